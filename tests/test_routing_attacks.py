"""Routing among strangers, against real hosts on loopback: what a server claims is capped by what
the client measured or by the other servers' claims, one server carries a bounded share of a client's
chains, and a server pushing bad hidden states is the one blamed (not the server that refused them).

Each test runs an honest client's generation at the same time, which must give transformers' tokens.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node.dht.routing import Hop, trusted_throughputs
from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.remote_sequential import RemoteSequential
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig, PeerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.attacks import AttackTarget
from tests.attacks.routing import attack_push_liar, attack_throughput_liar, lie_in_pushes
from tests.model_fixtures import reference_model
from tests.swarm_helpers import LOOPBACK, local_swarm
from tests.training_reference import blocks_output

H = 64
# a server may compute a step together with the honest client's (tests/test_batching.py's bound)
BATCHED = {"atol": 1e-4, "rtol": 1e-4}
FAST = ClientConfig(step_timeout=5.0, retry_delay=0.05, max_attempts=3)


async def honest_generation(model_path: Path, servers: list[Peer], results: dict[str, Any]) -> None:
    """Generate 10 tokens as an honest client of its own joined to ``servers``; the ids (and
    transformers' ids for the same prompt) go to ``results``."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    results["expected"] = reference_model(model_path).generate(
        input_ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(model_path))
    joined = PeerConfig(listen=LOOPBACK, initial_peers=tuple(servers[0].addrs[:1]))
    async with open_peer(joined, client=FAST) as client:
        results["ids"], _ = await generate_tokens(
            client,
            head,
            input_ids,
            SessionSettings(model=model_path.name, num_blocks=6),
            SamplingConfig(max_new_tokens=10),
        )


def exact(results: dict[str, Any]) -> bool:
    return results["ids"].tolist() == results["expected"].tolist()


async def attack_beside_honest(path: Path, attack: Any) -> dict[str, Any]:
    """``attack`` against a 2-server local swarm while an honest client generates (``exact``):
    its verdict, the honest results, and the sessions the second server holds afterwards."""
    results: dict[str, Any] = {}
    with trio.fail_after(120):
        async with local_swarm(path, [(0, 3), (3, 6)]) as (servers, _):
            target = AttackTarget(
                model=path.name, model_path=path, servers=tuple(p.addrs[0] for p in servers)
            )

            async def run() -> None:
                results["stopped"] = await attack(target)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                nursery.start_soon(honest_generation, path, servers, results)
            assert servers[1].server is not None
            results["target_sessions"] = len(servers[1].server.sessions)
    return results


async def test_a_throughput_liar_carries_at_most_its_share_of_a_clients_chains(
    tiny_llama: Path,
) -> None:
    # the attack serves every block honestly but announces 1e6 tokens/s (signed: records.py's
    # ceiling); an honest client's 40 chains (inference and training) go through it at most half
    # the time, and it ranks as the honest servers' claims, not 1e6
    results = await attack_beside_honest(tiny_llama, attack_throughput_liar)
    assert results["stopped"] is True
    assert exact(results)


