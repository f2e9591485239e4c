"""The library's front door: ``async with open_peer(config) as peer:``, a peer of the swarm.

A peer always has a libp2p host and a seat in the DHT; it serves blocks when given a ServerConfig and
runs inference sessions over the swarm as a client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import torch
import trio
from libp2p import new_host
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from swarm_node import __version__
from swarm_node.dht.discovery import SwarmDHT
from swarm_node.dht.records import MAX_NEXT_RTTS, ServerRecord
from swarm_node.dht.routing import Hop, RttEstimator, choose_inference_chain, server_rtts
from swarm_node.errors import ConfigError, SwarmError
from swarm_node.node.adapters import load_server_adapters
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig
from swarm_node.node.identity import load_or_create_identity
from swarm_node.node.inference_session import InferenceSession, open_stream, request
from swarm_node.node.server import TORCH_DTYPES, BlockServer, measure_throughput
from swarm_node.node.swarm_key import load_swarm_key
from swarm_node.protocol import PROTOCOL_ID
from swarm_node.protocol import messages as m

log = logging.getLogger(__name__)

PING_TIMEOUT = 5.0


def model_id_of(model: str) -> str:
    """The name a model is announced under: a bundled name as is, a folder by its last component."""
    from swarm_node.model import BUNDLED_MODELS

    if model in BUNDLED_MODELS:
        return model
    return model.rstrip("/").rsplit("/", 1)[-1]


def _parse_multiaddr(text: str, field: str) -> Multiaddr:
    try:
        return Multiaddr(text)
    except Exception as exc:  # multiaddr raises several types for bad text
        raise ConfigError(f"{field!r} must be a multiaddr like /ip4/127.0.0.1/tcp/31337/p2p/12D3..., got {text!r}: {exc}") from None


class Peer:
    """A running peer. Made by ``open_peer``; do not construct directly."""

    def __init__(self, host: Any, dht: SwarmDHT, config: PeerConfig, client: ClientConfig) -> None:
        self.host = host
        self.dht = dht
        self.config = config
        self.client_config = client
        self.server: BlockServer | None = None
        self.compute_limiter = trio.CapacityLimiter(1)
        self._seq = 0
        self.rtt = RttEstimator()  # smoothed round trips to the servers this peer pinged
        self.next_rtt = RttEstimator()  # a server's round trips to the servers of its next blocks

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs of this peer, with /p2p/<id>, to give others as --initial-peers."""
        out = []
        for addr in self.host.get_addrs():
            text = str(addr)
            if "/p2p/" not in text:
                text = f"{text}/p2p/{self.peer_id}"
            out.append(text)
        return out

    # -- serving ---------------------------------------------------------------------------------
    async def _start_serving(
        self, config: ServerConfig, prepared: tuple[Any, float, dict[str, Any]], nursery: trio.Nursery
    ) -> None:
        span, throughput, adapters = prepared
        self.server = BlockServer(
            adapters=adapters,
            span=span,
            model_id=model_id_of(config.model),
            config=config,
            max_frame_size=self.config.max_frame_size,
            compute_limiter=self.compute_limiter,
            throughput=throughput,
            host=self.host,
        )
        self.host.set_stream_handler(PROTOCOL_ID, self.server.handle_stream)
        await self.announce()
        nursery.start_soon(self._announce_loop)
        log.info(
            "serving blocks %d:%d of %s (%s, %.1f tokens/s)",
            config.start, config.end, self.server.model_id, config.dtype, throughput,
        )

    def _record(self, state: str, ttl: float) -> ServerRecord:
        assert self.server is not None
        self._seq += 1
        return ServerRecord(
            peer_id=self.peer_id,
            addrs=tuple(self.addrs),
            model=self.server.model_id,
            start=self.server.start,
            end=self.server.end,
            throughput=float(self.server.throughput),
            cache_tokens_left=self.server.cache_tokens_left,
            dtype=self.server.config.dtype,
            version=__version__,
            quant=self.server.config.quant or "none",
            adapters=tuple(sorted(self.server.adapters)),
            bytes_per_block=self.server.span.memory_bytes() // (self.server.end - self.server.start),
            next_rtts=tuple(sorted(self.next_rtt.as_dict().items()))[:MAX_NEXT_RTTS],
            state=state,
            seq=time.time_ns() // 1000 + self._seq,  # survives restarts with the same identity
            expires_at=time.time() + ttl,
        )

    async def announce(self, state: str = "ONLINE") -> None:
        await self.dht.announce(self._record(state, self.config.dht_ttl), provide_blocks=state == "ONLINE")

    async def _announce_loop(self) -> None:
        while True:
            await trio.sleep(self.config.dht_ttl / 3)
            try:
                await self.measure_next_rtts()
                await self.announce()
            except Exception:  # a failed re-announce must not take the server down
                log.warning("re-announcing failed; will retry", exc_info=True)

    async def measure_next_rtts(self) -> dict[str, float]:
        """Ping the servers of the block after this server's span; fold the round trips into
        ``next_rtt`` (published in the record as ``next_rtts``). Returns this round's samples."""
        assert self.server is not None
        if self.server.end >= self.server.span.config.num_hidden_layers:
            return {}
        servers: list[ServerRecord] = []
        with trio.move_on_after(self.client_config.lookup_timeout):
            servers = await self.dht.find_servers(self.server.model_id, [self.server.end])
        samples = await self._ping_all([s for s in servers if s.peer_id != self.peer_id])
        for peer_id, seconds in samples.items():
            self.next_rtt.observe(peer_id, seconds)
        return samples

    async def _withdraw(self) -> None:
        if self.server is None:
            return
        self.server.closing = True
        with trio.move_on_after(3.0):
            try:
                await self.announce("OFFLINE")
                log.info("withdrew the record of blocks %d:%d", self.server.start, self.server.end)
            except Exception:  # shutting down anyway
                log.warning("could not withdraw the server record", exc_info=True)

    # -- client side -------------------------------------------------------------------------------
    async def ping(self, peer_id: str) -> tuple[float, m.InfoResponse]:
        """Round trip (seconds) of one request to a server (opening the stream not counted), and its info."""
        conn = await open_stream(self.host, peer_id, max_frame_size=self.config.max_frame_size, timeout=PING_TIMEOUT)
        try:
            t0 = trio.current_time()
            info = await request(conn, m.InfoRequest(), m.InfoResponse, timeout=PING_TIMEOUT)
            elapsed = trio.current_time() - t0
        finally:
            await conn.close()
        return elapsed, info

    async def find_servers(self, model: str, num_blocks: int) -> list[ServerRecord]:
        with trio.fail_after(self.client_config.lookup_timeout):
            return await self.dht.find_servers(model, range(num_blocks))

    async def _ping_all(self, servers: Sequence[ServerRecord]) -> dict[str, float]:
        """Ping servers in parallel: peer id -> round trip (s); those that fail are left out."""
        samples: dict[str, float] = {}

        async def measure(rec: ServerRecord) -> None:
            try:
                samples[rec.peer_id], _ = await self.ping(rec.peer_id)
            except (SwarmError, trio.TooSlowError, OSError, Exception) as exc:  # any failure = skip it
                log.info("server %s did not answer a ping: %r", rec.peer_id, exc)

        async with trio.open_nursery() as nursery:
            for rec in servers:
                nursery.start_soon(measure, rec)
        return samples

    async def find_chain(
        self,
        model: str,
        num_blocks: int,
        *,
        start: int = 0,
        end: int | None = None,
        push: bool | None = None,
        max_length: int = 1,
        batch_size: int = 1,
        adapter: str | None = None,
    ) -> list[Hop]:
        """The chain covering blocks start..end-1 with the lowest expected per-token latency.

        Pings every server found (the samples feed ``self.rtt``), costs server-to-server hops from
        the round trips servers publish, and leaves out servers that did not answer or whose cache
        cannot hold ``max_length * batch_size`` tokens. ``push``: cost the chain for server-to-server
        push (default: the client config's choice). ``adapter``: only servers holding this LoRA
        adapter (default: the client config's; "": any server).
        """
        end = num_blocks if end is None else end
        adapter = self.client_config.adapter if adapter is None else adapter
        push = self.client_config.push if push is None else push
        servers = await self.find_servers(model, num_blocks)
        samples = await self._ping_all(servers)
        for peer_id, seconds in samples.items():
            self.rtt.observe(peer_id, seconds)
        unreachable = frozenset(s.peer_id for s in servers if s.peer_id not in samples)
        return choose_inference_chain(
            servers, model=model, start=start, end=end, rtt=self.rtt.as_dict(),
            server_rtt=server_rtts(servers), push=push, now=time.time(), max_length=max_length,
            batch_size=batch_size, exclude=unreachable, adapter=adapter or "",
        )

    def inference_session(
        self,
        chain: list[Hop],
        *,
        model: str,
        max_length: int,
        dtype: str = "float32",
        batch_size: int = 1,
        compression: str | None = None,
        push: bool | None = None,
        adapter: str | None = None,
        prompts: torch.Tensor | None = None,
        lora: Any = None,
    ) -> InferenceSession:
        """A session over ``chain``; ``compression`` and ``adapter`` override the client config's;
        ``prompts`` ``# (L, P, H)``: deep prompts of every block of the model, sent at open;
        ``lora``: a client-owned model.LoraWeights, each server gets its blocks' part at open."""
        return InferenceSession(
            self.host,
            chain,
            model=model,
            max_length=max_length,
            dtype=dtype,
            compression=compression or self.client_config.compression,
            step_timeout=self.client_config.step_timeout,
            max_frame_size=self.config.max_frame_size,
            batch_size=batch_size,
            push=self.client_config.push if push is None else push,
            adapter=(self.client_config.adapter if adapter is None else adapter) or "",
            prompts=prompts,
            lora=lora,
        )


