"""swarm_node sets how long torch's idle threads spin before torch loads (swarm_node/threads.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from swarm_node.threads import SPIN_COUNT, settle_threads

PROBE = (
    "import json, os, sys\n"
    "{imports}\n"
    "print(json.dumps({{'spin': os.environ.get('GOMP_SPINCOUNT'), 'torch': 'torch' in sys.modules}}))"
)


def probe(imports: str, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.slow
def test_importing_swarm_node_first_sets_the_spin_count_for_torch() -> None:
    out = probe("import swarm_node\nimport torch")
    assert out == {"spin": str(SPIN_COUNT), "torch": True}


@pytest.mark.slow
def test_the_users_choice_and_a_torch_loaded_first_are_left_alone() -> None:
    assert probe("import swarm_node", GOMP_SPINCOUNT="300000")["spin"] == "300000"
    assert probe("import swarm_node", OMP_WAIT_POLICY="ACTIVE")["spin"] is None
    assert probe("import torch\nimport swarm_node")["spin"] is None  # libgomp has read it already


def test_settle_threads_on_an_environment() -> None:
    env: dict[str, str] = {}
    loaded = "torch" in sys.modules
    assert settle_threads(env) is not loaded
    assert env == ({} if loaded else {"GOMP_SPINCOUNT": str(SPIN_COUNT)})
    assert settle_threads({"OMP_WAIT_POLICY": "PASSIVE"}) is False
