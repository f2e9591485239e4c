"""Lookups past peers that accept DHT streams and never answer: each query has its own deadline."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from libp2p import new_host
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.network.config import ConnectionConfig
from multiaddr import Multiaddr

from swarm_node.dht.discovery import LOOKUP_ROUNDS, QUERY_TIMEOUT
from swarm_node.node.config import PeerConfig
from swarm_node.node.peer import open_peer
from tests.swarm_helpers import LOOPBACK, local_swarm

pytestmark = pytest.mark.slow  # waits out query deadlines by design

SILENT = 8  # as many as the queries a peer keeps in flight at once


@asynccontextmanager
async def silent_peer() -> AsyncIterator[str]:
    """A real libp2p host that speaks the DHT protocol, reads each request and never answers."""
    host = new_host(
        key_pair=create_new_key_pair(),
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )

    async def swallow(stream: INetStream) -> None:
        while await stream.read(4096):  # until the asker gives up; no answer, ever
            pass

    host.set_stream_handler(KAD_PROTOCOL, swallow)
    async with host.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
        yield f"{host.get_addrs()[0]}/p2p/{host.get_id().to_base58()}"


async def test_lookup_finds_every_server_past_silent_peers(tiny_llama: Path) -> None:
    # The client knows the silent peers first (they are its initial peers), so its first queries
    # go to them: every query must give up on its own deadline, and the queries queued behind
    # them must not each wait that deadline again for a peer already found silent.
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            servers, _ = await stack.enter_async_context(local_swarm(tiny_llama, [(0, 3), (3, 6)]))
            silent = [await stack.enter_async_context(silent_peer()) for _ in range(SILENT)]
            client = await stack.enter_async_context(
                open_peer(PeerConfig(listen=LOOPBACK, initial_peers=(*silent, servers[0].addrs[0])))
            )
            # each silent peer costs one query deadline, not one for every query queued behind it
            # (that took 6 deadlines, 18 s, here: queued queries each waited QUERY_TIMEOUT for it)
            with trio.fail_after(4 * QUERY_TIMEOUT):
                found = await client.find_servers(tiny_llama.name, 6)
            assert sorted((r.start, r.end) for r in found) == [(0, 3), (3, 6)]
            assert {r.peer_id for r in found} == {s.peer_id for s in servers}
            assert len(client.dht._unreachable) == SILENT


async def test_announcing_past_silent_peers_takes_one_query_deadline(tiny_llama: Path) -> None:
    # A server whose routing table is full of peers that never answer: its re-announcement (record
    # and 6 provider records) costs at most a lookup's rounds and one store, each one query deadline
    # (9 s here), and reaches the others. KadDHT's own put_value and provide took 40 s here (their
    # lookup's 30 s cap, then a 10 s store), and left remote slots taken when cut off.
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr

    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            (server, other), client = await stack.enter_async_context(
                local_swarm(tiny_llama, [(0, 6), (0, 6)])
            )
            silent = [await stack.enter_async_context(silent_peer()) for _ in range(SILENT)]
            for addr in silent:
                info = info_from_p2p_addr(Multiaddr(addr))
                await server.host.connect(info)
                await server.dht.add_bootstrap_peer(info.peer_id)
            started = trio.current_time()
            await server.announce()
            took = trio.current_time() - started
            announced = server.announced  # leaving the swarm announces OFFLINE after this
            record = await client.dht.get_record(ID.from_base58(server.peer_id))
            # the other server holds the new record too (stored there, not only asked for)
            held = other.dht.kad.value_store.get(f"/swarmnode/{server.peer_id}".encode())
    assert took < (LOOKUP_ROUNDS + 1) * QUERY_TIMEOUT, took
    assert record is not None and announced is not None and record.seq == announced.seq
    assert held is not None and held.value and len(server.dht._unreachable) == SILENT
