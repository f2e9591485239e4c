"""What naming a model by its weights costs (model/identity.py), beside reading the weights once.

For each checkpoint: the first digest (hashing every tensor), a cached lookup (what every later
start pays), and reading every tensor into torch once (what loading costs anyway), in seconds, per GB
and as ratios. A full re-hash is what verifying the files at load would cost; a cached lookup only
checks the files' sizes and modification times.

Checkpoints: the bundled SmolLM2-135M (f32), and a Llama-3-8B-shaped checkpoint of random bf16
weights with ``--blocks`` of its 32 blocks (the hash cost is linear in bytes: per GB is the figure).
Rounds alternate hashing and reading; the page cache is warm after the first round (the figures
are for weights in memory, as a server that just converted or downloaded them has them).

    python scripts/bench_identity.py [--blocks 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def make_8b_shaped(folder: Path, blocks: int) -> Path:
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


def measure(folder: Path, name: str, rounds: int) -> None:
    from swarm_node.model import Checkpoint
    from swarm_node.model.identity import compute_identity, model_identity

    checkpoint = Checkpoint.open(folder)
    gb = weight_bytes(folder) / 1e9
    hashing, reading = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        identity = compute_identity(checkpoint, name=name)
        hashing.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        # copied out of the file into torch memory, as loading a span does (safetensors alone maps)
        tensors = {
            n: t.clone() for n, t in checkpoint.load_tensors(checkpoint.tensor_names()).items()
        }
        reading.append(time.perf_counter() - t0)
        del tensors
    cache = Path(tempfile.mkdtemp())
    beside = folder / ".swarm-node-identity.json"
    had_cache = beside.exists()
    try:
        model_identity(folder, name=name, cache_dir=cache)  # fills the cache
        t0 = time.perf_counter()
        for _ in range(20):
            model_identity(folder, name=name, cache_dir=cache)
        cached = (time.perf_counter() - t0) / 20
    finally:
        shutil.rmtree(cache)
        if not had_cache:
            beside.unlink(missing_ok=True)
    h, r = min(hashing), min(reading)
    print(
        f"{name}: {gb:.2f} GB, digest {identity.short}\n"
        f"  hash every tensor (first start, or a full verification): {h:.3f} s "
        f"({h / gb:.3f} s/GB), {h / r:.2f}x reading the weights once ({r:.3f} s, {r / gb:.3f} s/GB)\n"
        f"  cached lookup (every later start): {cached * 1000:.2f} ms ({cached / r:.4f}x reading)\n"
        f"  rounds: hash {[round(x, 3) for x in hashing]}, read {[round(x, 3) for x in reading]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="blocks of the 8B-shaped checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    if not args.skip_smollm2:
        from swarm_node.model import resolve_model

        measure(resolve_model("smollm2-135m"), "smollm2-135m", args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_8b_shaped(Path(tmp) / "llama3-8b-shaped", args.blocks)
        measure(folder, f"llama3-8b-shaped ({args.blocks} of 32 blocks, bf16)", args.rounds)


if __name__ == "__main__":
    main()
