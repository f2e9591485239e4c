#!/usr/bin/env python
"""How well spot checks (node/client/verification.py) catch lying servers, what they cost, and
that they accuse nobody honest. One JSON line.

Detection and false accusations, in one process: a tiny-Llama swarm on loopback: blocks 0-2 on three
servers (the first one lies), blocks 3-5 on two. For each misbehaviour (1% relative noise on every
answer; 5% noise on a random 1 step in 10; the last block skipped; the input returned) it runs
sessions of one-token steps on the chain [liar, honest] at the client's --rate and counts the steps
until the liar is found (the session's first step is always checked, then a server is due a check
with probability rate per step). ``detection``: misbehaviour -> {rate (found within the target),
median_steps}. With --push the liar is instead the middle server of a push chain of three
(blocks 0-1, 2-3 on three servers of which the first of 2-3 lies, 4-5), checked through the
servers' signed receipts. ``false_accusations`` over ``honest_runs``: greedy generations on an honest swarm
(float32 and int8 servers answering in every codec, chains drawn by the router) that banned or
rolled back anything.

Speed, in separate processes: four real ``swarm-node serve`` processes of --model (SmolLM2 by
default; two per half of its blocks, so every hop has a checker in another process), and for each
round a fresh client process that generates greedily with checks on and off alternately (--pairs of
each; which goes first alternates by round). ``tokens_per_s_on_over_off``: the median of the ratios
of neighbouring on/off generations; absolute medians beside, and the load average. The time of a
generation includes the final check of every server (``settle``). The machine may be shared: the
load is printed; the figures are only indicative under load.

    PYTHONPATH=. .venv/bin/python scripts/bench_verify.py [--quick] [--speed-only] [--rate 0.05]
        [--detection-only [--runs 40] [--honest-runs 200] [--push]]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_processes import run_worker, start_server, stop  # noqa: E402

from swarm_node.dht.bans import BanList  # noqa: E402
from swarm_node.dht.routing import Hop  # noqa: E402
from swarm_node.model import Checkpoint, ClientHead  # noqa: E402
from swarm_node.node.client.generation import SamplingConfig, generate_tokens  # noqa: E402
from swarm_node.node.client.settings import SessionSettings  # noqa: E402
from swarm_node.node.client.verification import RolledBack  # noqa: E402
from swarm_node.node.config import ClientConfig  # noqa: E402
from tests.model_fixtures import make_tiny_model_dir  # noqa: E402
from tests.swarm_helpers import local_swarm  # noqa: E402
from tests.test_verification import (  # noqa: E402
    MIXED,
    lie_in_answers,
    noisy,
    records_of,
    skip_last_block,
)

PROMPT = "The capital of France is"
H = 64  # the tiny model's hidden size
TARGETS = {"noise-1pct": 32, "one-step-in-ten": 400, "skips-last-block": 32, "returns-input": 32}


def misbehaviours(seed: int) -> dict:
    rng = random.Random(seed)
    one, five = noisy(0.01), noisy(0.05)
    return {
        "noise-1pct": lie_in_answers(lambda _, out, __: one(out)),
        "one-step-in-ten": lie_in_answers(
            lambda _, out, __: five(out) if rng.random() < 0.1 else out
        ),
        "skips-last-block": skip_last_block,
        "returns-input": lie_in_answers(lambda hidden, out, _: hidden.to(out.dtype)),
    }


async def steps_to_find(client, chain, model: str, liar: str, limit: int, push: bool) -> int | None:
    """One-token steps on ``chain`` until the liar is found (its step count) or ``limit``."""
    settings = SessionSettings(model=model, max_length=limit + 1, push=push)
    async with client.inference_session(chain, settings) as session:
        for step in range(1, limit + 1):
            try:
                await session.step(torch.randn(1, 1, H))
            except RolledBack:
                return step
            if any(f.liar == liar for f in session.verifier.found):
                return step
    return None


async def detection(
    path: Path, config: ClientConfig, runs: int, seed: int, push: bool = False
) -> dict:
    model, out = path.name, {}
    if push:  # the liar: the middle server (blocks 2-3) of a push chain of three
        spans = [(2, 4), (0, 2), (4, 6), (2, 4), (2, 4)]
        bounds = [(0, 2), (2, 4), (4, 6)]
    else:
        spans = [(0, 3), (3, 6), (0, 3), (0, 3), (3, 6)]
        bounds = [(0, 3), (3, 6)]
    for name, install in misbehaviours(seed).items():
        found: list[int | None] = []
        async with local_swarm(path, spans, client=config) as (servers, client):
            records = await records_of(client, model, servers)
            liar = servers[0]
            by_start = {}
            for server in servers[:3]:
                by_start.setdefault(server.server.start, server)
            chain = [Hop(records[by_start[a].peer_id], a, b) for a, b in bounds]
            install(liar)
            for _ in range(runs):
                client.bans = BanList(base=config.ban_time)  # each run meets the liar afresh
                found.append(
                    await steps_to_find(client, chain, model, liar.peer_id, TARGETS[name], push)
                )
        caught = [s for s in found if s is not None]
        out[name] = {
            "rate": len(caught) / runs,
            "median_steps": statistics.median(caught) if caught else None,
            "within": TARGETS[name],
            "runs": runs,
        }
    return out


async def honest(path: Path, config: ClientConfig, runs: int, new_tokens: int) -> dict:
    model = path.name
    head = ClientHead.load(Checkpoint.open(path))
    spans = [(0, 3)] * 3 + [(3, 6)] * 3
    accused, checked = 0, 0
    async with local_swarm(path, spans, client=config, per_server=MIXED) as (_, client):
        for run in range(runs):
            torch.manual_seed(run)
            _, stats = await generate_tokens(
                client,
                head,
                torch.randint(0, 256, (1, 8)),
                SessionSettings(model=model, num_blocks=6),
                SamplingConfig(max_new_tokens=new_tokens),
            )
            checked += stats.checked_positions
            if stats.rollbacks or stats.findings or client.bans.banned(trio.current_time()):
                accused += 1
                client.bans = BanList(base=config.ban_time)
    return {"false_accusations": accused, "honest_runs": runs, "positions_checked": checked}


def speed_worker(args: argparse.Namespace) -> dict:
    """A fresh client process: generations with checks on (at ``args.rate``) and off, alternating
    (``args.pairs`` of each, the first mode alternating with ``args.flip``)."""
    from swarm_node.model import load_tokenizer, resolve_model
    from swarm_node.node.config import PeerConfig
    from swarm_node.node.peer import open_peer

    path = resolve_model(args.model)
    checkpoint = Checkpoint.open(path)
    head = ClientHead.load(checkpoint)
    input_ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids
    settings = SessionSettings(model=args.model, num_blocks=checkpoint.num_blocks)
    config = ClientConfig(verify_rate=args.rate)
    modes = ("off", "on") if args.flip else ("on", "off")

    async def run() -> dict:
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        async with open_peer(PeerConfig(initial_peers=(args.addr,)), client=config) as peer:
            await generate_tokens(peer, head, input_ids, settings, SamplingConfig(max_new_tokens=4))
            sampling = SamplingConfig(max_new_tokens=args.new_tokens)
            for _ in range(args.pairs):
                for mode in modes:
                    rate = args.rate if mode == "on" else 0.0
                    peer.client_config = replace(config, verify_rate=rate)
                    out, stats = await generate_tokens(peer, head, input_ids, settings, sampling)
                    runs[mode].append(
                        {
                            "tokens": out[0, input_ids.shape[1] :].tolist(),
                            "tokens_per_s": stats.new_tokens / stats.total_time,
                            "checked_positions": stats.checked_positions,
                            "accused": len(stats.findings) + stats.rollbacks,
                        }
                    )
        return runs

    return trio.run(run)


def speed(args: argparse.Namespace) -> dict:
    """Tokens/s with checks on and off: real ``swarm-node serve`` processes (two servers for each
    half of the model, so each hop has a checker on another process), a fresh client process per
    round running generations with checks on and off alternately; the median of the on/off ratios
    of neighbouring generations, and the medians of each mode's tokens/s."""
    from swarm_node.model import resolve_model

    procs = []
    blocks = Checkpoint.open(resolve_model(args.model)).num_blocks
    half = f"{blocks // 2}"
    model = ("--model", args.model)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    try:
        first, addr = start_server(f"0:{half}", extra=model)
        procs.append(first)
        for span in (f"{half}:{blocks}", f"0:{half}", f"{half}:{blocks}"):
            procs.append(start_server(span, addr, extra=model)[0])
        for round_ in range(args.speed_rounds):
            flags = ["--addr", addr, "--model", args.model, "--rate", str(args.rate)]
            flags += ["--new-tokens", str(args.new_tokens), "--pairs", str(args.pairs)]
            got = run_worker(__file__, flags + (["--flip"] if round_ % 2 else []))
            for mode in runs:
                runs[mode] += got[mode]
            print(
                f"round {round_ + 1}: on "
                + ", ".join(f"{r['tokens_per_s']:.2f}" for r in got["on"])
                + "; off "
                + ", ".join(f"{r['tokens_per_s']:.2f}" for r in got["off"])
                + f" tokens/s (load {os.getloadavg()[0]:.1f})",
                file=sys.stderr,
            )
    finally:
        stop(procs)
    on = [r["tokens_per_s"] for r in runs["on"]]
    off = [r["tokens_per_s"] for r in runs["off"]]
    every = runs["on"] + runs["off"]
    return {
        "tokens_per_s_on_over_off": statistics.median(a / b for a, b in zip(on, off, strict=True)),
        "tokens_per_s_on": statistics.median(on),
        "tokens_per_s_off": statistics.median(off),
        "speed_model": args.model,
        "speed_generations_each": len(on),
        "speed_tokens": args.new_tokens,
        "same_tokens": all(r["tokens"] == every[0]["tokens"] for r in every),
        "checked_positions_per_run": statistics.median(r["checked_positions"] for r in runs["on"]),
        "speed_accused": sum(r["accused"] for r in runs["on"]),
    }


