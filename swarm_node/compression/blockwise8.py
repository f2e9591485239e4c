"""Blockwise dynamic 8-bit quantization, byte-compatible with bitsandbytes' ``quantize_blockwise``.

A tensor is cut, in flat (row-major) order, into blocks of ``block`` elements (the last block may be
shorter). Each block keeps its absolute maximum as a float32 ``absmax``; each element becomes the
index (uint8) of the nearest value of ``DYNAMIC_MAP`` to ``x / absmax``. ``DYNAMIC_MAP`` is
bitsandbytes' ``create_dynamic_map(signed=True)`` (256 sorted values in [-0.993, 1], dense near 0),
rebuilt here with the same float32 arithmetic so that nothing imports bitsandbytes (~2-5 s).

Payload (what ``WireTensor.data`` holds): ``absmax`` as ``ceil(numel / block)`` little-endian
float32, then ``numel`` uint8 codes. The block size is in the codec's name ("blockwise8" = 4096,
"blockwise8-64" = 64), so the payload length follows from the shape alone and is checked before
anything is allocated. bitsandbytes' ``dequantize_blockwise(codes, absmax=absmax, blocksize=block)``
reads these codes, and ``decode_payload`` reads bitsandbytes' ``(codes, absmax)``.

Error: for every element of a block with absmax ``m``, ``|decoded - x| <= m * MAX_HALF_GAP``
(``MAX_HALF_GAP`` = half the largest gap between neighbouring map values, ~0.00703, plus float32
rounding), before the cast back to a 16-bit original dtype, which adds that dtype's rounding.
Non-finite values poison their own block (it decodes as NaN); a block of zeros decodes exactly.

Assumes a little-endian machine (x86, ARM). Encoding finds the exactly nearest code without a
search: a table indexed by the upper 16 bits of the float32 ``x / absmax`` gives the code below,
and one comparison with the only midpoint that can fall inside that bit range moves it up
(``build_tables`` checks there is never more than one). The C kernel (native.py) does this 16 values
at a time with AVX-512 gathers where the CPU has AVX-512F, else numpy does it in passes; a tensor
holding NaN or infinity always goes through numpy. Decoding is one pass of a small C kernel,
``code value * absmax`` per element (64 at a time with AVX-512 VBMI), split over threads for large
tensors (native.py builds it with the system C compiler on first use); without it (no compiler,
``SWARM_NODE_NATIVE=0``) numpy and torch read codes two at a time from a table of value pairs and
multiply per block: the same bytes.
bitsandbytes' CPU kernel is approximate near midpoints: its codes differ from ours on ~0.2% of
elements, each time by one step, and ours is the nearer. Knows nothing of WireTensor or peers.
"""

from __future__ import annotations

import numpy as np
import torch

from swarm_node.compression import native

BLOCK_SIZES = {"blockwise8": 4096, "blockwise8-64": 64}  # codec name -> elements per block


def dynamic_map() -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256  # our own invariant
    return np.array(sorted(data), dtype=np.float32)


DYNAMIC_MAP = dynamic_map()  # (256,) float32, sorted ascending
MAX_HALF_GAP = float(np.diff(DYNAMIC_MAP.astype(np.float64)).max()) / 2 + 2.0**-22


