#!/usr/bin/env python
"""Wide-area inference on one machine: push vs client-star through 2 and 3 servers behind delay proxies.

Every peer (servers and the client) sits behind a userspace proxy adding DELAY seconds one way
(tests/delay_proxy.py), so every link has that delay. SmolLM2-135M, float32, greedy, 64 new tokens.
The bound for each run is ``1 / (compute + hops x delay)``: compute is the per-token time of the
same blocks and head run locally, measured right before and right after that very swarm run (their
mean: these machines drift by +-20% from minute to minute, so one figure taken at the start would
judge later runs against another machine); hops N + 1 with push, 2N client-star. The rate is the
steady decode rate (tokens after the first). Each mode runs ``--repeats`` times, interleaved; the
figure is the median of the per-run ``of_bound``.

    .venv/bin/python scripts/bench_wan.py [--delay 0.05] [--new-tokens 64] [--servers 2 3] [--repeats 3]
                                          [--torch-threads N]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

from swarm_node.model import BlockSpan, Checkpoint, ClientHead, load_tokenizer, resolve_model  # noqa: E402
from swarm_node.node.commands import split_blocks  # noqa: E402
from swarm_node.node.generation import SamplingConfig, generate_tokens  # noqa: E402
from tests.swarm_helpers import proxied_swarm  # noqa: E402

PROMPT = "The capital of France is"
MODEL = "smollm2-135m"


def local_compute(span: Any, head: Any, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Median seconds a token through every block of ``span`` plus the head, greedy, here (no network)."""
    num_blocks = span.end
    cache = span.new_cache(input_ids.shape[1] + new_tokens + 1, batch_size=1)
    times = []
    with torch.inference_mode():
        hidden = head.embed(input_ids)
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            out = span.forward(hidden, cache, start=0, end=num_blocks)
            token = head.logits(out[:, -1:, :])[:, -1, :].argmax(-1)
            hidden = head.embed(token[:, None])
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first is the prompt


async def swarm_runs(path: Path, head: Any, input_ids: torch.Tensor, args: argparse.Namespace) -> dict:
    checkpoint = Checkpoint.open(path)
    num_blocks = checkpoint.config.num_hidden_layers
    span = BlockSpan.load(checkpoint, 0, num_blocks)  # every block, for the local baseline
    out: dict[str, Any] = {}
    for n in args.servers:
        async with trio.open_nursery() as nursery:
            spans = split_blocks(num_blocks, n)
            async with proxied_swarm(MODEL, spans, args.delay, nursery, throughput=None) as (servers, client):
                chain = await client.find_chain(MODEL, num_blocks, push=True, max_length=256)
                runs: dict[str, Any] = {"chain": [[h.start, h.end] for h in chain]}
                outputs = []
                per_mode: dict[str, list[dict[str, Any]]] = {"client-star": [], "push": []}
                compute = local_compute(span, head, input_ids, args.new_tokens // 2)
                for _ in range(args.repeats):
                    for mode, push in (("client-star", False), ("push", True)):
                        ids, stats = await generate_tokens(
                            client, head, input_ids, model=MODEL, num_blocks=num_blocks, dtype="float32",
                            sampling=SamplingConfig(max_new_tokens=args.new_tokens), chain=chain, push=push,
                        )
                        after = local_compute(span, head, input_ids, args.new_tokens // 2)
                        here = (compute + after) / 2  # the local rate around this very run
                        compute = after
                        outputs.append(ids.tolist())
                        hops = len(chain) + 1 if push else 2 * len(chain)
                        bound = 1 / (here + hops * args.delay)
                        per_mode[mode].append({
                            "ms_per_token": round(1000 / stats.tokens_per_second, 1),
                            "compute_ms_per_token": round(here * 1000, 1),
                            "bound_ms_per_token": round(1000 / bound, 1),
                            "of_bound": round(stats.tokens_per_second / bound, 3),
                        })
                for mode, rows in per_mode.items():
                    runs[mode] = {
                        "hops": len(chain) + 1 if mode == "push" else 2 * len(chain),
                        "of_bound_median": round(statistics.median(r["of_bound"] for r in rows), 3),
                        "ms_per_token_median": round(statistics.median(r["ms_per_token"] for r in rows), 1),
                        "runs": rows,
                    }
                runs["same_tokens"] = all(o == outputs[0] for o in outputs)
                out[f"{n}-server"] = runs
            nursery.cancel_scope.cancel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay", type=float, default=0.05, help="one-way seconds in front of every peer")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--servers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, interleaved")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    path = resolve_model(MODEL)
    checkpoint = Checkpoint.open(path)
    head = ClientHead.load(checkpoint)
    input_ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids
    runs = trio.run(swarm_runs, path, head, input_ids, args)
    print(json.dumps({
        "bench": "wan", "model": MODEL, "delay_s": args.delay, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "target_push_of_bound": 0.9, **runs,
    }))


if __name__ == "__main__":
    main()
