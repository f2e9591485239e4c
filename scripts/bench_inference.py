#!/usr/bin/env python
"""Inference speed: local transformers generate vs the same weights through loopback swarms, every
measurement in its own clean process.

SmolLM2-135M, float32, greedy, 64 new tokens. The servers are real `swarm-node serve` processes at
their defaults; each measurement (local transformers, or a swarm client) is a fresh process that
loads, warms up with a 4-token generation and then times one generation. The local baseline runs at
torch's defaults with none of this program's settings in its environment, so nothing the swarm does
slows it (a process that has run swarm clients keeps thread teams that steal the cores: measured
40% slower). Runs alternate within each round; the figures are medians over rounds, the ratios
medians of the ratios paired within a round, because these shared machines drift.

Two views:
- co-located: the client and the servers share this machine's cores, every process at its defaults,
  against local generate at torch's default threads (1 server, 2 servers client-star, 2 servers with
  push: the first server hands its output straight to the second);
- dedicated: each process pinned to cores of its own, as on separate machines, against local on the
  same number of cores per process (1 server: client on core 0, server on core 1, each 1 thread, vs
  local on core 0 with 1 thread). With 2 cores there is no dedicated 2-server run; on a machine with
  more cores, --dedicated-cores gives each process that many.

    .venv/bin/python scripts/bench_inference.py [--repeats 5] [--new-tokens 64] [--quick]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_processes import THREAD_VARS, TokenClock, run_worker, start_server, stop  # noqa: E402

PROMPT = "The capital of France is"
MODEL = "smollm2-135m"


# ---- workers: each runs in its own process and prints one JSON line ----


def local_worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    from swarm_node.model.bundled import resolve_model

    path = resolve_model(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # run on past EOS, as the swarm runs do
    input_ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids

    def run(new: int) -> tuple[list[int], float, float]:
        clock = TokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, max_new_tokens=new, do_sample=False, streamer=clock)
        steady = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
        return out[0, input_ids.shape[1] :].tolist(), clock.times[0] - t0, steady

    run(4)
    tokens, ttft, tps = run(args.new_tokens)
    return {
        "tokens": tokens,
        "ttft_s": ttft,
        "tokens_per_s": tps,
        "threads": torch.get_num_threads(),
    }


def swarm_worker(args: argparse.Namespace) -> dict:
    importlib.import_module("swarm_node")  # first, as a user's program would: its thread settings
    import torch
    import trio

    from swarm_node.model import Checkpoint, ClientHead, load_tokenizer, resolve_model
    from swarm_node.node.client.generation import SamplingConfig, generate_tokens
    from swarm_node.node.client.settings import SessionSettings
    from swarm_node.node.config import PeerConfig
    from swarm_node.node.peer import open_peer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(MODEL)
    input_ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids
    head = ClientHead.load(Checkpoint.open(path))
    blocks = Checkpoint.open(path).num_blocks

    async def main() -> dict:
        async with open_peer(PeerConfig(initial_peers=(args.addr,))) as peer:
            chain = await peer.find_chain(MODEL, blocks)
            settings = SessionSettings(
                model=MODEL, num_blocks=blocks, dtype="float32", push=args.push
            )

            async def run(new: int) -> tuple[list[int], Any]:
                out, stats = await generate_tokens(
                    peer, head, input_ids, settings, SamplingConfig(max_new_tokens=new), chain=chain
                )
                return out[0, input_ids.shape[1] :].tolist(), stats

            await run(4)
            tokens, stats = await run(args.new_tokens)
            return {
                "tokens": tokens,
                "ttft_s": stats.time_to_first_token,
                "tokens_per_s": stats.tokens_per_second,
                "remote_ms_per_token": 1000 * stats.remote_time / stats.new_tokens,
                "threads": torch.get_num_threads(),
                "env": {k: os.environ.get(k) for k in THREAD_VARS if os.environ.get(k)},
            }

    return trio.run(main)


# ---- the orchestrator: starts servers, alternates worker processes (no torch work here) ----


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 32 tokens")
    parser.add_argument("--no-dedicated", action="store_true", help="co-located runs only")
    parser.add_argument(
        "--swarm-env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the servers and swarm clients (not the local baseline), to compare "
        "settings: e.g. GOMP_SPINCOUNT=300000 is libgomp's own spinning",
    )
    parser.add_argument("--worker", choices=("local", "swarm"), help=argparse.SUPPRESS)
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    parser.add_argument("--push", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (local_worker if args.worker == "local" else swarm_worker)(args)
        print(json.dumps(result))
        return
    if args.quick:
        args.repeats, args.new_tokens = 2, 32
    swarm_env = dict(item.split("=", 1) for item in args.swarm_env)
    cores = sorted(os.sched_getaffinity(0))
    dedicated = not args.no_dedicated and len(cores) >= 2
    procs: list[subprocess.Popen] = []
    try:
        p, one = start_server("0:30", env=swarm_env)
        procs.append(p)
        p, two = start_server("0:15", env=swarm_env)
        procs.append(p)
        p, _ = start_server("15:30", two, env=swarm_env)
        procs.append(p)
        runs: dict[str, tuple[str, list[str], set[int] | None]] = {
            "local": ("local", [], None),
            "1-server": ("swarm", ["--addr", one], None),
            "2-server": ("swarm", ["--addr", two], None),
            "2-server-push": ("swarm", ["--addr", two, "--push"], None),
        }
        if dedicated:
            p, solo = start_server("0:30", threads=1, cores={cores[1]}, env=swarm_env)
            procs.append(p)
            runs["dedicated-local"] = ("local", ["--threads", "1"], {cores[0]})
            runs["dedicated-1-server"] = (
                "swarm",
                ["--addr", solo, "--threads", "1"],
                {cores[0]},
            )
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for rnd in range(args.repeats):
            order = list(runs) if rnd % 2 == 0 else list(reversed(runs))
            for name in order:
                kind, extra, pin = runs[name]
                results[name].append(
                    run_worker(
                        __file__,
                        [kind, "--new-tokens", str(args.new_tokens), *extra],
                        cores=pin,
                        env=swarm_env if kind == "swarm" else None,
                    )
                )
            print(
                f"round {rnd + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v[-1]['tokens_per_s']:.1f}" for k, v in results.items())
                + " tokens/s",
                file=sys.stderr,
            )
    finally:
        stop(procs)

    def median(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in results[name]), 3)

    def ratio(name: str, base: str) -> float:
        pairs = zip(results[name], results[base], strict=True)
        return round(statistics.median(m["tokens_per_s"] / b["tokens_per_s"] for m, b in pairs), 3)

    tokens = {json.dumps(r["tokens"]) for rs in results.values() for r in rs}
    co_located = {
        f"{n}_vs_local": ratio(n, "local") for n in ("1-server", "2-server", "2-server-push")
    }
    out: dict[str, Any] = {
        "benchmark": "inference",
        "model": MODEL,
        "dtype": "float32",
        "new_tokens": args.new_tokens,
        "rounds": args.repeats,
        "cores": len(cores),
        "tokens_per_s_median": {n: median(n, "tokens_per_s") for n in results},
        "ttft_s_median": {n: median(n, "ttft_s") for n in results},
        "remote_ms_per_token_median": {
            n: median(n, "remote_ms_per_token")
            for n in results
            if "remote_ms_per_token" in results[n][0]
        },
        "threads": {n: results[n][0]["threads"] for n in results},
        "swarm_client_env": results["1-server"][0]["env"],
        "co_located": co_located,
        "dedicated": (
            {"1-server_vs_local": ratio("dedicated-1-server", "dedicated-local")}
            if dedicated
            else "needs 2 cores"
        ),
        "same_tokens": len(tokens) == 1,
        "targets": {
            "co_located": {"1-server_vs_local": 0.85, "2-server_vs_local": 0.75},
            "dedicated": {"1-server_vs_local": 0.95},
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
