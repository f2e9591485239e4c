#!/usr/bin/env python
"""How much error the greedy-agreement figure tolerates: plain transformers against itself.

Generates 64 greedy tokens for each of bench_compression.py's 10 prompts with SmolLM2 (float32, no
swarm, no codec) under 2 torch threads and sdpa attention, then again under 1 thread and/or eager
attention (float32 rounding differences: logits up to ~5e-5 apart), and prints the free-running agreement with the
first run and where each prompt first differs (None: never). Compare with the codecs' figures
(float16 0.92, blockwise8 0.54): bench_compression.py.

    .venv/bin/python scripts/agreement_noise_floor.py [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_compression import MODEL, PROMPTS  # noqa: E402
from swarm_node.model import load_tokenizer, resolve_model  # noqa: E402


def run(path: Path, tokenizer, threads: int, attention: str, new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attention
    ).eval()
    outs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, T)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        outs.append(out[0, ids.shape[1] :].tolist())
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    path = resolve_model(MODEL)
    tokenizer = load_tokenizer(path)
    reference = run(path, tokenizer, 2, "sdpa", args.new_tokens)
    total = sum(len(r) for r in reference)
    for threads, attention in ((1, "sdpa"), (2, "eager"), (1, "eager")):
        other = run(path, tokenizer, threads, attention, args.new_tokens)
        same = sum(
            int(a == b)
            for r, o in zip(reference, other, strict=True)
            for a, b in zip(r, o, strict=False)
        )
        first = [
            next((i for i, (a, b) in enumerate(zip(r, o, strict=False)) if a != b), None)
            for r, o in zip(reference, other, strict=True)
        ]
        print(
            f"{threads} thread(s), {attention}: agreement {same / total:.4f}, first difference per prompt {first}"
        )


if __name__ == "__main__":
    main()
