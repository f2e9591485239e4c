"""How long torch's idle CPU threads spin before they sleep: set before torch loads.

torch's CPU kernels run on GNU OpenMP (libgomp). After each parallel region its pool threads spin,
by default for 300,000 rounds (~5 ms measured here) before sleeping, so that the next region starts
at once. In one process doing one thing that is right. In a swarm on shared cores it is not: the
client and the servers take turns (a server computes a step while the client waits, then the client
computes the head while the server waits), and each one's spinning threads hold a core for ~5 ms of
the other's turn: an OpenMP region of the other then waits at its barrier for the core. Spinning
for 10,000 rounds (~0.15 ms) still bridges the gaps between the kernels of one forward pass and
lets the cores go between turns (scripts/bench_inference.py measures it: docs/benchmarks.md).
``OMP_WAIT_POLICY=PASSIVE`` (no spinning at all) is not the answer: every kernel then wakes sleeping
threads, which slowed local generation from ~31 to ~19 tokens/s on these machines.

libgomp reads its environment once, when torch loads it: ``settle_threads`` (called when
``swarm_node`` is imported, so by the ``swarm-node`` program and by a program importing swarm_node
before torch) sets ``GOMP_SPINCOUNT`` unless torch is already loaded or the user chose a wait
policy or spin count (their variables win).
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 10_000
USER_CHOICES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def settle_threads(environ: dict[str, str] | None = None) -> bool:
    """Set the spin count for the torch about to load; whether it was set."""
    env = os.environ if environ is None else environ
    if "torch" in sys.modules or any(name in env for name in USER_CHOICES):
        return False
    env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
