"""Processes for honest benchmarks: baselines in clean processes, servers as real `swarm-node serve`.

A baseline (local transformers, local back-to-back compute) must not run in a process that has run
swarm clients: torch starts an OpenMP thread team per calling thread, and the teams left behind
steal the cores (measured: local generate 40% slower). So every baseline here runs in a process of
its own, started with none of this program's thread settings in its environment (torch's defaults),
either once per measurement (``run_worker``) or kept for a run and asked for jobs over a pipe
(``CleanProcess``: for baselines measured between the segments of one swarm run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("swarm-node"))
# variables that change how fast torch runs: a baseline runs without the ones we set
THREAD_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def clean_env() -> dict[str, str]:
    """The environment of a process at torch's defaults (and none of swarm-node's SWARM_* settings)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env = {k: v for k, v in env.items() if not k.startswith("SWARM_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def pin(cores: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` keeping a child on ``cores`` (None: anywhere)."""
    return None if cores is None else (lambda: os.sched_setaffinity(0, cores))


def start_server(
    blocks: str,
    initial: str = "",
    *,
    threads: int | None = None,
    cores: set[int] | None = None,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """A `swarm-node serve --blocks START:END` process at its defaults; returns it and its address."""
    cmd = [CLI, "serve", "--blocks", blocks, "--listen", "/ip4/127.0.0.1/tcp/0"]
    cmd += ["--throughput", "100", *extra]
    if threads:
        cmd += ["--torch-threads", str(threads)]
    if initial:
        cmd += ["--initial-peers", initial]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**clean_env(), **(env or {})},
        preexec_fn=pin(cores),
    )
    addr = proc.stdout.readline().strip() if proc.stdout else ""
    if not addr:
        raise SystemExit(f"server {blocks} did not start")
    return proc, addr


def stop(processes: list[subprocess.Popen]) -> None:
    for proc in processes:
        proc.terminate()
    for proc in processes:
        proc.wait(timeout=30)


def run_worker(
    script: str,
    args: list[str],
    *,
    cores: set[int] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """``script --worker ...args`` in a fresh clean process; its last stdout line, as JSON."""
    done = subprocess.run(
        [sys.executable, script, "--worker", *args],
        capture_output=True,
        text=True,
        env={**clean_env(), **(env or {})},
        preexec_fn=pin(cores),
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {args} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class CleanProcess:
    """``script --baseline-worker ...args`` kept running in a clean process, answering jobs: one JSON
    line in (``{"job": NAME, ...}``), one JSON line out (see ``serve_jobs``)."""

    def __init__(self, script: str, args: list[str] = ()) -> None:  # type: ignore[assignment]
        self.proc = subprocess.Popen(
            [sys.executable, script, "--baseline-worker", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=clean_env(),
        )

    def ask(self, job: str, **fields: Any) -> dict[str, Any]:
        if self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError("the baseline process has no pipes")
        self.proc.stdin.write(json.dumps({"job": job, **fields}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the baseline process ended ({self.proc.wait()}) during {job!r}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def serve_jobs(handlers: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """The baseline process's loop: answer each job line on stdin until it closes."""
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps(handlers[job.pop("job")](**job)), flush=True)


class TokenClock:
    """A transformers streamer that notes when each new token arrives (the prompt's put skipped)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass
