"""Push is really used: with every peer behind a delay proxy, a push token costs N + 1 one-way
delays and a client-star token 2N (medians over several steps, generous margins)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
import trio

from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.peer import Peer
from tests.swarm_helpers import proxied_swarm

pytestmark = pytest.mark.slow  # real-time delays through proxies

DELAY = 0.1  # seconds one way, in front of every peer: large against the few ms a hop adds
H = 64  # hidden size of the tiny models
STEPS = 9


async def median_step_time(client: Peer, chain: list, model: str, *, push: bool) -> float:
    times = []
    async with client.inference_session(
        chain, SessionSettings(model=model, push=push, max_length=STEPS + 4)
    ) as s:
        await s.step(torch.randn(1, 3, H))  # prefill; opens nothing new after this
        for _ in range(STEPS):
            t0 = trio.current_time()
            await s.step(torch.randn(1, 1, H))
            times.append(trio.current_time() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("n", [2, 3])
async def test_push_costs_n_plus_one_delays_client_star_2n(tiny_llama: Path, n: int) -> None:
    spans = {2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}[n]
    with trio.fail_after(120):  # ~25-40 s here: setting up through the proxies takes most of it
        async with trio.open_nursery() as nursery:
            async with proxied_swarm(tiny_llama, spans, DELAY, nursery) as (servers, client):
                chain = await client.find_chain(tiny_llama.name, 6, push=True, max_length=16)
                assert [(h.start, h.end) for h in chain] == spans
                assert all(2 * DELAY <= rtt < 3 * DELAY for rtt in client.rtt.as_dict().values())
                star = await median_step_time(client, chain, tiny_llama.name, push=False)
                push = await median_step_time(client, chain, tiny_llama.name, push=True)
                assert [p.server.pushed_steps for p in servers][1:] == [STEPS + 1] * (n - 1)
            nursery.cancel_scope.cancel()
    print(f"n={n}: push {push * 1000:.1f} ms, client-star {star * 1000:.1f} ms a token")
    # client -> first -> ... -> last -> client: nearer N + 1 delays than 2N (compute and the
    # in-process peers add a few ms per hop on top)
    assert (n + 1) * DELAY <= push < (3 * n + 1) / 2 * DELAY
    assert 2 * n * DELAY <= star < (2 * n + 1.5) * DELAY  # a round trip per hop
