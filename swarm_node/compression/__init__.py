"""Tensor codecs: torch.Tensor <-> protocol WireTensor. Pure functions, no trio, no peers."""

from __future__ import annotations

from swarm_node.compression.codecs import CODECS, DTYPES, ERROR_BOUNDS, decode, encode

__all__ = ["CODECS", "DTYPES", "ERROR_BOUNDS", "decode", "encode"]
