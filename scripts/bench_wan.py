#!/usr/bin/env python
"""Wide-area inference on one machine: push vs client-star through 2 and 3 servers behind delay proxies.

Every peer (servers and the client) sits behind a userspace proxy adding DELAY seconds one way
(tests/delay_proxy.py), so every link has that delay. SmolLM2-135M, float32, greedy, 64 new tokens.
The bound is ``1 / (compute + hops x delay)``: compute is the per-token time of the same blocks and
head run locally, back to back (one BlockSpan of every block, no network), in a clean process of its
own at torch's defaults (never in this one, which runs the swarm: scripts/bench_processes.py says
why), hops N + 1 with push, 2N client-star. These machines drift by +-20% within a minute, so each run generates its tokens in
segments of ``--segment`` tokens through one session and measures the local compute
(``--local-tokens`` tokens) before the first segment and after each one: a segment is judged against
the mean of the two figures around it, and a run's ``of_bound`` is its bound time over its measured
time, summed over its segments (steady decode steps only: the prompt's prefill is left out). Each
mode runs ``--repeats`` times, interleaved; the figure is the median of the per-run ``of_bound``.

    .venv/bin/python scripts/bench_wan.py [--delay 0.05] [--new-tokens 64] [--servers 2 3] [--repeats 3]
                                          [--segment 16] [--local-tokens 8] [--torch-threads N]

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
from typing import TYPE_CHECKING, Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_processes import CleanProcess, serve_jobs  # noqa: E402

from swarm_node.model import BlockSpan, Checkpoint, ClientHead, load_tokenizer, resolve_model  # noqa: E402
from swarm_node.node.apps.commands import split_blocks  # noqa: E402
from swarm_node.node.client.generation import SamplingConfig, continue_tokens, open_token_session  # noqa: E402
from swarm_node.node.client.settings import SessionSettings  # noqa: E402
from tests.swarm_helpers import proxied_swarm  # noqa: E402

if TYPE_CHECKING:
    import torch

PROMPT = "The capital of France is"
MODEL = "smollm2-135m"


def baseline_worker(args: argparse.Namespace) -> None:
    """Answers "compute" jobs: median seconds a token through every block plus the head, greedy,
    back to back in this clean process (no network)."""
    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    path = resolve_model(MODEL)
    checkpoint = Checkpoint.open(path)
    head = ClientHead.load(checkpoint)
    span = BlockSpan.load(checkpoint, 0, checkpoint.num_blocks)
    input_ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids

    def compute(tokens: int) -> dict[str, Any]:
        cache = span.new_cache(input_ids.shape[1] + tokens + 1, batch_size=1)
        times = []
        with torch.inference_mode():
            hidden = head.embed(input_ids)
            for _ in range(tokens):
                t0 = time.perf_counter()
                out = span.forward(hidden, cache, start=0, end=span.end)
                token = head.logits(out[:, -1:, :])[:, -1, :].argmax(-1)
                hidden = head.embed(token[:, None])
                times.append(time.perf_counter() - t0)
        return {
            "s": statistics.median(times[1:]),
            "threads": torch.get_num_threads(),
        }  # [0]: prompt

    serve_jobs({"compute": compute})


async def one_run(
    client: Any,
    head: Any,
    baseline: CleanProcess,
    num_blocks: int,
    input_ids: torch.Tensor,
    chain: list[Any],
    push: bool,
    args: argparse.Namespace,
) -> tuple[list[int], dict[str, Any]]:
    """One generation of ``--new-tokens`` in segments of ``--segment`` tokens, the local compute
    measured before the first segment and after each one; each segment is judged against the mean
    of the two local figures around it (the machine drifts within one run)."""
    import torch  # loaded by now (swarm_node first: its thread settings)

    hops = len(chain) + 1 if push else 2 * len(chain)
    seconds = tokens = bound_seconds = 0.0
    compute_ms: list[float] = []
    before = baseline.ask("compute", tokens=args.local_tokens)["s"]
    async with open_token_session(
        client,
        SessionSettings(
            model=MODEL,
            num_blocks=num_blocks,
            dtype="float32",
            push=push,
            max_length=input_ids.shape[1] + args.new_tokens + 1,
        ),
        chain=chain,
    ) as ts:
        ids = input_ids
        while ids.shape[1] < input_ids.shape[1] + args.new_tokens:
            count = min(args.segment, input_ids.shape[1] + args.new_tokens - ids.shape[1])
            fresh = ids if ts.fed == 0 else ids[:, :0]  # the prompt once, then go on
            out, stats = await continue_tokens(
                head, ts, fresh, SamplingConfig(max_new_tokens=count)
            )
            ids = torch.cat([ids, out[:, fresh.shape[1] :]], dim=1)
            after = baseline.ask("compute", tokens=args.local_tokens)["s"]
            here = (before + after) / 2  # the local rate around this very segment
            before = after
            if fresh.shape[1]:  # the first segment: its first token comes with the prompt's prefill
                steady, step_seconds = (
                    stats.new_tokens - 1,
                    stats.total_time - stats.time_to_first_token,
                )
            else:  # a later one: every token is a decode step (the first also embeds the last token)
                steady, step_seconds = stats.new_tokens, stats.total_time
            seconds += step_seconds
            tokens += steady
            bound_seconds += steady * (here + hops * args.delay)
            compute_ms.append(round(here * 1000, 1))
    return ids[0].tolist(), {
        "ms_per_token": round(1000 * seconds / tokens, 1),
        "bound_ms_per_token": round(1000 * bound_seconds / tokens, 1),
        "of_bound": round(bound_seconds / seconds, 3),
        "compute_ms_per_token": compute_ms,  # per segment
    }


async def swarm_runs(
    path: Path, head: Any, input_ids: torch.Tensor, args: argparse.Namespace
) -> dict:
    num_blocks = Checkpoint.open(path).config.num_hidden_layers
    threads = [] if args.torch_threads is None else ["--torch-threads", str(args.torch_threads)]
    baseline = CleanProcess(__file__, threads)
    try:
        return await runs_of_each_size(head, baseline, num_blocks, input_ids, args)
    finally:
        baseline.close()


async def runs_of_each_size(
    head: Any, baseline: CleanProcess, num_blocks: int, input_ids: torch.Tensor, args: Any
) -> dict:
    out: dict[str, Any] = {}
    for n in args.servers:
        async with trio.open_nursery() as nursery:
            spans = split_blocks(num_blocks, n)
            async with proxied_swarm(MODEL, spans, args.delay, nursery, throughput=None) as (
                servers,
                client,
            ):
                chain = await client.find_chain(MODEL, num_blocks, push=True, max_length=256)
                runs: dict[str, Any] = {"chain": [[h.start, h.end] for h in chain]}
                outputs = []
                per_mode: dict[str, list[dict[str, Any]]] = {"client-star": [], "push": []}
                for _ in range(args.repeats):
                    for mode, push in (("client-star", False), ("push", True)):
                        ids, row = await one_run(
                            client, head, baseline, num_blocks, input_ids, chain, push, args
                        )
                        outputs.append(ids)
                        per_mode[mode].append(row)
                for mode, rows in per_mode.items():
                    runs[mode] = {
                        "hops": len(chain) + 1 if mode == "push" else 2 * len(chain),
                        "of_bound_median": round(statistics.median(r["of_bound"] for r in rows), 3),
                        "of_bound_min": min(r["of_bound"] for r in rows),
                        "ms_per_token_median": round(
                            statistics.median(r["ms_per_token"] for r in rows), 1
                        ),
                        "runs": rows,
                    }
                runs["same_tokens"] = all(o == outputs[0] for o in outputs)
                out[f"{n}-server"] = runs
            nursery.cancel_scope.cancel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--delay", type=float, default=0.05, help="one-way seconds in front of every peer"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--servers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, interleaved")
    parser.add_argument(
        "--segment", type=int, default=16, help="tokens between two local measurements"
    )
    parser.add_argument(
        "--local-tokens", type=int, default=8, help="tokens of each local measurement"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(args)
        return
    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    path = resolve_model(MODEL)
    checkpoint = Checkpoint.open(path)
    head = ClientHead.load(checkpoint)
    input_ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids
    runs = trio.run(swarm_runs, path, head, input_ids, args)
    print(
        json.dumps(
            {
                "bench": "wan",
                "model": MODEL,
                "delay_s": args.delay,
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "segment": args.segment,
                "local_tokens": args.local_tokens,
                "torch_threads": torch.get_num_threads(),
                "target_push_of_bound": 0.9,
                **runs,
            }
        )
    )


if __name__ == "__main__":
    main()
