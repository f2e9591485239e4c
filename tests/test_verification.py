"""Spot checks (node/client/verification.py): a server that computes wrongly is caught by another
server holding its blocks, confirmed by a third, banned, and the session rolled back, so that
generate() returns the tokens of the honest swarm (transformers' own); honest servers mixing
dtypes, weights and codecs are never accused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node.dht.routing import Hop
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.node.client.evidence import Evidence, recomputed_error, signed_by
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from swarm_node.node.peer import Peer
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm


async def records_of(client: Peer, model: str, servers: list[Peer]) -> dict[str, Any]:
    """Every server's record, once a lookup finds them all (a provider record of a block may be
    published a little after the server's own)."""
    wanted = {s.peer_id for s in servers}
    while True:
        records = {r.peer_id: r for r in await client.find_servers(model, 6)}
        if wanted <= set(records):
            return records
        await trio.sleep(0.2)


CHECKED = ClientConfig(step_timeout=10.0, retry_delay=0.05, max_attempts=3, verify_rate=0.25)


def lie_in_answers(bad: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> Any:
    """Make ``liar`` answer ``bad(input, output, step)`` for every step it computes (its cache
    holds the honest keys and values): the attacker's own code, injected in its process."""

    def install(liar: Peer) -> None:
        server = liar.server
        assert server is not None
        compute = server._compute_step
        steps = [0]

        async def lying(session: Any, hidden: torch.Tensor) -> torch.Tensor:
            out = await compute(session, hidden)
            steps[0] += 1
            return bad(hidden, out, steps[0])

        server._compute_step = lying

    return install


def skip_last_block(liar: Peer) -> None:
    """The liar's last block adds nothing to the residual stream: its output is its input."""
    assert liar.server is not None
    layer = liar.server.span.layers[-1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def noisy(scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return lambda out: out * (1 + scale * torch.randn(out.shape, generator=generator))


NOISE = noisy(0.01)
TENTH = noisy(0.05)
MISBEHAVIOURS = {
    "noise-1pct": lie_in_answers(lambda _, out, __: NOISE(out)),
    "one-step-in-ten": lie_in_answers(lambda _, out, step: TENTH(out) if step % 10 == 0 else out),
    "skips-last-block": skip_last_block,
    "returns-input": lie_in_answers(lambda hidden, out, _: hidden.to(out.dtype)),
}


@pytest.mark.parametrize("misbehaviour", list(MISBEHAVIOURS))
async def test_a_lying_server_is_caught_banned_and_its_lies_undone(
    tiny_llama: Path, misbehaviour: str
) -> None:
    # the liar carries blocks 0-2 of the chain; two honest servers hold the same blocks (a checker
    # and a tie-breaker), two more blocks 3-5
    model = tiny_llama.name
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    expected = reference_model(tiny_llama).generate(
        input_ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    spans = [(0, 3), (3, 6), (0, 3), (0, 3), (3, 6)]
    with trio.fail_after(240):
        async with local_swarm(tiny_llama, spans, client=CHECKED) as (servers, client):
            liar, tail = servers[0], servers[1]
            records = await records_of(client, model, servers)
            chain = [Hop(records[liar.peer_id], 0, 3), Hop(records[tail.peer_id], 3, 6)]
            MISBEHAVIOURS[misbehaviour](liar)
            taken: list[int] = []
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=model, num_blocks=6),
                SamplingConfig(max_new_tokens=24),
                chain=chain,
                on_retract=taken.append,
            )
            now = trio.current_time()
            banned = client.bans.banned(now)
    assert ids.tolist() == expected.tolist()
    assert banned == {liar.peer_id}
    assert stats.rollbacks >= 1 and stats.new_tokens == 24
    assert client.bans.is_banned(liar.peer_id, now + CHECKED.verify_ban - 60)
    # the evidence: the liar signed each input and answer; anyone with blocks 0-2 sees it wrong
    found = stats.findings[0]
    evidence = found.evidence
    assert found.liar == liar.peer_id and evidence is not None and signed_by(evidence)
    honest = BlockSpan.load(Checkpoint.open(tiny_llama), 0, 3)
    assert recomputed_error(evidence, honest) > found.bound
    forged = Evidence(server=tail.peer_id, steps=evidence.steps, wrong=evidence.wrong)
    assert not signed_by(forged)  # nobody can pin it on another server


async def test_an_honest_swarm_is_checked_and_never_accused(tiny_llama: Path) -> None:
    # every step checked (rate 1): the answers compared position by position agree
    model = tiny_llama.name
    torch.manual_seed(1)
    input_ids = torch.randint(0, 256, (2, 5))
    expected = reference_model(tiny_llama).generate(
        input_ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    always = ClientConfig(step_timeout=10.0, retry_delay=0.05, max_attempts=3, verify_rate=1.0)
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6), (0, 6)], client=always) as (
            _,
            client,
        ):
            for _ in range(2):
                ids, stats = await generate_tokens(
                    client,
                    head,
                    input_ids,
                    SessionSettings(model=model, num_blocks=6),
                    SamplingConfig(max_new_tokens=10),
                )
                assert ids.tolist() == expected.tolist()
                assert stats.rollbacks == 0
                assert stats.checked_positions >= 5 + 9  # every answer of the chain's servers
            assert not client.bans.banned(trio.current_time())


MIXED = [  # a session's servers compute in its dtype: float32 here, weights as held
    {"compression": "none"},
    {"quant": "int8", "compression": "float16"},
    {"compression": "blockwise8"},
    {"compression": "bfloat16"},
    {"quant": "int8", "compression": "none"},
    {"compression": "blockwise8-64"},
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_honest_servers_of_any_weights_and_codec_are_never_accused(
    tiny_llama: Path, dtype: str
) -> None:
    # sessions in ``dtype`` on servers holding it or int8 weights, each answering in another codec,
    # every step checked: each chain's servers compared with others within the calibrated bounds
    # (a session's servers all compute in its dtype); nobody is accused
    model = tiny_llama.name
    head = ClientHead.load(Checkpoint.open(tiny_llama), dtype=TORCH_DTYPES[dtype])
    always = ClientConfig(step_timeout=20.0, retry_delay=0.05, max_attempts=3, verify_rate=1.0)
    spans = [(0, 3)] * 3 + [(3, 6)] * 3
    torch.manual_seed(2)
    with trio.fail_after(240):
        async with local_swarm(tiny_llama, spans, dtype=dtype, client=always, per_server=MIXED) as (
            servers,
            client,
        ):
            records = await records_of(client, model, servers)
            for i in range(3):
                chain = [
                    Hop(records[servers[i].peer_id], 0, 3),
                    Hop(records[servers[3 + (i + 1) % 3].peer_id], 3, 6),
                ]
                _, stats = await generate_tokens(
                    client,
                    head,
                    torch.randint(0, 256, (1, 6)),
                    SessionSettings(model=model, num_blocks=6, dtype=dtype),
                    SamplingConfig(max_new_tokens=8),
                    chain=chain,
                )
                assert stats.rollbacks == 0
                assert stats.checked_positions >= 2 * (6 + 7)
            assert not client.bans.banned(trio.current_time())
