#!/usr/bin/env python
"""Failover: what a generation pays when the server it uses is SIGKILLed mid-generation.

`swarm-node serve` processes (blocks 0:H, and H:L on 1 + --repeats servers; SmolLM2 by default); the
client runs here. Each repetition runs a failure-free greedy generation, then the same one with the
server of blocks H:L SIGKILLed after --kill-after tokens: the client bans it, moves those blocks to
another server, replays the session's history there and goes on. Prints one JSON line (medians over
the repetitions, and every run): the time from the kill to the next token, the recovery with and
without the replay's compute, the usual time per token, the total slowdown of the affected generation,
and whether the tokens are the same.

    .venv/bin/python scripts/bench_failover.py [--model smollm2-135m] [--new-tokens 32] [--kill-after 12]
        [--repeats 2] [--push]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

from swarm_node.dht.routing import Hop  # noqa: E402
from swarm_node.model import Checkpoint, ClientHead, load_tokenizer, resolve_model  # noqa: E402
from swarm_node.model.bundled import model_id_of  # noqa: E402
from swarm_node.node.client.generation import GenerationStats, SamplingConfig, generate_tokens  # noqa: E402
from swarm_node.node.client.settings import SessionSettings  # noqa: E402
from swarm_node.node.config import ClientConfig, PeerConfig  # noqa: E402
from swarm_node.node.peer import open_peer  # noqa: E402
from tests.process_swarm import ServerProcess, server_processes  # noqa: E402

PROMPT = "The capital of France is"


class Timeline:
    """Token callback: notes each token's time; optionally SIGKILLs a server after ``kill_after`` tokens."""

    def __init__(self, kill_after: int | None = None, victim: ServerProcess | None = None) -> None:
        self.times: list[float] = []
        self.kill_after, self.victim = kill_after, victim
        self.killed_at: float | None = None

    def __call__(self, token: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if self.victim is not None and len(self.times) == self.kill_after:
            self.victim.process.send_signal(signal.SIGKILL)
            self.killed_at = time.perf_counter()


async def run(args: argparse.Namespace) -> dict:
    path = resolve_model(args.model)
    checkpoint = Checkpoint.open(path)
    layers = checkpoint.config.num_hidden_layers
    half = layers // 2
    head = ClientHead.load(checkpoint)
    input_ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids
    model = model_id_of(args.model)
    extra = ["--throughput", "100"] + (
        ["--torch-threads", str(args.server_threads)] if args.server_threads else []
    )
    client_config = ClientConfig(push=args.push, step_timeout=args.step_timeout)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    spans = [f"0:{half}"] + [f"{half}:{layers}"] * (args.repeats + 1)  # a spare for every kill
    runs: list[dict] = []
    async with server_processes(args.model, spans, extra=extra) as servers:
        async with open_peer(
            PeerConfig(initial_peers=(servers[0].addr,)), client=client_config
        ) as client:
            records = {r.peer_id: r for r in await client.find_servers(model, layers)}

            async def generate(
                chain: list[Hop], timeline: Timeline
            ) -> tuple[list[int], float, GenerationStats]:
                t0 = time.perf_counter()
                ids, stats = await generate_tokens(
                    client,
                    head,
                    input_ids,
                    SessionSettings(
                        model=model, num_blocks=layers, dtype="float32", push=args.push
                    ),
                    sampling,
                    chain=chain,
                    on_tokens=timeline,
                )
                return ids[0].tolist(), time.perf_counter() - t0, stats

            for r in range(args.repeats):  # pairs, side by side: these machines drift
                victim = servers[1 + r]
                chain = [
                    Hop(records[servers[0].peer_id], 0, half),
                    Hop(records[victim.peer_id], half, layers),
                ]
                if r == 0:
                    await generate(chain, Timeline())  # warm-up: connections, first-call costs
                free = Timeline()
                free_ids, free_total, _ = await generate(chain, free)
                failing = Timeline(args.kill_after, victim)
                fail_ids, fail_total, stats = await generate(chain, failing)
                assert failing.killed_at is not None and len(stats.recoveries) == 1
                event = stats.recoveries[0]
                gaps = [b - a for a, b in zip(free.times[1:], free.times[2:], strict=False)]
                after = failing.times[args.kill_after :]
                gaps_after = [b - a for a, b in zip(after, after[1:], strict=False)]
                runs.append(
                    {
                        "kill_to_next_token_s": failing.times[args.kill_after] - failing.killed_at,
                        "recovery_s": event.seconds,
                        "replay_s": event.replay_seconds,
                        "recovery_without_replay_s": event.seconds - event.replay_seconds,
                        "replayed_steps": event.replayed_steps,
                        "usual_token_s": statistics.median(gaps),
                        "token_after_failover_s": statistics.median(gaps_after)
                        if gaps_after
                        else 0.0,
                        "failure_free_total_s": free_total,
                        "with_failover_total_s": fail_total,
                        "slowdown_s": fail_total - free_total,
                        "same_tokens": fail_ids == free_ids,
                    }
                )

    def median(key: str) -> float:
        return round(statistics.median(run[key] for run in runs), 3)

    keys = [k for k in runs[0] if k.endswith("_s")]
    return {
        "model": model,
        "push": args.push,
        "new_tokens": args.new_tokens,
        "killed_after_tokens": args.kill_after,
        "repeats": args.repeats,
        **{k: median(k) for k in keys},
        "replayed_steps": runs[0]["replayed_steps"],
        "same_tokens": all(run["same_tokens"] for run in runs),
        "runs": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()} for run in runs
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kill-after", type=int, default=12)
    parser.add_argument("--push", action="store_true", help="server-to-server push")
    parser.add_argument("--step-timeout", type=float, default=10.0)
    parser.add_argument("--server-threads", type=int, default=None)
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="failure-free / failover pairs (one server killed each)",
    )
    args = parser.parse_args()
    if not 1 <= args.kill_after < args.new_tokens:
        parser.error("--kill-after must be in [1, --new-tokens)")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    print(json.dumps(trio.run(run, args)))


if __name__ == "__main__":
    main()
