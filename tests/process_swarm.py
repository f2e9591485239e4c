"""`swarm-node serve` processes for tests that must kill or freeze a server; the client stays in-process."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

CLI = str(Path(sys.executable).with_name("swarm-node"))


@dataclass
class ServerProcess:
    process: trio.Process
    addr: str  # full multiaddr with /p2p/<peer id>

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[1]


async def first_line(process: trio.Process) -> str:
    """The first stdout line of a process (a server prints its address first)."""
    assert process.stdout is not None
    data = b""
    while b"\n" not in data:
        chunk = await process.stdout.receive_some(4096)
        if not chunk:
            raise AssertionError(f"process exited before printing its address: {data!r}")
        data += chunk
    return data.split(b"\n", 1)[0].decode()


async def start_server(
    nursery: trio.Nursery, args: Sequence[str], started: list[trio.Process] | None = None
) -> ServerProcess:
    """Start ``swarm-node serve ARGS`` in ``nursery`` and wait until it prints its address.
    The process is appended to ``started`` as soon as it exists (for clean-up)."""
    command = [CLI, "serve", "--listen", "/ip4/127.0.0.1/tcp/0", *args]
    process = await nursery.start(
        lambda task_status: trio.run_process(  # noqa: ASYNC105 (nursery.start awaits it)
            command, stdout=subprocess.PIPE, task_status=task_status, check=False
        )
    )
    if started is not None:
        started.append(process)
    return ServerProcess(process, await first_line(process))


def stop_all(processes: Sequence[trio.Process]) -> None:
    """SIGCONT (in case a test froze one) and SIGKILL every process still running."""
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)
            process.kill()


@asynccontextmanager
async def server_processes(
    model: Path | str, spans: Sequence[str], *, extra: Sequence[str] = ()
) -> AsyncIterator[list[ServerProcess]]:
    """One server per ``spans`` entry ("0:3", or "--num-blocks 2"...); the first starts the swarm,
    the others join it together. On exit, every server still running is stopped: SIGCONT (in case a
    test froze it) and SIGKILL; tests that check a clean exit signal and wait themselves."""
    async with trio.open_nursery() as nursery:
        servers: list[ServerProcess] = []
        started: list[trio.Process] = []
        try:
            common = ["--model", str(model), *extra]
            servers.append(await start_server(nursery, [*common, *_span_args(spans[0])], started))
            joined: list[ServerProcess | None] = [None] * (len(spans) - 1)

            async def join(i: int, span: str) -> None:
                joined[i] = await start_server(
                    nursery,
                    [*common, *_span_args(span), "--initial-peers", servers[0].addr],
                    started,
                )

            async with trio.open_nursery() as starting:
                for i, span in enumerate(spans[1:]):
                    starting.start_soon(join, i, span)
            servers += [s for s in joined if s is not None]
            yield servers
        finally:
            stop_all(started)


def _span_args(span: str) -> list[str]:
    return span.split() if span.startswith("--") else ["--blocks", span]
