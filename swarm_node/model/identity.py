"""Which model is this: a digest of a model folder's config and of every block's weights.

A model's id is ``sha256(config digest, digest of the tensors outside the blocks, each block's
digest)``; a block's digest covers the name, dtype, shape and raw bytes of each of its tensors, read
straight from the safetensors files (memory-mapped, no torch). Computed once and cached beside the
model (or under the cache folder when the model's folder is read-only), keyed by the size,
modification time and inode of config.json and every weight file: a new revision written over the
old one is hashed again. A server verifies the blocks it loads against the cache (``verify``):
what it announces is what it holds. Knows nothing of peers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm_node.errors import ModelError
from swarm_node.model.checkpoint import INDEX_FILE, Checkpoint

log = logging.getLogger(__name__)

CACHE_FILE = ".swarm-node-identity.json"
MANIFEST_FILE = "swarm-node-manifest.json"  # the same, shipped beside a client's head (no stamp)
CACHE_VERSION = 1
DIGEST_CONTEXT = b"swarm-node/model/v1\x00"
SPAN_CONTEXT = b"swarm-node/span/v1\x00"
SHORT = 12  # hex digits shown to people
ADAPTER_ID_HEX = 32  # hex digits of an adapter's id (records list up to 64 of them)
MAX_HEADER = 100 << 20  # bytes of a safetensors JSON header
HASH_WORKERS = min(8, os.cpu_count() or 1)  # blocks hashed at once
# config.json entries that say how a file was written, not what the model computes
_VOLATILE_CONFIG = ("transformers_version", "_name_or_path", "_commit_hash")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelIdentity:
    """A model's name (for people) and digests (for machines): ``digest`` names the weights."""

    name: str
    digest: str  # hex sha256 over the config, the non-block tensors and every block
    config_digest: str
    rest_digest: str  # embeddings, final norm, LM head
    blocks: tuple[str, ...]  # one hex digest per block

    @property
    def short(self) -> str:
        return self.digest[:SHORT]

    def span_digest(self, start: int, end: int) -> str:
        """The digest of blocks ``start..end-1``, as a server of them announces it."""
        if not 0 <= start < end <= len(self.blocks):
            raise ModelError(
                f"span must satisfy 0 <= start < end <= {len(self.blocks)}, got {start}:{end}"
            )
        return span_digest(self.blocks[start:end], start)

    def describe(self) -> str:
        return f"{self.name} ({self.short})"


def span_digest(blocks: tuple[str, ...] | list[str], start: int) -> str:
    hasher = hashlib.sha256(SPAN_CONTEXT + struct.pack("<I", start))
    for block in blocks:
        hasher.update(bytes.fromhex(block))
    return hasher.hexdigest()


def model_identity(
    path: str | os.PathLike[str],
    *,
    name: str,
    cache_dir: Path,
    verify: tuple[int, int] | None = None,
) -> ModelIdentity:
    """The identity of the model folder ``path`` (a Checkpoint), from its cache when the files are
    the ones hashed (same size, modification time and inode), else computed (reading every weight
    once) and cached.

    ``verify`` (start, end): a cached identity is checked against the files' blocks start..end-1
    (hashed again: what a server loads is what it announces). A block whose bytes changed under an
    unchanged size and modification time (a copy that kept the times, a disk error) makes the
    whole identity computed again and cached anew, with a WARNING."""
    checkpoint = Checkpoint.open(path)
    folder = checkpoint.path
    stamp = _stamp(folder, checkpoint)
    for cache in _cache_paths(folder, cache_dir):
        found = _read_cache(cache, stamp)
        if found is None:
            continue
        identity = ModelIdentity(name=name, **found)
        changed = [] if verify is None else changed_blocks(checkpoint, identity, *verify)
        if not changed:
            return identity
        log.warning(
            "the weights of block(s) %s in %s are not those identified before (size and "
            "modification time unchanged): identifying the model again",
            changed,
            folder,
        )
        break
    if not _holds_blocks(checkpoint):
        return manifest_identity(checkpoint, name=name)
    computed = compute_identity(checkpoint, name=name)
    entry = {
        "version": CACHE_VERSION,
        "stamp": stamp,
        "digest": computed.digest,
        "config_digest": computed.config_digest,
        "rest_digest": computed.rest_digest,
        "blocks": list(computed.blocks),
    }
    for cache in _cache_paths(folder, cache_dir):
        try:
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entry) + "\n")
            os.replace(tmp, cache)
            break
        except OSError as exc:
            log.debug("cannot cache the identity of %s at %s: %r", folder, cache, exc)
    return computed