async def _prepare_span(config: ServerConfig) -> tuple[Any, float, dict[str, Any]]:
    """Load the span a server will hold and its adapters (before any networking), and measure its
    throughput."""
    from swarm_node.model import BlockSpan, Checkpoint, resolve_model

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    path = await trio.to_thread.run_sync(resolve_model, config.model)
    checkpoint = await trio.to_thread.run_sync(Checkpoint.open, path)
    num_blocks = checkpoint.config.num_hidden_layers
    if config.end > num_blocks:
        raise ConfigError(
            f"'--blocks' {config.start}:{config.end} is out of range: {model_id_of(config.model)} "
            f"has {num_blocks} blocks (0:{num_blocks})"
        )
    dtype = TORCH_DTYPES[config.dtype]
    t0 = time.perf_counter()
    span = await trio.to_thread.run_sync(
        lambda: BlockSpan.load(checkpoint, config.start, config.end, dtype=dtype, quant=config.quant)
    )
    per_block = span.memory_bytes() // (config.end - config.start)
    log.info(
        "loaded blocks %d:%d in %.1f s: %.1f MB per block (%s)",
        config.start, config.end, time.perf_counter() - t0, per_block / 1e6, config.quant or config.dtype,
    )
    adapters = await trio.to_thread.run_sync(
        lambda: load_server_adapters(config.adapters, checkpoint.config, start=config.start, end=config.end, dtype=dtype)
    )
    throughput = config.throughput
    if throughput is None:
        throughput = await trio.to_thread.run_sync(lambda: measure_throughput(span, dtype=dtype))
    return span, throughput, adapters


