#!/usr/bin/env python
"""A new user's first token: `swarm-node generate ... --max-new-tokens 1` and `swarm-node status`,
each a fresh CLI process, against loopback swarms of 1, 8 and 32 servers of SmolLM2-135M (servers
in processes of --per-process each; with 8 and 32 the model is split in 4 and 8 spans, each held by
several servers), without and with a delay proxy in front of every server (DELAY seconds one way;
since 2026-12-06 16:00 the proxies do not spin for precision: each chunk up to 1 ms late).

    .venv/bin/python scripts/bench_first_token.py [--servers 1 8 32] [--delays 0 0.025] [--repeats 3]
    .venv/bin/python scripts/bench_first_token.py --quick     # 1 and 8 servers, one repeat

`cli_first_token_s`: from starting the generate process to its first token on stdout (after the
prompt it echoes), median of the repeats, by "<servers>@<delay ms>"; `cli_exit_s` to its exit
(after the spot checks of its servers); `status_s` the same for `status`; `import_s`: `import
swarm_node.node.apps.commands` (what the CLI's commands need: libp2p; torch since 2026-12-06 no
longer) in a fresh process, `import_generate_s` that and what `generate` imports in its worker
thread (torch, the client's side), and `import_swarm_node_s`: `import swarm_node` alone. Rounds alternate generate and status.
`warm_lookup_ms`: a long-lived Python client's chain for a next request (after its first), median
of 5. Timing starts once the swarm is settled, as a user meets it (`settle`): its servers use
fewer than --settle-cores cores over 5 s (their start-up's announcements done), or --settle-most
seconds passed; `swarm_cores`: the cores they used over the last 5 s before the timing (their
idle load); `swarm_cpu_per_generate_s`: the CPU seconds the servers used while a generate ran
(median; on this 2-core machine whatever they use is taken from the client's cores: announcements
and lookups of other servers that fall during a run slow it). `load`: the load average after each swarm size (the figures are indicative on a shared
machine). Prints one JSON line. A baseline: BENCH_CHECKOUT=/path/to/main (the servers and the CLI
both come from that checkout), or `--compare /path/to/main`: that checkout's CLI against the same
swarms, rounds alternating with this one's (`compare` in the JSON). Issue 21's targets: first token <= 2.5 s on loopback whatever the
swarm size, <= 2.5 s + 8 round trips with the delay, status <= 2 s on loopback, a warm client's next
request <= 50 ms of lookup.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

# the checkout measured (its swarm_node and tests/ helpers): this one, or BENCH_CHECKOUT (a baseline)
ROOT = Path(os.environ.get("BENCH_CHECKOUT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from swarm_node.errors import SwarmError  # noqa: E402
from swarm_node.model import resolve_model  # noqa: E402
from swarm_node.node.apps.commands import split_blocks  # noqa: E402
from swarm_node.node.client.settings import SessionSettings  # noqa: E402
from swarm_node.node.config import PeerConfig, ServerConfig  # noqa: E402
from swarm_node.node.net.host import quiet_libp2p_logging  # noqa: E402
from swarm_node.node.peer import open_peer  # noqa: E402
from tests.delay_proxy import DelayProxy  # noqa: E402
from tests.swarm_helpers import LOOPBACK  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
CLI = [sys.executable, "-m", "swarm_node.node.apps.cli"]
# what `generate` imports before its first token (the commands, then torch and the client's side)
GENERATE_MODULES = (
    "swarm_node.node.apps.commands, swarm_node.node.client.generation, swarm_node.model.client_head"
)


def spans_for(servers: int, num_blocks: int) -> list[tuple[int, int]]:
    parts = 1 if servers == 1 else min(servers // 4 if servers >= 32 else 4, num_blocks)
    spans = split_blocks(num_blocks, parts)
    return [spans[i % parts] for i in range(servers)]


async def serve_spans(spans: list[tuple[int, int]], delay: float, initial: str) -> None:
    """A worker process: servers of ``spans`` (each behind its own delay proxy, announcing only the
    proxy, when ``delay``), joining ``initial`` (the first starts the swarm when empty); prints each
    one's address, then "ready", and serves until killed."""
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        first = initial
        for start, end in spans:
            proxy = None
            announce: tuple[str, ...] = ()
            if delay > 0:
                # no spinning (tests/delay_proxy.py): each chunk up to 1 ms late, not ~0.5
                # CPU-seconds a generate taken from the client's 2 cores by 32 proxies
                proxy = DelayProxy(target_port=0, delay=delay, timer_slack=0.0)
                port = await nursery.start(proxy.run)
                announce = (f"/ip4/127.0.0.1/tcp/{port}",)
            peer = await stack.enter_async_context(
                open_peer(
                    PeerConfig(
                        listen=LOOPBACK,
                        initial_peers=(first,) if first else (),
                        announce_addrs=announce,
                        reachability="public",  # the proxy forwards only once the peer listens
                    ),
                    server=ServerConfig(model=MODEL, start=start, end=end, throughput=100.0),
                )
            )
            if proxy is not None:
                proxy.target_port = int(
                    peer.host.get_transport_addrs()[0].value_for_protocol("tcp")
                )
            first = first or peer.addrs[0]
            print(peer.addrs[0], flush=True)
        print("ready", flush=True)
        await trio.sleep_forever()


