"""Loading the span a server will hold: its weights, its LoRA adapters and its measured throughput.

Runs before the peer exists (loading weights) or before a placed server moves; knows nothing of
networking, sessions or routing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
import trio

from swarm_node.errors import ConfigError
from swarm_node.model.bundled import identity_of, model_id_of
from swarm_node.model.devices import device_label, free_memory, resolve_device, resolve_dtype
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.node.config import ServerConfig

log = logging.getLogger(__name__)


async def prepare_span(config: ServerConfig) -> tuple[Any, float, dict[str, Any]]:
    """Load the span a server will hold and its LoRA adapters (before any networking), and measure
    its throughput."""
    from swarm_node.model import BlockSpan, Checkpoint, resolve_model
    from swarm_node.node.server.adapters import load_server_adapters

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    path = await trio.to_thread.run_sync(resolve_model, config.model)
    checkpoint = await trio.to_thread.run_sync(
        lambda: Checkpoint.open(path, memory_map=config.mmap_weights)
    )
    num_blocks = checkpoint.config.num_hidden_layers
    if config.end > num_blocks:
        raise ConfigError(
            f"'--blocks' {config.start}:{config.end} is out of range: {model_id_of(config.model)} "
            f"has {num_blocks} blocks (0:{num_blocks})"
        )
    device = resolve_device(config.device)  # open_peer resolved them already; a caller may not
    config = replace(config, device=str(device), dtype=resolve_dtype(config.dtype, device))
    dtype = TORCH_DTYPES[config.dtype]
    t0 = time.perf_counter()
    span = await trio.to_thread.run_sync(
        lambda: BlockSpan.load(
            checkpoint, config.start, config.end, dtype=dtype, quant=config.quant, device=device
        )
    )
    blocks = config.end - config.start
    log.info(
        "loaded blocks %d:%d to %s in %.1f s: %.1f MB of weights per block (%s) + %.1f KB of "
        "attention cache per token per block; %s",
        config.start,
        config.end,
        device_label(device),
        time.perf_counter() - t0,
        span.memory_bytes() / blocks / 1e6,
        config.quant or config.dtype,
        span.cache_bytes_per_token() / blocks / 1e3,
        f"{free_memory(device) / 1e9:.1f} GB left free on it",
    )
    if config.mmap_weights:
        log.info(
            "%d of %d tensors of the span are views of a memory map of the files (--mmap-weights: "
            "on a CPU, where the file's dtype is the served one)",
            len(checkpoint.names_mapped),
            len(checkpoint.names_read),
        )
    t0 = time.perf_counter()
    verify = None if config.no_verify_weights else (config.start, config.end)
    identity = await trio.to_thread.run_sync(lambda: identity_of(config.model, verify=verify))
    log.info(
        "weights of blocks %d:%d are model %s (%s in %.1f s)",
        config.start,
        config.end,
        identity.describe(),
        "identified from the cache" if verify is None else "verified",
        time.perf_counter() - t0,
    )
    adapters = await trio.to_thread.run_sync(
        lambda: load_server_adapters(
            config.adapters,
            checkpoint.config,
            start=config.start,
            end=config.end,
            dtype=dtype,
            model_digest=identity.digest,
        )
    )
    if device.type != "cpu":  # adapters live with the blocks they adapt
        adapters = {name: lora.to(device) for name, lora in adapters.items()}
    throughput = config.throughput
    if throughput is None:
        throughput = await trio.to_thread.run_sync(lambda: measured_throughput(span, config, dtype))
    return span, throughput, adapters


def measured_throughput(span: Any, config: ServerConfig, dtype: torch.dtype) -> float:
    from swarm_node.model.bundled import default_cache_dir
    from swarm_node.node.server.throughput import cache_key, device_name, span_throughput

    key = cache_key(
        model=model_id_of(config.model),
        dtype=config.dtype,
        quant=config.quant,
        device=device_name(span.device),
        threads=torch.get_num_threads(),
    )
    throughput, cached = span_throughput(span, key=key, dtype=dtype, cache_dir=default_cache_dir())
    log.info(
        "throughput %.1f tokens/s for blocks %d:%d (%s %s)",
        throughput,
        config.start,
        config.end,
        "cached as" if cached else "measured, cached as",
        key,
    )
    return throughput
