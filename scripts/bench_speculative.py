#!/usr/bin/env python
"""Speculative decoding over a wide-area pipeline: tokens/s with prompt-lookup drafts over without.

SmolLM2-135M-Instruct (float32, greedy, chat template) on 2 servers with push; every peer sits behind
a userspace proxy adding DELAY seconds one way (tests/delay_proxy.py), as in bench_wan.py. Two prompt
sets: "repetitive" (quote a given passage: the answer repeats the prompt; the 135M model rewrites
code it is asked to edit rather than copying it, and paraphrases the first passage more than the
others) and "chat" (open questions). Each round generates every prompt once without and once with
speculation (adaptive prompt lookup, the default drafter), alternating which goes first; a set's
figure per round is its tokens over its seconds (opening the session and the prefill included, the
same for both: ``speedup_*``) and its tokens after the first over the seconds from the first token
to the last (``decode_speedup_*``; before 2026-12-06 03:30 UTC these seconds also held opening and
closing the session, ~1.4 s a generation: ``session_s_per_run``), and the speedups are
medians over rounds of with/without. ``same_tokens``: greedy output identical
with and without. Per set: acceptance, tokens per trip, a trip's seconds with and without drafts.
Figures measured on a shared machine are under load: the absolute tokens/s and the load average
are printed beside the ratios. ``--trace FILE`` writes every trip (drafts, tokens, seconds) of
every speculative run as JSON lines.

    .venv/bin/python scripts/bench_speculative.py [--quick] [--delay 0.05] [--new-tokens 64]
                                                  [--rounds 3] [--draft-tokens 10] [--trace FILE]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

from swarm_node.model import Checkpoint, ClientHead, load_tokenizer, resolve_model  # noqa: E402
from swarm_node.node.apps.commands import encode_prompt, split_blocks  # noqa: E402
from swarm_node.node.client.drafting import DraftLength  # noqa: E402
from swarm_node.node.client.generation import SamplingConfig, generate_tokens  # noqa: E402
from swarm_node.node.client.generation_options import model_eos_ids  # noqa: E402
from swarm_node.node.client.settings import SessionSettings  # noqa: E402
from swarm_node.node.client.speculative import Speculation  # noqa: E402
from tests.swarm_helpers import proxied_swarm  # noqa: E402

MODEL = "smollm2-135m"
PASSAGES = (
    "The swarm keeps every block of the model on some server. A client looks the servers up, "
    "picks a chain that covers every block, and sends the hidden states of each new token "
    "through it. When a server fails, the client finds another for exactly its blocks and "
    "replays what it had sent, so the text it generates does not change.",
    "Peers find each other through a distributed hash table. Each server signs a record that "
    "names the blocks it holds, its addresses and its throughput. Records expire unless renewed, "
    "so a server that leaves is soon forgotten, and a client never has to trust a central list.",
    "A server at home sits behind a router that drops connections from outside. It reserves a "
    "slot on a public relay and announces the relayed address instead, so clients reach it "
    "through the relay without any port forwarding, and its traffic stays encrypted end to end.",
)
PROMPTS = {
    # SmolLM2-135M does not copy code it is asked to edit (it rewrites it): quoting stands in
    "repetitive": [f"Repeat this text word for word:\n\n{p}" for p in PASSAGES],
    "chat": [
        "What are three tips for staying healthy?",
        "Write a short story about a robot who learns to paint.",
        "Explain why the sky is blue.",
    ],
}


class TracedLength(DraftLength):
    """The adaptive draft length, remembering every trip it was told of."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        self.trips: list[tuple[int, int, float, int]] = []  # (drafted, emitted, seconds, kind)

    def observe(self, drafted: int, emitted: int, seconds: float) -> None:
        self.trips.append((drafted, emitted, round(seconds, 4), self.kind if drafted else 0))
        super().observe(drafted, emitted, seconds)


