#!/usr/bin/env python
"""Wide-area inference on one machine: push vs client-star through 2 and 3 servers behind delay proxies.

Every peer (servers and the client) sits behind a userspace proxy adding DELAY seconds one way
(tests/delay_proxy.py), so every link has that delay. SmolLM2-135M, float32, greedy, 64 new tokens.
The bound for each run is ``1 / (compute + hops x delay)``: compute is the per-token time of the
same blocks and head run locally (measured here, in the same run), hops N + 1 with push, 2N
client-star. The rate is the steady decode rate (tokens after the first).

    .venv/bin/python scripts/bench_wan.py [--delay 0.05] [--new-tokens 64] [--servers 2 3] [--torch-threads N]

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


def local_compute(checkpoint: Any, head: Any, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Median seconds a token through every block plus the head, greedy, here (no network)."""
    num_blocks = checkpoint.config.num_hidden_layers
    span = BlockSpan.load(checkpoint, 0, num_blocks)
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


async def swarm_runs(path: Path, head: Any, input_ids: torch.Tensor, args: argparse.Namespace, compute: float) -> dict:
    num_blocks = Checkpoint.open(path).config.num_hidden_layers
    out: dict[str, Any] = {}
    for n in args.servers:
        async with trio.open_nursery() as nursery:
            spans = split_blocks(num_blocks, n)
            async with proxied_swarm(MODEL, spans, args.delay, nursery, throughput=None) as (servers, client):
                chain = await client.find_chain(MODEL, num_blocks, push=True, max_length=256)
                runs: dict[str, Any] = {"chain": [[h.start, h.end] for h in chain]}
                outputs = []
                for mode, push in (("client-star", False), ("push", True), ("client-star-2", False), ("push-2", True)):
                    ids, stats = await generate_tokens(
                        client, head, input_ids, model=MODEL, num_blocks=num_blocks, dtype="float32",
                        sampling=SamplingConfig(max_new_tokens=args.new_tokens), chain=chain, push=push,
                    )
                    outputs.append(ids.tolist())
                    hops = len(chain) + 1 if push else 2 * len(chain)
                    bound = 1 / (compute + hops * args.delay)
                    runs[mode] = {
                        "tokens_per_s": round(stats.tokens_per_second, 3),
                        "ms_per_token": round(1000 / stats.tokens_per_second, 1),
                        "bound_tokens_per_s": round(bound, 3),
                        "bound_ms_per_token": round(1000 / bound, 1),
                        "of_bound": round(stats.tokens_per_second / bound, 3),
                        "hops": hops,
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
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    path = resolve_model(MODEL)
    checkpoint = Checkpoint.open(path)
    head = ClientHead.load(checkpoint)
    input_ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids
    compute = local_compute(checkpoint, head, input_ids, args.new_tokens)
    runs = trio.run(swarm_runs, path, head, input_ids, args, compute)
    print(json.dumps({
        "bench": "wan", "model": MODEL, "delay_s": args.delay, "new_tokens": args.new_tokens,
        "compute_ms_per_token": round(compute * 1000, 1), "torch_threads": torch.get_num_threads(), **runs,
    }))


if __name__ == "__main__":
    main()
