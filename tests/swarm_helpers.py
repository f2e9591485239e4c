"""A local swarm in one process: real libp2p hosts on 127.0.0.1, a real DHT, real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.delay_proxy import DelayProxy

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@asynccontextmanager
async def local_swarm(
    model: Path | str,
    spans: Sequence[tuple[int, int]],
    *,
    dtype: str = "float32",
    client: ClientConfig | None = None,
    max_frame_size: int | None = None,
    per_server: Sequence[dict[str, Any]] | None = None,
    **server_fields: Any,
) -> AsyncIterator[tuple[list[Peer], Peer]]:
    """Servers for ``spans`` (the first one starts the swarm) and a client peer joined to it.

    ``per_server``: ServerConfig fields for each server, over ``server_fields``."""
    frames = {} if max_frame_size is None else {"max_frame_size": max_frame_size}
    async with AsyncExitStack() as stack:
        servers: list[Peer] = []
        for i, (start, end) in enumerate(spans):
            own = per_server[i] if per_server is not None else {}
            initial = tuple(servers[0].addrs[:1]) if servers else ()
            server = ServerConfig(
                model=str(model), start=start, end=end, dtype=dtype, throughput=100.0
            )
            peer = await stack.enter_async_context(
                open_peer(
                    PeerConfig(listen=LOOPBACK, initial_peers=initial, **frames),
                    server=replace(server, **{**server_fields, **own}),
                )
            )
            servers.append(peer)
        client_peer = await stack.enter_async_context(
            open_peer(
                PeerConfig(listen=LOOPBACK, initial_peers=tuple(servers[0].addrs[:1]), **frames),
                client=client,
            )
        )
        yield servers, client_peer


@asynccontextmanager
async def proxied_swarm(
    model: Path | str,
    spans: Sequence[tuple[int, int]],
    delay: float,
    nursery: trio.Nursery,
    *,
    client: ClientConfig | None = None,
    **server_fields: Any,
) -> AsyncIterator[tuple[list[Peer], Peer]]:
    """Every peer, the client too, behind its own proxy and announcing only the proxy's address:
    every connection passes exactly one proxy (the dialed peer's), so every link has ``delay``."""
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        entry: tuple[str, ...] = ()
        for span in [*spans, None]:
            proxy = DelayProxy(
                target_port=0, delay=delay
            )  # the target is known once the peer listens
            port = await nursery.start(proxy.run)
            # public at the proxy's address, which forwards only once the peer listens (an
            # AutoNAT dial back before that would find it private)
            config = PeerConfig(
                listen=LOOPBACK,
                initial_peers=entry,
                announce_addrs=(f"/ip4/127.0.0.1/tcp/{port}",),
                reachability="public",
            )
            server = None
            if span is not None:
                fields = {"throughput": 1000.0, **server_fields}
                server = ServerConfig(model=str(model), start=span[0], end=span[1], **fields)
            peer = await stack.enter_async_context(
                open_peer(config, server=server, client=client if server is None else None)
            )
            proxy.target_port = int(peer.host.get_transport_addrs()[0].value_for_protocol("tcp"))
            assert peer.addrs == [f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer.peer_id}"]
            entry = entry or tuple(peer.addrs)
            peers.append(peer)
        yield peers[:-1], peers[-1]
