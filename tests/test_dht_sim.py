"""The pure Kademlia model behind scripts/sim_dht.py."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from swarm_node.dht.kademlia_sim import K, Network, bucket_index


def test_bucket_index() -> None:
    assert bucket_index(0b1000, 0b1001) == 0
    assert bucket_index(0b1000, 0b0000) == 3
    assert bucket_index(0, 1 << 255) == 255
    with pytest.raises(ValueError):
        bucket_index(5, 5)


def test_tables_hold_at_most_k_per_bucket_and_every_nonempty_bucket() -> None:
    net = Network(500, seed=1)
    node = net.ids[17]
    per_bucket = Counter(bucket_index(node, c) for c in net.table(node))
    assert max(per_bucket.values()) <= K
    occupied = {bucket_index(node, other) for other in net.ids if other != node}
    assert set(per_bucket) == occupied  # no bucket that has candidates is left empty
    assert net.table(node) is net.table(node)  # built once


def test_lookups_find_the_true_closest_in_few_hops() -> None:
    n = 400
    net = Network(n, seed=2)
    rng = random.Random(3)
    for _ in range(40):
        target = rng.getrandbits(256)
        result = net.lookup(rng.choice(net.ids), target)
        assert result.closest == net.true_closest(target, K)
        assert result.hops_to_closest <= math.log2(n)
        assert result.hops <= math.ceil(K / 3) + math.log2(n)
        assert result.queries <= 3 * result.hops
