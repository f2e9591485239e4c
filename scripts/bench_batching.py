#!/usr/bin/env python
"""Continuous batching on a server: aggregate tokens/s of 1-16 concurrent sessions, a lone session
with batching on vs off, and decode steps behind a 2048-token prefill.

SmolLM2-135M-Instruct, float32, greedy, through two 2-server swarms of real `swarm-node serve`
processes on loopback (blocks 0:15 and 15:30): one serving with batching (the default), one with
--no-batching. Every measurement runs in its own clean client process (``--worker``, torch at its
defaults) holding the embeddings and the LM head of its sessions (batched across them,
client/head_batching.py); rounds alternate the order of the levels and of on/off; medians.

- ``ratio_N_over_1``: aggregate tokens/s of N sessions at once over one session's, on the batching
  swarm (``tokens_s_N`` beside them); issue 19's target: ``ratio_8_over_1`` >= 3;
- ``lone_on_over_off``: a lone session's tokens/s, batching on over off (target >= 0.97): the median
  of --lone-pairs ratios, each of an "on" and an "off" run back to back (alternating which first;
  ``lone_on_over_off_pairs``); ``lone_on_over_off_of_medians``: the ratio of the two medians (the
  key's meaning until 2026-12-06, 3 runs each: the 2 shared cores' speed drifts by 10-30% over
  minutes, measured, so it swung 0.92-1.13 between runs of the same code);
- ``lone_step_p50_ms`` / ``lone_step_p95_ms``: a lone session's per-token intervals (batching on);
- ``prefill_delay_over_chunk``: while session B decodes alone, session A sends a 2048-token prompt;
  B's worst token interval during it (B decodes until 16 tokens after it), less B's median interval
  outside it, over one chunk's compute through the chain (``chunk_compute_ms``: a 256-token chunk
  after 1024 cached positions through blocks 0:15 plus through 15:30, timed alone at the servers'
  threads before the swarms start); the target: <= 1. A chunk gives way to the decode steps waiting
  after each of its blocks, so a step waits on each server for at most the block being computed
  (1/15 of a chunk here), then for its own compute slowed by the prefill's beside it on the 2 cores
  (``gap_p50_during_prefill_ms`` against ``lone_gap_ms``); ``..._over_server_chunk``: over one
  server's share; ``..._as_run``: over the chunks' time as they ran (the prefill's wall time /
  (chunks + 1) per server, x2), which a loaded machine stretches beyond the chunk timed alone;
- ``same_tokens``: every session's tokens in every concurrent round equal its solo run;
- ``batch_seen``: each server's record's largest decode batch of its last 60 s (read at the end);
- ``span_forward_ms_N``: the server's side alone, one decode forward of blocks 0:15 for N sessions;
- ``cpu_ms_per_token``: per level, CPU ms per generated token of [the client process, server
  0:15, server 15:30] (the servers' over the whole worker run, its start included; medians): what
  a loaded machine does not hide. With N sessions both cores are busy, so aggregate tokens/s is
  bound near 2000 / their sum; ``client_head_batches``: how many sessions' heads ran together.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_batching.py [--quick] [--tokens 32] [--rounds 3]

Prints one JSON line (progress on stderr). On a shared machine the figures carry that load
(``loadavg_before_after``): rerun on a quiet one.

Measured 2026-12-05 on the 2 shared cores before the client's head was batched (other sessions'
work beside it, load average falling from ~7 to ~2), --tokens 32, 2 rounds, 1 thread per server,
one client process for all levels: 1 session 10.3 tokens/s, 2: 10.8 (1.05x), 4: 15.4 (1.49x),
8: 20.0 (1.94x), 16: 23.8 (2.32x); lone on/off 1.11; lone step p50 61 ms, p95 123 ms; prefill
delay 1.6 of one server's chunk (~0.63 s); same_tokens true; one forward of blocks 0:15 for 16
sessions ~107 ms against ~42 ms for one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import trio

from swarm_node.model import Checkpoint, ClientHead, resolve_model
from swarm_node.node.apps.swarm_status import gather_status
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.head_batching import head_batcher
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import PeerConfig
from swarm_node.node.peer import open_peer

CLI = str(Path(sys.executable).with_name("swarm-node"))
MODEL = "smollm2-135m"
LEVELS = (1, 2, 4, 8, 16)
AFTER_PREFILL_MAX = 1000  # tokens session B may decode while a long prompt's prefill runs


def span_forward_ms(threads: int, chunk: int, repeats: int = 7) -> dict[str, float]:
    """The server side alone, in a clean process at the servers' threads: one decode forward of
    blocks 0:15 for N sessions (caches of 100 positions), median ms (N = 1 is the lone path); and
    one prefill chunk of ``chunk`` tokens after 1024 cached positions through blocks 0:15 and
    15:30 (what a decode step may wait for on each server behind a 2048-token prefill)."""
    from swarm_node.model import BlockSpan

    torch.set_num_threads(threads)
    checkpoint = Checkpoint.open(resolve_model(MODEL))
    span = BlockSpan.load(checkpoint, 0, 15)
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
        for start, end in ((0, 15), (15, 30)):
            part = span if start == 0 else BlockSpan.load(checkpoint, start, end)
            times = []
            for _ in range(3):
                cache = part.new_cache(1024 + chunk)
                part(torch.randn(1, 1024, part.hidden_size), cache)
                t0 = time.perf_counter()
                part(torch.randn(1, chunk, part.hidden_size), cache)
                times.append(time.perf_counter() - t0)
            out[f"chunk_ms_{start}_{end}"] = round(statistics.median(times) * 1000, 1)
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
        stopping: Any = None,
    ) -> tuple[list[int], list[float]]:
        """A session's generated ids and the times its tokens arrived (appended to ``times``);
        ``third`` is set when its third token arrives; ``stopping(ids)``: generate_tokens'."""
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
            stopping=stopping,
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