def manifest_identity(checkpoint: Checkpoint, *, name: str) -> ModelIdentity:
    """The identity of a folder holding no blocks (a client's: config, embeddings, norm, head),
    from the manifest beside it (MANIFEST_FILE, or CACHE_FILE copied from the model's folder).
    What the folder holds is checked: the manifest's config and non-block digests against the
    files, its model digest against its parts; its block digests are what the client expects of
    servers."""
    folder = checkpoint.path
    found = None
    for file_name in (MANIFEST_FILE, CACHE_FILE):
        found = _read_cache(folder / file_name, None)
        if found is not None:
            break
    if found is None:
        raise ModelError(
            f"model folder {str(folder)!r} holds none of the model's blocks, so it must hold a "
            f"manifest to be identified ({MANIFEST_FILE}, or the {CACHE_FILE} of the model's "
            "folder), found none"
        )
    identity = ModelIdentity(name=name, **found)
    config_digest = _config_digest(folder / "config.json")
    rest, _ = _digests(checkpoint, None, blocks_needed=False)
    top = hashlib.sha256(DIGEST_CONTEXT)
    for part in (identity.config_digest, identity.rest_digest, *identity.blocks):
        top.update(bytes.fromhex(part))
    problems = [
        f"{what} digest {held[:12]} in the manifest, {actual[:12]} {where}"
        for what, held, actual, where in (
            ("config", identity.config_digest, config_digest, "in config.json"),
            ("non-block tensors'", identity.rest_digest, rest, "in the weight files"),
            ("model", identity.digest, top.hexdigest(), "from the manifest's parts"),
        )
        if held != actual
    ]
    if len(identity.blocks) != checkpoint.num_blocks:
        problems.append(
            f"{len(identity.blocks)} block digests in the manifest, {checkpoint.num_blocks} "
            "blocks in config.json"
        )
    if problems:
        raise ModelError(
            f"the manifest in {str(folder)!r} must describe this folder's model: "
            + "; ".join(problems)
        )
    return identity


def _holds_blocks(checkpoint: Checkpoint) -> bool:
    prefixes = [checkpoint.family.layer_prefix(i) for i in range(checkpoint.num_blocks)]
    return any(_block_of(tensor, prefixes) is not None for tensor in checkpoint.tensor_names())


def changed_blocks(
    checkpoint: Checkpoint, identity: ModelIdentity, start: int, end: int
) -> list[int]:
    """The blocks of ``start..end-1`` whose tensors in the files do not hash to ``identity``'s
    digests (each read once, memory-mapped)."""
    if not 0 <= start < end <= len(identity.blocks):
        raise ModelError(
            f"blocks to verify must satisfy 0 <= start < end <= {len(identity.blocks)}, "
            f"got {start}:{end}"
        )
    _, blocks = _digests(checkpoint, range(start, end))
    return [
        b
        for b, digest in zip(range(start, end), blocks, strict=True)
        if digest != identity.blocks[b]
    ]


