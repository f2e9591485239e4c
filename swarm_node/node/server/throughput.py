"""A server's compute rate: measured once per model, dtype, weight format and device, then cached.

The cache is one JSON file, ``throughput.json`` in the swarm-node cache folder (``$SWARM_CACHE_DIR``,
else ``~/.cache/swarm-node``), mapping a key like ``smollm2-135m|float32|none|cpu|threads=2`` to the
seconds one block takes for one token of one sequence. A span of n blocks announces
``1 / (n * seconds_per_block)`` tokens/s, so a server that moves to other blocks needs no new
measurement. ``--throughput`` overrides all of this. Knows nothing of the swarm.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from swarm_node.model.devices import synchronize

log = logging.getLogger(__name__)

CACHE_FILE = "throughput.json"
MAX_ENTRIES = 256  # the file stays small whatever happens


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def cache_key(*, model: str, dtype: str, quant: str | None, device: str, threads: int) -> str:
    return f"{model}|{dtype}|{quant or 'none'}|{device}|threads={threads}"


def measure_seconds_per_block(span: Any, *, dtype: torch.dtype, repeats: int = 8) -> float:
    """Seconds of one decode step of one sequence through one block (the span's mean)."""
    cache = span.new_cache(repeats + 1, batch_size=1)
    hidden = torch.zeros(1, 1, span.hidden_size, dtype=dtype)
    with torch.inference_mode():
        span.forward(hidden, cache, start=span.start, end=span.end)  # warm-up
        synchronize(span.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            span.forward(hidden, cache, start=span.start, end=span.end)
        synchronize(span.device)  # a GPU's kernels finish after the calls return
        elapsed = time.perf_counter() - t0
    return max(elapsed, 1e-9) / repeats / (span.end - span.start)


def _read(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable throughput cache %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(k, str) and isinstance(v, int | float) and v > 0
    }


def _write(path: Path, entries: dict[str, float]) -> None:
    """Write atomically (a temporary file renamed over the old one): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".throughput-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(dict(list(entries.items())[-MAX_ENTRIES:]), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def span_throughput(
    span: Any, *, key: str, dtype: torch.dtype, cache_dir: Path
) -> tuple[float, bool]:
    """Tokens/s of ``span`` for one sequence, from the cache or measured (and cached) now.
    Returns (throughput, whether it came from the cache)."""
    path = cache_dir / CACHE_FILE
    entries = _read(path)
    seconds = entries.get(key)
    cached = seconds is not None
    if seconds is None:
        seconds = measure_seconds_per_block(span, dtype=dtype)
        entries[key] = seconds
        try:
            _write(path, entries)
        except (
            OSError
        ) as exc:  # a read-only cache folder costs a measurement per start, nothing more
            log.warning("could not save the throughput cache %s: %s", path, exc)
    return 1.0 / (seconds * (span.end - span.start)), cached
