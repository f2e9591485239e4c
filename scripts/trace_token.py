#!/usr/bin/env python
"""Where a token's time goes: the median timeline of one decode step through a loopback swarm.

A diagnostic, not a benchmark. Servers and the client run in this process (real libp2p hosts,
every peer behind a delay proxy when ``--delay`` > 0, as in bench_wan.py). The script wraps, for
the run only, the message stream's send/receive, each server's span computation and the client's
LM head and embedding with timestamps, generates ``--new-tokens`` greedy tokens, and prints for
each consecutive pair of events the median time between them over the steady tokens. Alongside,
the same spans and head computed locally in a tight loop (no network), so a slower "compute" line
in the swarm shows up as such (on these machines: spans computed after 50 ms idle run ~30% slower
than back to back).

    .venv/bin/python scripts/trace_token.py [--spans 0:15 15:30] [--delay 0.05] [--push]
                                             [--new-tokens 32] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

from swarm_node.model import BlockSpan, Checkpoint, ClientHead, load_tokenizer, resolve_model  # noqa: E402
from swarm_node.node.client.generation import SamplingConfig, generate_tokens  # noqa: E402
from swarm_node.node.client.settings import SessionSettings  # noqa: E402
from swarm_node.node.config import parse_blocks  # noqa: E402
from swarm_node.node.net import message_stream  # noqa: E402
from swarm_node.node.server import block_server as server  # noqa: E402
from tests.swarm_helpers import proxied_swarm  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
EVENTS: list[tuple[str, float]] = []


def mark(label: str) -> None:
    EVENTS.append((label, time.perf_counter()))


def instrument(head: ClientHead) -> None:
    """Timestamps around sends, receives, span computations and the head (this process only)."""
    send, receive = message_stream.MessageStream.send, message_stream.MessageStream.receive
    run_span = server.BlockServer._run_span

    async def timed_send(self: Any, message: Any) -> None:
        mark(f"send {type(message).__name__}")
        await send(self, message)
        mark(f"sent {type(message).__name__}")

    async def timed_receive(self: Any) -> Any:
        message = await receive(self)
        mark(f"received {type(message).__name__}")
        return message

    def timed_run_span(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        mark(f"compute {self.start}:{self.end}")
        out = run_span(self, *args, **kwargs)
        mark(f"computed {self.start}:{self.end}")
        return out

    logits, embed = head.logits, head.embed

    def timed_logits(hidden: torch.Tensor) -> torch.Tensor:
        mark("head")
        out = logits(hidden)
        mark("head done")
        return out

    def timed_embed(ids: torch.Tensor) -> torch.Tensor:
        out = embed(ids)
        mark("embedded")
        return out

    message_stream.MessageStream.send = timed_send  # type: ignore[method-assign]
    message_stream.MessageStream.receive = timed_receive  # type: ignore[method-assign]
    server.BlockServer._run_span = timed_run_span  # type: ignore[method-assign]
    head.logits, head.embed = timed_logits, timed_embed  # type: ignore[method-assign]


def local_times(
    checkpoint: Checkpoint,
    head: ClientHead,
    spans: list[tuple[int, int]],
    ids: torch.Tensor,
    tokens: int,
) -> dict[str, float]:
    """Median ms of each span and of the head, computed back to back here."""
    loaded = [BlockSpan.load(checkpoint, a, b) for a, b in spans]
    caches = [s.new_cache(ids.shape[1] + tokens + 1, batch_size=1) for s in loaded]
    times: dict[str, list[float]] = collections.defaultdict(list)
    with torch.inference_mode():
        hidden = head.embed(ids)
        for _ in range(tokens):
            for (a, b), span, cache in zip(spans, loaded, caches, strict=True):
                t0 = time.perf_counter()
                hidden = span.forward(hidden, cache, start=a, end=b)
                times[f"{a}:{b}"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            token = head.logits(hidden[:, -1:, :])[:, -1, :].argmax(-1)
            times["head"].append(time.perf_counter() - t0)
            hidden = head.embed(token[:, None])
    return {k: round(1000 * statistics.median(v[1:]), 2) for k, v in times.items()}


async def trace(args: argparse.Namespace) -> None:
    path = resolve_model(MODEL)
    checkpoint = Checkpoint.open(path)
    head = ClientHead.load(checkpoint)
    ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids
    num_blocks = args.spans[-1][1]
    print(
        "local, back to back (ms):", local_times(checkpoint, head, args.spans, ids, args.new_tokens)
    )
    instrument(head)
    async with trio.open_nursery() as nursery:
        async with proxied_swarm(MODEL, args.spans, args.delay, nursery, throughput=None) as (
            _,
            client,
        ):
            chain = await client.find_chain(
                MODEL, num_blocks, end=num_blocks, push=args.push, max_length=256
            )
            sampling = SamplingConfig(max_new_tokens=args.new_tokens)
            await generate_tokens(
                client,
                head,
                ids,
                SessionSettings(
                    model=MODEL, num_blocks=num_blocks, dtype="float32", push=args.push
                ),
                SamplingConfig(max_new_tokens=4),
                chain=chain,
            )
            EVENTS.clear()
            await generate_tokens(
                client,
                head,
                ids,
                SessionSettings(
                    model=MODEL, num_blocks=num_blocks, dtype="float32", push=args.push
                ),
                sampling,
                chain=chain,
            )
        nursery.cancel_scope.cancel()
    starts = [i for i, (label, _) in enumerate(EVENTS) if label == "embedded"][2:]  # steady tokens
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for a, b in itertools.pairwise(starts):
        for (first, t0), (second, t1) in zip(EVENTS[a:b], EVENTS[a + 1 : b + 1], strict=False):
            gaps[(first, second)].append(1000 * (t1 - t0))
    cycles = [1000 * (EVENTS[b][1] - EVENTS[a][1]) for a, b in itertools.pairwise(starts)]
    mode = "push" if args.push else "client-star"
    print(
        f"swarm ({mode}, {len(args.spans)} servers, {args.delay * 1000:.0f} ms one way): "
        f"median {statistics.median(cycles):.1f} ms a token over {len(cycles)} tokens"
    )
    for (first, second), values in gaps.items():  # events in the order they first happened
        share = len(values) / len(cycles)  # a pair can happen twice a token, or only in some tokens
        note = "" if share == 1 else f"  ({share:.1f} times a token)"
        print(f"  {first:>26} -> {second:<26} {statistics.median(values):7.2f} ms{note}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--spans", nargs="+", default=["0:15", "15:30"], help="each server's blocks, START:END"
    )
    parser.add_argument(
        "--delay", type=float, default=0.05, help="one-way seconds in front of every peer"
    )
    parser.add_argument(
        "--push", action="store_true", help="servers pass hidden states straight on"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    args.spans = [parse_blocks(s) for s in args.spans]
    torch.set_num_threads(args.torch_threads)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    trio.run(trace, args)


if __name__ == "__main__":
    main()
