"""A pure Kademlia model: XOR metric over 256-bit ids, k-buckets, iterative lookups that count hops.

It checks the routing arithmetic our DHT relies on (a lookup takes O(log N) rounds) at sizes no
test swarm reaches. It knows nothing of sockets, libp2p or time: a "query" is a function call on
another simulated node's table, and a hop is one round of up to ``alpha`` parallel queries.

Tables are what a settled network converges to: bucket i of node x holds up to k nodes drawn at
random from the nodes whose distance to x has bit length i + 1 (the nodes that would have reached
that bucket while joining, seen in random order). They are built lazily, only for nodes a lookup
queries, from a per-node seed, so a 10,000-node network costs what its lookups touch.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

ID_BITS = 256
K = 20  # bucket size, and how many closest nodes a lookup returns
ALPHA = 3  # parallel queries per round


def distance(a: int, b: int) -> int:
    return a ^ b


def bucket_index(own: int, other: int) -> int:
    """Index of the bucket ``other`` falls in for ``own`` (0: differs only in the last bit)."""
    d = own ^ other
    if d == 0:
        raise ValueError("a node is not in its own routing table")
    return d.bit_length() - 1


@dataclass(frozen=True, slots=True)
class LookupResult:
    closest: list[int]  # up to k ids, closest first
    hops: int  # rounds of parallel queries until the lookup ended
    hops_to_closest: int  # rounds until the final closest node was first learned (0: known locally)
    queries: int  # messages sent


class Network:
    """N simulated nodes with random 256-bit ids and settled k-bucket routing tables."""

    def __init__(self, n: int, *, seed: int = 0, k: int = K) -> None:
        if n < 2:
            raise ValueError(f"'n' must be >= 2, got {n}")
        self.k = k
        self.seed = seed
        rng = random.Random(seed)
        ids: set[int] = set()
        while len(ids) < n:
            ids.add(rng.getrandbits(ID_BITS))
        self.ids = sorted(ids)
        self._tables: dict[int, list[int]] = {}

    def table(self, node: int) -> list[int]:
        """Every contact in ``node``'s buckets (at most k per bucket)."""
        cached = self._tables.get(node)
        if cached is not None:
            return cached
        rng = random.Random(f"{self.seed}/{node}")
        contacts: list[int] = []
        for i in range(ID_BITS - 1, -1, -1):
            # bucket i: ids sharing node's top (255 - i) bits and differing at bit i
            base = ((node >> (i + 1)) << (i + 1)) | ((~node) & (1 << i))
            lo = bisect.bisect_left(self.ids, base)
            hi = bisect.bisect_left(self.ids, base + (1 << i))
            if hi - lo <= self.k:
                contacts.extend(self.ids[lo:hi])
            else:
                contacts.extend(self.ids[j] for j in rng.sample(range(lo, hi), self.k))
        self._tables[node] = contacts
        return contacts

    def closest_in_table(self, node: int, target: int, count: int) -> list[int]:
        """What ``node`` answers to FIND_NODE(target): its ``count`` closest contacts."""
        return sorted(self.table(node), key=lambda c: c ^ target)[:count]

    def true_closest(self, target: int, count: int = 1) -> list[int]:
        return sorted(self.ids, key=lambda c: c ^ target)[:count]

    def lookup(self, source: int, target: int, *, alpha: int = ALPHA) -> LookupResult:
        """Iterative FIND_NODE from ``source``: query the alpha closest unqueried nodes each round,
        until the k closest known nodes have all been asked."""
        known = {source, *self.closest_in_table(source, target, self.k)}
        queried: set[int] = {source}
        first_seen = dict.fromkeys(known, 0)
        hops = queries = 0
        while True:
            shortlist = sorted(known, key=lambda c: c ^ target)[: self.k]
            batch = [c for c in shortlist if c not in queried][:alpha]
            if not batch:
                break
            hops += 1
            for node in batch:
                queried.add(node)
                queries += 1
                for c in self.closest_in_table(node, target, self.k):
                    if c not in known:
                        known.add(c)
                        first_seen[c] = hops
        closest = sorted(known, key=lambda c: c ^ target)[: self.k]
        return LookupResult(closest, hops, first_seen[closest[0]] if closest else 0, queries)
