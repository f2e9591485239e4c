#!/usr/bin/env python
"""One decode step through all 30 SmolLM2 blocks: model/fast_decode.py vs transformers' own layers.

The same BlockSpan weights, two caches filled by the same prompt, then one new position at a time,
alternating the two paths step by step (these machines drift) and checking every output is the
same bits. Prints one JSON line: the median milliseconds a step of each and their ratio.

    .venv/bin/python scripts/bench_decode_step.py [--steps 200] [--blocks 0:30] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from swarm_node.choices import DTYPES
from swarm_node.model import BlockSpan, Checkpoint, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=200, help="decode steps of each path (default 200)"
    )
    parser.add_argument("--blocks", default="0:30", help="START:END of the span (default 0:30)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args()
    start, end = (int(x) for x in args.blocks.split(":"))
    dtype = getattr(torch, args.dtype)
    checkpoint = Checkpoint.open(resolve_model("smollm2-135m"))
    span = BlockSpan.load(checkpoint, start, end, dtype=dtype)
    hidden_size = span.hidden_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 8, hidden_size, generator=gen, dtype=dtype)
    times: dict[str, list[float]] = {"fast": [], "transformers": []}
    caches = {name: span.new_cache(8 + args.steps) for name in times}
    with torch.inference_mode():
        for cache in caches.values():
            span(prompt, cache)
        for _ in range(args.steps):
            step = torch.randn(1, 1, hidden_size, generator=gen, dtype=dtype)
            outs = []
            for name, cache in caches.items():
                span._fast_decode = (
                    None if name == "fast" else False
                )  # None: asks fast_decode.supports
                t0 = time.perf_counter()
                outs.append(span(step, cache))
                times[name].append(time.perf_counter() - t0)
            if not torch.equal(*outs):
                raise SystemExit("fast_decode differs from transformers' layers")
    span._fast_decode = None
    with torch.inference_mode():
        used = span.uses_fast_decode(1)
    fast = statistics.median(times["fast"][5:])
    slow = statistics.median(times["transformers"][5:])
    print(
        json.dumps(
            {
                "benchmark": "decode_step",
                "model": "smollm2-135m",
                "blocks": f"{start}:{end}",
                "dtype": args.dtype,
                "steps": args.steps,
                "torch_threads": torch.get_num_threads(),
                "fast_path_used": used,
                "bitwise_equal": True,
                "ms_per_step_median": {
                    "fast": round(fast * 1e3, 2),
                    "transformers": round(slow * 1e3, 2),
                },
                "ratio_transformers_vs_fast_time": round(slow / fast, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
