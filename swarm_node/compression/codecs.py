"""Tensor codecs for activations on the wire: torch.Tensor <-> WireTensor, pure functions.

Codecs and their error for a value ``x`` (per element, for values inside the codec's range;
``ERROR_BOUNDS[codec] = (relative, absolute)`` means ``|decoded - x| <= relative*|x| + absolute``):

- ``"none"``: the tensor's own bytes; exact, bit for bit (NaN and inf included).
- ``"float16"``: half the bytes of float32. Relative error <= 2**-11 (~4.9e-4) for |x| in
  [6.1e-5, 65504]; absolute error <= 2**-25 (~3e-8) below that (subnormals). Values beyond
  +-65504 are clamped to +-65504 (as hivemind does) rather than sent as inf; NaN stays NaN.
- ``"bfloat16"``: half the bytes of float32, float32's range. Relative error <= 2**-8 (~3.9e-3);
  absolute error <= 2**-134 for float32 subnormals.
- ``"blockwise8"`` / ``"blockwise8-64"``: bitsandbytes-compatible dynamic 8-bit codes, one float32
  absmax per block of 4096 / 64 elements (see blockwise8.py): ~1.0 byte per element. The error is
  per block, not per element: ``|decoded - x| <= BLOCK_ERROR_BOUNDS[codec] * absmax`` of the
  element's block (~0.0070 * absmax), so these codecs are not in ``ERROR_BOUNDS``.
  ``error_bound(x, codec)`` gives the bound per element of a tensor for every codec.

``WireTensor.dtype`` records the ORIGINAL dtype (float32, float16 or bfloat16) and ``decode``
restores it, so a float32 tensor sent as "float16" comes back float32 (with float16's error). A
16-bit original dtype other than the codec's adds its own rounding on the way back (float16 sent
as "bfloat16": about 2**-8 + 2**-11 relative).

A codec is one pair of functions, ``encode(tensor) -> bytes-like`` and ``decode(payload, numel,
dtype) -> 1-D tensor``, plus ``payload_nbytes(numel, dtype)`` so that ``decode`` checks the length
before it allocates anything. Add one to ``_CODECS`` and ``swarm_node.choices.CODECS``.

Directions. Every encoded tensor names its own codec, so a receiver never needs to be told how
to read one; what a session or request negotiates is the codec of what comes BACK:
- client -> server: the client encodes with its own codec (``--compression`` on ``generate``);
- server -> client: ``OpenSessionRequest.compression`` / ``ForwardRequest.compression`` (or
  "default": the server's ``--compression``);
- server -> server (push): the session's codec, the same as server -> client;
- gradients: a backward request carries the client's gradient w.r.t. the span's output, encoded
  with the client's codec, and names (like ``ForwardRequest.compression``) the codec of the
  gradient w.r.t. the span's input that the server sends back. ``encode``/``decode`` take any
  float32/float16/bfloat16 tensor of up to ``MAX_NDIM`` dimensions, a gradient included (a tensor
  that requires grad, a non-contiguous view); ``check_codec`` validates the name a request carries.

This module does NOT know frames, sessions or peers (protocol/ and node/ carry the WireTensor),
nor which codec a session negotiated: the caller passes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from swarm_node.choices import CODECS
from swarm_node.compression import blockwise8
from swarm_node.errors import LocalProtocolError, RemoteProtocolError
from swarm_node.protocol.tensors import MAX_NDIM, WireTensor

MAX_EXTENT = 2**48  # torch's stride arithmetic overflows on absurd shapes, even empty ones
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
ERROR_BOUNDS: dict[str, tuple[float, float]] = {  # codec -> (relative, absolute), see above
    "none": (0.0, 0.0),
    "float16": (2.0**-11, 2.0**-25),
    "bfloat16": (2.0**-8, 2.0**-134),
}
BLOCK_ERROR_BOUNDS: dict[str, float] = {  # codec -> bound relative to its block's absmax
    name: blockwise8.MAX_HALF_GAP for name in blockwise8.BLOCK_SIZES
}
_FLOAT16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True, slots=True)
class _Codec:
    encode: Callable[[torch.Tensor], memoryview]  # contiguous CPU tensor -> payload bytes
    decode: Callable[[memoryview, int, torch.dtype], torch.Tensor]  # -> 1-D, original dtype
    payload_nbytes: Callable[[int, torch.dtype], int]  # (numel, original dtype) -> bytes
    # a tensor on a GPU (or any device) -> the same payload bytes, computed on that device so
    # that only the payload crosses to the host (no float32 copy of the tensor there)
    encode_on_device: Callable[[torch.Tensor], memoryview]


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying (bfloat16 has no numpy dtype)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1)  # (N,)
    if flat.stride(0) != 1:  # a size-1 tensor may carry any stride, even 0
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    return memoryview(flat.view(torch.uint8).numpy())


def _from_bytes(payload: memoryview, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of ``numel`` elements of ``dtype`` holding a copy of ``payload``."""
    out = torch.empty(numel, dtype=dtype)  # (N,)
    out.view(torch.uint8).numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
    return out