async def generate(
    client: Any,
    head: Any,
    ids: torch.Tensor,
    args: argparse.Namespace,
    eos: tuple[int, ...],
    spec: bool,
) -> tuple[list[int], dict[str, Any]]:
    length = TracedLength(max_tokens=args.draft_tokens)
    speculation = Speculation(length=length) if spec else None
    t0 = time.perf_counter()
    out, stats = await generate_tokens(
        client,
        head,
        ids,
        SessionSettings(model=MODEL, num_blocks=args.num_blocks, dtype="float32", push=True),
        SamplingConfig(max_new_tokens=args.new_tokens, eos_token_ids=eos),
        speculation=speculation,
    )
    seconds = time.perf_counter() - t0
    return out[0].tolist(), {
        "tokens": stats.new_tokens,
        "seconds": seconds,
        "first_s": stats.time_to_first_token,
        # opening the session before the prompt and closing it after (route, open, push setup)
        "session_s": seconds - stats.total_time,
        "steps": stats.steps,
        "drafted": stats.draft_tokens,
        "accepted": stats.accepted_tokens,
        "trips": length.trips,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A set's figures over its rounds (each round: both modes' totals over the set's prompts)."""
    out: dict[str, Any] = {}
    for name, rate in (
        ("", lambda t: t["tokens"] / t["seconds"]),
        (
            "decode_",
            lambda t: (t["tokens"] - t["runs"]) / (t["seconds"] - t["session_s"] - t["first_s"]),
        ),
    ):
        rates = {mode: [rate(t[mode]) for t in rows] for mode in ("plain", "spec")}
        ratios = [s / p for s, p in zip(rates["spec"], rates["plain"], strict=True)]
        out[f"{name}speedup"] = round(statistics.median(ratios), 3)
        out[f"{name}ratios"] = [round(x, 3) for x in ratios]
        for mode in ("plain", "spec"):
            out[f"{name}{mode}_tokens_per_s"] = [round(x, 2) for x in rates[mode]]
    trips = [trip for t in rows for trip in t["spec"]["trips"]]
    drafting = [trip for trip in trips if trip[0]]
    plain_trips = [trip[2] for trip in trips if not trip[0]]
    kinds: dict[str, list[int]] = {}  # per kind of match: [trips, drafted, accepted]
    for drafted, emitted, _, kind in drafting:
        row = kinds.setdefault(str(kind), [0, 0, 0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + drafted, row[2] + emitted - 1
    drafted = sum(t["spec"]["drafted"] for t in rows)
    accepted = sum(t["spec"]["accepted"] for t in rows)
    out.update(
        acceptance=round(accepted / drafted, 3) if drafted else 0.0,
        drafted=drafted,
        accepted=accepted,
        tokens_per_trip=round(
            sum(t["spec"]["tokens"] for t in rows) / max(1, sum(t["spec"]["steps"] for t in rows)),
            2,
        ),
        trips_with_drafts=len(drafting),
        trips_without=len(plain_trips),
        drafts_per_trip=round(sum(t[0] for t in drafting) / len(drafting), 2) if drafting else 0.0,
        tokens_per_trip_with_drafts=round(sum(t[1] for t in drafting) / len(drafting), 2)
        if drafting
        else 0.0,
        trips_drafted_accepted_by_kind=kinds,
        trip_s_with_drafts=round(statistics.median(t[2] for t in drafting), 3)
        if drafting
        else None,
        trip_s_without=round(statistics.median(plain_trips), 3) if plain_trips else None,
        session_s_per_run=round(
            sum(t[m]["session_s"] for t in rows for m in ("plain", "spec"))
            / sum(t[m]["runs"] for t in rows for m in ("plain", "spec")),
            3,
        ),
    )
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    path = resolve_model(MODEL)
    checkpoint = Checkpoint.open(path)
    tokenizer = load_tokenizer(path)
    head = ClientHead.load(checkpoint)
    eos = model_eos_ids(checkpoint.setting("eos_token_id"), tokenizer)
    args.num_blocks = checkpoint.config.num_hidden_layers
    sets = {name: prompts[: args.prompts] for name, prompts in PROMPTS.items()}
    inputs = {
        name: [encode_prompt(tokenizer, p, chat=True) for p in prompts]
        for name, prompts in sets.items()
    }
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sets}
    same = True
    traces: list[dict[str, Any]] = []
    per_prompt: dict[tuple[str, int], list[float]] = {}  # each round's with/without, per prompt
    per_prompt_trips: dict[tuple[str, int], list[float]] = {}  # each round's tokens a trip
    async with trio.open_nursery() as nursery:
        spans = split_blocks(args.num_blocks, 2)
        async with proxied_swarm(MODEL, spans, args.delay, nursery, throughput=None) as (_, client):
            await client.find_chain(MODEL, args.num_blocks, push=True, max_length=1024)
            for r in range(args.rounds):
                for name, prompts in inputs.items():
                    totals: dict[str, dict[str, Any]] = {
                        m: {
                            "tokens": 0,
                            "seconds": 0.0,
                            "first_s": 0.0,
                            "session_s": 0.0,
                            "runs": 0,
                            "drafted": 0,
                            "accepted": 0,
                            "steps": 0,
                            "trips": [],
                        }
                        for m in ("plain", "spec")
                    }
                    for p, ids in enumerate(prompts):
                        order = ("plain", "spec") if r % 2 == 0 else ("spec", "plain")
                        outputs, rates = {}, {}
                        for mode in order:
                            outputs[mode], row = await generate(
                                client, head, ids, args, eos, mode == "spec"
                            )
                            row["runs"] = 1
                            rates[mode] = row["tokens"] / row["seconds"]
                            for key in totals[mode]:
                                totals[mode][key] += row[key]
                            if mode == "spec":
                                traces.append({"round": r, "set": name, "prompt": p, **row})
                                per_prompt_trips.setdefault((name, p), []).append(
                                    row["tokens"] / max(1, row["steps"])
                                )
                        same = same and outputs["plain"] == outputs["spec"]
                        per_prompt.setdefault((name, p), []).append(rates["spec"] / rates["plain"])
                    rounds[name].append(totals)
            nursery.cancel_scope.cancel()
    out: dict[str, Any] = {"traces": traces}
    for name, rows in rounds.items():
        out[name] = summary(rows)
        out[f"speedup_{name}"] = out[name].pop("speedup")
        out[f"decode_speedup_{name}"] = out[name].pop("decode_speedup")
        out[name]["per_prompt_speedup"] = [
            round(statistics.median(per_prompt[(name, p)]), 3) for p in range(len(inputs[name]))
        ]
        out[name]["per_prompt_tokens_per_trip"] = [
            round(statistics.median(per_prompt_trips[(name, p)]), 2)
            for p in range(len(inputs[name]))
        ]
    out["same_tokens"] = same
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--delay", type=float, default=0.05, help="one-way seconds before every peer"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds, alternating which mode goes first"
    )
    parser.add_argument("--prompts", type=int, default=3, help="prompts of each set")
    parser.add_argument(
        "--draft-tokens", type=int, default=10, help="the most drafts a step carries"
    )
    parser.add_argument("--trace", help="write every speculative run's trips here (JSON lines)")
    parser.add_argument("--quick", action="store_true", help="1 round, 48 tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 1, 48
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    load_before = os.getloadavg()
    runs = trio.run(run, args)
    load_after = os.getloadavg()
    traces = runs.pop("traces")
    if args.trace:
        with open(args.trace, "w") as file:
            file.writelines(json.dumps(line) + "\n" for line in traces)
    print(
        json.dumps(
            {
                "bench": "speculative",
                "model": MODEL,
                "servers": 2,
                "push": True,
                "delay_s": args.delay,
                "new_tokens": args.new_tokens,
                "rounds": args.rounds,
                "prompts_per_set": args.prompts,
                "draft_tokens": args.draft_tokens,
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "load_average_1_5_15": {
                    "before": [round(x, 2) for x in load_before],
                    "after": [round(x, 2) for x in load_after],
                },
                "targets": {"speedup_repetitive": 2.0, "speedup_chat": 0.97},
                "adaptive_length": "expected tokens/s, acceptance per kind of match (drafting.DraftLength)",
                **runs,
            }
        )
    )


if __name__ == "__main__":
    main()
