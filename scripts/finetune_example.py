#!/usr/bin/env python
"""Prompt-tune SmolLM2-135M through a swarm: the servers' weights stay frozen, the client trains a
soft prompt (16 vectors) whose gradients come back through the remote blocks.

A local swarm of two servers (blocks 0:15 and 15:30) runs in this process (real libp2p on loopback, a
real DHT); the client is a `DistributedModelForCausalLM` with ``tuning_mode="ptune"``, trained by a
plain torch optimizer on data/pirate_qa.txt (40 lines the repository keeps). It prints the loss as
it falls and the greedy answers to two questions that are not in the data, before and after.

    .venv/bin/python scripts/finetune_example.py [--steps 40] [--tuning-mode ptune|deep_ptune]
"""

from __future__ import annotations

import argparse
import logging
import random
import threading
import time
from pathlib import Path

import torch
import trio

from swarm_node import DistributedModelForCausalLM
from swarm_node.model import load_tokenizer, resolve_model
from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.peer import open_peer  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "pirate_qa.txt"
QUESTIONS = ["Q: What is your favorite food? A:", "Q: Where is the nearest town? A:"]
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def start_swarm(model: str, spans: list[tuple[int, int]]) -> tuple[str, threading.Event]:
    """Servers for ``spans`` in a background trio loop; returns the first one's address and a stop event."""
    ready: list[str] = []
    started, stop = threading.Event(), threading.Event()

    async def main() -> None:
        async with open_peer(
            PeerConfig(listen=LOOPBACK),
            server=ServerConfig(model=model, start=spans[0][0], end=spans[0][1], throughput=100.0),
        ) as first:
            entry = tuple(first.addrs[:1])
            async with open_peer(
                PeerConfig(listen=LOOPBACK, initial_peers=entry),
                server=ServerConfig(
                    model=model, start=spans[1][0], end=spans[1][1], throughput=100.0
                ),
            ):
                ready.append(entry[0])
                started.set()
                # `stop` is a threading.Event set by the main thread: trio cannot wait on it
                while not stop.is_set():  # noqa: ASYNC110
                    await trio.sleep(0.2)

    threading.Thread(target=trio.run, args=(main,), daemon=True, name="swarm").start()
    started.wait()
    return ready[0], stop


def answer(model: DistributedModelForCausalLM, tokenizer, question: str) -> str:
    ids = tokenizer(question, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, eos_token_id=tokenizer.convert_tokens_to_ids("\n"))
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--tuning-mode", default="ptune", choices=("ptune", "deep_ptune"))
    parser.add_argument("--pre-seq-len", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    torch.manual_seed(0)
    rng = random.Random(0)
    path = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(path)
    lines = [line for line in DATA.read_text().splitlines() if line.strip()]
    entry, stop = start_swarm(str(path), [(0, 15), (15, 30)])
    with DistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=[entry], tuning_mode=args.tuning_mode, pre_seq_len=args.pre_seq_len
    ) as model:
        trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
        print(f"trainable: {trainable}; the servers hold blocks 0:15 and 15:30")
        before = [answer(model, tokenizer, q) for q in QUESTIONS]
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = tokenizer(
                rng.sample(lines, args.batch),
                return_tensors="pt",
                padding=True,
                padding_side="right",
            )
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            opt.zero_grad()
            loss = model(batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
            loss.backward()
            opt.step()
            if step == 1 or step % 5 == 0:
                print(
                    f"step {step:3d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        after = [answer(model, tokenizer, q) for q in QUESTIONS]
    stop.set()
    for question, old, new in zip(QUESTIONS, before, after, strict=True):
        print(f"\n{question}\n  before: {old!r}\n  after:  {new!r}")


if __name__ == "__main__":
    main()
