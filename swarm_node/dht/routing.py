"""Choosing a chain of servers that covers every block of a model.

Pure: takes the server records, measured round trips and ``now``, returns hops. Knows nothing of the
network or the clock; the shell measures round trips and feeds them to an RttEstimator.

Three choices: ``choose_chain`` (fewest hops, then latency), ``choose_inference_chain`` (lowest
expected per-token latency, client-star or server-to-server push) and ``choose_training_chain``
(servers drawn in proportion to their throughput, to spread forward/backward load).

What a server claims is not taken on trust: ``trusted_throughputs`` caps each record's throughput
by what the client measured of it (``ThroughputEstimator``), or by what the other servers claim, and
``ChainShares`` keeps one server from carrying more than a bounded share of a client's chains.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from swarm_node.dht.records import ServerRecord
from swarm_node.errors import MissingBlocksError

DEFAULT_LATENCY = 0.05  # seconds assumed for a server we have not measured (a round trip)
# an unmeasured server is believed up to this many times the median of the others' claims
UNOBSERVED_CAP = 2.0


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
    adapter: str = "",
) -> list[Hop]:
    """The chain covering blocks ``start..end-1`` with the fewest hops, then the lowest latency
    (only servers holding ``adapter``, when one is named).

    Dynamic programming over block positions: from position p, a server covering p takes the
    sequence to its end. Raises MissingBlocksError naming the blocks nobody serves.
    """
    latency = latency or {}
    usable = [
        s
        for s in servers
        if s.model == model
        and s.peer_id not in exclude
        and (not adapter or s.holds_adapter(adapter))
    ]
    gaps = missing_blocks(usable, start, end)
    if gaps:
        holding = f" holding adapter {adapter!r}" if adapter else ""
        raise MissingBlocksError(f"no server{holding} for blocks {format_blocks(gaps)} of {model}")
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


# -- round trips -----------------------------------------------------------------------------------
@dataclass(slots=True)
class RttEstimator:
    """Smoothed round trip per peer, as TCP does it (RFC 6298): EWMAs of samples and of spread.

    Pure: the shell measures (a ping under a deadline) and calls ``observe(peer, seconds)``.
    """

    alpha: float = 0.125  # weight of a new sample in the mean
    beta: float = 0.25  # weight of a new deviation in the spread
    _srtt: dict[str, float] = field(default_factory=dict)
    _rttvar: dict[str, float] = field(default_factory=dict)

    def observe(self, peer: str, sample: float) -> float:
        """Fold one measured round trip (seconds) in; return the new smoothed value."""
        if not (math.isfinite(sample) and sample >= 0):
            raise ValueError(f"a round-trip sample must be finite and >= 0 seconds, got {sample}")
        old = self._srtt.get(peer)
        if old is None:
            self._srtt[peer], self._rttvar[peer] = sample, sample / 2
        else:
            spread = abs(old - sample)
            self._rttvar[peer] = (1 - self.beta) * self._rttvar[peer] + self.beta * spread
            self._srtt[peer] = (1 - self.alpha) * old + self.alpha * sample
        return self._srtt[peer]

    def get(self, peer: str) -> float | None:
        return self._srtt.get(peer)

    def timeout(self, peer: str, *, floor: float = 0.2) -> float | None:
        """A deadline for one request to ``peer``: srtt + 4 x spread, at least ``floor``."""
        if peer not in self._srtt:
            return None
        return max(floor, self._srtt[peer] + 4 * self._rttvar[peer])

    def forget(self, peer: str) -> None:
        self._srtt.pop(peer, None)
        self._rttvar.pop(peer, None)

    def as_dict(self) -> dict[str, float]:
        """Peer -> smoothed round trip, the ``rtt`` mapping the chain choices take."""
        return dict(self._srtt)


def server_rtts(servers: Iterable[ServerRecord]) -> dict[tuple[str, str], float]:
    """(from, to) -> round trip in seconds, from what servers publish about their next servers."""
    return {(s.peer_id, peer): rtt for s in servers for peer, rtt in s.next_rtts}


# -- latency-aware inference chains ----------------------------------------------------------------
def _usable(
    servers: Iterable[ServerRecord],
    *,
    model: str,
    start: int,
    end: int,
    now: float,
    exclude: frozenset[str],
    cache_tokens: int,
    adapter: str = "",
) -> list[ServerRecord]:
    """Live servers of ``model`` (holding ``adapter``, when one is named) with room for the session;
    MissingBlocksError names what lacks."""
    live = [s for s in servers if s.model == model and s.peer_id not in exclude and s.is_live(now)]
    candidates = [s for s in live if not adapter or s.holds_adapter(adapter)]
    usable = [s for s in candidates if s.throughput > 0 and s.cache_tokens_left >= cache_tokens]
    gaps = missing_blocks(usable, start, end)
    if gaps:
        lacking = [b for b in gaps if b not in missing_blocks(live, start, end)]
        full = [b for b in gaps if b not in missing_blocks(candidates, start, end)]
        holding = f" holding adapter {adapter!r}" if adapter and lacking else ""
        why = ""
        if full:
            why = f" ({format_blocks(full)} only on servers without room for {cache_tokens} tokens)"
        raise MissingBlocksError(
            f"no server{holding} for blocks {format_blocks(gaps)} of {model}{why}"
        )
    return sorted(usable, key=lambda s: (s.peer_id, s.start))


def compute_time(server: ServerRecord, start: int, end: int) -> float:
    """Seconds per token for blocks ``start..end-1`` on ``server`` (throughput is for its span)."""
    return (end - start) / (server.end - server.start) / server.throughput


def _one_way(rtt: Mapping[str, float], peer: str) -> float:
    return rtt.get(peer, DEFAULT_LATENCY) / 2


def _link(
    a: str, b: str, rtt: Mapping[str, float], server_rtt: Mapping[tuple[str, str], float]
) -> float:
    """One-way seconds from server a to server b: half the published round trip when known, else the
    mean of the client's one-way delays to a and b (servers as far from each other as from us)."""
    if (a, b) in server_rtt:
        return server_rtt[(a, b)] / 2
    return (_one_way(rtt, a) + _one_way(rtt, b)) / 2


