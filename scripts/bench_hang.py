#!/usr/bin/env python
"""A hung server: what a generation pays when the server it uses is frozen (SIGSTOP) mid-generation.

`swarm-node serve` processes: blocks 0:H on 1 + --repeats servers (the one in use and spares) and H:L
on one (SmolLM2-135M by default, H = L/2). Each repetition runs, each in its own fresh client process
(so no run inherits another's thread teams), an undisturbed greedy generation and the same one with
the server of blocks 0:H frozen after --freeze-after tokens; the two alternate in order. The client
notices the late step (step_deadlines.py), replays the session on a spare and goes on; the frozen
server is killed after its run. Prints one JSON line with medians over the repetitions:

- ``frozen_over_normal``: wall time of the frozen run / the undisturbed run (target <= 1.5);
- ``stall_s``: the gap before the token at which the freeze happened (target <= 1.5 s on loopback);
- ``same_tokens``; and the absolute times beside them, the machine and every run.

    .venv/bin/python scripts/bench_hang.py [--model smollm2-135m] [--new-tokens 96] [--freeze-after 8]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

from tests.process_swarm import server_processes  # noqa: E402

PROMPT = "The capital of France is"


async def client_run(args: argparse.Namespace) -> dict:
    """One generation on the chain ``args.chain`` (peer ids), freezing ``--freeze-pid`` after
    ``--freeze-after`` tokens if given; the token times and ids."""
    from swarm_node.dht.routing import Hop
    from swarm_node.model import Checkpoint, ClientHead, load_tokenizer, resolve_model
    from swarm_node.model.bundled import model_id_of
    from swarm_node.node.client.generation import SamplingConfig, generate_tokens
    from swarm_node.node.client.settings import SessionSettings
    from swarm_node.node.config import ClientConfig, PeerConfig
    from swarm_node.node.peer import open_peer

    path = resolve_model(args.model)
    checkpoint = Checkpoint.open(path)
    layers = checkpoint.config.num_hidden_layers
    head = ClientHead.load(checkpoint)
    input_ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids
    model = model_id_of(args.model)
    times: list[float] = []

    def on_token(token: object) -> None:
        times.append(time.perf_counter())
        if args.freeze_pid and len(times) == args.freeze_after:
            os.kill(args.freeze_pid, signal.SIGSTOP)

    config = ClientConfig(step_timeout=args.step_timeout)
    async with open_peer(PeerConfig(initial_peers=(args.bootstrap,)), client=config) as client:
        wanted = args.chain.split(",")
        records: dict = {}
        while not all(p in records for p in wanted):
            records.update((r.peer_id, r) for r in await client.find_servers(model, layers))
        half = layers // 2
        chain = [Hop(records[wanted[0]], 0, half), Hop(records[wanted[1]], half, layers)]
        t0 = time.perf_counter()
        ids, stats = await generate_tokens(
            client,
            head,
            input_ids,
            SessionSettings(model=model, num_blocks=layers, dtype="float32"),
            SamplingConfig(max_new_tokens=args.new_tokens),
            chain=chain,
            on_tokens=on_token,
        )
    return {
        "ids": ids[0].tolist(),
        "total_s": time.perf_counter() - t0,
        "times": [t - t0 for t in times],
        "recoveries": len(stats.recoveries),
        "hedges": len(stats.hedges),
    }


def run_client(args: argparse.Namespace, bootstrap: str, chain: list[str], pid: int = 0) -> dict:
    command = [
        sys.executable,
        __file__,
        "--client",
        *("--model", args.model, "--new-tokens", str(args.new_tokens)),
        *("--freeze-after", str(args.freeze_after), "--freeze-pid", str(pid)),
        *("--bootstrap", bootstrap, "--chain", ",".join(chain)),
        *("--step-timeout", str(args.step_timeout)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"client run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def run(args: argparse.Namespace) -> dict:
    from swarm_node.model import Checkpoint, resolve_model

    layers = Checkpoint.open(resolve_model(args.model)).config.num_hidden_layers
    half = layers // 2
    spans = [f"{half}:{layers}"] + [f"0:{half}"] * (args.repeats + 1)  # a spare for every freeze
    extra = ["--throughput", "100"]
    runs: list[dict] = []
    async with server_processes(args.model, spans, extra=extra) as servers:
        tail = servers[0]
        bootstrap = tail.addr
        run_client(args, bootstrap, [servers[1].peer_id, tail.peer_id])  # warm-up: first-call costs
        for r in range(args.repeats):
            victim = servers[1 + r]
            chain = [victim.peer_id, tail.peer_id]
            normal = await trio.to_thread.run_sync(run_client, args, bootstrap, chain)
            pid = victim.process.pid
            frozen = await trio.to_thread.run_sync(run_client, args, bootstrap, chain, pid)
            victim.process.send_signal(signal.SIGKILL)  # no later hedge or run looks at it again
            k = args.freeze_after
            runs.append(
                {
                    "normal_total_s": normal["total_s"],
                    "frozen_total_s": frozen["total_s"],
                    "frozen_over_normal": frozen["total_s"] / normal["total_s"],
                    "stall_s": frozen["times"][k] - frozen["times"][k - 1],
                    "usual_token_s": statistics.median(
                        b - a
                        for a, b in zip(normal["times"][1:], normal["times"][2:], strict=False)
                    ),
                    "same_tokens": frozen["ids"] == normal["ids"],
                    "recoveries": frozen["recoveries"],
                    "hedges": frozen["hedges"],
                }
            )

    def median(key: str) -> float:
        return round(statistics.median(run[key] for run in runs), 3)

    return {
        "bench": "hang",
        "model": args.model,
        "new_tokens": args.new_tokens,
        "frozen_after_tokens": args.freeze_after,
        "repeats": args.repeats,
        "frozen_over_normal": median("frozen_over_normal"),
        "stall_s": median("stall_s"),
        "same_tokens": all(run["same_tokens"] for run in runs),
        **{k: median(k) for k in ("normal_total_s", "frozen_total_s", "usual_token_s")},
        "targets": {"stall_s": 1.5, "frozen_over_normal": 1.5},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "runs": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()} for run in runs
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--freeze-after", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="undisturbed / frozen pairs")
    parser.add_argument("--step-timeout", type=float, default=60.0, help="the client's ceiling")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--chain", help=argparse.SUPPRESS)
    parser.add_argument("--freeze-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.freeze_after < args.new_tokens:
        parser.error("--freeze-after must be in [1, --new-tokens)")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    print(json.dumps(trio.run(client_run if args.client else run, args)))


if __name__ == "__main__":
    main()
