"""Tensor codecs: torch.Tensor <-> protocol WireTensor. Pure functions, no trio, no peers.

The names below load ``codecs`` (and torch) on first use: ``compression.native`` alone (the C
kernel's build, started by every peer) needs no torch.
"""

from __future__ import annotations

from swarm_node.lazy_names import lazy_names

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


__getattr__ = lazy_names(__name__, dict.fromkeys(__all__, f"{__name__}.codecs"), globals())