def chain_latency(
    chain: Sequence[Hop],
    *,
    rtt: Mapping[str, float],
    server_rtt: Mapping[tuple[str, str], float] | None = None,
    push: bool,
) -> float:
    """Expected seconds per token: compute of every hop plus the network path.

    Client-star: a round trip client <-> server per hop (2N one-way delays). Push: client -> first,
    server -> server along the chain, last -> client (N + 1 one-way delays).
    """
    server_rtt = server_rtt or {}
    total = sum(compute_time(h.server, h.start, h.end) for h in chain)
    if not chain:
        return total
    if not push:
        return total + sum(2 * _one_way(rtt, h.server.peer_id) for h in chain)
    total += _one_way(rtt, chain[0].server.peer_id) + _one_way(rtt, chain[-1].server.peer_id)
    for a, b in zip(chain, chain[1:], strict=False):
        total += _link(a.server.peer_id, b.server.peer_id, rtt, server_rtt)
    return total


def is_relayed(server: ServerRecord) -> bool:
    """Whether ``server`` is reached through relays only (every address a ``/p2p-circuit`` one)."""
    return bool(server.addrs) and all("/p2p-circuit" in a for a in server.addrs)


def choose_inference_chain(
    servers: Iterable[ServerRecord],
    *,
    model: str,
    start: int,
    end: int,
    rtt: Mapping[str, float],
    server_rtt: Mapping[tuple[str, str], float] | None = None,
    push: bool,
    now: float,
    max_length: int,
    batch_size: int = 1,
    exclude: frozenset[str] = frozenset(),
    adapter: str = "",
) -> list[Hop]:
    """The chain with the lowest expected per-token latency (``chain_latency``), then fewest hops,
    then fewest relayed servers (``is_relayed``: their round trips, measured through the relay,
    are already in ``rtt``; at equal cost a direct server is preferred).

    Only live servers whose cache can hold ``max_length * batch_size`` tokens (and that hold
    ``adapter``, when one is named) take part. Dynamic
    programming over (block position, last server), since a push hop's cost depends on the server
    before it; a hop may end at any block (servers of different speeds make mid-span switches pay
    off), so the work is O(blocks^2 x servers^2): fine for the tens of blocks and servers a chain
    choice sees.
    """
    server_rtt = server_rtt or {}
    usable = _usable(
        servers,
        model=model,
        start=start,
        end=end,
        now=now,
        exclude=exclude,
        cache_tokens=max_length * batch_size,
        adapter=adapter,
    )
    positions = list(range(start, end + 1))
    # best[pos][last] = (seconds, hops, relayed hops, previous (pos, last), hop); last = -1: nothing
    # sent yet
    Entry = tuple[float, int, int, tuple[int, int] | None, Hop | None]
    best: dict[int, dict[int, Entry]] = {p: {} for p in positions}
    best[start][-1] = (0.0, 0, 0, None, None)
    for pos in positions:
        if pos >= end:
            break
        for last, (cost, hops, relayed, _, _) in list(best[pos].items()):
            for i, s in enumerate(usable):
                if not s.covers(pos):
                    continue
                via = relayed + is_relayed(s)
                stop_max = min(s.end, end)
                for stop in range(pos + 1, stop_max + 1):
                    step = compute_time(s, pos, stop)
                    if not push:
                        step += 2 * _one_way(rtt, s.peer_id)
                    elif last < 0:
                        step += _one_way(rtt, s.peer_id)
                    else:
                        step += _link(usable[last].peer_id, s.peer_id, rtt, server_rtt)
                    if push and stop == end:
                        step += _one_way(rtt, s.peer_id)
                    old = best[stop].get(i)
                    new = (cost + step, hops + 1, via, (pos, last), Hop(s, pos, stop))
                    if old is None or new[:3] < old[:3]:
                        best[stop][i] = new
    assert best[end], "every block is covered, so the DP reaches the end"
    last = min(best[end], key=lambda i: best[end][i][:3])
    state: tuple[int, int] | None = (end, last)
    chain: list[Hop] = []
    while state is not None:
        _, _, _, prev, hop = best[state[0]][state[1]]
        if hop is not None:
            chain.append(hop)
        state = prev
    return chain[::-1]


