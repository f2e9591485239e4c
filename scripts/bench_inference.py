#!/usr/bin/env python
"""Inference speed: local transformers generate vs the same weights through 1- and 2-server loopback swarms.

SmolLM2-135M, float32, greedy, 64 new tokens. The servers are real `swarm-node serve` processes; the
client runs here. Runs are interleaved (local, 1-server, 2-server client-star, 2-server with push:
the first server hands its output straight to the second) and repeated; the figures are the medians
of the ratios paired within each repetition, because these 2-core machines drift.

The targets compare against transformers' generate. A swarm server runs its blocks with
model/fast_decode.py, a leaner decode step than transformers' layers (same bits), so the run
"local-loop" is also measured: the same BlockSpan and head in this process, no network; the ratio
1-server / local-loop is what the protocol and the second process cost.

    .venv/bin/python scripts/bench_inference.py [--repeats 5] [--new-tokens 64] [--server-threads 2]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import trio

from swarm_node.model import BlockSpan, Checkpoint, ClientHead, load_tokenizer, resolve_model
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import PeerConfig
from swarm_node.node.peer import open_peer

CLI = str(Path(sys.executable).with_name("swarm-node"))
PROMPT = "The capital of France is"
RUNS = ("local", "1-server", "2-server", "2-server-push", "local-loop")


class Clock:
    """A transformers streamer that notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.skipped_prompt = False

    def put(self, value: Any) -> None:
        if not self.skipped_prompt:
            self.skipped_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def local_run(model: Any, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    clock = Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
        )
    ttft = clock.times[0] - t0
    tps = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    return ttft, tps


def local_loop_run(
    span: Any, head: Any, input_ids: torch.Tensor, new_tokens: int
) -> tuple[float, float]:
    """Greedy decoding with the swarm's own pieces (BlockSpan of all blocks, ClientHead) in this process."""
    cache = span.new_cache(input_ids.shape[1] + new_tokens)
    times = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        hidden = head.embed(input_ids)
        for _ in range(new_tokens):
            token = head.logits(span(hidden, cache)[:, -1:, :])[:, -1, :].argmax(-1)
            times.append(time.perf_counter())
            hidden = head.embed(token[:, None])
    return times[0] - t0, (len(times) - 1) / (times[-1] - times[0])


def start_servers(spans: list[tuple[int, int]], threads: int) -> tuple[list[subprocess.Popen], str]:
    processes: list[subprocess.Popen] = []
    first_addr = ""
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
        if first_addr:
            cmd += ["--initial-peers", first_addr]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        processes.append(proc)
        addr = proc.stdout.readline().strip() if proc.stdout else ""
        if not addr:
            raise SystemExit(f"server {start}:{end} did not start")
        first_addr = first_addr or addr
    return processes, first_addr


async def swarm_runs(
    addrs: dict[str, str],
    head: Any,
    input_ids: torch.Tensor,
    local: Any,
    span: Any,
    args: argparse.Namespace,
) -> dict:
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in RUNS}
    remote: dict[str, list[float]] = {
        name: [] for name in ("1-server", "2-server", "2-server-push")
    }
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    async with (
        open_peer(PeerConfig(initial_peers=(addrs["1-server"],))) as one,
        open_peer(PeerConfig(initial_peers=(addrs["2-server"],))) as two,
    ):
        clients = {"1-server": one, "2-server": two}
        chains = {name: await peer.find_chain("smollm2-135m", 30) for name, peer in clients.items()}
        runs = [(name, clients[name], chains[name], False) for name in clients]
        runs.append(("2-server-push", two, chains["2-server"], True))
        for _name, peer, chain, push in runs:  # warm-up: caches, allocators, connections
            await generate_tokens(
                peer,
                head,
                input_ids,
                SessionSettings(model="smollm2-135m", num_blocks=30, dtype="float32", push=push),
                SamplingConfig(max_new_tokens=4),
                chain=chain,
            )
        local_run(local, input_ids, 4)
        local_loop_run(span, head, input_ids, 4)
        for rep in range(args.repeats):
            results["local"].append(
                await trio.to_thread.run_sync(local_run, local, input_ids, args.new_tokens)
            )
            for name, peer, chain, push in runs:
                _, stats = await generate_tokens(
                    peer,
                    head,
                    input_ids,
                    SessionSettings(
                        model="smollm2-135m", num_blocks=30, dtype="float32", push=push
                    ),
                    sampling,
                    chain=chain,
                )
                results[name].append((stats.time_to_first_token, stats.tokens_per_second))
                remote[name].append(stats.remote_time / stats.new_tokens)
            results["local-loop"].append(
                await trio.to_thread.run_sync(
                    local_loop_run, span, head, input_ids, args.new_tokens
                )
            )
            print(
                f"repeat {rep + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v[-1][1]:.1f} tok/s" for k, v in results.items()),
                file=sys.stderr,
            )
    results["remote_ms_per_token"] = {
        k: round(1000 * statistics.median(v), 1) for k, v in remote.items()
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--server-threads", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.ERROR)

    path = resolve_model("smollm2-135m")
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    checkpoint = Checkpoint.open(path)
    head = ClientHead.load(checkpoint)
    span = BlockSpan.load(checkpoint, 0, checkpoint.num_blocks)
    procs: list[subprocess.Popen] = []
    try:
        p1, a1 = start_servers([(0, 30)], args.server_threads)
        procs += p1
        p2, a2 = start_servers([(0, 15), (15, 30)], args.server_threads)
        procs += p2
        results = trio.run(
            swarm_runs, {"1-server": a1, "2-server": a2}, head, input_ids, local, span, args
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)

    def paired(name: str, index: int, invert: bool = False, baseline: str = "local") -> float:
        ratios = []
        for mine, base in zip(results[name], results[baseline], strict=True):
            ratios.append(base[index] / mine[index] if invert else mine[index] / base[index])
        return round(statistics.median(ratios), 3)

    out = {
        "benchmark": "inference",
        "model": "smollm2-135m",
        "dtype": "float32",
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "server_torch_threads": args.server_threads,
        "torch_threads_local": torch.get_num_threads(),
        "tokens_per_s_median": {
            k: round(statistics.median(v[1] for v in results[k]), 2) for k in RUNS
        },
        "ttft_s_median": {k: round(statistics.median(v[0] for v in results[k]), 4) for k in RUNS},
        "remote_ms_per_token_median": results["remote_ms_per_token"],
        "ratio_1server_vs_local_tokens_per_s": paired("1-server", 1),
        "ratio_2server_vs_local_tokens_per_s": paired("2-server", 1),
        "ratio_2server_push_vs_local_tokens_per_s": paired("2-server-push", 1),
        "ratio_local_loop_vs_local_tokens_per_s": paired("local-loop", 1),
        "ratio_1server_vs_local_loop_tokens_per_s": paired("1-server", 1, baseline="local-loop"),
        "ratio_2server_vs_local_loop_tokens_per_s": paired("2-server", 1, baseline="local-loop"),
        "ratio_local_vs_1server_ttft": paired("1-server", 0, invert=True),
        "ratio_local_vs_2server_ttft": paired("2-server", 0, invert=True),
        "ratio_local_vs_2server_push_ttft": paired("2-server-push", 0, invert=True),
        "targets": {"1server_vs_local": 0.95, "2server_vs_local": 0.8},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