async def start_worker(
    nursery: trio.Nursery, spans: list[tuple[int, int]], delay: float, initial: str
) -> tuple[trio.Process, list[str]]:
    """A process of servers (``serve_spans``); returns it and its servers' addresses."""
    command = [sys.executable, __file__, "--worker", "--delay", str(delay), "--initial", initial]
    command += ["--spans", *(f"{start}:{end}" for start, end in spans)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await nursery.start(
        functools.partial(trio.run_process, command, stdout=subprocess.PIPE, env=env, check=False)
    )
    assert process.stdout is not None
    data = b""
    while not data.endswith(b"ready\n"):
        chunk = await process.stdout.receive_some(4096)
        if not chunk:
            raise RuntimeError(f"a server process ended before it was ready: {data!r}")
        data += chunk
    return process, data.decode().split()[:-1]


async def start_swarm(
    nursery: trio.Nursery, spans: list[tuple[int, int]], delay: float, per_process: int
) -> tuple[list[trio.Process], str]:
    """Servers of ``spans`` in processes of ``per_process`` servers each (the first process starts
    the swarm, the others join it together); returns the processes and the first server's address."""
    groups = [spans[i : i + per_process] for i in range(0, len(spans), per_process)]
    first, addrs = await start_worker(nursery, groups[0], delay, "")
    processes = [first]

    async def join(group: list[tuple[int, int]]) -> None:
        processes.append((await start_worker(nursery, group, delay, addrs[0]))[0])

    async with trio.open_nursery() as starting:
        for group in groups[1:]:
            starting.start_soon(join, group)
    return processes, addrs[0]


async def timed(
    command: list[str], first_after: str = "", root: Path = ROOT
) -> tuple[float, float]:
    """Seconds from starting ``command`` (with ``root``'s swarm_node) to its first stdout text
    past ``first_after`` (a generate's first token after the prompt it echoes; "": its first
    output) and to its exit."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    first = None
    out = b""
    with tempfile.TemporaryFile() as errors:  # its last line names a failure
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    command,
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    env=env,
                    cwd=root,  # `python -m` puts its folder first on the path, before PYTHONPATH
                    check=False,
                )
            )
            assert process.stdout is not None
            while chunk := await process.stdout.receive_some(4096):
                out += chunk
                if first is None and len(out) > len(first_after.encode()):
                    first = time.perf_counter() - t0
        elapsed = time.perf_counter() - t0
        if process.returncode != 0 or first is None:
            errors.seek(0)
            error = errors.read().decode(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{command[3]} exited with {process.returncode}: {error}")
    return first, elapsed


async def warm_lookup_ms(entry: str, num_blocks: int) -> float:
    """A long-lived Python client's chain for its second request, after a first one (median ms)."""
    config = PeerConfig(listen=LOOPBACK, initial_peers=(entry,))
    settings = SessionSettings(model=MODEL)
    async with open_peer(config) as client:
        await client.route(settings, 0, num_blocks)  # the first request: a lookup
        times = []
        for _ in range(5):  # the next ones, as a session opens them (open_token_session)
            t0 = time.perf_counter()
            await client.route(settings, 0, num_blocks)
            times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 1)


