"""Hole punching through two real NATs: tests/nat_lab.py's namespaces, routers masquerading with
nftables. Skipped where the environment cannot make them (no unprivileged user + network
namespaces, or no `ip`, `nsenter` or `nft` command)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio

from tests.model_fixtures import make_tiny_model_dir
from tests.nat_lab import LAB_SECONDS
from tests.test_relay import expected_tokens

ROOT = Path(__file__).resolve().parent.parent


def lab_missing() -> str | None:
    """Why the lab cannot run here, or None."""
    for tool in ("unshare", "nsenter", "ip", "nft"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command"
    probe = subprocess.run(
        [
            "unshare",
            "-rn",
            "sh",
            "-c",
            "ip link add name lab0 type veth peer name lab1 && nft list tables",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"no user + network namespaces with veth and nftables here: {probe.stderr.strip()}"
    return None


@pytest.mark.slow
async def test_a_client_behind_a_nat_punches_through_to_a_server_behind_another(
    tmp_path: Path,
) -> None:
    """Client and server each behind a masquerading router, the relay on the "internet": the
    client's generation through the relay equals transformers', DCUtR then opens a direct
    connection to the server's public (router B's) address, the relayed one is closed, and a
    second generation goes direct with the same tokens."""
    missing = lab_missing()
    if missing is not None:
        pytest.skip(missing)
    model = make_tiny_model_dir(tmp_path / "tiny-natted", num_layers=6, seed=9)
    torch.manual_seed(14)
    input_ids = torch.randint(0, 256, (1, 5))
    expected = expected_tokens(model, input_ids, 6)
    out = tmp_path / "lab"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with trio.fail_after(LAB_SECONDS + 30):
        lab = await trio.run_process(
            ["unshare", "-rn", sys.executable, "-m", "tests.nat_lab", "lab", str(model)]
            + [str(out), json.dumps(input_ids.tolist()), "6"],
            env=env,
            cwd=ROOT,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
    assert lab.returncode == 0, lab.stderr.decode()[-3000:]
    result = json.loads((out / "client.json").read_text())
    why = f"{result} {lab.stderr.decode()[-3000:]}"
    assert result["first"] == expected == result["second"], why
    assert result["upgraded"] == 1, why
    assert result["direct_addrs"] == ["/ip4/203.0.113.6/tcp/4002"], why  # router B's, punched
    assert result["relayed_left"] == 0 and result["second_relayed"] == 0, why
