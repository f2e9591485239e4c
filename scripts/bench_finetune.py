#!/usr/bin/env python
"""Prompt-tuning step time: SmolLM2-135M trained locally vs through a loopback swarm, same batch.

One training step = forward of the batch with the soft prompt prepended, the loss, backward to the
prompt, an Adam step. Local: transformers' model in this process. Swarm: `swarm-node serve` processes
holding the blocks (``--spans``), this process holding embeddings, norm, head and the prompt
(DistributedModelForCausalLM, tuning_mode="ptune"): the servers run a forward, then recompute it for
the backward. Steps are interleaved (local, swarm) and repeated; the ratio is the median of the
ratios paired within each repetition, because these 2-core machines drift.

    .venv/bin/python scripts/bench_finetune.py [--repeats 5] [--batch 8] [--tokens 64] [--spans 0:30]

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

# Idle OpenMP threads sleep instead of spinning: the client and the server processes take turns on
# the same cores, and spinning threads of one slow the other down several times (measured: 6.3x vs
# 1.4x local). Set before torch loads; the servers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import start_servers  # noqa: E402

from swarm_node import DistributedModelForCausalLM  # noqa: E402
from swarm_node.model import resolve_model  # noqa: E402
from swarm_node.model.prompts import PromptTuning  # noqa: E402


def local_step(ref, ptune, opt, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    embeds = ref.model.embed_tokens(ids)
    hidden = ptune.prepend(embeds)
    labels = ids.clone()
    labels[:, 0] = -100  # as the swarm model: the first token is not predicted from the prompt
    labels = torch.cat([torch.full((ids.shape[0], ptune.pre_seq_len), -100), labels], dim=1)
    opt.zero_grad()
    loss = ref(inputs_embeds=hidden, labels=labels).loss
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def swarm_step(model, opt, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    opt.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--spans", default="0:30", help="comma-separated START:END of the servers")
    parser.add_argument("--server-threads", type=int, default=2)
    parser.add_argument(
        "--pieces", type=int, default=1, help="cut each batch into this many pieces (pipelining)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM

    path = resolve_model("smollm2-135m")
    spans = [tuple(int(x) for x in s.split(":")) for s in args.spans.split(",")]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (args.batch, args.tokens))
    processes, entry = start_servers(spans, args.server_threads)
    try:
        model = DistributedModelForCausalLM.from_pretrained(
            "smollm2-135m",
            initial_peers=[entry],
            tuning_mode="ptune",
            pre_seq_len=args.pre_seq_len,
            min_pieces=args.pieces,
        )
        ptune = PromptTuning(
            mode="ptune",
            pre_seq_len=args.pre_seq_len,
            hidden_size=ref.config.hidden_size,
            num_blocks=ref.config.num_hidden_layers,
        )
        ptune.load_state_dict(model.ptune.state_dict())
        local_opt = torch.optim.Adam(ptune.parameters(), lr=1e-3)
        swarm_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):  # warm-up: routes, streams, allocator
            local_step(ref, ptune, local_opt, ids)
            swarm_step(model, swarm_opt, ids)
        local_times, swarm_times = [], []
        for _ in range(args.repeats):
            local_times.append(local_step(ref, ptune, local_opt, ids))
            swarm_times.append(swarm_step(model, swarm_opt, ids))
        model.close()
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            proc.wait(timeout=30)
    ratios = [s / t for s, t in zip(swarm_times, local_times, strict=True)]
    print(
        json.dumps(
            {
                "model": "smollm2-135m",
                "dtype": "float32",
                "batch": args.batch,
                "tokens": args.tokens,
                "pre_seq_len": args.pre_seq_len,
                "spans": args.spans,
                "pieces": args.pieces,
                "server_threads": args.server_threads,
                "torch_threads_client": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "repeats": args.repeats,
                "local_step_s": [round(t, 4) for t in local_times],
                "swarm_step_s": [round(t, 4) for t in swarm_times],
                "local_median_s": round(statistics.median(local_times), 4),
                "swarm_median_s": round(statistics.median(swarm_times), 4),
                "ratio_median": round(statistics.median(ratios), 3),
                "ratios": [round(r, 3) for r in ratios],
            }
        )
    )


if __name__ == "__main__":
    main()
