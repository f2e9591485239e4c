"""scripts/attack_swarm.py end to end, --quick, on the tiny model: every attack in tests/attacks is
stopped, no server or API process crashes or hangs, the honest client stays exact and the servers'
memory stays within their budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "attack_swarm.py"


@pytest.mark.slow
def test_the_attack_harness_finds_every_target_met(tiny_chat_llama: Path) -> None:
    # tiny_chat_llama: the tiny model with a byte tokenizer, so that the API process runs too
    command = [sys.executable, str(SCRIPT), "--quick", "--model", str(tiny_chat_llama)]
    done = subprocess.run(
        [*command, "--fuzz-frames", "1000"], capture_output=True, text=True, timeout=300
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    missed = [a for a in report["attacks"] if not a["stopped"]]
    assert report["attacks"] and not missed, missed
    assert report["crashes"] == [] and report["hangs"] == [], report
    assert report["honest_exact"] and report["honest"]["generations"] >= 2, report["honest"]
    assert 0 < report["server_peak_rss_mb"] <= report["memory_budget_mb"]
    assert report["fuzz"]["frames"] == 1000 and report["fuzz"]["stalled"] == 0
    assert done.returncode == 0 and all(report["targets"].values()), report["targets"]
