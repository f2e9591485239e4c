"""Kept forward graphs (node/kept_graphs.py): a backward on the graph its forward kept gives the
gradients of the recompute path, and a missing, foreign or stale graph falls back to the recompute."""

from __future__ import annotations

from pathlib import Path

import torch
import trio
import trio.testing

from swarm_node import compression
from swarm_node.node.client.remote_sequential import RemoteSequential
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import request
from swarm_node.node.server.kept_graphs import KeptGraph, KeptGraphs
from swarm_node.protocol import messages as m
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm
from tests.test_remote_training import TOL, _client_lora
from tests.training_reference import blocks_output, lora_hooks


def _wire(t: torch.Tensor) -> m.WireTensor:
    return compression.encode(t, "none")


def _pass(remote, hidden, prompts, lora, weight):
    h = hidden.clone().requires_grad_(True)
    p = prompts.clone().requires_grad_(True)
    out = remote(h, p, lora.weights())
    (out * weight).sum().backward()
    grads = [t.grad.clone() for t in lora.parameters()]
    lora.zero_grad()
    return out.detach(), h.grad, p.grad, grads


async def test_kept_graphs_give_the_gradients_of_local_autograd_and_of_the_recompute(
    tiny_llama: Path,
) -> None:
    ref = reference_model(tiny_llama)
    torch.manual_seed(7)
    hidden, prompts, weight = (
        torch.randn(2, 6, 64),
        torch.randn(6, 2, 64) * 0.1,
        torch.randn(2, 6, 64),
    )
    lora, local_lora = _client_lora(0), _client_lora(0)
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, client):
            stores = [s.server.kept_graphs for s in servers]
            kept = RemoteSequential(client, model=tiny_llama.name, num_blocks=6)
            got = await trio.to_thread.run_sync(_pass, kept, hidden, prompts, lora, weight)
            hits = [(s.hits, s.misses, len(s)) for s in stores]
            plain = RemoteSequential(client, model=tiny_llama.name, num_blocks=6, keep_graphs=False)
            again = await trio.to_thread.run_sync(_pass, plain, hidden, prompts, lora, weight)
            after = [(s.hits, s.misses, len(s)) for s in stores]
            # an evaluation pass (no_grad in the thread that runs it): no backward will come, nothing kept
            await trio.to_thread.run_sync(
                lambda: torch.no_grad()(kept)(hidden, prompts.requires_grad_(True))
            )
            prompts.requires_grad_(False)
            await trio.to_thread.run_sync(
                kept, hidden
            )  # nothing requires grad: nothing kept either
            idle = [len(s) for s in stores]
            spans = [s.server.span for s in servers]
    assert hits == [(1, 0, 0), (1, 0, 0)]  # one hop per server, each backward on its kept graph
    assert after == hits  # the recompute path keeps nothing
    assert idle == [0, 0]
    h, p = hidden.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    with lora_hooks(ref, local_lora.weights()):
        out = blocks_output(ref, h, p)
    (out * weight).sum().backward()
    expected = [out.detach(), h.grad, p.grad, [t.grad for t in local_lora.parameters()]]
    for a, b, c in zip(got[:3], again[:3], expected[:3], strict=True):
        torch.testing.assert_close(a, c, **TOL)
        torch.testing.assert_close(a, b, **TOL)
    for a, b, c in zip(got[3], again[3], expected[3], strict=True):
        torch.testing.assert_close(a, c, **TOL)
        torch.testing.assert_close(a, b, **TOL)
    for span in spans:  # the servers' weights got no gradient
        assert all(p.grad is None and not p.requires_grad for p in span.parameters())


async def test_a_backward_naming_an_unknown_or_mismatched_graph_recomputes(
    tiny_llama: Path,
) -> None:
    torch.manual_seed(8)
    hidden, other, grad = torch.randn(2, 5, 64), torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    prompts = _wire(torch.randn(3, 2, 64) * 0.1)
    base = dict(model=tiny_llama.name, start=1, end=4, compression="none", prompts=prompts)

    def backward(x, graph_id=""):
        return m.BackwardRequest(
            **base, hidden=_wire(x), grad_output=_wire(grad), graph_id=graph_id
        )

    def grads(reply):
        return (
            compression.decode(reply.grad_input, max_numel=10**6),
            compression.decode(reply.grad_prompts, max_numel=10**6),
        )

    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, client):
            store = servers[0].server.kept_graphs
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )

            async def kept_forward(x):
                req = m.ForwardRequest(**base, hidden=_wire(x), keep_graph=True)
                return await request(conn, req, m.ForwardResponse, timeout=10)

            plain = grads(await request(conn, backward(hidden), m.BackwardResponse, timeout=10))
            first = await kept_forward(hidden)
            assert first.graph_id and len(store) == 1 and store.nbytes > 0
            unknown = grads(
                await request(
                    conn, backward(hidden, "no-such-graph"), m.BackwardResponse, timeout=10
                )
            )
            assert (store.hits, store.misses, len(store)) == (0, 1, 1)
            used = grads(
                await request(
                    conn, backward(hidden, first.graph_id), m.BackwardResponse, timeout=10
                )
            )
            assert (store.hits, store.misses, len(store)) == (1, 1, 0)
            twice = grads(
                await request(
                    conn, backward(hidden, first.graph_id), m.BackwardResponse, timeout=10
                )
            )
            assert (store.hits, store.misses) == (1, 2)  # used once: the second recomputes
            second = await kept_forward(hidden)
            wrong = grads(
                await request(
                    conn, backward(other, second.graph_id), m.BackwardResponse, timeout=10
                )
            )
            assert (store.hits, store.misses, len(store)) == (1, 3, 0)  # other inputs: recomputed
            other_plain = grads(
                await request(conn, backward(other), m.BackwardResponse, timeout=10)
            )
            await conn.close()
    for got in (unknown, used, twice):
        for a, b in zip(got, plain, strict=True):
            torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(wrong, other_plain, strict=True):
        torch.testing.assert_close(a, b, **TOL)


