"""Tensor codecs: torch.Tensor <-> protocol WireTensor. Pure functions, no trio, no peers.

The names below load ``codecs`` (and torch) on first use: ``compression.native`` alone (the C
kernel's build, started by every peer) needs no torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BLOCK_ERROR_BOUNDS",
    "CODECS",
    "DTYPES",
    "ERROR_BOUNDS",
    "check_codec",
    "decode",
    "encode",
    "error_bound",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from swarm_node.compression import codecs

        value = getattr(codecs, name)
        globals()[name] = value  # later uses are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
