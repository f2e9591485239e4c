"""Latency-aware inference chains, throughput-spread training chains, the RTT estimator."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm_node.dht.records import ServerRecord
from swarm_node.dht.routing import (
    ChainShares,
    Hop,
    RttEstimator,
    ThroughputEstimator,
    chain_latency,
    choose_inference_chain,
    choose_training_chain,
    server_rtts,
    spread_exclusion,
    trusted_throughputs,
)
from swarm_node.errors import MissingBlocksError

NOW = 1000.0


def rec(peer: str, start: int, end: int, **kw: object) -> ServerRecord:
    fields: dict[str, object] = dict(
        peer_id=peer,
        addrs=(),
        model="m",
        start=start,
        end=end,
        throughput=1e6,
        cache_tokens_left=4096,
        dtype="float32",
        version="0.1.0",
        seq=1,
        expires_at=NOW + 60,
    )
    fields.update(kw)
    return ServerRecord(**fields)  # type: ignore[arg-type]


def shape(chain: list[Hop]) -> list[tuple[str, int, int]]:
    return [(h.server.peer_id, h.start, h.end) for h in chain]


def infer(
    servers: list[ServerRecord], rtt: dict[str, float], *, push: bool, end: int = 8, **kw: object
) -> list[Hop]:
    args: dict[str, object] = dict(
        model="m", start=0, end=end, rtt=rtt, push=push, now=NOW, max_length=128
    )
    args.update(kw)
    return choose_inference_chain(servers, **args)  # type: ignore[arg-type]


def test_push_costs_n_plus_one_delays_star_costs_2n() -> None:
    chain = [Hop(rec(p, i, i + 1), i, i + 1) for i, p in enumerate("ABC")]
    rtt = dict.fromkeys("ABC", 0.1)  # 50 ms one way, compute ~0
    assert chain_latency(chain, rtt=rtt, push=False) == pytest.approx(6 * 0.05, abs=1e-5)
    assert chain_latency(chain, rtt=rtt, push=True) == pytest.approx(4 * 0.05, abs=1e-5)
    # a published server-to-server round trip replaces the estimate through the client
    published = {("A", "B"): 0.002, ("B", "C"): 0.002}
    assert chain_latency(chain, rtt=rtt, server_rtt=published, push=True) == pytest.approx(
        0.102, abs=1e-5
    )


def test_compute_and_network_traded_off() -> None:
    slow_near = rec("near", 0, 8, throughput=5.0)  # 200 ms a token, 2 ms away
    fast_far = rec("far", 0, 8, throughput=50.0)  # 20 ms a token, 100 ms away
    assert shape(infer([slow_near, fast_far], {"near": 0.002, "far": 0.1}, push=False)) == [
        ("far", 0, 8)
    ]
    assert shape(infer([slow_near, fast_far], {"near": 0.002, "far": 0.3}, push=False)) == [
        ("near", 0, 8)
    ]


def test_push_prefers_more_hops_when_servers_are_close_to_each_other() -> None:
    a, b = rec("A", 0, 4, throughput=100.0), rec("B", 4, 8, throughput=100.0)  # 10 + 10 ms
    whole = rec("W", 0, 8, throughput=40.0)  # 25 ms
    rtt = {"A": 0.1, "B": 0.1, "W": 0.1}
    near = {("A", "B"): 0.002}
    # star: A+B = 20 ms + 2 x 100 ms > W = 25 + 100 ms
    assert shape(infer([a, b, whole], rtt, push=False)) == [("W", 0, 8)]
    # push, A->B estimated from the client's view: 20 + 50 + 50 + 50 > 25 + 100
    assert shape(infer([a, b, whole], rtt, push=True)) == [("W", 0, 8)]
    # push with A->B published at 2 ms: 20 + 50 + 1 + 50 < 125
    chain = infer([a, b, whole], rtt, push=True, server_rtt=near)
    assert shape(chain) == [("A", 0, 4), ("B", 4, 8)]
    assert chain_latency(chain, rtt=rtt, server_rtt=near, push=True) == pytest.approx(0.121)


def test_published_server_rtts_choose_the_next_server() -> None:
    a = rec("A", 0, 4, next_rtts=(("B2", 0.004), ("B1", 0.08)))
    servers = [a, rec("B1", 4, 8), rec("B2", 4, 8)]
    rtt = {"A": 0.05, "B1": 0.05, "B2": 0.05}
    assert server_rtts(servers) == {("A", "B2"): 0.004, ("A", "B1"): 0.08}
    chain = infer(servers, rtt, push=True, server_rtt=server_rtts(servers))
    assert shape(chain) == [("A", 0, 4), ("B2", 4, 8)]


def test_sub_spans_switch_where_another_server_starts() -> None:
    slow = rec("S", 0, 8, throughput=1.0)  # 125 ms a block
    fast = rec("F", 4, 8, throughput=100.0)
    chain = infer([slow, fast], {"S": 0.01, "F": 0.01}, push=False)
    assert shape(chain) == [("S", 0, 4), ("F", 4, 8)]


def test_servers_without_cache_room_dead_or_excluded_are_left_out() -> None:
    servers = [
        rec("small", 0, 8, cache_tokens_left=100),
        rec("gone", 0, 8, state="OFFLINE"),
        rec("stale", 0, 8, expires_at=NOW),
        rec("ok", 0, 8, throughput=1.0),
        rec("banned", 0, 8),
    ]
    chain = infer(
        servers, {}, push=True, max_length=64, batch_size=2, exclude=frozenset({"banned"})
    )
    assert shape(chain) == [("ok", 0, 8)]
    assert shape(infer(servers[:1], {}, push=True, max_length=100)) == [("small", 0, 8)]
    with pytest.raises(
        MissingBlocksError, match=r"blocks 0-7 of m \(0-7 only on servers without room for 101"
    ):
        infer(servers[:3], {}, push=True, max_length=101)
    with pytest.raises(MissingBlocksError, match=r"no server for blocks 0-7 of m$"):
        infer(servers[1:3], {}, push=False)


def _all_chains(servers: list[ServerRecord], pos: int, end: int) -> list[list[Hop]]:
    if pos == end:
        return [[]]
    out = []
    for s in servers:
        if s.covers(pos):
            for stop in range(pos + 1, min(s.end, end) + 1):
                out += [[Hop(s, pos, stop), *rest] for rest in _all_chains(servers, stop, end)]
    return out


@settings(max_examples=150)
@given(
    spans=st.lists(
        st.tuples(
            st.integers(0, 5),
            st.integers(1, 6),
            st.sampled_from([1.0, 3.0, 10.0, 50.0]),
            st.sampled_from([0.001, 0.02, 0.1]),
        ),
        min_size=1,
        max_size=4,
    ),
    push=st.booleans(),
    links=st.dictionaries(
        st.tuples(st.sampled_from("PQRS"), st.sampled_from("PQRS")), st.sampled_from([0.001, 0.3])
    ),
)
def test_dp_matches_brute_force(spans: list, push: bool, links: dict) -> None:
    servers = [
        rec(p, a, min(a + n, 6), throughput=tp)
        for p, (a, n, tp, _) in zip("PQRS", spans, strict=False)
    ]
    rtt = {p: r for p, (*_, r) in zip("PQRS", spans, strict=False)}
    chains = _all_chains(servers, 0, 6)
    if not chains:
        with pytest.raises(MissingBlocksError):
            infer(servers, rtt, push=push, end=6, server_rtt=links)
        return
    best = min(chain_latency(c, rtt=rtt, server_rtt=links, push=push) for c in chains)
    chosen = infer(servers, rtt, push=push, end=6, server_rtt=links)
    assert [h.start for h in chosen][0] == 0 and chosen[-1].end == 6
    assert all(a.end == b.start for a, b in zip(chosen, chosen[1:], strict=False))
    assert chain_latency(chosen, rtt=rtt, server_rtt=links, push=push) == pytest.approx(best)


def test_training_chain_spreads_load_by_throughput() -> None:
    servers = [
        rec("A", 0, 8, throughput=10.0),
        rec("B", 0, 8, throughput=30.0),
        rec("C", 0, 8, state="OFFLINE"),
    ]
    rng = random.Random(7)
    counts = Counter(
        choose_training_chain(servers, model="m", start=0, end=8, rng=rng, now=NOW)[
            0
        ].server.peer_id
        for _ in range(4000)
    )
    assert set(counts) == {"A", "B"}
    assert counts["B"] / 4000 == pytest.approx(0.75, abs=0.03)
    again = [
        shape(
            choose_training_chain(servers, model="m", start=0, end=8, rng=random.Random(1), now=NOW)
        )
        for _ in range(2)
    ]
    assert again[0] == again[1]  # seeded: reproducible


def test_training_chain_covers_every_block() -> None:
    servers = [rec("A", 0, 5, throughput=1.0), rec("B", 3, 8, throughput=9.0), rec("C", 5, 8)]
    for seed in range(50):
        chain = choose_training_chain(
            servers, model="m", start=0, end=8, rng=random.Random(seed), now=NOW
        )
        assert chain[0].start == 0 and chain[-1].end == 8
        assert all(a.end == b.start for a, b in zip(chain, chain[1:], strict=False))
    with pytest.raises(MissingBlocksError, match="blocks 0-2"):
        choose_training_chain(servers[1:], model="m", start=0, end=8, rng=random.Random(0), now=NOW)


def test_rtt_estimator_smooths_samples() -> None:
    est = RttEstimator()
    assert est.get("A") is None and est.timeout("A") is None
    assert est.observe("A", 0.1) == 0.1
    assert est.timeout("A") == pytest.approx(max(0.2, 0.1 + 4 * 0.05))
    est.observe("A", 0.9)  # one outlier moves the mean by alpha only
    assert est.get("A") == pytest.approx(0.1 + 0.125 * 0.8)
    for _ in range(100):
        est.observe("A", 0.02)
    assert est.get("A") == pytest.approx(0.02, abs=1e-4)
    assert est.timeout("A") == 0.2  # the floor, once the spread has settled
    assert est.as_dict() == {"A": est.get("A")}
    est.forget("A")
    assert est.as_dict() == {}
    with pytest.raises(ValueError, match="finite and >= 0"):
        est.observe("A", float("nan"))


# -- what servers claim against what the client saw -------------------------------------------------
def test_throughput_estimator_folds_timed_steps() -> None:
    est = ThroughputEstimator(alpha=0.5)
    assert est.get("A") is None
    assert est.observe("A", tokens=1, seconds=0.01) == pytest.approx(100)
    assert est.observe("A", tokens=0.5, seconds=0.01) == pytest.approx(75)  # half the span
    assert est.as_dict() == {"A": pytest.approx(75)}
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            est.observe("A", tokens=1, seconds=bad)
        with pytest.raises(ValueError):
            est.observe("A", tokens=bad, seconds=1)


def test_an_observed_server_is_capped_at_what_was_measured() -> None:
    servers = [rec("liar", 0, 8, throughput=1e6), rec("B", 0, 8, throughput=50)]
    trusted = {s.peer_id: s for s in trusted_throughputs(servers, {"liar": 40.0, "B": 900.0})}
    assert trusted["liar"].throughput == 40.0
    assert trusted["B"].throughput == 50  # never above its own claim
    assert trusted["liar"].seq == servers[0].seq and trusted["liar"].addrs == servers[0].addrs


def test_an_unobserved_server_is_capped_at_twice_the_median_block_rate_of_the_others() -> None:
    # per-block rates (tokens/s x blocks) of the others covering its blocks: 400, 400, 800
    servers = [
        rec("liar", 0, 8, throughput=1e6),
        rec("A", 0, 4, throughput=100),
        rec("B", 4, 8, throughput=100),
        rec("C", 0, 8, throughput=100),
        rec("far", 8, 12, throughput=1e5),  # covers none of its blocks: not counted
    ]
    trusted = {s.peer_id: s for s in trusted_throughputs(servers, {})}
    assert trusted["liar"].throughput == 2 * 400 / 8
    assert trusted["A"].throughput == 100  # honest claims up to twice the median stay
    # alone on its blocks, "far" is compared with every other server of the model, at their
    # claims (8e6, 400, 400, 800: median 600); one liar among four moves the median, not to 8e6
    assert trusted["far"].throughput == 2 * 600 / 4
    assert trusted_throughputs([servers[0]], {}) == [servers[0]]  # alone: nothing to compare with


def test_a_liar_no_longer_dominates_training_draws() -> None:
    servers = [rec("liar", 0, 8, throughput=1e6)] + [rec(p, 0, 8, throughput=100) for p in "ABC"]
    rng = random.Random(0)
    draws = Counter(
        choose_training_chain(
            trusted_throughputs(servers, {}), model="m", start=0, end=8, rng=rng, now=NOW
        )[0].server.peer_id
        for _ in range(400)
    )
    # capped at twice an honest server: 2 / 5 of 400 draws; ~400 if its claim were believed
    assert 120 < draws["liar"] < 200


def test_chain_shares_bound_one_server_per_window() -> None:
    shares = ChainShares(share=0.5, window=4)
    assert shares.limit == 2
    a, b = rec("A", 0, 8), rec("B", 0, 8)
    chosen = []
    for _ in range(12):  # a client that always takes A unless A is crowded
        peer = "B" if "A" in shares.crowded() else "A"
        shares.record([Hop(a if peer == "A" else b, 0, 8)])
        chosen.append(peer)
    for i in range(len(chosen) - 3):
        assert chosen[i : i + 4].count("A") <= 2
    assert chosen[:2] == ["A", "A"]  # the bound does not bite before the server reaches it
    fresh = ChainShares(share=0.5, window=4)
    for chain in ([Hop(a, 0, 8)], [Hop(rec("A", 0, 4), 0, 4), Hop(rec("C", 4, 8), 4, 8)]):
        fresh.record(chain)
    # A carried 1.5 chains' worth: one more whole chain would make 2.5 > 2 (C: 0.5, it may)
    assert fresh.crowded() == {"A": 1.5}
    fresh.record([Hop(rec("C", 0, 8), 0, 8)])
    fresh.record([Hop(rec("A", 0, 2), 0, 2), Hop(rec("C", 2, 8), 2, 8)])
    assert fresh.crowded() == {"C": 2.25}  # of the last 3 chains (the next one makes 4)
    assert ChainShares(share=1.0, window=4).crowded() == {}
    with pytest.raises(ValueError):
        ChainShares(share=0.0)


def test_spread_exclusion_keeps_a_crowded_server_without_alternative() -> None:
    servers = [rec("A", 0, 4), rec("B", 4, 8), rec("C", 4, 8)]
    args: dict[str, object] = dict(model="m", start=0, end=8, now=NOW, exclude=frozenset())
    out = spread_exclusion(servers, crowded={"A": 3, "B": 2}, **args)  # type: ignore[arg-type]
    assert out == {"B"}  # A alone holds 0-3: still used; C takes 4-7
    out = spread_exclusion(servers, crowded={"B": 2, "C": 3}, **args)  # type: ignore[arg-type]
    assert out == {"C"}  # one of B and C must stay: the most crowded goes


def test_spread_exclusion_leaves_out_the_most_crowded_of_mutual_alternatives() -> None:
    # a liar of every block against the two servers that are its only alternative
    servers = [rec("liar", 0, 8), rec("A", 0, 4), rec("B", 4, 8)]
    args: dict[str, object] = dict(model="m", start=0, end=8, now=NOW, exclude=frozenset())
    out = spread_exclusion(servers, crowded={"liar": 10, "A": 9}, **args)  # type: ignore[arg-type]
    assert out == {"liar"}
    out = spread_exclusion(servers, crowded={"liar": 10, "A": 10}, **args)  # type: ignore[arg-type]
    assert out == {"liar"}  # a tie: the one holding the most blocks goes
    out = spread_exclusion(servers, crowded={"liar": 10, "A": 11}, **args)  # type: ignore[arg-type]
    assert out == {"A"}  # A is the most crowded: then the liar is needed


def test_a_direct_server_is_preferred_to_a_relayed_one_at_equal_cost() -> None:
    relayed = ("/ip4/10.0.0.1/tcp/1/p2p/R/p2p-circuit/p2p/P",)
    for names in (("P", "D"), ("D", "P")):  # whatever the order of the records
        servers = [
            rec(n, 0, 8, addrs=relayed if n == "P" else ("/ip4/10.0.0.2/tcp/1",)) for n in names
        ]
        assert shape(infer(servers, {"P": 0.02, "D": 0.02}, push=False)) == [("D", 0, 8)]
    # the relayed round trip measured lower (a relay next door, a far direct server): it wins
    servers = [rec("P", 0, 8, addrs=relayed), rec("D", 0, 8)]
    assert shape(infer(servers, {"P": 0.02, "D": 0.05}, push=False)) == [("P", 0, 8)]
