#!/usr/bin/env python
"""How well spot checks (node/client/verification.py) catch lying servers, what they cost, and
that they accuse nobody honest. One JSON line.

In one process, a tiny-Llama swarm on loopback: blocks 0-2 on three servers (the first one lies),
blocks 3-5 on two. For each misbehaviour (1% relative noise on every answer; 5% noise on a random
1 step in 10; the last block skipped; the input returned) it runs sessions of one-token steps on
the chain [liar, honest] at the client's --verify-rate and counts the steps until the liar is
found (the session's first step is always checked, then a server is due a check with probability
rate per step). ``detection``: misbehaviour -> {rate (found within the target), median_steps}.
``false_accusations`` over ``honest_runs``: greedy generations on an honest swarm (float32 and
int8 servers answering in every codec, chains drawn by the router) that banned or rolled back
anything. ``tokens_per_s_on_over_off``: greedy generations with checks on and off, interleaved,
medians (absolute tokens/s beside). The machine may be shared: say so beside the figures.

    PYTHONPATH=. .venv/bin/python scripts/bench_verify.py [--quick] [--rate 0.05]
"""

from __future__ import annotations

import argparse
import json
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


async def steps_to_find(client, chain, model: str, liar: str, limit: int) -> int | None:
    """One-token steps on ``chain`` until the liar is found (its step count) or ``limit``."""
    settings = SessionSettings(model=model, max_length=limit + 1)
    async with client.inference_session(chain, settings) as session:
        for step in range(1, limit + 1):
            try:
                await session.step(torch.randn(1, 1, H))
            except RolledBack:
                return step
            if any(f.liar == liar for f in session.verifier.found):
                return step
    return None


async def detection(path: Path, config: ClientConfig, runs: int, seed: int) -> dict:
    model, out = path.name, {}
    spans = [(0, 3), (3, 6), (0, 3), (0, 3), (3, 6)]
    for name, install in misbehaviours(seed).items():
        found: list[int | None] = []
        async with local_swarm(path, spans, client=config) as (servers, client):
            records = await records_of(client, model, servers)
            liar, tail = servers[0], servers[1]
            chain = [Hop(records[liar.peer_id], 0, 3), Hop(records[tail.peer_id], 3, 6)]
            install(liar)
            for _ in range(runs):
                client.bans = BanList(base=config.ban_time)  # each run meets the liar afresh
                found.append(await steps_to_find(client, chain, model, liar.peer_id, TARGETS[name]))
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


async def speed(path: Path, config: ClientConfig, rounds: int, new_tokens: int) -> dict:
    model = path.name
    head = ClientHead.load(Checkpoint.open(path))
    rates: dict[str, list[float]] = {"on": [], "off": []}
    spans = [(0, 3), (3, 6), (0, 3), (3, 6)]
    async with local_swarm(path, spans, client=config) as (_, client):
        for round_ in range(rounds):
            for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                rate = config.verify_rate if mode == "on" else 0.0
                client.client_config = replace(config, verify_rate=rate)
                _, stats = await generate_tokens(
                    client,
                    head,
                    torch.randint(0, 256, (1, 8)),
                    SessionSettings(model=model, num_blocks=6),
                    SamplingConfig(max_new_tokens=new_tokens),
                )
                rates[mode].append(new_tokens / stats.total_time)
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {
        "tokens_per_s_on_over_off": on / off,
        "tokens_per_s_on": on,
        "tokens_per_s_off": off,
        "speed_rounds": rounds,
        "speed_tokens": new_tokens,
    }


async def main(args: argparse.Namespace) -> None:
    path = make_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny-llama", num_layers=6)
    config = ClientConfig(
        step_timeout=20.0, retry_delay=0.05, max_attempts=3, verify_rate=args.rate
    )
    quick = args.quick
    t0 = time.perf_counter()
    result = {"bench": "verify", "verify_rate": args.rate, "quick": quick}
    result["detection"] = await detection(path, config, 3 if quick else 40, args.seed)
    result.update(await honest(path, config, 10 if quick else 200, 16))
    result.update(await speed(path, config, 4 if quick else 12, 32))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["load"] = "shared 2-core machine unless rerun on a quiet one"
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few runs (a smoke test)")
    parser.add_argument("--rate", type=float, default=ClientConfig().verify_rate)
    parser.add_argument("--seed", type=int, default=0)
    trio.run(main, parser.parse_args())