# -- training chains -------------------------------------------------------------------------------
def choose_training_chain(
    servers: Iterable[ServerRecord],
    *,
    model: str,
    start: int,
    end: int,
    rng: random.Random,
    now: float,
    exclude: frozenset[str] = frozenset(),
    adapter: str = "",
) -> list[Hop]:
    """A chain for forward/backward passes: at each position, a server drawn in proportion to its
    throughput among the live ones covering it (and holding ``adapter``, when one is named), so
    many clients spread their load over the swarm."""
    usable = _usable(
        servers,
        model=model,
        start=start,
        end=end,
        now=now,
        exclude=exclude,
        cache_tokens=0,
        adapter=adapter,
    )
    chain: list[Hop] = []
    pos = start
    while pos < end:
        here = [s for s in usable if s.covers(pos)]
        (server,) = rng.choices(here, weights=[s.throughput for s in here])
        stop = min(server.end, end)
        chain.append(Hop(server, pos, stop))
        pos = stop
    return chain


# -- what a server claims, checked against what the client saw ---------------------------------------
@dataclass(slots=True)
class ThroughputEstimator:
    """Tokens/s per server as this client saw them: an EWMA of its own steps' timings.

    Pure: the shell times a step and calls ``observe(peer, tokens=, seconds=)`` with the step's
    tokens in units of the server's whole span (a hop over half the span counts half a token per
    token), so the estimate is comparable with the throughput records announce.
    """

    alpha: float = 0.25  # weight of a new sample
    _rate: dict[str, float] = field(default_factory=dict)

    def observe(self, peer: str, *, tokens: float, seconds: float) -> float:
        """Fold one timed step in; return the new estimate (tokens/s)."""
        if not (math.isfinite(tokens) and tokens > 0):
            raise ValueError(f"'tokens' must be finite and > 0, got {tokens}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"'seconds' must be finite and > 0, got {seconds}")
        sample = tokens / seconds
        old = self._rate.get(peer)
        self._rate[peer] = sample if old is None else (1 - self.alpha) * old + self.alpha * sample
        return self._rate[peer]

    def get(self, peer: str) -> float | None:
        return self._rate.get(peer)

    def as_dict(self) -> dict[str, float]:
        return dict(self._rate)


def _block_rate(server: ServerRecord, throughput: float) -> float:
    """Blocks/s: a span's tokens/s times its blocks (spans of different lengths compare)."""
    return throughput * (server.end - server.start)


def trusted_throughputs(
    servers: Sequence[ServerRecord], observed: Mapping[str, float]
) -> list[ServerRecord]:
    """``servers`` with each throughput capped by what the client knows, for routing only.

    - Observed (``observed``: the client's ``ThroughputEstimator``): at most what it measured.
    - Not observed: at most ``UNOBSERVED_CAP`` (2) x the median block rate (throughput x blocks,
      ``_block_rate``) of the other servers of the same model covering any of its blocks (of all
      the model's other servers when none does; its own claim when it is alone), where an
      observed server counts at its capped rate. A liar claiming 1e6 tokens/s thus ranks as at
      most twice a median server until measured, and then as what it is (an honest fast server
      keeps an edge before it is measured); it gains more only while liars are at least half of
      a block's servers.

    Records keep their signature fields; only the throughput routing reads is lowered.
    """
    first = {s.peer_id: min(s.throughput, observed.get(s.peer_id, math.inf)) for s in servers}
    out = []
    for s in servers:
        if s.peer_id in observed:
            out.append(replace(s, throughput=first[s.peer_id]))
            continue
        same_model = [o for o in servers if o.model == s.model and o.peer_id != s.peer_id]
        overlapping = [o for o in same_model if o.start < s.end and s.start < o.end]
        others = overlapping or same_model
        if not others:
            out.append(s)
            continue
        median = statistics.median(_block_rate(o, first[o.peer_id]) for o in others)
        cap = UNOBSERVED_CAP * median / (s.end - s.start)
        out.append(replace(s, throughput=min(s.throughput, cap)))
    return out


@dataclass(slots=True)
class ChainShares:
    """The servers of a client's last ``window`` chains, to bound any one server's share of them.

    A server carries of a chain the fraction of its blocks it runs (a whole chain: 1). The bound:
    when alternatives exist for its blocks, a server carries at most ``floor(share x window)`` (at
    least 1) chains' worth of any ``window`` consecutive chains the client chooses; a server
    ``crowded`` now is left out of the next chain where the blocks stay covered without it
    (``spread_exclusion``). ``share`` >= 1 turns the bound off.
    """

    share: float = 0.5
    window: int = 20
    _recent: deque[dict[str, float]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.share) and self.share > 0):
            raise ValueError(f"'share' must be finite and > 0, got {self.share}")
        if self.window < 1:
            raise ValueError(f"'window' must be >= 1, got {self.window}")

    @property
    def limit(self) -> int:
        """Chains of the window one server may be in."""
        return max(1, math.floor(self.share * self.window))

    def record(self, chain: Sequence[Hop]) -> None:
        total = sum(h.end - h.start for h in chain)
        carried: Counter[str] = Counter()
        for h in chain:
            carried[h.server.peer_id] += (h.end - h.start) / total
        self._recent.append(dict(carried))
        while len(self._recent) > self.window:
            self._recent.popleft()

    def crowded(self) -> dict[str, float]:
        """Servers that one more chain could carry past the bound -> chains' worth they carry of
        the window."""
        if self.share >= 1:
            return {}
        # only the last window - 1 chains stay in the window once the next one is recorded
        kept = list(self._recent)[-(self.window - 1) :] if self.window > 1 else []
        carried: Counter[str] = Counter()
        for chain in kept:
            carried.update(chain)
        return {peer: n for peer, n in carried.items() if n + 1 > self.limit + 1e-9}


def spread_exclusion(
    servers: Iterable[ServerRecord],
    *,
    model: str,
    start: int,
    end: int,
    now: float,
    exclude: frozenset[str],
    crowded: Mapping[str, float],
    cache_tokens: int = 0,
    adapter: str = "",
) -> frozenset[str]:
    """``exclude`` plus every ``crowded`` server (-> its chains in the window) that can be left
    out with blocks ``start..end-1`` still covered by usable servers (live, of ``model``, with
    room, holding ``adapter``); a crowded server with no alternative for its blocks stays in. When
    crowded servers are each other's only alternatives, the most crowded is left out first (then
    the one holding the most blocks: a liar claiming every block before the servers it crowds)."""
    servers = list(servers)
    blocks = {s.peer_id: s.end - s.start for s in servers}
    out = set(exclude)
    order = sorted(set(crowded) - exclude, key=lambda p: (-crowded[p], -blocks.get(p, 0), p))
    for peer in order:
        try:
            _usable(
                servers,
                model=model,
                start=start,
                end=end,
                now=now,
                exclude=frozenset(out | {peer}),
                cache_tokens=cache_tokens,
                adapter=adapter,
            )
        except MissingBlocksError:
            continue
        out.add(peer)
    return frozenset(out)
