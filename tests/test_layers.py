"""The layer rules hold for the package, and the checker really catches each kind of break."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_layers.py"


def load_checker():
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = module
    spec.loader.exec_module(module)
    return module


checker = load_checker()


def test_the_package_keeps_every_layer_rule() -> None:
    problems = [
        p for path in sorted(checker.PACKAGE.rglob("*.py")) for p in checker.check_file(path)
    ]
    assert problems == []


@pytest.mark.parametrize(
    ("module", "source", "why"),
    [
        ("swarm_node.protocol.x", "import trio\n", "sans-IO"),
        ("swarm_node.protocol.x", "from torch import nn\n", "compression payloads"),
        (
            "swarm_node.model.x",
            "from swarm_node.node.peer import open_peer\n",
            "knows nothing of peers",
        ),
        ("swarm_node.model.x", "from swarm_node.protocol import messages\n", "the wire"),
        ("swarm_node.compression.x", "import swarm_node.model.span\n", "pure codecs"),
        ("swarm_node.dht.x", "from swarm_node.model import BlockSpan\n", "weights"),
        (
            "swarm_node.node.server.x",
            "from swarm_node.node.client import recovery\n",
            "never import each other",
        ),
        (
            "swarm_node.node.client.x",
            "from ..server.push import PushLink\n",
            "never import each other",
        ),
        ("swarm_node.node.peer", "from libp2p.peer.id import ID\n", "only node/net/ and dht/"),
        (
            "swarm_node.node.apps.x",
            "from swarm_node.node.peer import _helper\n",
            "private name _helper",
        ),
        ("swarm_node.node.apps.x", "def f(peer):\n    return peer._ping_all()\n", "peer._ping_all"),
    ],
)
def test_each_kind_of_break_is_caught(module: str, source: str, why: str) -> None:
    problems = checker.check_source(source, module, "x.py")
    assert len(problems) == 1 and why in problems[0], problems


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("swarm_node.node.net.host", "from libp2p import new_host\n"),
        ("swarm_node.dht.x", "from libp2p.kad_dht.kad_dht import KadDHT\n"),
        (
            "swarm_node.node.peer",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from libp2p.abc import IHost\n",
        ),
        (
            "swarm_node.node.peer",
            "class P:\n    def __init__(self):\n        self._n = 1\n\ndef f(p):\n    return p._n\n",
        ),
        ("swarm_node.node.peer", "def f(x):\n    return x.__class__\n"),
    ],
)
def test_what_the_rules_allow_passes(module: str, source: str) -> None:
    assert checker.check_source(source, module, "x.py") == []
