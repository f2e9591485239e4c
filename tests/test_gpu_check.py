"""scripts/gpu_check.py, the one prepared run for a GPU machine, as a dry run on the CPU: every part
runs (a tiny model), what only CUDA measures says so, the report is one JSON line also written
under $OUT, and a part past its timeout is killed with the servers it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "gpu_check.py")
SKIPPED = "skipped: no CUDA"
NO_CUDA = not torch.cuda.is_available()


def run_check(tmp_path: Path, *args: str, timeout: float) -> tuple[int, list[str], str]:
    out = subprocess.run(
        [sys.executable, SCRIPT, "--workdir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path / "out")},
    )
    return out.returncode, out.stdout.splitlines(), out.stderr


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (the run's own work folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line and proc.name.isdigit():
            found.append(line)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not NO_CUDA, reason="the dry run is the CPU's; a GPU runs the real check")
def test_the_dry_run_on_the_cpu_runs_every_part(tmp_path: Path) -> None:
    code, stdout, stderr = run_check(
        tmp_path,
        "--device",
        "cpu",
        "--new-tokens",
        "8",
        "--out",
        str(tmp_path / "r.json"),
        timeout=1500,
    )
    assert code == 0, stderr[-4000:]
    assert len(stdout) == 1  # one JSON line, nothing else on stdout
    report = json.loads(stdout[0])
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert (tmp_path / "out" / "gpu_check_server-b.log").exists()  # the servers' logs come back
    assert report["complete"] and report["failed_parts"] == []
    for part in ("checkpoint", "local", "swarm", "spans", "oom", "codecs"):
        assert "error" not in report[part] and "skipped" not in report[part], report[part]
        assert f"{part}: done in" in stderr  # progress on stderr
    assert report["device"] == {"name": "cpu", "memory_bytes": SKIPPED, "free_bytes": SKIPPED}
    assert report["same_tokens"] and len(report["swarm"]["tokens"]) == 8
    assert report["swarm"]["chain"] == ["0:2", "2:4"]
    assert any("memory plan on cpu" in line for line in report["swarm"]["servers"]["server-b"])
    assert report["local"]["peak_gpu_bytes"] == SKIPPED
    for quant in ("int8", "nf4"):
        assert report["spans"][quant]["cosine_vs_unquantized"] > 0.99
        assert report["spans"][quant]["allocated_per_block"] == SKIPPED
    assert report["oom"]["refused"].startswith("out_of_memory: a step: the server's cpu ran out")
    assert report["oom"]["same_output_after"] and report["oom"]["reserved_after"] == SKIPPED
    for codec in ("blockwise8", "blockwise8-64"):
        checks = report["codecs"][codec]
        assert checks.pop("code_agreement_with_bitsandbytes_encoder") > 0.9
        assert set(checks.values()) == {True}, checks
    assert list(tmp_path.glob("gpu-check-*")) == []  # the checkpoint and logs deleted


@pytest.mark.slow
def test_a_part_past_its_timeout_is_killed_with_the_servers_it_started(tmp_path: Path) -> None:
    code, stdout, stderr = run_check(
        tmp_path,
        "--device",
        "cpu",
        "--parts",
        "checkpoint,swarm,oom",
        "--timeout",
        "swarm=6",
        "--keep",
        timeout=900,
    )
    report = json.loads(stdout[-1])
    assert code == 1 and report["failed_parts"] == ["swarm"], stderr[-3000:]
    assert report["swarm"]["error"] == "timed out after 6 s (killed with what it started)"
    assert "error" not in report["oom"]  # the parts after it still ran
    assert "local" not in report
    (workdir,) = tmp_path.glob("gpu-check-*")  # --keep
    assert processes_naming(str(workdir)) == []  # no server outlived its part


@pytest.mark.skipif(not NO_CUDA, reason="torch sees a CUDA device here")
def test_cuda_asked_without_cuda_exits_2_saying_so(tmp_path: Path) -> None:
    code, stdout, stderr = run_check(tmp_path, "--device", "cuda", timeout=300)
    assert code == 2 and stdout == []
    assert "--device cuda needs a CUDA device, and torch" in stderr
    assert "nothing was measured" in stderr