def compute_identity(checkpoint: Checkpoint, *, name: str) -> ModelIdentity:
    """Hash the config and every tensor (no cache)."""
    config_digest = _config_digest(checkpoint.path / "config.json")
    rest, blocks = _digests(checkpoint, None)
    top = hashlib.sha256(DIGEST_CONTEXT)
    for part in (config_digest, rest, *blocks):
        top.update(bytes.fromhex(part))
    return ModelIdentity(
        name=name,
        digest=top.hexdigest(),
        config_digest=config_digest,
        rest_digest=rest,
        blocks=blocks,
    )


def _digests(
    checkpoint: Checkpoint, span: range | None, *, blocks_needed: bool = True
) -> tuple[str, tuple[str, ...]]:
    """(digest of the tensors outside the blocks, each block's digest): of every block, or only of
    those in ``span`` (then the first is ""); ``blocks_needed=False``: the first alone."""
    prefixes = [checkpoint.family.layer_prefix(i) for i in range(checkpoint.num_blocks)]
    every = range(len(prefixes)) if blocks_needed else range(0)
    wanted = every if span is None else span
    hashers = {b: hashlib.sha256() for b in wanted}
    rest = hashlib.sha256()
    names = checkpoint.tensor_names()  # sorted: the digest does not depend on file layout
    held = {_block_of(tensor, prefixes) for tensor in names}
    absent = [i for i in wanted if i not in held]
    if absent:
        raise ModelError(
            f"model folder {str(checkpoint.path)!r} must hold the tensors of every block to be "
            f"identified, it has none of block(s) {absent[:8]}"
        )
    by_file: dict[str, list[str]] = {}
    for tensor in names:
        block = _block_of(tensor, prefixes)
        if block in hashers or (block is None and span is None):
            by_file.setdefault(checkpoint.weight_file(tensor), []).append(tensor)
    entries: dict[str, tuple[str, list[int], int, int, int]] = {}
    maps: list[mmap.mmap] = []
    try:
        for file_name in sorted(by_file):
            mapped, header, base = _map_safetensors(checkpoint.path / file_name)
            maps.append(mapped)
            for tensor in by_file[file_name]:
                where = _tensor_entry(header, tensor, len(mapped), base, file_name)
                entries[tensor] = (*where[:2], len(maps) - 1, *where[2:])
        groups: dict[int | None, list[str]] = {}
        for tensor in names:
            if tensor in entries:
                groups.setdefault(_block_of(tensor, prefixes), []).append(tensor)

        def hash_group(group: int | None) -> None:
            hasher = rest if group is None else hashers[group]
            for tensor in groups[group]:
                dtype, shape, index, begin, end = entries[tensor]
                hasher.update(f"{tensor}\x00{dtype}\x00{shape}\x00".encode())
                with memoryview(maps[index]) as view:
                    hasher.update(view[begin:end])

        # blocks hash independently, each on a thread (hashlib lets go of the GIL for large
        # buffers); the pool is joined before the files are unmapped
        with ThreadPoolExecutor(max_workers=HASH_WORKERS) as pool:
            list(pool.map(hash_group, groups))
    finally:
        for mapped in maps:
            mapped.close()
    return ("" if span is not None else rest.hexdigest()), tuple(
        hashers[b].hexdigest() for b in wanted
    )


def safetensors_digest(path: str | os.PathLike[str]) -> str:
    """The digest of one safetensors file's content: its metadata and each tensor (name, dtype,
    shape, bytes), in name order: the same tensors saved again give the same digest (the header's
    own byte layout varies between saves)."""
    mapped, header, base = _map_safetensors(Path(path))
    try:
        hasher = hashlib.sha256(b"swarm-node/safetensors/v1\x00")
        metadata = header.get("__metadata__", {})
        hasher.update(
            json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode() + b"\x00"
        )
        for tensor in sorted(k for k in header if k != "__metadata__"):
            dtype, shape, begin, end = _tensor_entry(header, tensor, len(mapped), base, str(path))
            hasher.update(f"{tensor}\x00{dtype}\x00{shape}\x00".encode())
            with memoryview(mapped) as view:
                hasher.update(view[begin:end])
        return hasher.hexdigest()
    finally:
        mapped.close()


