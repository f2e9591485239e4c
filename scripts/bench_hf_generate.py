#!/usr/bin/env python
"""generate() through transformers' loop vs our own decode loop, on the same swarm.

SmolLM2-135M, float32, greedy (both loops give the same tokens), one `swarm-node serve` process
holding all 30 blocks. Each measurement runs in its own clean client process (torch defaults: no
thread pools spun up by an earlier run), the two loops alternate round by round, and the figures are
medians: steady tokens/s (after the first token, timed by a streamer) and time to first token. The
ratio is transformers' loop over ours, paired within each round.

    .venv/bin/python scripts/bench_hf_generate.py [--rounds 5] [--new-tokens 64] [--quick]

Prints one JSON line. (scripts/bench_inference.py measures the swarm against local transformers.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_processes import TokenClock  # noqa: E402

CLI = str(Path(sys.executable).with_name("swarm-node"))
PROMPT = "The capital of France is"
LOOPS = ("swarm", "transformers")


def measure(addr: str, loop: str, new_tokens: int) -> dict[str, Any]:
    """One client process's run: a warm-up call (routes, connections), then the timed one."""
    from swarm_node import DistributedModelForCausalLM
    from swarm_node.model import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=[addr]) as model:
        model.generate(ids, max_new_tokens=4, decode_loop=loop)
        clock = TokenClock()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, decode_loop=loop, streamer=clock)
    steady = clock.times[-1] - clock.times[0]
    return {
        "tokens": out[0, ids.shape[1] :].tolist(),
        "ttft_s": clock.times[0] - t0,
        "tokens_per_s": (len(clock.times) - 1) / steady if steady > 0 else 0.0,
    }


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [CLI, "serve", "--blocks", "0:30", "--listen", "/ip4/127.0.0.1/tcp/0"]
    cmd += ["--torch-threads", str(threads), "--throughput", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    addr = proc.stdout.readline().strip() if proc.stdout else ""
    if not addr:
        proc.kill()
        raise SystemExit("the server did not start")
    return proc, addr


def run_clean(addr: str, loop: str, new_tokens: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", loop, "--addr", addr]
    cmd += ["--new-tokens", str(new_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 16 tokens")
    parser.add_argument("--measure", choices=LOOPS, help=argparse.SUPPRESS)  # a client process
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.addr, args.measure, args.new_tokens)))
        return
    if args.quick:
        args.rounds, args.new_tokens = 2, 16
    load_before = os.getloadavg()
    server, addr = start_server(args.server_threads)
    runs: dict[str, list[dict[str, Any]]] = {loop: [] for loop in LOOPS}
    try:
        for i in range(args.rounds):
            for loop in LOOPS if i % 2 == 0 else reversed(LOOPS):
                runs[loop].append(run_clean(addr, loop, args.new_tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)

    def median(loop: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[loop]), 4)

    ratios = [
        t["tokens_per_s"] / s["tokens_per_s"]
        for s, t in zip(runs["swarm"], runs["transformers"], strict=True)
        if s["tokens_per_s"] > 0
    ]
    print(
        json.dumps(
            {
                "bench": "hf_generate",
                "model": "smollm2-135m",
                "dtype": "float32",
                "servers": 1,
                "new_tokens": args.new_tokens,
                "rounds": args.rounds,
                "swarm_loop_tokens_per_s": median("swarm", "tokens_per_s"),
                "transformers_loop_tokens_per_s": median("transformers", "tokens_per_s"),
                "swarm_loop_ttft_s": median("swarm", "ttft_s"),
                "transformers_loop_ttft_s": median("transformers", "ttft_s"),
                "ratio_transformers_over_swarm": round(statistics.median(ratios), 3),
                "same_tokens": all(
                    s["tokens"] == t["tokens"]
                    for s, t in zip(runs["swarm"], runs["transformers"], strict=True)
                ),
                "load_avg_before": [round(x, 2) for x in load_before],
                "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