async def test_a_liar_ranks_as_the_others_claims_then_as_what_was_measured(
    tiny_llama: Path,
) -> None:
    # three servers of every block, one claiming 1e6 tokens/s; the share bound is off here
    # (max_server_share=1), so only the throughput cap keeps the liar from every training draw
    model = tiny_llama.name
    unbounded = ClientConfig(step_timeout=5.0, max_server_share=1.0)
    results: dict[str, Any] = {}
    with trio.fail_after(120):
        async with local_swarm(
            tiny_llama,
            [(0, 6), (0, 6), (0, 6)],
            client=unbounded,
            per_server=[{"throughput": 1e6}, {}, {}],
        ) as (servers, client):
            liar = servers[0].peer_id

            async def draws() -> None:
                rng = random.Random(1)
                chains = [
                    await client.route(SessionSettings(model=model), 0, 6, rng=rng, max_age=60)
                    for _ in range(60)
                ]
                results["through_liar"] = sum(c[0].server.peer_id == liar for c in chains)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(draws)
                nursery.start_soon(honest_generation, tiny_llama, servers, results)
            assert client.observed.get(liar) is None
            records = {r.peer_id: r for r in await client.find_servers(model, 6)}
            before = {
                r.peer_id: r.throughput for r in trusted_throughputs(list(records.values()), {})
            }
            assert before[liar] == 200.0  # twice the others' claims (100 tokens/s), not 1e6
            settings = SessionSettings(model=model, max_length=8)
            async with client.inference_session([Hop(records[liar], 0, 6)], settings) as s:
                for x in [torch.randn(1, 3, H)] + [torch.randn(1, 1, H) for _ in range(3)]:
                    await s.step(x)
            measured = client.observed.get(liar)
            assert measured is not None and measured < 1e6
            trusted = trusted_throughputs(list(records.values()), client.observed.as_dict())
            assert {r.peer_id: r.throughput for r in trusted}[liar] == measured
    # capped at twice an honest server: half of 60 draws; all 60 if its claim were believed
    assert results["through_liar"] < 45
    assert exact(results)


def lie_in_answers_and_pushes(liar: Peer) -> None:
    """The liar's blocks answer NaN for every one-token step (to the client and in its pushes)."""
    run_span = liar.server._run_span

    def lying(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = run_span(hidden, *args, **kwargs)
        return out * float("nan") if hidden.shape[1] == 1 else out

    liar.server._run_span = lying


LIES = {
    "nan-everywhere": lie_in_answers_and_pushes,
    "pushes-nan": lie_in_pushes(lambda out: out * float("nan")),
    "pushes-wrong-shape": lie_in_pushes(lambda out: out[..., : H // 2].contiguous()),
    "pushes-wrong-dtype": lie_in_pushes(lambda out: out.to(torch.bfloat16)),
}


@pytest.mark.parametrize("lie", list(LIES))
async def test_a_server_pushing_bad_hidden_states_is_the_one_banned(
    tiny_llama: Path, lie: str
) -> None:
    # push mode: the liar (blocks 0-2) sends its output straight to the server of blocks 3-5, which
    # refuses it (bad_push); the liar is banned and replaced, never the server that refused, and
    # the outputs are the honest chain's to the bit, but for batching with the honest client's steps
    model = tiny_llama.name
    torch.manual_seed(5)
    inputs = [torch.randn(1, 6, H)] + [torch.randn(1, 1, H) for _ in range(3)]
    results: dict[str, Any] = {}
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6), (0, 3)], client=FAST) as (
            servers,
            client,
        ):
            liar, refuser, spare = servers
            records = {r.peer_id: r for r in await client.find_servers(model, 6)}
            chain = [Hop(records[liar.peer_id], 0, 3), Hop(records[refuser.peer_id], 3, 6)]
            star = SessionSettings(model=model, max_length=16)
            async with client.inference_session(chain, star) as honest:
                expected = [await honest.step(x) for x in inputs]
            pushed = SessionSettings(model=model, max_length=16, push=True)

            async def lied_to() -> None:
                async with client.inference_session(chain, pushed) as s:
                    assert [span.pushes for span in s._spans] == [True, False]
                    LIES[lie](liar)
                    results["outputs"] = [await s.step(x) for x in inputs]
                    results["slots"] = [
                        [span.hop.server.peer_id for span in slot.spans] for slot in s._slots
                    ]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lied_to)
                nursery.start_soon(honest_generation, tiny_llama, servers, results)
            now = trio.current_time()
            assert client.bans.is_banned(liar.peer_id, now)
            assert not client.bans.is_banned(refuser.peer_id, now)
            assert results["slots"] == [[spare.peer_id], [refuser.peer_id]]
    for out, ref in zip(results["outputs"], expected, strict=True):
        torch.testing.assert_close(out, ref, **BATCHED)
    assert exact(results)


