"""Twenty peers in one process: every client finds every block through the DHT."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.swarm_helpers import LOOPBACK

pytestmark = pytest.mark.slow  # twenty peers: a minute of lookups

SERVERS = [(b, b + 1) for b in range(6)] * 2  # 12 servers: every block of the tiny model twice
CLIENTS = 8


async def test_twenty_peers_every_client_finds_every_block(tiny_llama: Path) -> None:
    rng = random.Random(0)
    with trio.fail_after(180):
        async with AsyncExitStack() as stack:
            peers: list[Peer] = []
            for start, end in SERVERS:
                # each newcomer bootstraps from a random earlier peer, not always the first
                initial = tuple(rng.choice(peers).addrs[:1]) if peers else ()
                peers.append(
                    await stack.enter_async_context(
                        open_peer(
                            PeerConfig(listen=LOOPBACK, initial_peers=initial),
                            server=ServerConfig(
                                model=str(tiny_llama), start=start, end=end, throughput=1.0
                            ),
                        )
                    )
                )
            clients = []
            for _ in range(CLIENTS):
                initial = tuple(rng.choice(peers).addrs[:1])
                clients.append(
                    await stack.enter_async_context(
                        open_peer(PeerConfig(listen=LOOPBACK, initial_peers=initial))
                    )
                )
            server_ids = {p.peer_id for p in peers}
            for client in clients:
                found = await client.find_servers(tiny_llama.name, 6)
                assert {r.peer_id for r in found} == server_ids
                covered = sorted((r.start, r.end) for r in found)
                assert covered == sorted(SERVERS)
                chain = await client.find_chain(tiny_llama.name, 6)
                assert [(h.start, h.end) for h in chain] == [(b, b + 1) for b in range(6)]
