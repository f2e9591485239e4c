"""How long a slot's step should take, from what its steps took before: deadlines that follow the work.

A step that runs past ``factor`` times the slow end of its recent kind (the 90th percentile of the last
``window`` steps with as many tokens) is *late*: the session starts the same step on a spare server
(a hedge) and keeps whichever answers first. Late is not failed: the late server is not banned, and
it still has until the client's ``step_timeout`` (the ceiling) to answer. Before ``min_samples``
steps of a kind were seen, nothing is late short of the ceiling. Pure: no clock, no trio.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

FLOOR = 0.5  # seconds: no step is late sooner (a GC pause or a busy server's scheduler costs this)
FACTOR = 4.0  # times the 90th percentile of recent steps of the same kind
WINDOW = 32  # recent steps of each kind remembered
MIN_SAMPLES = 3  # steps of a kind seen before one can be late
HEDGE_EVERY = 20  # one hedge allowed per this many steps (plus one): hedges never double the load


@dataclass(slots=True)
class StepTimes:
    """Recent seconds of one slot's steps, by tokens per step (a decode step, a prefill chunk...)."""

    by_tokens: dict[int, deque[float]] = field(default_factory=dict)

    def observe(self, tokens: int, seconds: float) -> None:
        self.by_tokens.setdefault(tokens, deque(maxlen=WINDOW)).append(seconds)

    def late_after(self, tokens: int, ceiling: float) -> float:
        """Seconds after which a step of ``tokens`` is late (``ceiling`` when too few were seen)."""
        seen = sorted(self.by_tokens.get(tokens, ()))
        if len(seen) < MIN_SAMPLES:
            return ceiling
        p90 = seen[min(len(seen) - 1, (len(seen) * 9) // 10)]
        return min(ceiling, max(FLOOR, FACTOR * p90))


@dataclass(slots=True)
class HedgeBudget:
    """At most one hedge, plus one per ``HEDGE_EVERY`` steps of the session."""

    steps: int = 0
    hedges: int = 0

    def allows(self) -> bool:
        return self.hedges < 1 + self.steps // HEDGE_EVERY

    def spend(self) -> None:
        self.hedges += 1
