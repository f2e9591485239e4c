"""Choosing a chain of servers that covers every block of a model.

Pure: takes the server records and measured latencies, returns hops. Knows nothing of the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from swarm_node.dht.records import ServerRecord
from swarm_node.errors import MissingBlocksError

DEFAULT_LATENCY = 0.05  # seconds assumed for a server we have not measured


@dataclass(frozen=True, slots=True)
class Hop:
    """Blocks ``start..end-1`` run on ``server`` (a sub-span of what it serves)."""

    server: ServerRecord
    start: int
    end: int


def format_blocks(blocks: Iterable[int]) -> str:
    """Compact ranges: [0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    run: list[int] = []
    for b in sorted(blocks):
        if run and b == run[-1] + 1:
            run.append(b)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [b]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def missing_blocks(servers: Iterable[ServerRecord], start: int, end: int) -> list[int]:
    covered = set()
    for s in servers:
        covered.update(range(max(s.start, start), min(s.end, end)))
    return [b for b in range(start, end) if b not in covered]


def choose_chain(
    servers: Iterable[ServerRecord],
    *,
    model: str,
    start: int,
    end: int,
    latency: Mapping[str, float] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> list[Hop]:
    """The chain covering blocks ``start..end-1`` with the fewest hops, then the lowest latency.

    Dynamic programming over block positions: from position p, a server covering p takes the
    sequence to its end. Raises MissingBlocksError naming the blocks nobody serves.
    """
    latency = latency or {}
    usable = [s for s in servers if s.model == model and s.peer_id not in exclude]
    gaps = missing_blocks(usable, start, end)
    if gaps:
        raise MissingBlocksError(f"no server for blocks {format_blocks(gaps)} of {model}")
    inf = (float("inf"), float("inf"))
    best: list[tuple[float, float]] = [inf] * (end + 1)
    back: list[Hop | None] = [None] * (end + 1)
    best[start] = (0, 0.0)
    for pos in range(start, end):
        if best[pos] == inf:
            continue
        hops, cost = best[pos]
        for s in usable:
            if not s.covers(pos):
                continue
            stop = min(s.end, end)
            cand = (hops + 1, cost + latency.get(s.peer_id, DEFAULT_LATENCY))
            if cand < best[stop]:
                best[stop] = cand
                back[stop] = Hop(s, pos, stop)
    chain: list[Hop] = []
    pos = end
    while pos > start:
        hop = back[pos]
        assert hop is not None, "every block is covered, so the DP reaches the end"
        chain.append(hop)
        pos = hop.start
    return chain[::-1]
