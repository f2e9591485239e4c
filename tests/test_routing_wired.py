"""Routing in a live swarm: pings feed the client's RttEstimator, a server without cache room for a
session is left out of its chain, servers publish next_rtts."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.swarm_helpers import local_swarm


async def test_find_chain_feeds_rtt_estimator_and_respects_cache(tiny_llama: Path) -> None:
    # the one-hop server is the fastest chain, but its cache holds 32 tokens of one sequence
    small_cache = {"cache_budget_tokens": 32, "throughput": 1000.0}
    with trio.fail_after(60):
        async with local_swarm(
            tiny_llama, [(0, 6), (0, 3), (3, 6)], per_server=[small_cache, {}, {}]
        ) as (servers, client):
            fits = await client.find_chain(tiny_llama.name, 6, max_length=32)
            assert [(h.server.peer_id, h.start, h.end) for h in fits] == [
                (servers[0].peer_id, 0, 6)
            ]
            # the first chain's lookup stopped at the first records that cover it (here the
            # entry server's own: connected, it answered before the other provider keys did)
            assert servers[0].peer_id in client.rtt.as_dict()
            for max_length, batch_size in ((33, 1), (16, 3)):
                chain = await client.find_chain(
                    tiny_llama.name, 6, max_length=max_length, batch_size=batch_size
                )
                assert [(h.server.peer_id, h.start, h.end) for h in chain] == [
                    (servers[1].peer_id, 0, 3),
                    (servers[2].peer_id, 3, 6),
                ]
            rtts = client.rtt.as_dict()
            assert set(rtts) == {p.peer_id for p in servers}
            assert all(0 < r < 5 for r in rtts.values())


async def test_servers_publish_round_trips_to_next_servers(tiny_llama: Path) -> None:
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 2), (2, 4), (4, 6)]) as (servers, client):
            first, second, last = servers
            assert set(await first.measure_next_rtts()) == {second.peer_id}
            before = first.dht.queries_sent
            assert set(await first.measure_next_rtts()) == {second.peer_id}  # pings, no lookup
            assert first.dht.queries_sent == before
            assert set(await second.measure_next_rtts()) == {last.peer_id}
            assert await last.measure_next_rtts() == {}  # nothing after the last block
            await first.announce()
            await second.announce()
            records = {r.peer_id: r for r in await client.find_servers(tiny_llama.name, 6)}
            assert [p for p, _ in records[first.peer_id].next_rtts] == [second.peer_id]
            assert [p for p, _ in records[second.peer_id].next_rtts] == [last.peer_id]
            assert records[last.peer_id].next_rtts == ()
            assert all(0 < rtt < 5 for _, rtt in records[first.peer_id].next_rtts)
            # the client costs push hops with them: the chain still covers every block
            chain = await client.find_chain(tiny_llama.name, 6, push=True, max_length=8)
            assert [(h.start, h.end) for h in chain] == [(0, 2), (2, 4), (4, 6)]
