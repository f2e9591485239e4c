"""Spot checks of a push chain (node/client/inference_session.py, verification.py): a server that
the step was pushed to proves, with its signed receipt, that it computed from exactly what the
pushing server answered the client, so its answers are checked as any other's. A lying middle
server is caught, banned and its lies undone; an honest push chain is never accused and keeps
pushing; a push without that proof (a server that signs no receipts, a pusher that pushes another
input than it answers) is redone by the client, nobody banned."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from swarm_node import compression
from swarm_node.dht.receipts import Receipt, sign_receipt
from swarm_node.dht.routing import Hop
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.node.client.evidence import digest, recomputed_error, signed_by
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.push_proof import PushUnproven, proven
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from swarm_node.node.peer import Peer
from swarm_node.protocol.messages import StepResponse
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm
from tests.test_verification import NOISE, lie_in_answers, records_of

NEW_TOKENS = 16
PUSHED = ClientConfig(
    step_timeout=10.0, retry_delay=0.05, max_attempts=3, verify_rate=0.25, push=True
)


def expected_tokens(model: Path, input_ids: torch.Tensor) -> list[list[int]]:
    out = reference_model(model).generate(
        input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out.tolist()


async def chain_of(client: Peer, model: str, servers: list[Peer]) -> list[Hop]:
    """servers[0..2] as the chain 0:2, 2:4, 4:6."""
    records = await records_of(client, model, servers)
    return [Hop(records[s.peer_id], 2 * i, 2 * i + 2) for i, s in enumerate(servers[:3])]


def pushes_another_input(liar: Peer) -> None:
    """The liar answers the client honestly but pushes the next server a noisy copy."""
    server = liar.server
    assert server is not None
    opened = server._open

    async def opening(req: Any, sessions: Any, conn: Any) -> Any:
        reply = await opened(req, sessions, conn)
        link = server.sessions[reply.session_id].push
        if link is not None:
            honest = link.push

            async def lying(step_id: int, position: int, hidden: Any, *rest: Any) -> bool:
                noisy = NOISE(compression.decode(hidden, max_numel=1 << 20))
                return await honest(
                    step_id, position, compression.encode(noisy, hidden.codec), *rest
                )

            link.push = lying  # type: ignore[method-assign]
        return reply

    server._open = opening  # type: ignore[method-assign]


def signs_no_receipts(server_peer: Peer) -> None:
    """An older server: its answers carry no signed receipt."""
    assert server_peer.server is not None
    server_peer.server._receipt = lambda *_: ""  # type: ignore[method-assign]


def test_a_pushed_input_is_proven_only_by_the_servers_signature_over_it() -> None:
    key = create_new_key_pair()
    server = SimpleNamespace(peer_id=ID.from_pubkey(key.public_key).to_base58(), model_digest="d")
    span = SimpleNamespace(hop=SimpleNamespace(server=server, start=2, end=4), session_id="s1")
    given, other = (compression.encode(torch.randn(1, 1, 64), "float16") for _ in range(2))
    out = compression.encode(torch.randn(1, 1, 64), "float16")

    def answer(computed_from: Any, position: int = 7) -> StepResponse:
        receipt = Receipt(
            model="d",
            start=2,
            end=4,
            session_id="s1",
            step_id=3,
            position=position,
            input_digest=digest(computed_from),
            output_digest=digest(out),
        )
        signature = sign_receipt(receipt, key.private_key)
        return StepResponse(session_id="s1", step_id=3, hidden=out, receipt=signature)

    assert proven(span, 7, given, answer(given)) is given  # type: ignore[arg-type]
    unproven = [
        (given, answer(other)),  # it computed from another input than the client holds
        (given, answer(given, position=8)),  # a receipt of another step
        (None, answer(given)),  # nothing to compare with
        (given, StepResponse(session_id="s1", step_id=3, hidden=out)),  # no receipt at all
    ]
    for held, reply in unproven:
        with pytest.raises(PushUnproven):
            proven(span, 7, held, reply)  # type: ignore[arg-type]


async def test_a_lying_middle_server_of_a_push_chain_is_caught(tiny_llama: Path) -> None:
    # chain 0:2 -> liar 2:4 -> 4:6, every step after the first hop pushed; two more servers hold
    # 2:4 (a checker and a tie-breaker)
    model = tiny_llama.name
    torch.manual_seed(3)
    input_ids = torch.randint(0, 256, (1, 6))
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    spans = [(0, 2), (2, 4), (4, 6), (2, 4), (2, 4)]
    with trio.fail_after(240):
        async with local_swarm(tiny_llama, spans, client=PUSHED) as (servers, client):
            chain = await chain_of(client, model, servers)
            liar = servers[1]
            lie_in_answers(lambda _, out, __: NOISE(out))(liar)
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=model, num_blocks=6),
                SamplingConfig(max_new_tokens=NEW_TOKENS),
                chain=chain,
            )
            banned = client.bans.banned(trio.current_time())
            assert liar.server is not None
            pushed_to_liar = liar.server.pushed_steps
    assert ids.tolist() == expected_tokens(tiny_llama, input_ids)
    assert banned == {liar.peer_id}
    assert pushed_to_liar >= 1 and stats.rollbacks >= 1
    # the evidence holds the inputs as pushed, signed by the liar: anyone with 2:4 sees it wrong
    found = stats.findings[0]
    assert found.liar == liar.peer_id and found.evidence is not None
    assert signed_by(found.evidence)
    honest = BlockSpan.load(Checkpoint.open(tiny_llama), 2, 4)
    assert recomputed_error(found.evidence, honest) > found.bound


@pytest.mark.parametrize("rate", [1.0, 0.0])
async def test_an_honest_push_chain_is_checked_keeps_pushing_and_is_never_accused(
    tiny_llama: Path, rate: float
) -> None:
    # rate 0: no checks, no proofs asked; push as before
    model = tiny_llama.name
    torch.manual_seed(4)
    input_ids = torch.randint(0, 256, (2, 5))
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    always = ClientConfig(
        step_timeout=10.0, retry_delay=0.05, max_attempts=3, verify_rate=rate, push=True
    )
    spans = [(0, 2), (2, 4), (4, 6), (0, 6)]
    with trio.fail_after(180):
        async with local_swarm(tiny_llama, spans, client=always) as (servers, client):
            chain = await chain_of(client, model, servers)
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=model, num_blocks=6),
                SamplingConfig(max_new_tokens=NEW_TOKENS),
                chain=chain,
            )
            pushed = [s.server.pushed_steps for s in servers[:3] if s.server is not None]
            banned = client.bans.banned(trio.current_time())
    assert ids.tolist() == expected_tokens(tiny_llama, input_ids)
    assert not banned and stats.rollbacks == 0
    assert pushed == [0, NEW_TOKENS, NEW_TOKENS]  # the prompt and every decode step but the last
    if rate:
        assert stats.checked_positions >= 3 * (5 + NEW_TOKENS - 1)  # every answer of all three
    else:
        assert stats.checked_positions == 0


@pytest.mark.parametrize("misbehaviour", ["signs-no-receipts", "pushes-another-input"])
async def test_a_push_without_proof_of_its_input_is_redone_by_the_client(
    tiny_llama: Path, misbehaviour: str
) -> None:
    # the middle server signs nothing, or the first server pushes it another input than it
    # answers: the client cannot tell which lies, so it bans nobody, redoes the step from the
    # middle hop on and sends those hops every step itself from then on (all checked)
    model = tiny_llama.name
    torch.manual_seed(5)
    input_ids = torch.randint(0, 256, (1, 6))
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    always = ClientConfig(
        step_timeout=10.0, retry_delay=0.05, max_attempts=3, verify_rate=1.0, push=True
    )
    spans = [(0, 2), (2, 4), (4, 6), (0, 6)]
    with trio.fail_after(180):
        async with local_swarm(tiny_llama, spans, client=always) as (servers, client):
            chain = await chain_of(client, model, servers)
            if misbehaviour == "signs-no-receipts":
                signs_no_receipts(servers[1])
            else:
                pushes_another_input(servers[0])
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=model, num_blocks=6),
                SamplingConfig(max_new_tokens=NEW_TOKENS),
                chain=chain,
            )
            assert servers[1].server is not None
            pushed_to_middle = servers[1].server.pushed_steps
            banned = client.bans.banned(trio.current_time())
    assert ids.tolist() == expected_tokens(tiny_llama, input_ids)
    assert not banned and stats.rollbacks == 0
    assert pushed_to_middle == 1  # the first pushed step, redone; none pushed after it
    assert stats.checked_positions >= 3 * (6 + NEW_TOKENS - 1)
