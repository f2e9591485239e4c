"""What naming a model by its weights costs (model/identity.py), beside reading the weights once.

For each checkpoint, each figure measured in its own clean process (torch defaults), rounds
alternating the kinds, medians reported:
  read      every tensor copied out of the files into torch memory (what loading costs anyway)
  load      BlockSpan.load of every block (what a server's start does: skeleton, weights, dtype)
  manifest  the first digest: the config and every tensor hashed (a model's first start)
  verify    verification at load: every block hashed again and checked against the cached
            digests (identity.changed_blocks; what each later start of a server pays)
  cached    the cached lookup alone (--no-verify-weights: sizes, times and inodes compared)
Ratios: manifest / read, verify / read and verify / load. The weights are read once before the
rounds, so the page cache is warm (the figures are for weights in memory, as a server that just
converted, downloaded or loaded them has them).

Checkpoints: a Llama-3-8B-shaped checkpoint of random bf16 weights with ``--blocks`` of its 32
blocks (hashing is linear in bytes: per GB is the figure), and the bundled SmolLM2-135M (f32)
unless ``--skip-smollm2``. One JSON line on stdout.

    python scripts/bench_identity.py [--quick] [--blocks 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("read", "load", "manifest", "verify", "cached")


def make_8b_shaped(folder: Path, blocks: int) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=blocks,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        torch_dtype="bfloat16",
    )
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    h, i, kv = 4096, 14336, 1024
    tensors = {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for b in range(blocks):
        p = f"model.layers.{b}."
        shapes = {
            "self_attn.q_proj.weight": (h, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }
        for name, shape in shapes.items():
            tensors[p + name] = torch.randn(shape, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure_once(kind: str, folder: Path, cache: Path) -> float:
    """Seconds ``kind`` takes on ``folder`` (in this process: called by the child)."""
    from swarm_node.model import BlockSpan, Checkpoint
    from swarm_node.model.identity import changed_blocks, compute_identity, model_identity

    checkpoint = Checkpoint.open(folder)
    n = checkpoint.num_blocks
    identity = model_identity(folder, name="bench", cache_dir=cache)  # cached by the parent
    t0 = time.perf_counter()
    if kind == "read":
        tensors = checkpoint.load_tensors(checkpoint.tensor_names())
        copied = {name: t.clone() for name, t in tensors.items()}
        del copied
    elif kind == "load":
        dtype = next(iter(checkpoint.load_tensors(["model.norm.weight"]).values())).dtype
        BlockSpan.load(checkpoint, 0, n, dtype=dtype)
    elif kind == "manifest":
        compute_identity(checkpoint, name="bench")
    elif kind == "verify":
        if changed_blocks(checkpoint, identity, 0, n):
            raise SystemExit("the weights changed during the benchmark")
    elif kind == "cached":
        for _ in range(20):
            model_identity(folder, name="bench", cache_dir=cache)
        return (time.perf_counter() - t0) / 20
    else:
        raise SystemExit(f"kind must be one of {KINDS}, got {kind!r}")
    return time.perf_counter() - t0


def in_clean_process(kind: str, folder: Path, cache: Path) -> float:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--measure",
            kind,
            "--folder",
            str(folder),
            "--cache",
            str(cache),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def bench(folder: Path, name: str, rounds: int, cache: Path) -> dict[str, object]:
    from swarm_node.model.identity import model_identity

    identity = model_identity(folder, name=name, cache_dir=cache)  # the cache the children read
    gb = weight_bytes(folder) / 1e9
    for path in folder.glob("*.safetensors"):  # warm the page cache once
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(rounds):
        order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
        for kind in order:
            times[kind].append(in_clean_process(kind, folder, cache))
    med = {kind: statistics.median(values) for kind, values in times.items()}
    return {
        "checkpoint": name,
        "gb": round(gb, 3),
        "blocks": len(identity.blocks),
        "digest": identity.short,
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "seconds_per_gb": {k: round(v / gb, 4) for k, v in med.items() if k != "cached"},
        "manifest_over_read": round(med["manifest"] / med["read"], 3),
        "verify_over_read": round(med["verify"] / med["read"], 3),
        "verify_over_load": round(med["verify"] / med["load"], 3),
        "cached_ms": round(med["cached"] * 1000, 3),
        "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="blocks of the 8B-shaped checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 block, 1 round, no SmolLM2")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--measure", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({"seconds": measure_once(args.measure, args.folder, args.cache)}))
        return
    if args.quick:
        args.blocks, args.rounds, args.skip_smollm2 = 1, 1, True
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        if not args.skip_smollm2:
            from swarm_node.model import resolve_model

            results.append(bench(resolve_model("smollm2-135m"), "smollm2-135m", args.rounds, cache))
        folder = make_8b_shaped(Path(tmp) / "llama3-8b-shaped", args.blocks)
        name = f"llama3-8b-shaped ({args.blocks} of 32 blocks, bf16)"
        results.append(bench(folder, name, args.rounds, cache))
    print(
        json.dumps(
            {
                "bench": "identity",
                "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "cpus": os.cpu_count(),
                "load_1min": round(os.getloadavg()[0], 2),
                "rounds": args.rounds,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
