"""Single tensors out of a safetensors file with plain reads: no memory map, no other tensor touched.

safetensors' ``safe_open`` maps the whole shard, and a tensor of the file's own dtype comes back as
a view of that map: the weights a server computes with would be the file's pages, resident once
touched, shared with the page cache, and changed (or a SIGBUS) if the file is rewritten under the
server, after its digests were checked. Here the header is parsed once (checked: a JSON object of
at most ``MAX_HEADER_BYTES``, every entry a known dtype, a shape of ints, offsets inside the file
whose length is the shape's bytes) and each tensor is read straight into a buffer of its own: the
process holds exactly the tensors asked for, owned, nothing else of the file.
``map_tensor`` is the other way, asked for explicitly (a CPU server's --mmap-weights): a view of a
private map of the file, whose untouched pages cost nothing and whose pages are shared with the
page cache and other processes of the same file until written.
Knows nothing of models, layers or devices.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm_node.errors import ModelError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor's entry in the safetensors file ``path``; ModelError if the header lies."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ModelError(f"{str(path)!r} is not a safetensors file: shorter than 8 bytes")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelError(
                    f"{str(path)!r}: header length must be at most "
                    f"{min(MAX_HEADER_BYTES, size - 8)} bytes, got {length}"
                )
            raw = f.read(length)
    except OSError as exc:
        raise ModelError(f"{str(path)!r} cannot be read: {exc}") from exc
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"{str(path)!r}: the header must be JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{str(path)!r}: the header must be a JSON object")
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, base, size)
    return entries


def _entry(path: Path, name: str, info: object, base: int, size: int) -> TensorEntry:
    where = f"{str(path)!r}, tensor {name!r}"
    if not isinstance(info, dict):
        raise ModelError(f"{where}: its entry must be an object, got {type(info).__name__}")
    dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise ModelError(
            f"{where}: 'dtype' must be one of {sorted(DTYPES)}, got {info.get('dtype')!r}"
        )
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ModelError(f"{where}: 'shape' must be a list of ints >= 0, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= size - base
    ):
        raise ModelError(
            f"{where}: 'data_offsets' must be [begin, end] inside the file's {size - base} data "
            f"bytes, got {offsets!r}"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ModelError(
            f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, its offsets span "
            f"{offsets[1] - offsets[0]}"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), offset=base + offsets[0], nbytes=nbytes)


def read_tensor(f: object, entry: TensorEntry) -> torch.Tensor:
    """The tensor of ``entry`` from the open binary file ``f``, in a buffer of its own."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        f.seek(entry.offset)  # type: ignore[attr-defined]
        done = 0
        while done < entry.nbytes:
            got = f.readinto(view[done:])  # type: ignore[attr-defined]
            if not got:
                raise ModelError(f"a safetensors file ended inside a tensor at byte {done}")
            done += got
    return out


def map_file(f: object) -> mmap.mmap:
    """A private (copy-on-write) map of the whole open binary file ``f``."""
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # type: ignore[attr-defined]


def map_tensor(mapped: mmap.mmap, entry: TensorEntry) -> torch.Tensor | None:
    """The tensor of ``entry`` as a view of ``mapped`` (nothing copied), or None where it cannot be
    one: empty, or not aligned to its dtype in the file."""
    if not entry.nbytes or entry.offset % entry.dtype.itemsize:
        return None
    count = entry.nbytes // entry.dtype.itemsize
    flat = torch.frombuffer(mapped, dtype=entry.dtype, count=count, offset=entry.offset)
    return flat.view(entry.shape)