async def prefill_delay(runner: Runner, prompt_len: int) -> dict[str, Any]:
    """Session B decodes alone; once it is decoding, session A sends a ``prompt_len``-token
    prompt: B's token intervals (B goes on until 16 tokens after A's prefill ended, at most
    ``AFTER_PREFILL_MAX`` tokens), and when A's prefill (its first token) started and ended."""
    gen = torch.Generator().manual_seed(7)
    long_ids = torch.randint(0, 49152, (1, prompt_len), generator=gen)
    short = torch.randint(0, 49152, (1, 8), generator=gen)
    window: dict[str, float] = {}
    times: list[float] = []
    decoding = trio.Event()

    def after_prefill(_: torch.Tensor) -> bool:
        return "end" in window and sum(t > window["end"] for t in times) >= 16

    async def decoder() -> None:
        new = AFTER_PREFILL_MAX
        await runner.one(short, new=new, times=times, third=decoding, stopping=after_prefill)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(decoder)
        await decoding.wait()  # B is decoding (its prefill done) before A's prompt goes out
        window["start"] = time.perf_counter()
        await runner.one(long_ids, new=1)
        window["end"] = time.perf_counter()
    return {"times": times, **window}


async def work(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (``args.worker``) in this clean process, against the swarm at ``args.addr``."""
    head = ClientHead.load(Checkpoint.open(resolve_model(MODEL)))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (1, 6 + i % 5), generator=gen) for i in range(max(LEVELS))]
    async with open_peer(PeerConfig(initial_peers=(args.addr,))) as peer:
        runner = Runner(peer, head, args.tokens)
        await runner.one(prompts[0], new=2)  # warm-up
        if args.worker == "solo":
            return {"outs": [(await runner.one(p))[0] for p in prompts]}
        if args.worker == "prefill":
            out = await prefill_delay(runner, args.prefill)
            status = await gather_status(peer, MODEL, num_blocks=30)
            return {**out, "batch_seen": [s["batch"] for s in status["servers"]]}
        cpu = time.process_time()
        if args.sessions == 1:
            t0 = time.perf_counter()
            ids, times = await runner.one(prompts[0])
            wall = time.perf_counter() - t0
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            out = {"outs": [ids], "tokens": len(ids), "wall": wall, "gaps": gaps}
            return {**out, "client_cpu_s": time.process_time() - cpu}
        heads = head_batcher(head)
        heads.batch_sizes.clear()
        outs, wall = await runner.together(prompts[: args.sessions])
        return {
            "outs": outs,
            "tokens": sum(map(len, outs)),
            "wall": wall,
            "client_cpu_s": time.process_time() - cpu,
            "head_batches": {str(k): v for k, v in sorted(heads.batch_sizes.items())},
        }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    args: argparse.Namespace,
    kind: str,
    addr: str = "",
    sessions: int = 1,
    servers: list[subprocess.Popen] = (),  # type: ignore[assignment]
) -> dict:
    """One worker process's run; ``server_cpu_s``: the servers' CPU seconds over it (the worker's
    start, warm-up and sessions' opening included)."""
    cmd = [sys.executable, __file__, "--worker", kind, "--addr", addr, "--sessions", str(sessions)]
    cmd += ["--tokens", str(args.tokens), "--prefill", str(args.prefill)]
    cmd += ["--chunk", str(args.chunk), "--server-threads", str(args.server_threads)]
    before = [cpu_seconds(p.pid) for p in servers]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {kind} worker failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["server_cpu_s"] = [cpu_seconds(p.pid) - b for p, b in zip(servers, before, strict=True)]
    return out


def prefill_figures(run: dict[str, Any], forward: dict[str, float], chunks: int) -> dict[str, Any]:
    """B's worst token interval during A's prefill, less B's median interval, over one chunk's
    compute through the chain (blocks 0:15 then 15:30, measured alone) and over one server's."""
    times, start, end = run["times"], run["start"], run["end"]
    gaps = [(b - a, b) for a, b in zip(times, times[1:], strict=False)]
    during = [g for g, t in gaps if start <= t <= end + 0.5]
    lone = statistics.median(g for g, t in gaps if t < start or t > end + 0.5)
    delay = max(during, default=lone) - lone
    server_chunks = [forward["chunk_ms_0_15"] / 1000, forward["chunk_ms_15_30"] / 1000]
    return {
        "prefill_s": round(end - start, 3),
        "lone_gap_ms": round(lone * 1000, 1),
        "worst_gap_during_prefill_ms": round((delay + lone) * 1000, 1),
        "gap_p50_during_prefill_ms": round(statistics.median(during or [lone]) * 1000, 1),
        "chunk_compute_ms": round(sum(server_chunks) * 1000, 1),
        "prefill_delay_over_chunk": round(delay / sum(server_chunks), 3),
        "prefill_delay_over_server_chunk": round(delay / max(server_chunks), 3),
        # the same over the chunks as they ran (a loaded machine slows them): the prefill's wall
        # time, pipelined over the 2 servers, is (chunks + 1) of one server's chunk
        "prefill_delay_over_chunk_as_run": round(delay / (2 * (end - start) / (chunks + 1)), 3),
        "batch_seen": run["batch_seen"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 16 tokens a session, 4 lone pairs"
    )
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per session")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--lone-pairs", type=int, default=8, help="lone runs with batching on and off, in pairs"
    )
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=2048, help="tokens of the long prompt")
    parser.add_argument("--chunk", type=int, default=256, help="the servers' --prefill-chunk")
    parser.add_argument(
        "--worker", choices=("span", "solo", "together", "prefill"), help=argparse.SUPPRESS
    )
    parser.add_argument("--addr", help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    if args.worker == "span":
        print(json.dumps(span_forward_ms(args.server_threads, args.chunk)))
        return
    if args.worker:
        print(json.dumps(trio.run(work, args)))
        return
    if args.quick:
        args.rounds, args.tokens, args.lone_pairs = 1, 16, 4
    load_before = os.getloadavg()
    forward = measure(args, "span")  # before the swarms start
    forward.pop("server_cpu_s")
    procs: list[subprocess.Popen] = []
    rates: dict[int, list[float]] = {n: [] for n in LEVELS}
    cpu: dict[int, list[list[float]]] = {n: [] for n in LEVELS}  # [client, 2 servers] s/token
    heads: dict[int, Counter[str]] = {n: Counter() for n in LEVELS}  # head batch size -> count
    lone: dict[str, list[float]] = {"on": [], "off": []}
    gaps: list[float] = []
    pairs: list[float] = []  # a lone session's tokens/s, on over off, per pair
    try:
        chunk = ["--prefill-chunk", str(args.chunk)]
        on_procs, on_addr = start_swarm(chunk, args.server_threads)
        procs += on_procs
        off_procs, off_addr = start_swarm([*chunk, "--no-batching"], args.server_threads)
        procs += off_procs
        solo = measure(args, "solo", on_addr)["outs"]
        same = True
        for r in range(args.rounds):
            for n in LEVELS if r % 2 == 0 else LEVELS[::-1]:
                run = measure(args, "together", on_addr, n, on_procs)
                same = same and run["outs"] == solo[:n]
                rates[n].append(run["tokens"] / run["wall"])
                cpu[n].append(
                    [x / run["tokens"] for x in (run["client_cpu_s"], *run["server_cpu_s"])]
                )
                heads[n].update(run.get("head_batches", {}))
                print(f"round {r + 1}: {n} sessions {rates[n][-1]:.1f} tok/s", file=sys.stderr)
        # a lone session, batching on and off, in pairs run back to back (alternating which goes
        # first): the 2 shared cores' speed drifts by 10-30% over minutes, which a pair's ratio
        # cancels and a ratio of medians over a few runs does not
        for r in range(args.lone_pairs):
            pair: dict[str, float] = {}
            for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                run = measure(args, "together", on_addr if name == "on" else off_addr)
                pair[name] = run["tokens"] / run["wall"]
                lone[name].append(pair[name])
                gaps += run["gaps"] if name == "on" else []
            pairs.append(pair["on"] / pair["off"])
            print(f"lone pair {r + 1}: on/off {pairs[-1]:.3f}", file=sys.stderr)
        prefill = measure(args, "prefill", on_addr)
    finally:
        for proc in procs:
            proc.kill()
    one = statistics.median(rates[1])
    result: dict[str, Any] = {}
    for n in LEVELS:
        result[f"tokens_s_{n}"] = round(statistics.median(rates[n]), 2)
        if n > 1:
            result[f"ratio_{n}_over_1"] = round(statistics.median(rates[n]) / one, 3)
    on_rate, off_rate = statistics.median(lone["on"]), statistics.median(lone["off"])
    result.update(
        lone_tokens_s_on=round(on_rate, 2),
        lone_tokens_s_off=round(off_rate, 2),
        lone_on_over_off=round(statistics.median(pairs), 3),
        lone_on_over_off_pairs=[round(x, 3) for x in pairs],
        lone_on_over_off_of_medians=round(on_rate / off_rate, 3),
        lone_step_p50_ms=round(statistics.median(gaps) * 1000, 1),
        lone_step_p95_ms=round(statistics.quantiles(gaps, n=20)[18] * 1000, 1),
        same_tokens=same,
    )
    result["cpu_ms_per_token"] = {  # median over rounds: [client, server 0:15, server 15:30]
        str(n): [round(statistics.median(r[i] for r in cpu[n]) * 1000, 1) for i in range(3)]
        for n in LEVELS
    }
    result["client_head_batches"] = {str(n): dict(heads[n]) for n in LEVELS if n > 1}
    result.update(prefill_figures(prefill, forward, -(-args.prefill // args.chunk)))
    result.update(forward)
    result.update(
        model=MODEL,
        tokens_per_session=args.tokens,
        rounds=args.rounds,
        lone_pairs=args.lone_pairs,
        server_threads=args.server_threads,
        prefill_tokens=args.prefill,
        prefill_chunk=args.chunk,
        loadavg_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
