"""Real processes: two `swarm-node serve` and the `swarm-node generate` CLI on the bundled SmolLM2."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.process_swarm import first_line

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).with_name("swarm-node"))


async def test_two_servers_and_generate_cli(smollm2_path: Path) -> None:
    serve = [CLI, "serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--throughput", "10"]
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            first = await nursery.start(
                lambda task_status: trio.run_process(  # noqa: ASYNC105 (nursery.start awaits it)
                    [*serve, "--blocks", "0:15"],
                    stdout=subprocess.PIPE,
                    task_status=task_status,
                    check=False,
                )
            )
            addr = await first_line(first)
            assert addr.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3" in addr
            second = await nursery.start(
                lambda task_status: trio.run_process(  # noqa: ASYNC105 (nursery.start awaits it)
                    [*serve, "--blocks", "15:30", "--initial-peers", addr],
                    stdout=subprocess.PIPE,
                    task_status=task_status,
                    check=False,
                )
            )
            await first_line(second)
            result = await trio.run_process(
                [
                    CLI,
                    "generate",
                    "The capital of France is",
                    "--initial-peers",
                    addr,
                    "--max-new-tokens",
                    "8",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            out = result.stdout.decode()
            assert result.returncode == 0, result.stderr.decode()[-3000:]
            assert out.startswith("The capital of France is Paris"), out
            assert (
                "blocks 0:15 on" in result.stderr.decode()
                and "blocks 15:30 on" in result.stderr.decode()
            )
            for process in (first, second):  # Ctrl-C: records withdrawn, clean exit
                process.send_signal(signal.SIGINT)
            assert await first.wait() == 0
            assert await second.wait() == 0


async def test_demo_command(smollm2_path: Path) -> None:
    with trio.fail_after(300):
        result = await trio.run_process(
            [CLI, "demo", "--max-new-tokens", "6"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = result.stderr.decode()
    assert result.returncode == 0, err[-3000:]
    assert result.stdout.decode().startswith("The capital of France is Paris")
    assert "serves blocks 0:15" in err and "serves blocks 15:30" in err
    assert "chain: blocks 0:15 on" in err and "tokens/s" in err
