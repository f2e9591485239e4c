"""Starting a peer: loading the span a server will hold, and reaching the swarm's initial peers.

Runs before the peer exists (loading weights) or while it starts (dialing); knows nothing of
sessions or routing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from swarm_node.dht.discovery import SwarmDHT
from swarm_node.errors import ConfigError, SwarmError
from swarm_node.node.config import ServerConfig
from swarm_node.node.server import TORCH_DTYPES

log = logging.getLogger(__name__)


def model_id_of(model: str) -> str:
    """The name a model is announced under: a bundled name as is, a folder by its last component."""
    from swarm_node.model import BUNDLED_MODELS

    if model in BUNDLED_MODELS:
        return model
    return model.rstrip("/").rsplit("/", 1)[-1]


def parse_multiaddr(text: str, field: str) -> Multiaddr:
    try:
        return Multiaddr(text)
    except Exception as exc:  # multiaddr raises several types for bad text
        raise ConfigError(f"{field!r} must be a multiaddr like /ip4/127.0.0.1/tcp/31337/p2p/12D3..., got {text!r}: {exc}") from None


async def prepare_span(config: ServerConfig) -> tuple[Any, float, dict[str, Any]]:
    """Load the span a server will hold and its LoRA adapters (before any networking), and measure
    its throughput."""
    from swarm_node.node.adapters import load_server_adapters

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
        throughput = await trio.to_thread.run_sync(lambda: measured_throughput(span, config, dtype))
    return span, throughput, adapters


def measured_throughput(span: Any, config: ServerConfig, dtype: torch.dtype) -> float:
    from swarm_node.model.bundled import default_cache_dir
    from swarm_node.node.throughput import cache_key, device_name, span_throughput

    key = cache_key(
        model=model_id_of(config.model), dtype=config.dtype, quant=config.quant, device=device_name(),
        threads=torch.get_num_threads(),
    )
    throughput, cached = span_throughput(span, key=key, dtype=dtype, cache_dir=default_cache_dir())
    log.info("throughput %.1f tokens/s for blocks %d:%d (%s %s)", throughput, config.start, config.end,
             "cached as" if cached else "measured, cached as", key)
    return throughput


async def connect_initial_peers(
    host: Any, dht: SwarmDHT, addrs: Sequence[str], timeout: float, private: bool
) -> None:
    if not addrs:
        return
    reached = 0
    errors = []
    for text in addrs:
        addr = parse_multiaddr(text, "initial_peers")
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