def adapter_id(folder: str | os.PathLike[str]) -> str:
    """A PEFT adapter folder's id: ADAPTER_ID_HEX hex digits of the digest of its
    ``adapter_config.json`` (canonical JSON) and ``adapter_model.safetensors`` (content)."""
    folder = Path(folder).expanduser()
    config = _config_digest(folder / "adapter_config.json")
    weights = safetensors_digest(folder / "adapter_model.safetensors")
    digest = hashlib.sha256(b"swarm-node/adapter/v1\x00" + bytes.fromhex(config + weights))
    return digest.hexdigest()[:ADAPTER_ID_HEX]


def _block_of(tensor: str, prefixes: list[str]) -> int | None:
    for i, prefix in enumerate(prefixes):
        if tensor.startswith(prefix):
            return i
    return None


def _config_digest(path: Path) -> str:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{str(path)!r} must be readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _map_safetensors(path: Path) -> tuple[mmap.mmap, dict[str, Any], int]:
    """(the memory-mapped file, its JSON header, where its data starts), lengths checked first."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 2 <= header_len <= min(MAX_HEADER, size - 8):
            raise ModelError(
                f"{str(path)!r} must start with a safetensors header of 2 to {MAX_HEADER} bytes "
                f"within the file ({size} bytes), got a length of {header_len}"
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise ModelError(f"{str(path)!r}: safetensors header is not JSON: {exc}") from None
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if not isinstance(header, dict):
        mapped.close()
        raise ModelError(f"{str(path)!r}: safetensors header must be a JSON object")
    return mapped, header, 8 + header_len


def _tensor_entry(
    header: dict[str, Any], tensor: str, size: int, base: int, file_name: str
) -> tuple[str, list[int], int, int]:
    """(dtype, shape, first byte, one past the last) of ``tensor`` in its file, checked."""
    found = header.get(tensor)
    info: dict[str, Any] = found if isinstance(found, dict) else {}
    offsets = info.get("data_offsets")
    begin, end = offsets if isinstance(offsets, list) and len(offsets) == 2 else (-1, -1)
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise ModelError(
            f"{file_name!r}: tensor {tensor!r} must have data offsets, got {str(found)[:100]}"
        )
    if base + end > size:
        raise ModelError(
            f"{file_name!r}: tensor {tensor!r} must lie within the file ({size} bytes), "
            f"ends at {base + end}"
        )
    return str(info.get("dtype")), list(info.get("shape", [])), base + begin, base + end


def _stamp(folder: Path, checkpoint: Checkpoint) -> dict[str, list[int]]:
    """Size and modification time (ns) of every file the digest depends on."""
    files = {"config.json", *(checkpoint.weight_file(n) for n in checkpoint.tensor_names())}
    if (folder / INDEX_FILE).is_file():
        files.add(INDEX_FILE)
    out = {}
    for name in sorted(files):
        st = (folder / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def _cache_paths(folder: Path, cache_dir: Path) -> list[Path]:
    """Beside the model first, then under ``cache_dir`` (a folder we may not write to)."""
    keyed = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return [folder / CACHE_FILE, cache_dir / "identities" / f"{keyed}.json"]


def _read_cache(path: Path, stamp: dict[str, list[int]] | None) -> dict[str, Any] | None:
    """The digests in the cache entry ``path`` if it is one of files with ``stamp`` (None: any)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("version") != CACHE_VERSION:
        return None
    if stamp is not None and entry.get("stamp") != stamp:
        return None
    blocks = entry.get("blocks")
    fields = (entry.get("digest"), entry.get("config_digest"), entry.get("rest_digest"))
    if not (isinstance(blocks, list) and all(_is_hex(x) for x in (*fields, *blocks))):
        return None
    return {
        "digest": fields[0],
        "config_digest": fields[1],
        "rest_digest": fields[2],
        "blocks": tuple(blocks),
    }


def _is_hex(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 64:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True
