#!/usr/bin/env python
"""Speculative decoding over a wide-area pipeline: tokens/s with prompt-lookup drafts over without.

SmolLM2-135M-Instruct (float32, greedy, chat template) on 2 servers with push; every peer sits behind
a userspace proxy adding DELAY seconds one way (tests/delay_proxy.py), as in bench_wan.py. Two prompt
sets: "repetitive" (quote a given passage: the answer repeats the prompt; the 135M model rewrites
code it is asked to edit rather than copying it) and "chat" (open questions). Each round generates
every prompt once without and once with speculation (adaptive prompt lookup, the default drafter),
alternating which goes first; a set's
figure per round is its tokens over its seconds (prefill included, the same for both), and the
speedup is the median over rounds of with/without. ``same_tokens``: greedy output identical with
and without. Figures measured on a shared machine are under load: the absolute tokens/s are printed
beside the ratios.

    .venv/bin/python scripts/bench_speculative.py [--quick] [--delay 0.05] [--new-tokens 64]
                                                  [--rounds 3] [--draft-tokens 10]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
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


async def generate(
    client: Any,
    head: Any,
    ids: torch.Tensor,
    args: argparse.Namespace,
    eos: tuple[int, ...],
    spec: bool,
) -> tuple[list[int], dict[str, Any]]:
    speculation = Speculation.of(num_tokens=args.draft_tokens) if spec else None
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
        "steps": stats.steps,
        "drafted": stats.draft_tokens,
        "accepted": stats.accepted_tokens,
    }


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
    async with trio.open_nursery() as nursery:
        spans = split_blocks(args.num_blocks, 2)
        async with proxied_swarm(MODEL, spans, args.delay, nursery, throughput=None) as (_, client):
            await client.find_chain(MODEL, args.num_blocks, push=True, max_length=1024)
            for r in range(args.rounds):
                for name, prompts in inputs.items():
                    totals = {
                        m: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "steps": 0}
                        for m in ("plain", "spec")
                    }
                    for ids in prompts:
                        order = ("plain", "spec") if r % 2 == 0 else ("spec", "plain")
                        outputs = {}
                        for mode in order:
                            outputs[mode], row = await generate(
                                client, head, ids, args, eos, mode == "spec"
                            )
                            for key in totals[mode]:
                                totals[mode][key] += row[key]
                        same = same and outputs["plain"] == outputs["spec"]
                    rounds[name].append(totals)
            nursery.cancel_scope.cancel()
    out: dict[str, Any] = {}
    for name, rows in rounds.items():
        rate = {
            mode: [t[mode]["tokens"] / t[mode]["seconds"] for t in rows]
            for mode in ("plain", "spec")
        }
        ratios = [s / p for s, p in zip(rate["spec"], rate["plain"], strict=True)]
        drafted = sum(t["spec"]["drafted"] for t in rows)
        accepted = sum(t["spec"]["accepted"] for t in rows)
        out[f"speedup_{name}"] = round(statistics.median(ratios), 3)
        out[name] = {
            "ratios": [round(x, 3) for x in ratios],
            "plain_tokens_per_s": [round(x, 2) for x in rate["plain"]],
            "spec_tokens_per_s": [round(x, 2) for x in rate["spec"]],
            "acceptance": round(accepted / drafted, 3) if drafted else 0.0,
            "drafted": drafted,
            "accepted": accepted,
            "tokens_per_step": round(
                sum(t["spec"]["tokens"] for t in rows)
                / max(1, sum(t["spec"]["steps"] for t in rows)),
                2,
            ),
        }
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
    parser.add_argument("--quick", action="store_true", help="1 round, 1 prompt a set, 32 tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.prompts, args.new_tokens = 1, 1, 32
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    runs = trio.run(run, args)
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
                "targets": {"speedup_repetitive": 2.0, "speedup_chat": 0.97},
                **runs,
            }
        )
    )


if __name__ == "__main__":
    main()
