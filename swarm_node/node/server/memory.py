"""A server's device and memory: the concrete device and dtype of "auto", how many blocks and how
big an attention cache fit (``--num-blocks auto``, ``--cache-tokens auto``), and an out-of-memory
during compute turned into a refusal of that one request.

The plan reads the checkpoint's headers only (each tensor's shape and dtype), never its weights:
one block's bytes as held (``--dtype``, or int8/nf4 linears) and the cache bytes one token takes in
one block (keys + values of the key/value heads). The budget is ``--max-memory-mb`` when given,
else what the device has free less ``headroom`` (activations, the CUDA context, the allocator's
slack). Knows nothing of sessions, peers or the wire.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from swarm_node.choices import AUTO
from swarm_node.errors import ConfigError, RequestError
from swarm_node.model.devices import (
    device_label,
    free_memory,
    is_out_of_memory,
    release_cached_memory,
    resolve_device,
    resolve_dtype,
)
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.model.families import cache_heads
from swarm_node.node.config import ServerConfig

log = logging.getLogger(__name__)

GPU_HEADROOM = 2 * 2**30  # bytes a GPU keeps free for activations, workspaces and the context
HOST_HEADROOM = 2 * 2**30  # bytes of the host's available memory left to everything else
AUTO_CACHE_TOKENS = 16384  # reserved per block when both the blocks and the cache are "auto"
NF4_BLOCK = 64  # bitsandbytes' nf4 block: one 8-bit absmax per 64 weights (double quantized)
NF4_TABLES = 256 * 4 + 64  # bytes of each nf4 linear's code table and nested statistics


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    device: str  # "cuda:0", "cpu", ...
    label: str  # the device as a log line names it
    dtype: str
    budget_bytes: int  # what the blocks and the attention cache may take
    block_bytes: int  # weights of one block as held
    token_bytes: int  # attention cache of one token in one block
    num_blocks: int
    cache_tokens: int

    def describe(self) -> str:
        return (
            f"{self.label}: {self.budget_bytes / 2**20:.0f} MiB for blocks and cache; one block "
            f"holds {self.block_bytes / 2**20:.1f} MiB of weights + {self.token_bytes / 2**10:.1f} "
            f"KiB of cache per token: {self.num_blocks} blocks with a cache of "
            f"{self.cache_tokens} tokens"
        )


def block_bytes(checkpoint: Any, index: int, dtype: torch.dtype, quant: str | None) -> int:
    """Bytes block ``index`` of ``checkpoint`` will hold in ``dtype`` (its linears' weights in
    int8 with one float32 scale per row, or nf4), from the file's headers alone."""
    prefix = checkpoint.family.layer_prefix(index)
    total = 0
    for name in checkpoint.tensor_names():
        if not name.startswith(prefix):
            continue
        entry = checkpoint.tensor_entry(name)
        numel = 1
        for side in entry.shape:
            numel *= side
        linear = quant is not None and len(entry.shape) == 2 and name.endswith(".weight")
        if linear and quant == "int8":
            total += numel + 4 * entry.shape[0]
        elif linear:
            total += numel // 2 + numel // NF4_BLOCK + 4 * (numel // (NF4_BLOCK * 256) + 1)
            total += NF4_TABLES
        else:
            total += numel * dtype.itemsize
    return total


def token_bytes(checkpoint: Any, dtype: torch.dtype) -> int:
    """Attention-cache bytes of one token in one block: keys and values of every key/value head."""
    heads = int(checkpoint.setting("num_attention_heads"))
    kv_heads = cache_heads(checkpoint.config)  # Falcon caches other than num_key_value_heads
    head_dim = checkpoint.setting("head_dim") or int(checkpoint.setting("hidden_size")) // heads
    return 2 * kv_heads * int(head_dim) * dtype.itemsize


