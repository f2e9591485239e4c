"""The swarm outlives the peer it was bootstrapped from: new peers join through others and find blocks."""

from __future__ import annotations

from pathlib import Path

import trio

from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.swarm_helpers import LOOPBACK


async def hold_peer(
    config: PeerConfig,
    server: ServerConfig | None,
    stop: trio.Event,
    stopped: trio.Event | None = None,
    *,
    task_status: trio.TaskStatus[Peer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A peer in its own task, so it can leave before peers started after it."""
    try:
        async with open_peer(config, server=server) as peer:
            task_status.started(peer)
            await stop.wait()
    finally:
        if stopped is not None:
            stopped.set()


async def test_bootstrap_peer_dies_new_peers_still_join_and_find_blocks(tiny_llama: Path) -> None:
    def serving(start: int, end: int) -> ServerConfig:
        return ServerConfig(model=str(tiny_llama), start=start, end=end, throughput=100.0)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            stop_bootstrap, bootstrap_stopped, stop_all = trio.Event(), trio.Event(), trio.Event()
            bootstrap = await nursery.start(
                hold_peer, PeerConfig(listen=LOOPBACK), None, stop_bootstrap, bootstrap_stopped
            )
            via_bootstrap = PeerConfig(listen=LOOPBACK, initial_peers=tuple(bootstrap.addrs))
            first = await nursery.start(hold_peer, via_bootstrap, serving(0, 3), stop_all)
            second = await nursery.start(hold_peer, via_bootstrap, serving(3, 6), stop_all)
            old_client = await nursery.start(hold_peer, via_bootstrap, None, stop_all)
            chain = await old_client.find_chain(tiny_llama.name, 6)
            assert [h.server.peer_id for h in chain] == [first.peer_id, second.peer_id]

            gone = bootstrap.peer_id
            stop_bootstrap.set()
            await bootstrap_stopped.wait()  # its host is closed, its connections with it

            # a new server joins through a surviving peer; new and old clients find every server
            via_first = PeerConfig(listen=LOOPBACK, initial_peers=tuple(first.addrs))
            third = await nursery.start(hold_peer, via_first, serving(0, 6), stop_all)
            new_client = await nursery.start(
                hold_peer,
                PeerConfig(listen=LOOPBACK, initial_peers=tuple(second.addrs)),
                None,
                stop_all,
            )
            expected = {(first.peer_id, 0, 3), (second.peer_id, 3, 6), (third.peer_id, 0, 6)}
            for client in (new_client, old_client):
                found = await client.find_servers(tiny_llama.name, 6)
                assert {(s.peer_id, s.start, s.end) for s in found} == expected
                chain = await client.find_chain(tiny_llama.name, 6)
                assert chain[0].start == 0 and chain[-1].end == 6
                assert gone not in {h.server.peer_id for h in chain}
            stop_all.set()
