"""Tensor codecs: torch.Tensor <-> protocol WireTensor. Pure functions, no trio, no peers."""

from __future__ import annotations

from swarm_node.compression.codecs import (
    BLOCK_ERROR_BOUNDS,
    CODECS,
    DTYPES,
    ERROR_BOUNDS,
    check_codec,
    decode,
    encode,
    error_bound,
)

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