def cpu_seconds(processes: list[trio.Process]) -> float:
    """CPU seconds (user + system) the server processes have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for process in processes:
        with open(f"/proc/{process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


async def settle(processes: list[trio.Process], *, below: float, most: float) -> float:
    """Wait until the swarm is settled, as a user meets it: its servers together use less than
    ``below`` cores over 5 s (their start-up's announcements, provides and first round-trip
    measurements done), or ``most`` seconds passed. Returns the cores of the last 5 s."""
    deadline = time.perf_counter() + most
    while True:
        t0, c0 = time.perf_counter(), cpu_seconds(processes)
        await trio.sleep(5.0)
        cores = (cpu_seconds(processes) - c0) / (time.perf_counter() - t0)
        if cores < below or time.perf_counter() >= deadline:
            return round(cores, 3)


def import_seconds(module: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from swarm_node.model import Checkpoint

    num_blocks = Checkpoint.open(resolve_model(MODEL)).num_blocks
    out: dict[str, Any] = {
        "cli_first_token_s": {},
        "cli_exit_s": {},
        "status_s": {},
        "warm_lookup_ms": {},
        "swarm_cores": {},
        "swarm_cpu_per_generate_s": {},
        "load": {},
    }
    for servers in args.servers:
        for delay in args.delays:
            key = f"{servers}@{round(delay * 1000)}ms"
            async with trio.open_nursery() as nursery:  # the server processes
                spans = spans_for(servers, num_blocks)
                processes, entry = await start_swarm(nursery, spans, delay, args.per_process)
                out["swarm_cores"][key] = await settle(
                    processes, below=args.settle_cores, most=args.settle_most
                )
                common = ["--initial-peers", entry, "--model", MODEL]
                generate = [*CLI, "generate", PROMPT, "--max-new-tokens", "1", *common]
                status = [*CLI, "status", *common]
                firsts, exits, status_times, swarm_cpu = [], [], [], []
                base: dict[str, list[float]] = {"first": [], "exit": [], "status": []}
                for _ in range(args.repeats):
                    try:
                        before = cpu_seconds(processes)
                        first, done = await timed(generate, PROMPT)
                        swarm_cpu.append(cpu_seconds(processes) - before)
                        firsts.append(first)
                        exits.append(done)
                        status_times.append((await timed(status))[1])
                        if args.compare is not None:  # the same swarm, the other checkout's client
                            first, done = await timed(generate, PROMPT, args.compare)
                            base["first"].append(first)
                            base["exit"].append(done)
                            base["status"].append((await timed(status, "", args.compare))[1])
                    except RuntimeError as exc:  # noted; the other measurements go on
                        out.setdefault("errors", {}).setdefault(key, []).append(str(exc))
                        print(key, exc, file=sys.stderr, flush=True)
                if args.compare is not None:
                    out.setdefault("compare", {})[key] = {
                        name: round(statistics.median(base[part]), 3) if base[part] else None
                        for name, part in (
                            ("cli_first_token_s", "first"),
                            ("cli_exit_s", "exit"),
                            ("status_s", "status"),
                        )
                    }
                    print(key, "compare", base, file=sys.stderr, flush=True)
                try:
                    out["warm_lookup_ms"][key] = await warm_lookup_ms(entry, num_blocks)
                except (trio.TooSlowError, SwarmError) as exc:  # its first lookup failed
                    out["warm_lookup_ms"][key] = None
                    out.setdefault("errors", {}).setdefault(key, []).append(repr(exc))
                for name, times in (
                    ("cli_first_token_s", firsts),
                    ("cli_exit_s", exits),
                    ("status_s", status_times),
                ):
                    out[name][key] = round(statistics.median(times), 3) if times else None
                if swarm_cpu:
                    out["swarm_cpu_per_generate_s"][key] = round(statistics.median(swarm_cpu), 2)
                out["load"][key] = [round(x, 2) for x in os.getloadavg()]
                print(
                    key, firsts, exits, status_times, out["load"][key], file=sys.stderr, flush=True
                )
                for process in processes:
                    process.kill()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.025])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-process", type=int, default=4, help="servers a server process hosts")
    parser.add_argument("--quick", action="store_true", help="1 and 8 servers, one repeat")
    parser.add_argument(
        "--settle-cores",
        type=float,
        default=0.3,
        help="timing starts once the servers use fewer cores than this over 5 s",
    )
    parser.add_argument(
        "--settle-most", type=float, default=120.0, help="or once this many seconds passed"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="CHECKOUT",
        help="also time the CLI of this checkout against the same swarms, rounds alternating",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--initial", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spans", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        quiet_libp2p_logging(0)
        spans = [tuple(map(int, span.split(":"))) for span in args.spans]
        trio.run(serve_spans, spans, args.delay, args.initial)
        return
    if args.quick:
        args.servers, args.repeats = [1, 8], 1
    result = {
        "import_s": round(
            statistics.median(import_seconds("swarm_node.node.apps.commands") for _ in range(3)), 3
        ),
        "import_swarm_node_s": round(import_seconds("swarm_node"), 3),
        "import_generate_s": round(import_seconds(GENERATE_MODULES), 3),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    result |= trio.run(run, args)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
