#!/usr/bin/env python
"""The OpenAI-compatible API under load: N concurrent chat requests vs the same N one at a time.

SmolLM2-135M-Instruct, float32, greedy, through a 2-server swarm of real `swarm-node serve` processes
on loopback (blocks 0:15 and 15:30, batching on unless --no-server-batching). Each measurement runs
in its own clean process (``--worker``): it opens a peer and the API (``open_api``, hypercorn's trio
worker, torch at its default threads) and the official ``openai`` client sends the requests over HTTP
from worker threads, either one at a time ("sequential", the baseline) or all at once
("concurrent"). Rounds alternate the two (sequential first in even rounds), with the same prompts, so
both produce the same text (``same_text``). The figure is the median over rounds of concurrent
aggregate tokens/s over sequential tokens/s (issue 19's target: >= 3 for 8 requests).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_api.py [--quick] [--rounds 3] [--max-tokens 32]

Prints one JSON line (progress on stderr). On a shared machine the figures carry that load
(``loadavg`` before and after): rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CLI = str(Path(sys.executable).with_name("swarm-node"))
MODEL = "smollm2-135m"
QUESTIONS = [
    "Tell me about the history of Paris.",
    "How do plants make food?",
    "Explain how a bicycle works.",
    "Why is the sky blue?",
    "What do bees do in winter?",
    "Describe a good breakfast.",
    "How does a computer store numbers?",
    "What makes a good friend?",
    "What is a volcano?",
    "How do birds fly?",
    "Why do we sleep?",
    "How is bread made?",
    "What is the moon made of?",
    "How do fish breathe?",
    "What is rain?",
    "Why are leaves green?",
]


def start_servers(threads: int, extra: list[str]) -> tuple[list[subprocess.Popen], str]:
    processes: list[subprocess.Popen] = []
    first = ""
    for start, end in ((0, 15), (15, 30)):
        cmd = [CLI, "serve", "--blocks", f"{start}:{end}", "--listen", "/ip4/127.0.0.1/tcp/0"]
        cmd += ["--torch-threads", str(threads), "--throughput", "100", *extra]
        if first:
            cmd += ["--initial-peers", first]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        processes.append(proc)
        addr = proc.stdout.readline().strip() if proc.stdout else ""
        if not addr:
            raise SystemExit(f"server {start}:{end} did not start")
        first = first or addr
    return processes, first


def chat_once(client: Any, question: str, max_tokens: int) -> tuple[int, str]:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.usage.completion_tokens, reply.choices[0].message.content


def sequential(client: Any, questions: list[str], max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    replies = [chat_once(client, q, max_tokens) for q in questions]
    wall = time.perf_counter() - t0
    return {"tokens": sum(n for n, _ in replies), "wall": wall, "texts": [t for _, t in replies]}


def concurrent(client: Any, questions: list[str], max_tokens: int) -> dict[str, Any]:
    replies: list[tuple[int, str]] = [(0, "")] * len(questions)
    latencies = [0.0] * len(questions)
    barrier = threading.Barrier(len(questions) + 1)

    def one(i: int) -> None:
        barrier.wait()
        t = time.perf_counter()
        replies[i] = chat_once(client, questions[i], max_tokens)
        latencies[i] = time.perf_counter() - t

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    return {
        "tokens": sum(n for n, _ in replies),
        "wall": wall,
        "texts": [t for _, t in replies],
        "latency_median_s": statistics.median(latencies),
    }


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (clean) process: an API over the swarm at ``args.addr``."""
    import openai
    import trio

    from swarm_node.node.apps.api import ApiConfig, open_api
    from swarm_node.node.client.head_batching import head_batcher
    from swarm_node.node.config import PeerConfig
    from swarm_node.node.peer import open_peer

    questions = QUESTIONS[: args.requests]

    async def main() -> dict[str, Any]:
        config = ApiConfig(models=(MODEL,), port=0, refresh_interval=600.0)
        async with open_peer(PeerConfig(initial_peers=(args.addr,))) as peer:
            async with open_api(peer, config) as api:
                client = openai.OpenAI(
                    base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=600
                )
                await trio.to_thread.run_sync(chat_once, client, questions[0], 4)  # warm-up
                api.tracker.peak_active = 0
                run = sequential if args.worker == "sequential" else concurrent
                cpu = time.process_time()
                out = await trio.to_thread.run_sync(run, client, questions, args.max_tokens)
                out["client_cpu_s"] = time.process_time() - cpu
                out["peak_in_flight"] = api.tracker.peak_active
                heads = head_batcher(api.runtimes[MODEL].head)
                out["head_batches"] = {str(k): v for k, v in sorted(heads.batch_sizes.items())}
                return out

    print(json.dumps(trio.run(main)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    mode: str, addr: str, args: argparse.Namespace, servers: list[subprocess.Popen]
) -> dict[str, Any]:
    """One worker process's run; the servers' CPU seconds over it (warm-up and start included)."""
    cmd = [sys.executable, __file__, "--worker", mode, "--addr", addr]
    cmd += ["--requests", str(args.requests), "--max-tokens", str(args.max_tokens)]
    before = [cpu_seconds(p.pid) for p in servers]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} worker failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["server_cpu_s"] = [cpu_seconds(p.pid) - b for p, b in zip(servers, before, strict=True)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 16 tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--no-server-batching", action="store_true")
    parser.add_argument("--worker", choices=("sequential", "concurrent"), help=argparse.SUPPRESS)
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.rounds, args.max_tokens = 1, 16
    load_before = os.getloadavg()
    extra = ["--no-batching"] if args.no_server_batching else []
    procs: list[subprocess.Popen] = []
    runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "concurrent": []}
    try:
        procs, addr = start_servers(args.server_threads, extra)
        for r in range(args.rounds):
            order = ("sequential", "concurrent") if r % 2 == 0 else ("concurrent", "sequential")
            for mode in order:
                runs[mode].append(measure(mode, addr, args, procs))
                got = runs[mode][-1]
                print(
                    f"round {r + 1}/{args.rounds} {mode}: {got['tokens'] / got['wall']:.1f} tok/s",
                    file=sys.stderr,
                )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    seq = [x["tokens"] / x["wall"] for x in runs["sequential"]]
    conc = [x["tokens"] / x["wall"] for x in runs["concurrent"]]
    texts = [x["texts"] for x in runs["sequential"] + runs["concurrent"]]
    out = {
        "benchmark": "api_concurrency",
        "model": MODEL,
        "dtype": "float32",
        "swarm": "2 serve processes on loopback, blocks 0:15 and 15:30",
        "server_batching": not args.no_server_batching,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "server_torch_threads": args.server_threads,
        "completion_tokens_per_round": [x["tokens"] for x in runs["sequential"]],
        "sequential_tokens_per_s": [round(x, 2) for x in seq],
        "concurrent_tokens_per_s": [round(x, 2) for x in conc],
        "concurrent_request_latency_s_median": [
            round(x["latency_median_s"], 2) for x in runs["concurrent"]
        ],
        "sequential_request_latency_s_mean": [
            round(x["wall"] / args.requests, 2) for x in runs["sequential"]
        ],
        "peak_requests_in_flight": [x["peak_in_flight"] for x in runs["concurrent"]],
        "client_head_batches": [x["head_batches"] for x in runs["concurrent"]],
        "same_text": all(t == texts[0] for t in texts),
        # CPU ms per completion token: the API process over its requests, each server over the
        # whole worker run (its warm-up request of 4 tokens included)
        "cpu_ms_per_token": {
            mode: {
                "api": round(
                    statistics.median(1000 * x["client_cpu_s"] / x["tokens"] for x in xs), 1
                ),
                "servers": [
                    round(
                        statistics.median(1000 * x["server_cpu_s"][i] / x["tokens"] for x in xs), 1
                    )
                    for i in range(2)
                ],
            }
            for mode, xs in runs.items()
        },
        "ratio_concurrent_vs_single_tokens_per_s": round(
            statistics.median(conc) / statistics.median(seq), 3
        ),
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
