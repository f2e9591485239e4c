#!/usr/bin/env python
"""Continuous batching on a server: aggregate tokens/s of 1-16 concurrent sessions, a lone session
with batching on vs off, and decode steps behind a 2048-token prefill.

SmolLM2-135M-Instruct, float32, greedy, through two 2-server swarms of real `swarm-node serve`
processes on loopback (blocks 0:15 and 15:30): one serving with batching (the default), one with
--no-batching, each its own swarm; the client (this process) holds the embeddings and the LM head of
every session, computed one session at a time (issue 19's client-side batching is not built).

- ``ratio_N_over_1``: aggregate tokens/s of N sessions at once over one session's, on the batching
  swarm, each level the median of --repeats rounds (``tokens_s_N`` beside them);
- ``lone_on_over_off``: a lone session's tokens/s, batching on over off, rounds alternating;
- ``lone_step_p50_ms`` / ``lone_step_p95_ms``: a lone session's per-token intervals (batching on);
- ``prefill_delay_over_chunk``: while session B decodes alone, session A sends a 2048-token prompt;
  B's worst token interval during it, less B's median, over one chunk's compute, estimated as A's
  prefill wall time / (chunks + 1) (the chain is pipelined over two servers). A step may wait one
  chunk on each server, so up to ~2 is the bound through this 2-server chain;
- ``same_tokens``: every session's tokens in every concurrent round equal its solo run;
- ``batch_seen``: each server's record's largest decode batch of its last 60 s (read at the end of
  the rounds; records are re-announced every 40 s);
- ``span_forward_ms_N``: the server's side alone, one decode forward of blocks 0:15 for N sessions
  in this process before the swarms start (what batching saves where the client keeps up).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_batching.py [--tokens 32] [--repeats 2]

Prints one JSON line. On a shared machine the figures carry that load: rerun on a quiet one.

Measured 2026-12-05 on the 2 shared cores (other sessions' work beside it, load average falling from
~7 to ~2 during the run), --tokens 32 --repeats 2, 1 thread per server: 1 session 10.3 tokens/s,
2: 10.8 (1.05x), 4: 15.4 (1.49x), 8: 20.0 (1.94x), 16: 23.8 (2.32x); records showed batches of 14
and 13; lone on/off 11.0 / 9.9 (1.11); lone step p50 61 ms, p95 123 ms; prefill delay 1.6 chunks
(256-token chunks, ~0.63 s each); same_tokens true. The server side alone: one forward of blocks 0:15
for 16 sessions ~107 ms against ~42 ms for one. Here the client process (16 sessions' LM heads and
messages on one loop) is the limit, not the servers: issue 19's client-side batching is next.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import trio

from swarm_node.model import Checkpoint, ClientHead, resolve_model
from swarm_node.node.apps.swarm_status import gather_status
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import PeerConfig
from swarm_node.node.peer import open_peer

CLI = str(Path(sys.executable).with_name("swarm-node"))
MODEL = "smollm2-135m"
LEVELS = (1, 2, 4, 8, 16)


def span_forward_ms(threads: int, repeats: int = 7) -> dict[str, float]:
    """The server side alone, in this process before any peer starts: one decode forward of blocks
    0:15 for N sessions (caches of 100 positions), median ms; N = 1 is the lone path."""
    from swarm_node.model import BlockSpan

    torch.set_num_threads(threads)
    span = BlockSpan.load(Checkpoint.open(resolve_model(MODEL)), 0, 15)
    caches = [span.new_cache(512) for _ in range(max(LEVELS))]
    out: dict[str, float] = {}
    with torch.inference_mode():
        for cache in caches:
            span(torch.randn(1, 100, span.hidden_size), cache)
        for n in LEVELS:
            times = []
            for _ in range(repeats):
                steps = [torch.randn(1, 1, span.hidden_size) for _ in range(n)]
                t0 = time.perf_counter()
                if n == 1:
                    span(steps[0], caches[0])
                else:
                    span.forward_batch(steps, caches[:n])
                times.append(time.perf_counter() - t0)
            out[f"span_forward_ms_{n}"] = round(statistics.median(times) * 1000, 1)
    return out


def start_swarm(extra: list[str], threads: int) -> tuple[list[subprocess.Popen], str]:
    processes: list[subprocess.Popen] = []
    first = ""
    for start, end in ((0, 15), (15, 30)):
        cmd = [CLI, "serve", "--blocks", f"{start}:{end}", "--listen", "/ip4/127.0.0.1/tcp/0"]
        cmd += ["--torch-threads", str(threads), "--throughput", "100", *extra]
        if first:
            cmd += ["--initial-peers", first]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        processes.append(proc)
        addr = proc.stdout.readline().strip() if proc.stdout else ""
        if not addr:
            raise SystemExit(f"server {start}:{end} ({extra}) did not start")
        first = first or addr
    return processes, first


class Runner:
    def __init__(self, peer: Any, head: ClientHead, tokens: int) -> None:
        self.peer, self.head, self.tokens = peer, head, tokens

    async def one(
        self,
        ids: torch.Tensor,
        new: int | None = None,
        times: list[float] | None = None,
        third: trio.Event | None = None,
    ) -> tuple[list[int], list[float]]:
        """A session's generated ids and the times its tokens arrived (appended to ``times``);
        ``third`` is set when its third token arrives."""
        times = [] if times is None else times

        def arrived(_: torch.Tensor) -> None:
            times.append(time.perf_counter())
            if third is not None and len(times) == 3:
                third.set()

        settings = SessionSettings(model=MODEL, num_blocks=30)
        out, _ = await generate_tokens(
            self.peer,
            self.head,
            ids,
            settings,
            SamplingConfig(max_new_tokens=new or self.tokens),
            on_tokens=arrived,
        )
        return out[0, ids.shape[1] :].tolist(), times

    async def together(self, prompts: list[torch.Tensor]) -> tuple[list[list[int]], float]:
        outs: list[list[int]] = [[] for _ in prompts]

        async def run(i: int) -> None:
            outs[i] = (await self.one(prompts[i]))[0]

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(run, i)
        return outs, time.perf_counter() - t0


async def prefill_delay(runner: Runner, prompt_len: int, chunk: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(7)
    long_ids = torch.randint(0, 49152, (1, prompt_len), generator=gen)
    short = torch.randint(0, 49152, (1, 8), generator=gen)
    window: dict[str, float] = {}
    times: list[float] = []

    decoding = trio.Event()

    async def decoder() -> None:
        await runner.one(short, new=4 * runner.tokens, times=times, third=decoding)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(decoder)
        await decoding.wait()  # B is decoding (its prefill done) before A's prompt goes out
        window["start"] = time.perf_counter()
        await runner.one(long_ids, new=1)
        window["end"] = time.perf_counter()
    gaps = [(b - a, b) for a, b in zip(times, times[1:], strict=False)]
    during = [g for g, t in gaps if window["start"] <= t <= window["end"] + 0.5]
    lone = statistics.median(g for g, t in gaps if t < window["start"] or t > window["end"] + 0.5)
    chunks = -(-prompt_len // chunk)
    chunk_s = (window["end"] - window["start"]) / (chunks + 1)
    worst = max(during, default=lone)
    return {
        "prefill_s": window["end"] - window["start"],
        "chunk_s_estimate": chunk_s,
        "lone_gap_ms": lone * 1000,
        "worst_gap_during_prefill_ms": worst * 1000,
        "prefill_delay_over_chunk": (worst - lone) / chunk_s,
    }


async def bench(on_addr: str, off_addr: str, args: argparse.Namespace) -> dict[str, Any]:
    head = ClientHead.load(Checkpoint.open(resolve_model(MODEL)))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (1, 6 + i % 5), generator=gen) for i in range(max(LEVELS))]
    result: dict[str, Any] = {}
    async with (
        open_peer(PeerConfig(initial_peers=(on_addr,))) as on_peer,
        open_peer(PeerConfig(initial_peers=(off_addr,))) as off_peer,
    ):
        on, off = Runner(on_peer, head, args.tokens), Runner(off_peer, head, args.tokens)
        await on.one(prompts[0], new=2)  # warm-up both swarms
        await off.one(prompts[0], new=2)
        solo = [(await on.one(p))[0] for p in prompts]
        lone_rates: dict[str, list[float]] = {"on": [], "off": []}
        gaps: list[float] = []
        for _ in range(args.repeats):
            for name, runner in (("on", on), ("off", off)):
                t0 = time.perf_counter()
                ids, times = await runner.one(prompts[0])
                lone_rates[name].append(len(ids) / (time.perf_counter() - t0))
                if name == "on":
                    gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
        same = True
        rates: dict[int, list[float]] = {n: [] for n in LEVELS}
        for rep in range(args.repeats):
            for n in LEVELS:
                outs, wall = await on.together(prompts[:n])
                same = same and outs == solo[:n]
                rates[n].append(sum(map(len, outs)) / wall)
                print(f"repeat {rep + 1}: {n} sessions {rates[n][-1]:.1f} tok/s", file=sys.stderr)
        one = statistics.median(rates[1])
        for n in LEVELS:
            result[f"tokens_s_{n}"] = round(statistics.median(rates[n]), 2)
            if n > 1:
                result[f"ratio_{n}_over_1"] = round(statistics.median(rates[n]) / one, 3)
        on_rate, off_rate = (
            statistics.median(lone_rates["on"]),
            statistics.median(lone_rates["off"]),
        )
        result.update(
            lone_tokens_s_on=round(on_rate, 2),
            lone_tokens_s_off=round(off_rate, 2),
            lone_on_over_off=round(on_rate / off_rate, 3),
            lone_step_p50_ms=round(statistics.median(gaps) * 1000, 1),
            lone_step_p95_ms=round(statistics.quantiles(gaps, n=20)[18] * 1000, 1),
        )
        status = await gather_status(on_peer, MODEL, num_blocks=30)
        result["batch_seen"] = [s["batch"] for s in status["servers"]]  # records' last 60 s
        delay = await prefill_delay(on, args.prefill, args.chunk)
        result.update({k: round(v, 3) for k, v in delay.items()})
        result["same_tokens"] = same
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per session")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=2048, help="tokens of the long prompt")
    parser.add_argument("--chunk", type=int, default=256, help="the servers' --prefill-chunk")
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    forward = span_forward_ms(args.server_threads)
    procs: list[subprocess.Popen] = []
    try:
        chunk = ["--prefill-chunk", str(args.chunk)]
        on_procs, on_addr = start_swarm(chunk, args.server_threads)
        procs += on_procs
        off_procs, off_addr = start_swarm([*chunk, "--no-batching"], args.server_threads)
        procs += off_procs
        result = trio.run(bench, on_addr, off_addr, args)
    finally:
        for proc in procs:
            proc.kill()
    result.update(forward)
    result.update(
        model=MODEL,
        tokens_per_session=args.tokens,
        repeats=args.repeats,
        server_threads=args.server_threads,
        prefill_chunk=args.chunk,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