def _encode_float16(tensor: torch.Tensor) -> memoryview:
    if tensor.dtype == torch.float16:
        return _as_bytes(tensor)
    return _as_bytes(tensor.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16))


def _decode_float16(payload: memoryview, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return _from_bytes(payload, numel, torch.float16).to(dtype)


def _encode_bfloat16(tensor: torch.Tensor) -> memoryview:
    return _as_bytes(tensor.to(torch.bfloat16))


def _decode_bfloat16(payload: memoryview, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return _from_bytes(payload, numel, torch.bfloat16).to(dtype)


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    return _as_bytes(tensor.to("cpu").contiguous())


def _float16_on_device(tensor: torch.Tensor) -> memoryview:
    if tensor.dtype != torch.float16:
        tensor = tensor.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16)
    return _host_bytes(tensor)


def _bfloat16_on_device(tensor: torch.Tensor) -> memoryview:
    return _host_bytes(tensor.to(torch.bfloat16))


def _own_itemsize(numel: int, dtype: torch.dtype) -> int:
    return numel * dtype.itemsize


def _two_bytes(numel: int, dtype: torch.dtype) -> int:
    return numel * 2


def _blockwise_codec(block: int) -> _Codec:
    return _Codec(
        encode=lambda tensor: blockwise8.encode_payload(tensor, block),
        decode=lambda payload, numel, dtype: blockwise8.decode_payload(
            payload, numel, block, dtype
        ),
        payload_nbytes=lambda numel, dtype: blockwise8.payload_nbytes(numel, block),
        encode_on_device=lambda tensor: memoryview(
            blockwise8.encode_payload_torch(tensor, block).cpu().numpy()
        ),
    )


_CODECS: dict[str, _Codec] = {
    "none": _Codec(_as_bytes, _from_bytes, _own_itemsize, _host_bytes),
    "float16": _Codec(_encode_float16, _decode_float16, _two_bytes, _float16_on_device),
    "bfloat16": _Codec(_encode_bfloat16, _decode_bfloat16, _two_bytes, _bfloat16_on_device),
    "blockwise8": _blockwise_codec(blockwise8.BLOCK_SIZES["blockwise8"]),
    "blockwise8-64": _blockwise_codec(blockwise8.BLOCK_SIZES["blockwise8-64"]),
}
assert tuple(_CODECS) == CODECS  # our own invariant: one table, one tuple


def error_bound(tensor: torch.Tensor, codec: str) -> torch.Tensor:
    """The largest ``|decode(encode(tensor, codec)) - tensor|`` per element, as float64.

    For finite values (float16 within +-65504), before the cast back to a 16-bit original dtype
    other than the codec's own, which adds that dtype's rounding (about 2**-8 relative at most).
    """
    if codec in blockwise8.BLOCK_SIZES:
        return blockwise8.error_bound(tensor, blockwise8.BLOCK_SIZES[codec])
    if codec not in ERROR_BOUNDS:
        raise LocalProtocolError(f"'codec' must be one of {CODECS}, got {codec!r}")
    relative, absolute = ERROR_BOUNDS[codec]
    return tensor.detach().to(torch.float64).abs() * relative + absolute


def encode(tensor: torch.Tensor, codec: str) -> WireTensor:
    """``tensor`` as a WireTensor under ``codec``; raises LocalProtocolError on a bad argument.

    For codec "none" (and "float16" of a float16 tensor) on a contiguous CPU tensor, ``data`` is a
    view of the tensor's memory, not a copy: frame it before changing the tensor in place. A
    tensor on another device (a GPU) is cast or quantized there and only the payload's bytes
    are copied to the host (``_Codec.encode_on_device``): the same bytes as from the host.
    """
    if codec not in _CODECS:
        raise LocalProtocolError(f"'codec' must be one of {CODECS}, got {codec!r}")
    if not isinstance(tensor, torch.Tensor):
        raise LocalProtocolError(f"'tensor' must be a torch.Tensor, got {type(tensor).__name__}")
    dtype_name = _DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise LocalProtocolError(
            f"'tensor.dtype' must be one of {sorted(DTYPES)}, got {tensor.dtype}"
        )
    if tensor.dim() > MAX_NDIM:
        raise LocalProtocolError(
            f"'tensor' must have at most {MAX_NDIM} dimensions, got {tensor.dim()}"
        )
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        data = _CODECS[codec].encode(tensor.contiguous())
    else:  # cast or quantized where it lives; only the payload comes to the host
        data = _CODECS[codec].encode_on_device(tensor)
    return WireTensor(codec=codec, dtype=dtype_name, shape=tuple(tensor.shape), data=data)


def decode(wire: WireTensor, *, max_numel: int) -> torch.Tensor:
    """The tensor in ``wire``, in its original dtype, owning its memory.

    Checks codec, dtype, shape, ``max_numel`` and the byte count before allocating anything, and
    raises RemoteProtocolError (the peer sent it) when one is wrong.
    """
    codec = _CODECS.get(wire.codec) if type(wire.codec) is str else None
    if codec is None:
        raise RemoteProtocolError(f"'codec' must be one of {CODECS}, got {wire.codec!r}")
    dtype = DTYPES.get(wire.dtype) if type(wire.dtype) is str else None
    if dtype is None:
        raise RemoteProtocolError(f"'dtype' must be one of {sorted(DTYPES)}, got {wire.dtype!r}")
    shape = wire.shape
    if (
        type(shape) is not tuple
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise RemoteProtocolError(
            f"'shape' must be a tuple of at most {MAX_NDIM} ints >= 0, got {shape!r}"
        )
    numel = math.prod(shape)
    if numel > max_numel:
        raise RemoteProtocolError(
            f"tensor must have at most {max_numel} elements, got shape {shape} ({numel})"
        )
    extent = math.prod(max(d, 1) for d in shape)  # an empty tensor's other sides must be sane too
    if extent > MAX_EXTENT:
        raise RemoteProtocolError(
            f"tensor shape must span at most 2**48 elements (zero sides counted as 1), got {shape}"
        )
    if not isinstance(wire.data, bytes | bytearray | memoryview):
        raise RemoteProtocolError(f"'data' must be bytes, got {type(wire.data).__name__}")
    payload = memoryview(wire.data)
    if not payload.c_contiguous:
        raise RemoteProtocolError("'data' must be a contiguous buffer, got a strided memoryview")
    payload = payload.cast("B")
    expected = codec.payload_nbytes(numel, dtype)
    if payload.nbytes != expected:
        raise RemoteProtocolError(
            f"'data' must be {expected} bytes for shape {shape} under codec {wire.codec!r}, "
            f"got {payload.nbytes}"
        )
    return codec.decode(payload, numel, dtype).reshape(shape)


def check_codec(name: object, *, field: str = "compression", remote: bool = True) -> str:
    """``name`` if it is one of ``CODECS``, else RemoteProtocolError (or LocalProtocolError when
    ``remote`` is False) saying which field, what was expected and what came.

    For the codec a request asks its answer in (a forward's output, a backward's gradients).
    """
    if type(name) is str and name in _CODECS:
        return name
    error = RemoteProtocolError if remote else LocalProtocolError
    raise error(f"{field!r} must be one of {CODECS}, got {name!r}")