def build_tables(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per upper-16-bit pattern of a float32: the code index at its low end, and a threshold.

    For ``s`` with upper bits ``h``: ``index = low[h] + (s > threshold[h])`` is the index of the
    nearest value of ``code`` (ties go down); ``threshold`` is +inf where no midpoint is inside.
    """
    mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)  # (255,)
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    ends = np.stack([high.view(np.float32), (high | 0xFFFF).view(np.float32)])  # (2, 65536)
    finite = np.isfinite(ends).all(axis=0)
    ends = np.where(finite, ends, np.float32(0))
    first = np.searchsorted(mids, ends.min(axis=0), side="left")  # mids strictly below
    last = np.searchsorted(mids, ends.max(axis=0), side="left")
    assert int((last - first).max()) <= 1  # our own invariant: at most one midpoint per range
    low = first.astype(np.uint8)
    threshold = np.where(last > first, mids[np.minimum(first, len(mids) - 1)], np.inf)
    return low, threshold.astype(np.float32)


_LOW, _THRESHOLD = build_tables(DYNAMIC_MAP)
_PAIRS = (  # two codes read as one little-endian uint16 -> their two float32 values as one uint64
    np.stack([DYNAMIC_MAP[np.arange(1 << 16) & 0xFF], DYNAMIC_MAP[np.arange(1 << 16) >> 8]], axis=1)
    .astype("<f4")
    .view(np.uint64)
    .reshape(-1)
)  # (65536,): half as many lookups as one code at a time


def payload_nbytes(numel: int, block: int) -> int:
    return 4 * -(numel // -block) + numel


# From this many elements on, the table lookups go through torch's index_select (int32 indices,
# ~2x faster than numpy's take, which first widens the indices to int64, and on the calling
# thread), and the per-block max and multiply through torch (numpy is ~2-3x slower on rows of 64);
# below it numpy's ~1 us a call wins. Both paths give the same bytes (tested).
GATHER_MIN_NUMEL = 1 << 15
_LOW32 = torch.from_numpy(_LOW.astype(np.int32))  # (65536,)
_THRESHOLD_T = torch.from_numpy(_THRESHOLD)  # (65536,) float32, shares memory
_PAIRS_T = torch.from_numpy(_PAIRS.view(np.int64))  # (65536,) two float32 values as one int64
_TINY = np.float32(2.0**-149)  # the smallest float32: a block of zeros divides by it, not by 0


def encode_payload(tensor: torch.Tensor, block: int) -> memoryview:
    """A contiguous CPU floating tensor -> absmax (float32) bytes followed by uint8 codes."""
    flat = tensor.reshape(-1)  # (N,)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    x = flat.numpy()
    numel = x.size
    blocks = -(numel // -block)
    out = np.empty(payload_nbytes(numel, block), dtype=np.uint8)
    absmax = out[: 4 * blocks].view("<f4")  # (nblocks,)
    codes = out[4 * blocks :]  # (N,)
    if numel and _encode_native(x, out, numel, block, blocks):
        return memoryview(out)
    full = numel - numel % block
    if full:
        _encode_blocks(x[:full].reshape(-1, block), absmax[: full // block], codes[:full])
    if full < numel:
        _encode_blocks(x[full:].reshape(1, -1), absmax[full // block :], codes[full:])
    return memoryview(out)


def _encode_native(x: np.ndarray, out: np.ndarray, numel: int, block: int, blocks: int) -> bool:
    """The C kernel's encoding into ``out``; False (numpy's turn) when it is not there, the CPU has
    no AVX-512F, or a block holds a NaN or an infinity (numpy's NaN bytes are kept)."""
    kernel = native.encode_kernel(build=numel >= NATIVE_BUILD_MIN_NUMEL)
    if kernel is None or not x.flags.c_contiguous:  # a strided 1-D view: numpy's passes take it
        return False
    address = out.__array_interface__["data"][0]
    threads = 1 if numel < THREAD_MIN_NUMEL else torch.get_num_threads()
    done = kernel(
        x.__array_interface__["data"][0],
        address,
        address + 4 * blocks,
        _LOW32_ADDRESS,
        _THRESHOLD_ADDRESS,
        numel,
        block,
        threads,
    )
    return done == 1


def _encode_blocks(x: np.ndarray, absmax: np.ndarray, codes: np.ndarray) -> None:
    """Blocks ``x`` (nblocks, block) -> ``absmax`` (nblocks,) and ``codes`` (nblocks * block,)."""
    if x.size < GATHER_MIN_NUMEL:
        np.abs(x).max(axis=1, out=absmax)
    else:  # numpy reduces rows of 64 ~3x slower than torch
        torch.amax(torch.from_numpy(x).abs(), dim=1, out=torch.from_numpy(absmax))
    scale = np.maximum(absmax, _TINY)[:, None]  # zeros stay 0, not NaN; NaN stays NaN
    if np.isfinite(absmax).all():
        _encode_scaled(x / scale, codes)  # x / scale: (nblocks, block) in [-1, 1]
        return
    with np.errstate(invalid="ignore", divide="ignore"):  # the block decodes as NaN
        _encode_scaled(x / scale, codes)


def _encode_scaled(scaled: np.ndarray, codes: np.ndarray) -> None:
    """Values in [-1, 1] ``(nblocks, block)`` -> the index of the nearest map value, into ``codes``."""
    high = scaled.view(np.uint16)[:, 1::2]  # (nblocks, block): upper 16 bits, little-endian
    if scaled.size < GATHER_MIN_NUMEL:
        codes = codes.reshape(scaled.shape)
        np.take(_LOW, high, out=codes)
        codes += scaled > np.take(_THRESHOLD, high)
        return
    index = torch.from_numpy(high.astype(np.int32).reshape(-1))  # (N,)
    low = _LOW32.index_select(0, index).numpy()  # (N,) int32
    above = scaled.reshape(-1) > _THRESHOLD_T.index_select(0, index).numpy()  # (N,)
    np.add(low, above, out=codes, casting="unsafe")  # < 256: the cast to uint8 is exact


# The C kernel (native.py) decodes in one pass, on torch.get_num_threads() threads from
# THREAD_MIN_NUMEL elements on (below it, measured here, one thread is as fast or faster). Only a
# tensor of NATIVE_BUILD_MIN_NUMEL elements or more compiles the kernel when it is not built yet
# (~0.5 s, once per machine); smaller ones use it once it is loaded, or one built earlier from the
# cache, and else numpy, never waiting for a compiler.
NATIVE_BUILD_MIN_NUMEL = GATHER_MIN_NUMEL
THREAD_MIN_NUMEL = 1 << 19
_MAP_ADDRESS = DYNAMIC_MAP.__array_interface__["data"][0]  # (256,) float32, lives with the module
_LOW32_ADDRESS = _LOW32.data_ptr()  # (65536,) int32, lives with the module
_THRESHOLD_ADDRESS = _THRESHOLD.__array_interface__["data"][0]  # (65536,) float32


def decode_payload(payload: memoryview, numel: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes checked to be ``payload_nbytes(numel, block)`` long -> a 1-D tensor of ``dtype``."""
    kernel = native.decode_kernel(build=numel >= NATIVE_BUILD_MIN_NUMEL) if numel else None
    if kernel is not None:
        out = torch.empty(numel, dtype=torch.float32)  # (N,)
        address = np.frombuffer(payload, dtype=np.uint8).__array_interface__["data"][0]
        absmax_bytes = 4 * -(numel // -block)
        threads = 1 if numel < THREAD_MIN_NUMEL else torch.get_num_threads()
        codes = address + absmax_bytes
        kernel(codes, address, _MAP_ADDRESS, out.data_ptr(), numel, block, threads, 1)
    else:
        out = _decode_numpy(payload, numel, block)
    return out if dtype == torch.float32 else out.to(dtype)


def _decode_numpy(payload: memoryview, numel: int, block: int) -> torch.Tensor:
    """The same as the C kernel, in numpy and torch passes -> (N,) float32."""
    blocks = -(numel // -block)
    absmax = np.frombuffer(payload, dtype="<f4", count=blocks).astype(np.float32)  # (nblocks,)
    pairs = numel // 2
    out = torch.empty(numel, dtype=torch.float32)
    values = out.numpy()  # (N,)
    if pairs:
        codes = np.frombuffer(payload, dtype="<u2", count=pairs, offset=4 * blocks)  # (N // 2,)
        if numel < GATHER_MIN_NUMEL:
            np.take(_PAIRS, codes, out=values[: 2 * pairs].view(np.uint64))
        else:
            index = torch.from_numpy(codes.astype(np.int32))  # (N // 2,), aligned and writable
            torch.index_select(_PAIRS_T, 0, index, out=out[: 2 * pairs].view(torch.int64))
    if numel % 2:
        values[-1] = DYNAMIC_MAP[payload[-1]]
    full = numel - numel % block
    if full >= GATHER_MIN_NUMEL:  # torch broadcasts rows of 64 ~2x faster than numpy
        out[:full].view(-1, block).mul_(torch.from_numpy(absmax[: full // block, None]))
    # a NaN/inf block decodes to NaN/inf, as encoded
    with np.errstate(invalid="ignore", over="ignore"):
        if full and full < GATHER_MIN_NUMEL:
            by_block = values[:full].reshape(-1, block)
            by_block *= absmax[: full // block, None]
        if full < numel:
            values[full:] *= absmax[-1]
    return out


_MIDS = torch.from_numpy(((DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) / np.float32(2)).astype(np.float32))
_MIDS_ON: dict[torch.device, torch.Tensor] = {}  # (255,) float32 midpoints, per device


def encode_payload_torch(tensor: torch.Tensor, block: int) -> torch.Tensor:
    """The payload of ``encode_payload`` computed with torch operations on the tensor's own device
    (a GPU's output is quantized there and only ~1 byte per element crosses to the host): a
    uint8 tensor on that device, the same bytes for finite values (NaN/inf blocks decode as
    NaN/inf either way). Each code is the number of map midpoints strictly below ``x / absmax``
    (``bucketize``), which is the nearest map value with ties going down, as the tables give."""
    flat = tensor.detach().reshape(-1).to(torch.float32)  # (N,)
    numel = flat.numel()
    blocks = -(numel // -block)
    payload = torch.empty(payload_nbytes(numel, block), dtype=torch.uint8, device=flat.device)
    if not numel:
        return payload
    rows = torch.nn.functional.pad(flat, (0, blocks * block - numel)).view(blocks, block)
    absmax = rows.abs().amax(dim=1)  # (nblocks,); the zero padding changes no maximum
    scaled = rows / absmax.clamp_min(float(_TINY))[:, None]  # (nblocks, block) in [-1, 1]
    mids = _MIDS_ON.get(flat.device)
    if mids is None:
        mids = _MIDS_ON[flat.device] = _MIDS.to(flat.device)
    codes = torch.bucketize(scaled, mids)  # (nblocks, block) int64
    payload[: 4 * blocks] = absmax.view(torch.uint8)  # little-endian float32, as on the host
    payload[4 * blocks :] = codes.reshape(-1)[:numel].to(torch.uint8)
    return payload


def error_bound(tensor: torch.Tensor, block: int) -> torch.Tensor:
    """Largest |decoded - x| per element of ``tensor`` (float32 rounding in; no 16-bit cast).

    The code's half gap times the block's absmax, plus the float32 rounding of ``code * absmax``:
    2**-24 relative for normal numbers, up to 2**-149 absolute where the product is subnormal.
    """
    flat = tensor.detach().reshape(-1).to(torch.float64).abs()  # (N,)
    bound = torch.empty_like(flat)
    full = flat.numel() - flat.numel() % block
    rel = MAX_HALF_GAP + 2.0**-23
    if full:
        absmax = flat[:full].reshape(-1, block).amax(dim=1, keepdim=True)
        bound[:full] = (absmax * rel).expand(-1, block).reshape(-1)
    if full < flat.numel():
        bound[full:] = flat[full:].max() * rel
    return (bound + 2.0**-149).reshape(tensor.shape)
