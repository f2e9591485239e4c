"""Which device and dtype a span or a head computes on, how much memory the device has free, and
whether an exception is the device running out of memory.

``resolve_device("auto")`` is the first CUDA device, else the CPU; ``resolve_dtype("auto", device)``
is bfloat16 on a GPU that computes it (Ampere and later), float16 on an older GPU or on MPS, and
float32 on the CPU (what every CPU run computed before devices existed). Knows nothing of spans,
configs or peers.
"""

from __future__ import annotations

import torch

from swarm_node.choices import check_device
from swarm_node.errors import ConfigError


def resolve_device(name: str, field: str = "device") -> torch.device:
    """The torch device ``name`` stands for on this machine, or ConfigError saying what is missing."""
    check_device(name, field)
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{field!r} is {name!r}, which needs a CUDA device, and torch sees none "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}): "
                "install a CUDA build of torch, or use --device cpu"
            )
        index = 0 if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f"{field!r} must name a CUDA device in cuda:0..cuda:{count - 1}, got {name!r}"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field!r} is 'mps', and torch sees no Apple GPU (MPS) here")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    """``name`` (a dtype name, or "auto": the fastest exact-enough dtype of ``device``)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "mps":
        return "float16"
    return "float32"


def device_label(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)``, ``cpu``: the device as a log line names it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def free_memory(device: torch.device) -> int:
    """Bytes the device has free now: CUDA's free memory, MPS's recommended working set less what
    torch holds there, or the host's available memory (MemAvailable) for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return host_available_memory()


def host_available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator failing: torch.OutOfMemoryError (CUDA, MPS), or the
    RuntimeError a CPU allocation or an older torch raises for it."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's unused blocks back (after an out-of-memory)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
