#!/usr/bin/env python
"""Prompt-tuning step time: SmolLM2-135M trained locally vs through a loopback swarm, same batch.

One training step = forward of the batch with the soft prompt prepended, the loss, backward to the
prompt, an Adam step. Local: transformers' model in its own clean process at torch's defaults (it
never runs swarm code: scripts/bench_processes.py says why). Swarm: `swarm-node serve` processes
holding the blocks (``--spans``) at their defaults, this process holding embeddings, norm, head and
the prompt (DistributedModelForCausalLM, tuning_mode="ptune"): the servers run a forward, then
recompute it for the backward. Steps are interleaved (local, swarm) and repeated; the ratio is the
median of the ratios paired within each repetition, because these 2-core machines drift.

    .venv/bin/python scripts/bench_finetune.py [--repeats 5] [--batch 8] [--tokens 64] [--spans 0:30]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_processes import CleanProcess, serve_jobs, start_server, stop  # noqa: E402

MODEL = "smollm2-135m"


def batch(args: argparse.Namespace, vocab_size: int) -> Any:
    import torch

    torch.manual_seed(0)
    return torch.randint(0, vocab_size, (args.batch, args.tokens))


def baseline_worker(args: argparse.Namespace) -> None:
    """The local steps, in a clean process at torch's defaults, one per "step" job."""
    import torch
    from transformers import AutoModelForCausalLM

    from swarm_node.model import resolve_model
    from swarm_node.model.prompts import PromptTuning

    ref = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32).eval()
    ref.requires_grad_(False)
    ids = batch(args, ref.config.vocab_size)
    ptune = PromptTuning(
        mode="ptune",
        pre_seq_len=args.pre_seq_len,
        hidden_size=ref.config.hidden_size,
        num_blocks=ref.config.num_hidden_layers,
    )
    opt = torch.optim.Adam(ptune.parameters(), lr=1e-3)

    def step() -> dict[str, Any]:
        t0 = time.perf_counter()
        hidden = ptune.prepend(ref.model.embed_tokens(ids))
        labels = ids.clone()
        labels[:, 0] = -100  # as the swarm model: the first token is not predicted from the prompt
        labels = torch.cat([torch.full((ids.shape[0], ptune.pre_seq_len), -100), labels], dim=1)
        opt.zero_grad()
        ref(inputs_embeds=hidden, labels=labels).loss.backward()
        opt.step()
        return {"s": time.perf_counter() - t0, "threads": torch.get_num_threads()}

    serve_jobs({"step": step})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--spans", default="0:30", help="comma-separated START:END of the servers")
    parser.add_argument(
        "--pieces", type=int, default=1, help="cut each batch into this many pieces (pipelining)"
    )
    parser.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(args)
        return
    importlib.import_module("swarm_node")  # before torch loads: its thread settings, as a user's
    import torch

    from swarm_node import DistributedModelForCausalLM

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    shape = ["--batch", str(args.batch), "--tokens", str(args.tokens)]
    local = CleanProcess(__file__, [*shape, "--pre-seq-len", str(args.pre_seq_len)])
    processes = []
    try:
        entry = ""
        for span in args.spans.split(","):
            proc, addr = start_server(span, entry)
            processes.append(proc)
            entry = entry or addr
        model = DistributedModelForCausalLM.from_pretrained(
            MODEL,
            initial_peers=[entry],
            tuning_mode="ptune",
            pre_seq_len=args.pre_seq_len,
            min_pieces=args.pieces,
        )
        ids = batch(args, model.config.vocab_size)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def swarm_step() -> float:
            t0 = time.perf_counter()
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
            return time.perf_counter() - t0

        for _ in range(2):  # warm-up: routes, streams, allocator
            local.ask("step")
            swarm_step()
        local_times, swarm_times = [], []
        for rep in range(args.repeats):
            first, second = ("local", "swarm") if rep % 2 == 0 else ("swarm", "local")
            for which in (first, second):
                if which == "local":
                    answer = local.ask("step")
                    local_times.append(answer["s"])
                else:
                    swarm_times.append(swarm_step())
        model.close()
    finally:
        local.close()
        stop(processes)
    ratios = [s / t for s, t in zip(swarm_times, local_times, strict=True)]
    print(
        json.dumps(
            {
                "benchmark": "finetune",
                "model": MODEL,
                "dtype": "float32",
                "batch": args.batch,
                "tokens": args.tokens,
                "pre_seq_len": args.pre_seq_len,
                "spans": args.spans,
                "pieces": args.pieces,
                "baseline": "local transformers in its own clean process, torch defaults",
                "local_threads": answer["threads"],
                "client_threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "local_step_s": [round(t, 4) for t in local_times],
                "swarm_step_s": [round(t, 4) for t in swarm_times],
                "local_median_s": round(statistics.median(local_times), 4),
                "swarm_median_s": round(statistics.median(swarm_times), 4),
                "ratio_median": round(statistics.median(ratios), 3),
                "ratios": [round(r, 3) for r in ratios],
                "target": "ratio_median <= 1.3",
            }
        )
    )


if __name__ == "__main__":
    main()