async def test_a_peer_keeps_at_most_its_limit_and_a_closed_stream_drops_them(
    tiny_llama: Path,
) -> None:
    req = m.ForwardRequest(
        model=tiny_llama.name,
        start=0,
        end=2,
        compression="none",
        hidden=_wire(torch.randn(1, 4, 64)),
        keep_graph=True,
    )
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, client):
            store = servers[0].server.kept_graphs
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            ids = [
                (await request(conn, req, m.ForwardResponse, timeout=10)).graph_id
                for _ in range(store.per_peer + 1)
            ]
            assert len(set(ids)) == len(ids) and all(ids)
            assert len(store) == store.per_peer and store.evicted == 1  # the oldest went
            old = m.BackwardRequest(
                model=tiny_llama.name,
                start=0,
                end=2,
                compression="none",
                hidden=req.hidden,
                grad_output=_wire(torch.ones(1, 4, 64)),
                graph_id=ids[0],
            )
            await request(conn, old, m.BackwardResponse, timeout=10)
            assert (store.hits, store.misses) == (0, 1)
            await conn.close()
            # the server notices the closed stream; the store has no event to wait on
            while len(store):  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert store.evicted == 1 + store.per_peer


def _graph(peer: str, nbytes: int = 10) -> KeptGraph:
    return KeptGraph(
        peer=peer,
        start=0,
        end=1,
        out=torch.zeros(1),
        inputs=[],
        has_prompts=False,
        owned_lora=False,
        adapter="",
        nbytes=nbytes,
    )


def test_the_store_evicts_by_peer_limit_budget_and_age() -> None:
    store = KeptGraphs(per_peer=2, ttl=60.0, budget_bytes=100)
    a1, a2 = store.put(_graph("a"), now=0.0), store.put(_graph("a"), now=1.0)
    b1 = store.put(_graph("b"), now=2.0)
    a3 = store.put(_graph("a"), now=3.0)  # a's oldest goes, b's stays
    assert store.count("a") == 2 and store.take(a1, "a", now=3.0) is None and store.evicted == 1
    assert (
        store.take(b1, "a", now=3.0) is None and store.count("b") == 1
    )  # another peer's: left alone
    assert store.put(_graph("c", nbytes=101), now=3.0) == ""  # over the whole budget: not kept
    store.put(_graph("c", nbytes=85), now=4.0)  # the oldest (a2, b1) go to make room
    assert store.take(a2, "a", now=4.0) is None and store.take(b1, "b", now=4.0) is None
    assert store.nbytes == 95 and len(store) == 2
    assert store.purge(now=63.0) == 1  # a3 (kept at 3.0) expired
    assert store.take(a3, "a", now=63.0) is None and len(store) == 1
    assert store.purge(now=64.0) == 1 and store.nbytes == 0 and len(store) == 0


def test_the_store_drops_a_peers_graphs_with_its_last_stream() -> None:
    store = KeptGraphs()
    store.stream_opened("a")
    store.stream_opened("a")
    kept = store.put(_graph("a"), now=0.0)
    store.stream_closed("a")
    assert len(store) == 1  # one of its streams is still open
    store.stream_closed("a")
    assert len(store) == 0 and store.take(kept, "a", now=0.0) is None


async def test_expiry_follows_the_trio_clock(mock_clock: trio.testing.MockClock) -> None:
    store = KeptGraphs(ttl=60.0)  # no checkpoint below: nothing to bound with a deadline
    kept = store.put(_graph("a"))
    assert store.take(kept, "a") is not None
    kept = store.put(_graph("a"))
    mock_clock.jump(59.0)
    assert store.purge(trio.current_time()) == 0
    mock_clock.jump(1.0)  # no real wait
    assert store.take(kept, "a") is None and store.evicted == 1
