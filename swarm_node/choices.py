"""The names a user picks from, without importing torch: config, CLI and API check against these;
model/dtypes.py and compression/ map them to torch."""

import re
from typing import Any

from swarm_node.errors import ConfigError

DTYPES = (
    "float32",
    "bfloat16",
    "float16",
)  # what a span, a head, an adapter or a session computes in
AUTO = "auto"  # --dtype/--device/--num-blocks/--cache-tokens: chosen from the device at start
CODECS = ("none", "float16", "bfloat16", "blockwise8", "blockwise8-64")  # wire codecs
DEVICES = "auto, cpu, cuda, cuda:N or mps"  # where a span or a head computes
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def check_device(name: Any, field: str = "device") -> str:
    """``name`` if it is one of ``DEVICES`` (whether this machine has it is asked at start)."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ConfigError(f"{field!r} must be one of {DEVICES}, got {name!r}")
    return name
