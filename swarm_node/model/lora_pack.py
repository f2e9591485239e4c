"""A LoraWeights as one flat tensor and a small manifest: how a client-owned LoRA travels.

``pack_lora`` -> ``(flat # (N,), manifest)``; the manifest lists ``[module key, rank, scale]`` in
order and the flat tensor holds each module's A then B, row-major. A receiver reads the manifest
first (``manifest_entries``: every key, rank and the total size checked against the span's
Linears), so it knows exactly how many numbers to accept before it decodes the tensor.
``unpack_lora`` makes views of the flat tensor: if it requires grad, the gradient of every A and B
lands in one flat gradient in the same layout, which is how gradients travel back.

Knows nothing of the wire's framing or codecs (compression/ turns the flat tensor into bytes).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from swarm_node.errors import ConfigError
from swarm_node.model.lora import MAX_RANK, LoraModule, LoraWeights, Shapes, check_lora

_KEY = re.compile(r"model\.layers\.(\d{1,6})\.([A-Za-z0-9_.]{1,128})")


def pack_lora(lora: LoraWeights) -> tuple[torch.Tensor, tuple[tuple[str, int, float], ...]]:
    """``(flat # (N,), manifest)``: every A then B flattened in ``lora.items()`` order (autograd
    flows through ``torch.cat``)."""
    entries = tuple((key, mod.rank, float(mod.scale)) for key, mod in lora.items())
    parts = [t.reshape(-1) for _, mod in lora.items() for t in (mod.a, mod.b)]
    flat = torch.cat(parts) if parts else torch.zeros(0)
    return flat, entries


def manifest_entries(
    manifest: Any, *, shapes: Shapes, start: int, end: int, max_rank: int = MAX_RANK
) -> tuple[list[tuple[int, str, int, float]], int]:
    """Parsed and checked manifest: ``[(block, module, rank, scale)]`` and the flat size they need.

    ConfigError (field, expectation, what came) for anything a span ``start..end-1`` cannot take.
    """
    limit = (end - start) * len(shapes)
    if not isinstance(manifest, list | tuple) or not 1 <= len(manifest) <= limit:
        raise ConfigError(
            f"'lora_manifest' must list 1 to {limit} modules, got {str(manifest)[:80]!r}"
        )
    entries: list[tuple[int, str, int, float]] = []
    seen: set[str] = set()
    numel = 0
    for item in manifest:
        ok = isinstance(item, list | tuple) and len(item) == 3 and isinstance(item[0], str)
        match = _KEY.fullmatch(item[0]) if ok else None
        if match is None:
            raise ConfigError(
                f"'lora_manifest' entries must be [\"model.layers.<i>.<module>\", rank, scale], "
                f"got {str(item)[:80]!r}"
            )
        key, rank, scale = item
        block, module = int(match.group(1)), match.group(2)
        if not start <= block < end or module not in shapes or key in seen:
            raise ConfigError(
                f"'lora_manifest' module {key!r} must be a distinct Linear of blocks {start}:{end}, "
                f"one of {sorted(shapes)}"
            )
        if type(rank) is not int or not 1 <= rank <= max_rank:
            raise ConfigError(
                f"'lora_manifest' rank of {key!r} must be an int in [1, {max_rank}], got {rank!r}"
            )
        if type(scale) not in (int, float) or not math.isfinite(scale):
            raise ConfigError(
                f"'lora_manifest' scale of {key!r} must be a finite number, got {scale!r}"
            )
        seen.add(key)
        fan_in, fan_out = shapes[module]
        numel += rank * (fan_in + fan_out)
        entries.append((block, module, rank, float(scale)))
    return entries, numel


def unpack_lora(
    flat: torch.Tensor,
    manifest: Any,
    *,
    shapes: Shapes,
    start: int,
    end: int,
    max_rank: int = MAX_RANK,
) -> LoraWeights:
    """The LoraWeights of ``pack_lora``'s output, as views of ``flat`` (checked: ConfigError)."""
    entries, numel = manifest_entries(
        manifest, shapes=shapes, start=start, end=end, max_rank=max_rank
    )
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.numel() != numel:
        got = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
        raise ConfigError(
            f"'lora' must be a flat tensor of {numel} numbers (as the manifest says), got {got}"
        )
    if not flat.is_floating_point():
        raise ConfigError(f"'lora' must be a floating tensor, got {flat.dtype}")
    modules: dict[int, dict[str, LoraModule]] = {}
    offset = 0
    for block, module, rank, scale in entries:
        fan_in, fan_out = shapes[module]
        a = flat[offset : offset + rank * fan_in].view(rank, fan_in)  # (r, in)
        offset += rank * fan_in
        b = flat[offset : offset + fan_out * rank].view(fan_out, rank)  # (out, r)
        offset += fan_out * rank
        modules.setdefault(block, {})[module] = LoraModule(a, b, scale)
    lora = LoraWeights(modules)
    check_lora(lora, shapes=shapes, start=start, end=end, max_rank=max_rank)
    return lora
