#!/usr/bin/env python
"""The OpenAI-compatible API under load: 8 concurrent chat requests vs the same 8 one at a time.

SmolLM2-135M-Instruct, float32, greedy, through a 2-server swarm of real `swarm-node serve` processes
on loopback (blocks 0:15 and 15:30). The API runs in this process (``open_api``, hypercorn's trio
worker); the official ``openai`` client sends the requests over HTTP from worker threads. Each
repetition runs the 8 requests one at a time ("sequential", a single request's throughput) and then
all 8 at once ("concurrent"), with the same prompts, so both produce the same tokens. The figure is
the median over repetitions of concurrent aggregate tokens/s over sequential tokens/s.

    .venv/bin/python scripts/bench_api.py [--repeats 3] [--max-tokens 32] [--server-threads 1]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

from swarm_node.node.apps.api import ApiConfig, open_api
from swarm_node.node.config import PeerConfig
from swarm_node.node.peer import open_peer

CLI = str(Path(sys.executable).with_name("swarm-node"))
QUESTIONS = [
    "Tell me about the history of Paris.",
    "How do plants make food?",
    "Explain how a bicycle works.",
    "Why is the sky blue?",
    "What do bees do in winter?",
    "Describe a good breakfast.",
    "How does a computer store numbers?",
    "What makes a good friend?",
]


def start_servers(spans: list[tuple[int, int]], threads: int) -> tuple[list[subprocess.Popen], str]:
    processes: list[subprocess.Popen] = []
    first = ""
    for start, end in spans:
        cmd = [
            CLI,
            "serve",
            "--blocks",
            f"{start}:{end}",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--torch-threads",
            str(threads),
            "--throughput",
            "100",
        ]
        if first:
            cmd += ["--initial-peers", first]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        processes.append(proc)
        addr = proc.stdout.readline().strip() if proc.stdout else ""
        if not addr:
            raise SystemExit(f"server {start}:{end} did not start")
        first = first or addr
    return processes, first


def chat_once(client: Any, question: str, max_tokens: int) -> int:
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.usage.completion_tokens


def sequential(client: Any, max_tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    tokens = sum(chat_once(client, q, max_tokens) for q in QUESTIONS)
    return tokens, time.perf_counter() - t0


def concurrent(client: Any, max_tokens: int) -> tuple[int, float, list[float]]:
    counts = [0] * len(QUESTIONS)
    latencies = [0.0] * len(QUESTIONS)
    barrier = threading.Barrier(len(QUESTIONS) + 1)

    def one(i: int) -> None:
        barrier.wait()
        t = time.perf_counter()
        counts[i] = chat_once(client, QUESTIONS[i], max_tokens)
        latencies[i] = time.perf_counter() - t

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    return sum(counts), time.perf_counter() - t0, latencies


async def run(addr: str, args: argparse.Namespace) -> dict[str, Any]:
    import openai

    results: dict[str, list[Any]] = {"sequential": [], "concurrent": [], "peak_active": []}
    async with (
        open_peer(PeerConfig(initial_peers=(addr,))) as peer,
        open_api(peer, ApiConfig(models=("smollm2-135m",), port=0, refresh_interval=60.0)) as api,
    ):
        client = openai.OpenAI(
            base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=600
        )
        await trio.to_thread.run_sync(chat_once, client, QUESTIONS[0], 4)  # warm-up
        for rep in range(args.repeats):
            tokens, wall = await trio.to_thread.run_sync(sequential, client, args.max_tokens)
            results["sequential"].append((tokens, wall))
            api.tracker.peak_active = 0
            ctokens, cwall, latencies = await trio.to_thread.run_sync(
                concurrent, client, args.max_tokens
            )
            results["concurrent"].append((ctokens, cwall, latencies))
            results["peak_active"].append(api.tracker.peak_active)
            print(
                f"repeat {rep + 1}/{args.repeats}: sequential {tokens / wall:.1f} tok/s, "
                f"concurrent {ctokens / cwall:.1f} tok/s (peak {api.tracker.peak_active} in flight)",
                file=sys.stderr,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--server-threads", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    procs: list[subprocess.Popen] = []
    try:
        procs, addr = start_servers([(0, 15), (15, 30)], args.server_threads)
        results = trio.run(run, addr, args)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    seq = [tokens / wall for tokens, wall in results["sequential"]]
    conc = [tokens / wall for tokens, wall, _ in results["concurrent"]]
    out = {
        "benchmark": "api_concurrency",
        "model": "smollm2-135m",
        "dtype": "float32",
        "swarm": "2 serve processes on loopback, blocks 0:15 and 15:30",
        "requests": len(QUESTIONS),
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "server_torch_threads": args.server_threads,
        "completion_tokens_per_round": [t for t, _ in results["sequential"]],
        "sequential_tokens_per_s": [round(x, 2) for x in seq],
        "concurrent_tokens_per_s": [round(x, 2) for x in conc],
        "concurrent_request_latency_s_median": [
            round(statistics.median(lat), 2) for _, _, lat in results["concurrent"]
        ],
        "sequential_request_latency_s_mean": [
            round(wall / len(QUESTIONS), 2) for _, wall in results["sequential"]
        ],
        "peak_requests_in_flight": results["peak_active"],
        "ratio_concurrent_vs_single_tokens_per_s": round(
            statistics.median(c / s for c, s in zip(conc, seq, strict=True)), 3
        ),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
