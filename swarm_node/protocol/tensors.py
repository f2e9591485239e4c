"""The wire form of a tensor: codec name, original dtype, shape and the encoded bytes.

This module checks only what the protocol can check: types, non-negative dimensions, at most
``MAX_NDIM`` dimensions, and that the byte count in a frame header is an int. It does NOT know what
a codec is, how many bytes a shape needs under a codec, or which dtypes exist: compression/ decides
that when it decodes. It does not import torch or numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarm_node.errors import ProtocolError

MAX_NDIM = 8  # more dimensions than any hidden state needs; bounds the work a header can ask for
MAX_DIM = 2**63 - 1  # a single dimension must fit an int64
MAX_NAME_LEN = 32  # codec and dtype names are short identifiers


@dataclass(frozen=True, slots=True, eq=False)
class WireTensor:
    """One encoded tensor as it travels: ``data`` holds exactly the codec's payload bytes.

    ``dtype`` is the dtype the receiver should restore (not necessarily the dtype on the wire:
    codec "float16" sends float16 bytes for a float32 tensor and records "float32").
    Equality compares the bytes' content, so a memoryview equals the bytes it shows.
    """

    codec: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @property
    def nbytes(self) -> int:
        """Length of the payload in bytes (a memoryview's ``len`` counts items, not bytes)."""
        return memoryview(self.data).nbytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WireTensor):
            return NotImplemented
        return (
            self.codec == other.codec
            and self.dtype == other.dtype
            and self.shape == other.shape
            and memoryview(self.data).cast("B") == memoryview(other.data).cast("B")
        )

    def __hash__(self) -> int:
        return hash((self.codec, self.dtype, self.shape, bytes(self.data)))

    def __repr__(self) -> str:
        return (
            f"WireTensor(codec={self.codec!r}, dtype={self.dtype!r}, shape={self.shape!r}, "
            f"nbytes={self.nbytes})"
        )


def check_name(field: str, value: Any, error: type[ProtocolError]) -> str:
    """A codec or dtype name: a non-empty str of at most ``MAX_NAME_LEN`` characters."""
    if type(value) is not str or not 0 < len(value) <= MAX_NAME_LEN:
        raise error(
            f"{field!r} must be a str of 1 to {MAX_NAME_LEN} characters, got {short_repr(value)}"
        )
    return value


def check_shape(field: str, value: Any, error: type[ProtocolError]) -> tuple[int, ...]:
    """A shape: a list or tuple of at most ``MAX_NDIM`` ints in [0, 2**63 - 1]; returns a tuple."""
    if type(value) not in (list, tuple) or len(value) > MAX_NDIM:
        raise error(
            f"{field!r} must be a list of at most {MAX_NDIM} ints >= 0, got {short_repr(value)}"
        )
    for dim in value:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise error(f"{field!r} must be a list of ints >= 0, got {short_repr(value)}")
    return tuple(value)


def check_payload(field: str, value: Any, error: type[ProtocolError]) -> memoryview:
    """Tensor data: bytes, bytearray or a C-contiguous memoryview; returns a flat byte view."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise error(f"{field!r} must be bytes or a memoryview, got {type(value).__name__}")
    view = memoryview(value)
    if not view.c_contiguous:
        raise error(f"{field!r} must be a C-contiguous buffer, got a strided memoryview")
    return view.cast("B")


def check_wire_tensor(field: str, value: Any, error: type[ProtocolError]) -> WireTensor:
    """Check a WireTensor we are about to send (types and limits only)."""
    if not isinstance(value, WireTensor):
        raise error(f"{field!r} must be a WireTensor, got {type(value).__name__}")
    check_name(f"{field}.codec", value.codec, error)
    check_name(f"{field}.dtype", value.dtype, error)
    if type(value.shape) is not tuple:
        raise error(f"'{field}.shape' must be a tuple of ints, got {type(value.shape).__name__}")
    check_shape(f"{field}.shape", value.shape, error)
    check_payload(f"{field}.data", value.data, error)
    return value


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() of a value cut to ``limit`` characters, for error messages about peer input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
