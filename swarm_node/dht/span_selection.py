"""Which blocks a server should hold: the span that raises the swarm's weakest coverage most.

Pure: takes server records and ``now``, returns block numbers. Knows nothing of the network, the
clock or of loading weights; node/placement.py runs it at start and periodically.

A block's coverage is the summed throughput of the live servers holding it. A joining server picks,
among all windows of its length, the one that leaves the fewest blocks uncovered, then raises the
weakest block most, then sits where coverage is thinnest (the smallest summed coverage of the window),
then the lowest start. A serving server moves only if the move leaves no block uncovered that is
covered now, and either covers more blocks or raises the weakest coverage by more than ``min_gain``
(a fraction).

Moves are claimed: a server about to move announces ``moving_to`` first, then looks again, and gives
the move up if another server's claim touches the same blocks (``conflicting_moves``). Of two servers
that claim at once, at least one sees the other's claim, so two moves never both leave the same blocks
on a stale view of each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from swarm_node.dht.records import ServerRecord


def block_coverage(
    servers: Iterable[ServerRecord],
    *,
    model: str,
    num_blocks: int,
    now: float,
    exclude: frozenset[str] = frozenset(),
) -> list[float]:
    """Summed throughput per block of ``model`` over the live servers not in ``exclude``."""
    coverage = [0.0] * num_blocks
    for s in servers:
        if s.model != model or s.peer_id in exclude or not s.is_live(now):
            continue
        for block in range(max(0, s.start), min(s.end, num_blocks)):
            coverage[block] += s.throughput
    return coverage


def with_span(coverage: Sequence[float], start: int, length: int, throughput: float) -> list[float]:
    """``coverage`` with a server of ``throughput`` on blocks ``start..start+length-1`` added."""
    return [c + throughput if start <= b < start + length else c for b, c in enumerate(coverage)]


@dataclass(frozen=True, slots=True)
class Score:
    """How well a coverage serves the swarm; bigger is better."""

    uncovered: int
    weakest: float

    def key(self) -> tuple[int, float]:
        return (-self.uncovered, self.weakest)


def score(coverage: Sequence[float]) -> Score:
    return Score(
        uncovered=sum(1 for c in coverage if c <= 0), weakest=min(coverage) if coverage else 0.0
    )


def choose_span(coverage: Sequence[float], *, length: int, throughput: float) -> int:
    """The start of the best window of ``length`` blocks for a server of ``throughput`` tokens/s."""
    if not 1 <= length <= len(coverage):
        raise ValueError(
            f"a span of {length} blocks does not fit a model of {len(coverage)} blocks"
        )
    throughput = max(throughput, 1e-9)  # even an unmeasured server covers its blocks

    def key(start: int) -> tuple[int, float, float, int]:
        after = score(with_span(coverage, start, length, throughput))
        return (*after.key(), -sum(coverage[start : start + length]), -start)

    return max(range(len(coverage) - length + 1), key=key)


def better_start(
    servers: Iterable[ServerRecord],
    *,
    me: ServerRecord,
    num_blocks: int,
    now: float,
    min_gain: float,
) -> int | None:
    """Where ``me`` should move to, or None to stay.

    Compares the swarm with ``me`` where it is against ``me`` at the best window among the others'
    coverage. Moves only when no block covered now is left uncovered and the move covers more blocks,
    or raises the weakest block's coverage by more than ``min_gain`` (0.2 = 20%).
    """
    length = me.end - me.start
    others = block_coverage(
        servers, model=me.model, num_blocks=num_blocks, now=now, exclude=frozenset({me.peer_id})
    )
    best = choose_span(others, length=length, throughput=me.throughput)
    if best == me.start:
        return None
    here = with_span(others, me.start, length, me.throughput)
    there = with_span(others, best, length, me.throughput)
    if any(h > 0 and t <= 0 for h, t in zip(here, there, strict=True)):
        return None  # the move would uncover a block
    now_score, new_score = score(here), score(there)
    if new_score.uncovered < now_score.uncovered:
        return best
    if new_score.uncovered == now_score.uncovered and new_score.weakest > now_score.weakest * (
        1 + min_gain
    ):
        return best
    return None


def conflicting_moves(
    servers: Iterable[ServerRecord], *, me: ServerRecord, target: int, now: float
) -> list[ServerRecord]:
    """Other live servers of ``me``'s model moving now whose blocks (where they are and where they
    go) overlap ``me``'s (where it is and ``target``): a move of ``me`` to ``target`` must wait for
    them, since each move was judged on a view without the other."""
    length = me.end - me.start
    mine = set(range(me.start, me.end)) | set(range(target, target + length))
    out = []
    for s in servers:
        moving = s.moving_span
        if s.peer_id == me.peer_id or moving is None or s.model != me.model or not s.is_live(now):
            continue
        theirs = set(range(s.start, s.end)) | set(range(*moving))
        if mine & theirs:
            out.append(s)
    return out