async def test_a_training_hop_answering_another_dtype_is_the_one_banned(tiny_llama: Path) -> None:
    # client-star training: the client checks each forward answer (shape, dtype, finite) before it
    # sends it on, so the liar answering bfloat16 for float32 is banned, never the next hop that
    # would have refused it; every pass's output is the local model's
    ref = reference_model(tiny_llama)
    torch.manual_seed(6)
    hidden = torch.randn(2, 5, H)
    expected = blocks_output(ref, hidden).detach()
    results: dict[str, Any] = {}
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6), (0, 3)], client=FAST) as (
            servers,
            client,
        ):
            liar, following, _ = servers
            forward = liar.server.span.forward
            liar.server.span.forward = lambda *a, **kw: forward(*a, **kw).to(torch.bfloat16)

            async def passes() -> None:
                remote = RemoteSequential(client, model=tiny_llama.name, num_blocks=6, seed=0)
                results["outputs"] = []
                for _ in range(12):  # until the liar was drawn (half the draws: it claims as much)
                    results["outputs"].append(await trio.to_thread.run_sync(remote, hidden))
                    if client.bans.is_banned(liar.peer_id, trio.current_time()):
                        break

            async with trio.open_nursery() as nursery:
                nursery.start_soon(passes)
                nursery.start_soon(honest_generation, tiny_llama, servers, results)
            now = trio.current_time()
            assert client.bans.is_banned(liar.peer_id, now)
            assert not client.bans.is_banned(following.peer_id, now)
    for out in results["outputs"]:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-6)
    assert exact(results)


async def test_the_push_liar_attack_is_stopped(tiny_llama: Path) -> None:
    # the same lie from a server the attacker runs (tests/attacks/routing.py): an honest client in
    # push mode bans the liar, not the target server it pushed NaN to, and its outputs are exact
    results = await attack_beside_honest(tiny_llama, attack_push_liar)
    assert results["target_sessions"] == 0  # the target server closed the liar's sessions too
    assert results["stopped"] is True
    assert exact(results)


async def test_a_push_that_never_comes_bans_no_one_and_the_client_sends_it(
    tiny_llama: Path,
) -> None:
    # a server that says it pushed (pushed=True) but sent nothing, or a next server that ignored
    # the push: the client cannot tell them apart, so after the step deadline it sends the step
    # itself, bans neither, and sends that link's steps from then on; the outputs stay exact
    model = tiny_llama.name
    torch.manual_seed(7)
    inputs = [torch.randn(1, 6, H)] + [torch.randn(1, 1, H) for _ in range(3)]
    quick = ClientConfig(step_timeout=2.0, retry_delay=0.05, max_attempts=3)
    results: dict[str, Any] = {}
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)], client=quick) as (servers, client):
            liar, following = servers
            records = {r.peer_id: r for r in await client.find_servers(model, 6)}
            chain = [Hop(records[liar.peer_id], 0, 3), Hop(records[following.peer_id], 3, 6)]
            async with client.inference_session(
                chain, SessionSettings(model=model, max_length=16)
            ) as honest:
                expected = [await honest.step(x) for x in inputs]

            async def silent(step_id: int, position: int, hidden: Any, *_: Any) -> bool:
                return True  # "pushed" (and any roll back or reorder with it)

            async def lied_to() -> None:
                pushed = SessionSettings(model=model, max_length=16, push=True)
                async with client.inference_session(chain, pushed) as s:
                    assert liar.server is not None
                    for session in liar.server.sessions.values():
                        if session.push is not None:
                            session.push.push = silent
                    results["outputs"] = [await s.step(x) for x in inputs]
                    results["pushes"] = [span.pushes for span in s._spans]
                    results["peers"] = [span.hop.server.peer_id for span in s._spans]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lied_to)
                nursery.start_soon(honest_generation, tiny_llama, servers, results)
            now = trio.current_time()
            assert not client.bans.banned(now)
    assert results["peers"] == [liar.peer_id, following.peer_id]
    assert results["pushes"] == [False, False]  # the lost link is off
    for out, ref in zip(results["outputs"], expected, strict=True):
        torch.testing.assert_close(out, ref, **BATCHED)
    assert exact(results)
