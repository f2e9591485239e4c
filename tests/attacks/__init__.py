"""Attacks on a live swarm, shared by the tests and scripts/attack_swarm.py.

Each attack is ``async def attack_<name>(target: AttackTarget) -> bool``: it performs the attack over
the network only (real libp2p dials, real HTTP), against servers that may be in this process (tests,
with tests.swarm_helpers.local_swarm) or `swarm-node serve` processes (the harness), and returns True
when the attack was stopped (refused, bounded, ignored: whatever the issue asks of it). It never
raises for a stopped attack, and it is bounded in time by itself (trio.move_on_after / fail_after).
Tests check the server's internals beside it; the harness checks crashes, hangs and memory.
Each area's attacks live in a module here (transport.py, dht.py, sessions.py, compute.py, routing.py,
api.py) and are listed in its ``ATTACKS`` tuple of (name, function).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class AttackTarget:
    model: str  # the model name the swarm serves (its folder name)
    model_path: Path  # the checkpoint folder, for attacks that need the config or weights
    servers: tuple[str, ...]  # each server's full multiaddr (…/p2p/<peer id>), in chain order
    api_url: str | None = None  # http://127.0.0.1:PORT of a `swarm-node api` in front of the swarm
    api_key: str | None = None  # that API's --api-key (SWARM_API_KEY), if it has one

    def peer_id(self, i: int) -> str:
        return self.servers[i].rsplit("/p2p/", 1)[1]


Attack = Callable[[AttackTarget], Awaitable[bool]]