async def _connect_initial_peers(
    host: Any, dht: SwarmDHT, addrs: Sequence[str], timeout: float, private: bool
) -> None:
    if not addrs:
        return
    reached = 0
    errors = []
    for text in addrs:
        addr = _parse_multiaddr(text, "initial_peers")
        try:
            info = info_from_p2p_addr(addr)
        except Exception as exc:  # libp2p raises several types for a multiaddr without /p2p/
            raise ConfigError(f"'initial_peers' entry {text!r} must end with /p2p/<peer id>: {exc}") from None
        try:
            with trio.fail_after(timeout):
                await host.connect(info)
            await dht.add_bootstrap_peer(info.peer_id)
            reached += 1
        except Exception as exc:  # unreachable peer: try the others
            why = f"no handshake within {timeout} s" if isinstance(exc, trio.TooSlowError) else repr(exc)
            errors.append(f"{text}: {why}")
            log.warning("could not reach initial peer %s: %r", text, exc)
    if not reached:
        hint = (
            "this peer uses a swarm key: the initial peers must use the same --swarm-key"
            if private
            else "if the swarm is private, start this peer with its --swarm-key FILE"
        )
        raise SwarmError(f"could not reach any initial peer ({hint}):\n  " + "\n  ".join(errors))


def _single_leaf(group: BaseExceptionGroup) -> BaseException | None:
    """The one real error inside nested groups (ignoring Cancelled), or None if there are several."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None


@asynccontextmanager
async def open_peer(
    config: PeerConfig | None = None,
    *,
    server: ServerConfig | None = None,
    client: ClientConfig | None = None,
) -> AsyncIterator[Peer]:
    """Start a peer; leaving the block withdraws its records and closes everything it opened.

    Errors come out as themselves (a ConfigError, a SwarmError...), not wrapped in the exception
    groups of py-libp2p's internal nurseries.
    """
    config = config or PeerConfig()
    client = client or ClientConfig()
    key_pair = load_or_create_identity(config.identity)
    listen = [_parse_multiaddr(a, "listen") for a in config.listen]
    announce = [_parse_multiaddr(a, "announce_addrs") for a in config.announce_addrs] or None
    psk = load_swarm_key(config.swarm_key) if config.swarm_key is not None else None
    prepared = await _prepare_span(server) if server is not None else None
    host = new_host(
        key_pair=key_pair,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        announce_addrs=announce,
        psk=psk,
    )
    try:
        async with host.run(listen_addrs=listen):
            dht = SwarmDHT(host)
            await _connect_initial_peers(
                host, dht, config.initial_peers, timeout=config.connect_timeout, private=config.swarm_key is not None
            )
            async with background_trio_service(dht.kad), trio.open_nursery() as nursery:
                peer = Peer(host, dht, config, client)
                try:
                    if server is not None and prepared is not None:
                        await peer._start_serving(server, prepared, nursery)
                    yield peer
                finally:
                    with trio.CancelScope(shield=True):
                        await peer._withdraw()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = _single_leaf(group)
        if leaf is None:
            raise
        raise leaf from None


def with_listen(config: PeerConfig, listen: Sequence[str]) -> PeerConfig:
    return replace(config, listen=tuple(listen))
