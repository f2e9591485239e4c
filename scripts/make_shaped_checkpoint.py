#!/usr/bin/env python
"""Write a random-weight checkpoint with a real model's shape, sharded like the hub's.

    python scripts/make_shaped_checkpoint.py --shape llama-3-8b --out /tmp/llama-3-8b-shaped
    python scripts/make_shaped_checkpoint.py --shape llama-3-8b --layers 8 --hidden 1024 \\
        --intermediate 3584 --vocab 16384 --out /tmp/small   # the same proportions, smaller

The folder holds config.json, model.safetensors.index.json and model-0000X-of-0000N.safetensors
(at most --shard-mb each), every tensor of transformers' model of that config (names and shapes
from its skeleton on the meta device): linear weights uniform with std --std, norms ones. Written
tensor by tensor, each in chunks of rows: the process never holds more than one chunk
(~64 MB), whatever the model's size, so an 8B- or 70B-shaped checkpoint can be written on a small
machine (mind the disk: Llama-3-8B in float16 is ~16 GB, 70B ~141 GB). `--device cuda` draws the
random numbers on a GPU (several times faster). Prints one JSON line (folder, bytes, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "llama-3-70b": dict(
        model_type="llama",
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
CHUNK_ELEMENTS = 16 * 2**20  # numbers drawn at a time


def shaped_config(shape: str, **overrides: object):
    """transformers' config of ``shape`` with the given fields replaced (None: kept)."""
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of ``config`` holds, in the hub's order."""
    import copy

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def plan_shards(
    shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_shard(
    path: Path,
    tensors: list[tuple[str, tuple[int, ...]]],
    *,
    dtype: torch.dtype,
    std: float,
    seed: int,
    device: str,
) -> int:
    """One safetensors file, its header first, then each tensor drawn and written chunk by chunk."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    bound = std * math.sqrt(3.0)  # uniform in [-bound, bound] has standard deviation std
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for index, (name, shape) in enumerate(tensors):
            numel = math.prod(shape)
            norm = len(shape) == 1 and name.endswith("norm.weight")
            generator = torch.Generator(device=device).manual_seed(seed * 100003 + index)
            for begin in range(0, numel, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, numel - begin)
                if norm:
                    chunk = torch.ones(count, dtype=dtype)
                else:
                    chunk = torch.empty(count, device=device).uniform_(
                        -bound, bound, generator=generator
                    )
                    chunk = chunk.to(dtype).cpu()
                f.write(memoryview(chunk.view(torch.uint8).numpy()))
    return 8 + len(raw) + offset


def write_checkpoint(
    out: Path,
    config,
    *,
    dtype: torch.dtype = torch.float16,
    shard_mb: int = 4900,
    std: float = 0.02,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(config)
    shards = plan_shards(shapes, dtype.itemsize, shard_mb * 2**20)
    weight_map = {}
    total = 0
    for i, tensors in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        written = write_shard(
            out / file_name, tensors, dtype=dtype, std=std, seed=seed + i, device=device
        )
        total += written
        weight_map.update({name: file_name for name, _ in tensors})
        print(f"wrote {file_name} ({written / 2**20:.0f} MiB)", file=sys.stderr, flush=True)
    data_bytes = sum(math.prod(s) for _, s in shapes) * dtype.itemsize
    index = {"metadata": {"total_size": data_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out)
    return {
        "folder": str(out),
        "model_type": config.model_type,
        "blocks": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "tensors": len(shapes),
        "shards": len(shards),
        "bytes": total,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--layers", type=int, help="num_hidden_layers instead of the shape's")
    p.add_argument("--hidden", type=int, help="hidden_size instead of the shape's")
    p.add_argument("--intermediate", type=int, help="intermediate_size instead of the shape's")
    p.add_argument("--heads", type=int, help="num_attention_heads instead of the shape's")
    p.add_argument("--kv-heads", type=int, help="num_key_value_heads instead of the shape's")
    p.add_argument("--vocab", type=int, help="vocab_size instead of the shape's")
    p.add_argument("--shard-mb", type=int, default=4900, help="largest shard (the hub's: ~5 GB)")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where random numbers are drawn (cpu, cuda)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args()
    if args.out.exists():
        if not args.force:
            p.error(f"--out {args.out} exists (--force replaces it)")
        shutil.rmtree(args.out)
    config = shaped_config(
        args.shape,
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
    )
    free = shutil.disk_usage(args.out.parent if args.out.parent.exists() else Path.cwd()).free
    need = sum(math.prod(s) for _, s in tensor_shapes(config)) * getattr(torch, args.dtype).itemsize
    if need > free - 2**30:
        p.error(
            f"the checkpoint needs {need / 2**30:.1f} GiB, the disk has {free / 2**30:.1f} free"
        )
    summary = write_checkpoint(
        args.out,
        config,
        dtype=getattr(torch, args.dtype),
        shard_mb=args.shard_mb,
        std=args.std,
        seed=args.seed,
        device=args.device,
    )
    print(json.dumps({"shape": args.shape, **summary}))


if __name__ == "__main__":
    main()
