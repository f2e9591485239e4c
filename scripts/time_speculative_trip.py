#!/usr/bin/env python
"""Where a speculative trip's extra CPU goes, part by part, without a swarm: the client's head over
k + 1 rows (as one linear, as ``ClientHead.verify_logits`` computes it), one server's span over
k + 1 cached positions (the fast path and transformers' layers), the cache roll back and greedy
acceptance. CPU seconds by ``time.thread_time`` (load enters only through caches and memory
bandwidth), medians of ``--reps``.

    .venv/bin/python scripts/time_speculative_trip.py [--threads 1] [--reps 9]

Prints one JSON line: milliseconds per part and number of positions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from swarm_node.model import BlockSpan, Checkpoint, ClientHead, resolve_model
from swarm_node.model.speculation import accept_drafts

POSITIONS = (1, 2, 3, 4, 6, 9, 11)
PAST = 100  # cached positions before the step


def cpu_ms(run: Callable[[], object], reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    return round(statistics.median(times) * 1e3, 1)


def span_ms(span: BlockSpan, positions: int, reps: int, fast: bool) -> float:
    span._fast_decode = None if fast else False  # noqa: SLF001 (a one-off probe of both paths)
    times = []
    gen = torch.Generator().manual_seed(positions)
    with torch.inference_mode():
        for _ in range(reps):
            cache = span.new_cache(PAST + 32)
            span(torch.randn(1, PAST, span.hidden_size, generator=gen), cache)
            step = torch.randn(1, positions, span.hidden_size, generator=gen)
            start = time.thread_time()
            span(step, cache)
            times.append(time.thread_time() - start)
    span._fast_decode = None  # noqa: SLF001
    return round(statistics.median(times) * 1e3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = Checkpoint.open(resolve_model("smollm2-135m"))
    head = ClientHead.load(checkpoint)
    span = BlockSpan.load(checkpoint, 0, checkpoint.num_blocks // 2)
    rows = torch.randn(1, max(POSITIONS), head.hidden_size, generator=torch.Generator())
    out: dict[str, object] = {"threads": args.threads, "positions": list(POSITIONS)}
    out["head_linear_ms"] = [
        cpu_ms(lambda t=t: head.logits(rows[:, :t]), args.reps) for t in POSITIONS
    ]
    out["head_verify_ms"] = [
        cpu_ms(lambda t=t: head.verify_logits(rows[:, :t]), args.reps) for t in POSITIONS
    ]
    out["span_fast_ms"] = [span_ms(span, t, args.reps, fast=True) for t in POSITIONS]
    out["span_transformers_ms"] = [span_ms(span, t, args.reps, fast=False) for t in POSITIONS]
    with torch.inference_mode():
        cache = span.new_cache(PAST + 32)
        span(torch.randn(1, PAST + 10, span.hidden_size), cache)
        start = time.thread_time()
        cache.truncate(PAST)
        out["truncate_ms"] = round((time.thread_time() - start) * 1e3, 2)
    seen = torch.arange(150)
    accept = []
    for t in POSITIONS:
        logits = torch.randn(t, head.vocab_size)
        drafts = logits.argmax(-1)[: t - 1].tolist()
        accept.append(
            cpu_ms(lambda lg=logits, d=drafts: accept_drafts(lg, d, seen, temperature=0), args.reps)
        )
    out["accept_ms"] = accept
    print(json.dumps(out))


if __name__ == "__main__":
    main()
