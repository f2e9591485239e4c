#!/usr/bin/env python
"""A new user's first token: `swarm-node generate ... --max-new-tokens 1` and `swarm-node status`,
each a fresh CLI process, against loopback swarms of 1, 8 and 32 servers of SmolLM2-135M (all
servers in this process; with 8 and 32 the model is split in 4 and 8 spans, each held by several
servers), without and with a delay proxy in front of every server (DELAY seconds one way).

    .venv/bin/python scripts/bench_first_token.py [--servers 1 8 32] [--delays 0 0.025] [--repeats 3]

`cli_first_token_s`: the generate process's wall time, start to exit (its one token printed: an
upper bound on the first token), median of the repeats, by "<servers>@<delay ms>"; `status_s` the
same for `status`; `import_s`: `import swarm_node.node.apps.commands` (what the CLI's commands need:
torch and libp2p) in a fresh process, and `import_swarm_node_s`: `import swarm_node` alone.
Rounds alternate generate and status. `warm_lookup_ms`: a long-lived Python client's chain for a
next request (after its first), median of 5. Prints one JSON line. A baseline: BENCH_CHECKOUT=/path/to/main
(the servers and the CLI both come from that checkout). Issue 21's targets: first token
<= 2.5 s on loopback whatever the swarm size, <= 2.5 s + 8 round trips with the delay, status
<= 2 s on loopback, a warm client's next request <= 50 ms of lookup.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

# the checkout measured (its swarm_node and tests/ helpers): this one, or BENCH_CHECKOUT (a baseline)
ROOT = Path(os.environ.get("BENCH_CHECKOUT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from swarm_node.model import resolve_model  # noqa: E402
from swarm_node.node.apps.commands import split_blocks  # noqa: E402
from swarm_node.node.client.settings import SessionSettings  # noqa: E402
from swarm_node.node.config import PeerConfig, ServerConfig  # noqa: E402
from swarm_node.node.peer import Peer, open_peer  # noqa: E402
from tests.delay_proxy import DelayProxy  # noqa: E402
from tests.swarm_helpers import LOOPBACK  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
CLI = [sys.executable, "-m", "swarm_node.node.apps.cli"]


def spans_for(servers: int, num_blocks: int) -> list[tuple[int, int]]:
    parts = 1 if servers == 1 else min(servers // 4 if servers >= 32 else 4, num_blocks)
    spans = split_blocks(num_blocks, parts)
    return [spans[i % parts] for i in range(servers)]


async def start_swarm(
    stack: AsyncExitStack, nursery: trio.Nursery, spans: list[tuple[int, int]], delay: float
) -> list[Peer]:
    """Servers of ``spans``; with ``delay``, each behind its own proxy, announcing only the proxy."""
    peers: list[Peer] = []
    for start, end in spans:
        proxy = None
        announce: tuple[str, ...] = ()
        if delay > 0:
            proxy = DelayProxy(target_port=0, delay=delay)
            port = await nursery.start(proxy.run)
            announce = (f"/ip4/127.0.0.1/tcp/{port}",)
        initial = tuple(peers[0].addrs[:1]) if peers else ()
        peer = await stack.enter_async_context(
            open_peer(
                PeerConfig(listen=LOOPBACK, initial_peers=initial, announce_addrs=announce),
                server=ServerConfig(model=MODEL, start=start, end=end, throughput=100.0),
            )
        )
        if proxy is not None:
            proxy.target_port = int(peer.host.get_transport_addrs()[0].value_for_protocol("tcp"))
        peers.append(peer)
    return peers


async def timed(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = await trio.run_process(
        command, capture_stdout=True, capture_stderr=True, env=env, check=False
    )
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{command[3:5]} failed: {done.stderr.decode()[-2000:]}")
    return elapsed


async def warm_lookup_ms(peers: list[Peer], num_blocks: int) -> float:
    """A long-lived Python client's chain for its second request, after a first one (median ms)."""
    config = PeerConfig(listen=LOOPBACK, initial_peers=tuple(peers[0].addrs[:1]))
    settings = SessionSettings(model=MODEL)
    async with open_peer(config) as client:
        await client.route(settings, 0, num_blocks)  # the first request: a lookup
        times = []
        for _ in range(5):  # the next ones, as a session opens them (open_token_session)
            t0 = time.perf_counter()
            await client.route(settings, 0, num_blocks)
            times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 1)


def import_seconds(module: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, env=env)
    return time.perf_counter() - t0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from swarm_node.model import Checkpoint

    num_blocks = Checkpoint.open(resolve_model(MODEL)).num_blocks
    out: dict[str, Any] = {"cli_first_token_s": {}, "status_s": {}, "warm_lookup_ms": {}}
    for servers in args.servers:
        for delay in args.delays:
            key = f"{servers}@{round(delay * 1000)}ms"
            async with trio.open_nursery() as nursery:  # the proxies
                async with AsyncExitStack() as stack:
                    spans = spans_for(servers, num_blocks)
                    peers = await start_swarm(stack, nursery, spans, delay)
                    entry = ["--initial-peers", peers[0].addrs[0], "--model", MODEL]
                    generate = [*CLI, "generate", PROMPT, "--max-new-tokens", "1", *entry]
                    status = [*CLI, "status", *entry]
                    gen_times, status_times = [], []
                    for _ in range(args.repeats):
                        gen_times.append(await timed(generate))
                        status_times.append(await timed(status))
                    out["warm_lookup_ms"][key] = await warm_lookup_ms(peers, num_blocks)
                out["cli_first_token_s"][key] = round(statistics.median(gen_times), 3)
                out["status_s"][key] = round(statistics.median(status_times), 3)
                print(key, gen_times, status_times, file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.025])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {
        "import_s": round(
            statistics.median(import_seconds("swarm_node.node.apps.commands") for _ in range(3)), 3
        ),
        "import_swarm_node_s": round(import_seconds("swarm_node"), 3),
    }
    result |= trio.run(run, args)
    result["load"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