async def in_process(args: argparse.Namespace) -> dict:
    path = make_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny-llama", num_layers=6)
    config = ClientConfig(
        step_timeout=20.0, retry_delay=0.05, max_attempts=3, verify_rate=args.rate
    )
    runs = args.runs or (3 if args.quick else 40)
    honest_runs = args.honest_runs or (10 if args.quick else 200)
    result: dict = {"detection": await detection(path, config, runs, args.seed, args.push)}
    result["push"] = args.push
    result.update(await honest(path, config, honest_runs, 16))
    return result


def main(args: argparse.Namespace) -> None:
    if args.worker:
        print(json.dumps(speed_worker(args)))
        return
    t0 = time.perf_counter()
    result: dict = {"bench": "verify", "verify_rate": args.rate, "quick": args.quick}
    result["load_at_start"] = os.getloadavg()[0]
    if not args.speed_only:
        result.update(trio.run(in_process, args))
    if args.quick:
        args.speed_rounds = min(args.speed_rounds, 2)
    if not args.detection_only:
        result.update(speed(args))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["load_at_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few runs (a smoke test)")
    parser.add_argument("--rate", type=float, default=ClientConfig().verify_rate)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-only", action="store_true", help="only tokens/s on vs off")
    parser.add_argument(
        "--detection-only", action="store_true", help="only detection and false accusations"
    )
    parser.add_argument("--runs", type=int, default=0, help="runs per misbehaviour (0: 40)")
    parser.add_argument("--honest-runs", type=int, default=0, help="honest runs (0: 200)")
    parser.add_argument(
        "--push", action="store_true", help="the liar is the middle server of a push chain"
    )
    parser.add_argument("--model", default="smollm2-135m", help="the speed runs' model")
    parser.add_argument("--speed-rounds", type=int, default=4, help="client processes")
    parser.add_argument("--pairs", type=int, default=3, help="on/off pairs per client process")
    parser.add_argument("--flip", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    main(parser.parse_args())