def plan_blocks(
    *,
    budget: int,
    block: int,
    token: int,
    num_blocks: int | str,
    cache_tokens: int | str,
    total_blocks: int,
    min_tokens: int,
) -> tuple[int, int]:
    """(blocks, cache tokens) within ``budget`` bytes: "auto" blocks are as many as fit beside a
    cache of ``cache_tokens`` (``AUTO_CACHE_TOKENS`` when that is "auto" too), at most
    ``total_blocks``; an "auto" cache takes what the blocks leave. ConfigError when not even one
    block (or a cache of ``min_tokens``, one longest session) fits."""
    reserve = AUTO_CACHE_TOKENS if cache_tokens == AUTO else int(cache_tokens)
    if num_blocks == AUTO:
        blocks = min(total_blocks, budget // (block + reserve * token))
        if blocks < 1:
            raise ConfigError(
                f"'num_blocks' auto: one block takes {block / 2**20:.1f} MiB of weights + "
                f"{reserve * token / 2**20:.1f} MiB of cache for {reserve} tokens, and the device "
                f"has {budget / 2**20:.0f} MiB to give: use --quant, a smaller --cache-tokens, "
                "or a device with more memory"
            )
    else:
        blocks = int(num_blocks)
    if cache_tokens != AUTO:
        return blocks, int(cache_tokens)
    tokens = (budget - blocks * block) // (blocks * token)
    if tokens < min_tokens:
        raise ConfigError(
            f"'cache_tokens' auto: {blocks} blocks of {block / 2**20:.1f} MiB leave "
            f"{max(budget - blocks * block, 0) / 2**20:.0f} MiB of {budget / 2**20:.0f} MiB, "
            f"room for {max(tokens, 0)} tokens; a session may take {min_tokens} "
            "(--max-session-length): serve fewer blocks or use --quant"
        )
    return blocks, int(tokens)


def resolve_server(
    config: ServerConfig, *, free_bytes: int | None = None
) -> tuple[ServerConfig, MemoryPlan | None]:
    """``config`` with its device, dtype and any "auto" block count or cache size made concrete,
    and the memory plan behind them (None when neither was "auto": nothing to plan).
    ``free_bytes`` stands in for the device's free memory (tests)."""
    from swarm_node.model import Checkpoint, resolve_model

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.quant is not None and device.type == "mps":
        raise ConfigError(f"'quant' {config.quant!r} needs a CUDA device or the CPU, got mps")
    resolved = replace(config, device=str(device), dtype=dtype)
    if AUTO not in (config.num_blocks, config.cache_budget_tokens):
        return resolved, None
    checkpoint = Checkpoint.open(resolve_model(config.model))
    torch_dtype = TORCH_DTYPES[dtype]
    if config.max_memory_mb is not None:
        budget = config.max_memory_mb * 2**20
    else:
        free = free_memory(device) if free_bytes is None else free_bytes
        budget = max(free - (HOST_HEADROOM if device.type == "cpu" else GPU_HEADROOM), 0)
    span = config.end - config.start if config.end else config.num_blocks
    block = block_bytes(checkpoint, config.start, torch_dtype, config.quant)
    token = token_bytes(checkpoint, torch_dtype)
    blocks, tokens = plan_blocks(
        budget=budget,
        block=block,
        token=token,
        num_blocks=span if span is not None else AUTO,
        cache_tokens=config.cache_budget_tokens,
        total_blocks=checkpoint.num_blocks,
        min_tokens=config.max_session_length,
    )
    plan = MemoryPlan(
        device=str(device),
        label=device_label(device),
        dtype=dtype,
        budget_bytes=budget,
        block_bytes=block,
        token_bytes=token,
        num_blocks=blocks,
        cache_tokens=tokens,
    )
    log.info("memory plan on %s", plan.describe())
    if config.num_blocks == AUTO:
        resolved = replace(resolved, num_blocks=blocks)
    return replace(resolved, cache_budget_tokens=tokens), plan


def out_of_memory_refusal(
    exc: BaseException, device: torch.device, what: str
) -> RequestError | None:
    """RequestError "out_of_memory" for ``exc`` when it is an allocator failing (torch's
    OutOfMemoryError, a RuntimeError saying so), after handing the cached blocks back; else None."""
    if not is_out_of_memory(exc):
        return None
    release_cached_memory(device)
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    log.warning("out of memory on %s computing %s: %s", device, what, first)
    return RequestError(
        "out_of_memory",
        f"{what}: the server's {device.type} ran out of memory ({first}); retry later or elsewhere",
    )


@contextlib.contextmanager
def out_of_memory_refused(device: torch.device, what: str) -> Iterator[None]:
    """An allocator failing inside the block becomes RequestError "out_of_memory" for this one
    request (``out_of_memory_refusal``); other errors pass."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        refusal = out_of_memory_refusal(exc, device, what)
        if refusal is None:
            raise
        raise refusal from None
