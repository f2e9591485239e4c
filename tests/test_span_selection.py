"""Choosing blocks: pure span selection, and the placement loop's timing under trio's mock clock."""

from __future__ import annotations

import functools
import random
from dataclasses import replace

import pytest
import trio

from swarm_node.dht.records import ServerRecord
from swarm_node.dht.span_selection import (
    better_start,
    block_coverage,
    choose_span,
    conflicting_moves,
)
from swarm_node.node.server.placement import choose_start, rebalance_loop

FOREVER = 1e12


def rec(peer: str, start: int, end: int, throughput: float = 10.0, **kw: object) -> ServerRecord:
    fields: dict = dict(
        peer_id=peer,
        addrs=(),
        model="m",
        start=start,
        end=end,
        throughput=throughput,
        cache_tokens_left=1000,
        dtype="float32",
        version="0",
        expires_at=FOREVER,
    )
    fields.update(kw)
    return ServerRecord(**fields)


def test_coverage_sums_live_servers_of_the_model() -> None:
    servers = [
        rec("a", 0, 3),
        rec("b", 2, 6, 5.0),
        rec("c", 0, 6, state="OFFLINE"),
        rec("d", 0, 6, model="other"),
        rec("e", 0, 6, expires_at=1.0),
    ]
    assert block_coverage(servers, model="m", num_blocks=6, now=2.0) == [10, 10, 15, 5, 5, 5]
    assert (
        block_coverage(servers, model="m", num_blocks=6, now=2.0, exclude=frozenset({"b"}))
        == [10] * 3 + [0] * 3
    )


def test_joiners_fill_gaps_first_then_the_weakest_blocks() -> None:
    assert choose_span([0.0] * 6, length=2, throughput=1) == 0  # an empty swarm: from the start
    assert choose_span([5, 5, 0, 0, 0, 0], length=2, throughput=1) == 2  # the gap
    assert choose_span([5, 5, 0, 0, 0, 0], length=3, throughput=1) == 2  # three uncovered blocks
    assert choose_span([5, 5, 5, 0, 0, 0], length=2, throughput=1) == 3
    assert choose_span([10, 10, 1, 1, 10, 10], length=2, throughput=1) == 2  # the weakest pair
    assert (
        choose_span([4, 4, 8, 8, 4, 4], length=4, throughput=4) == 0
    )  # ties: the thinnest, then lowest
    with pytest.raises(ValueError, match="does not fit"):
        choose_span([1.0] * 3, length=4, throughput=1)


def test_a_server_moves_only_when_it_pays_and_uncovers_nothing() -> None:
    me = rec("me", 0, 4)
    # b left blocks 4-5 uncovered; c still covers 0-3: moving there covers everything
    assert better_start([me, rec("c", 0, 4)], me=me, num_blocks=6, now=0, min_gain=0.2) == 2
    # alone on 0-3: a move would uncover them
    assert better_start([me, rec("c", 4, 6)], me=me, num_blocks=6, now=0, min_gain=0.2) is None
    # every block covered; a move would lift the weakest from 10 to 11: under the 20% threshold
    servers = [me, rec("b", 2, 6), rec("c", 0, 6, 1.0)]
    assert better_start(servers, me=me, num_blocks=6, now=0, min_gain=0.2) is None
    assert (
        better_start(servers, me=me, num_blocks=6, now=0, min_gain=0.05) is None
    )  # 0-3 at 11, 4-5 at 11
    slow = [
        me,
        rec("b", 0, 4),
        rec("c", 4, 6, 1.0),
    ]  # blocks 4-5 at 1 token/s: a move to 2-5 lifts them
    assert better_start(slow, me=me, num_blocks=6, now=0, min_gain=0.2) == 2


class Board:
    """The swarm's records in memory, for placement loops under the mock clock (the DHT's role)."""

    def __init__(self) -> None:
        self.records: dict[str, ServerRecord] = {}
        self.moves = 0
        self.history: list[list[float]] = []  # the coverage after every change of a record

    async def fetch(self) -> list[ServerRecord]:
        await trio.sleep(
            0.5
        )  # a lookup takes a while; it sees the records as they are when it ends
        return list(self.records.values())

    def write(self, name: str, record: ServerRecord | None) -> None:
        if record is None:
            del self.records[name]
        else:
            self.records[name] = record
        self.history.append(self.coverage())

    def coverage(self) -> list[float]:
        return block_coverage(
            self.records.values(), model="m", num_blocks=6, now=trio.current_time()
        )

    async def serve(
        self,
        name: str,
        seed: int | random.Random,
        *,
        start: int | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        rng = seed if isinstance(seed, random.Random) else random.Random(seed)
        if start is None:
            start = await choose_start(
                self.fetch,
                model="m",
                total_blocks=6,
                length=4,
                throughput=10.0,
                start_delay=5.0,
                rng=rng,
                now=trio.current_time,
            )
        self.write(name, rec(name, start, start + 4))
        task_status.started()

        async def claim(target: int | None) -> None:
            self.write(
                name, replace(self.records[name], moving_to=-1 if target is None else target)
            )

        async def move(target: int) -> None:
            await trio.sleep(2.0)  # loading the new blocks
            self.write(name, rec(name, target, target + 4))
            self.moves += 1

        try:
            await rebalance_loop(
                self.fetch,
                me=lambda: self.records[name],
                claim=claim,
                move=move,
                total_blocks=6,
                interval=60.0,
                min_gain=0.2,
                rng=rng,
                now=trio.current_time,
            )
        finally:
            self.write(name, None)  # leaving: the record is withdrawn


class Scripted(random.Random):
    """An rng whose ``uniform`` gives the interval factors listed, then the last one forever."""

    def __init__(self, factors: list[float]) -> None:
        super().__init__(0)
        self.factors = factors

    def uniform(self, a: float, b: float) -> float:
        return self.factors.pop(0) if len(self.factors) > 1 else self.factors[0]


@pytest.mark.parametrize("together", [False, True], ids=["one-after-another", "all-at-once"])
async def test_three_servers_cover_every_block_and_recover_when_one_leaves(
    autojump_clock: trio.testing.MockClock, together: bool
) -> None:
    board = Board()
    with trio.fail_after(10_000):  # virtual seconds: the whole test takes well under a real second
        async with trio.open_nursery() as nursery:
            scopes: dict[str, trio.CancelScope] = {}
            for i, name in enumerate("abc"):
                scopes[name] = trio.CancelScope()

                async def run(
                    name: str = name,
                    seed: int = i,
                    *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                ) -> None:
                    with scopes[name]:
                        await board.serve(name, seed, task_status=task_status)

                if together:
                    nursery.start_soon(run)
                else:
                    await nursery.start(run)
            await trio.sleep(300)  # a few re-check rounds
            assert min(board.coverage()) > 0
            moves_before = board.moves
            await trio.sleep(600)
            assert board.moves == moves_before  # settled: nobody moves back and forth
            # the server alone on some blocks leaves; the others re-cover them
            covering = {n: r for n, r in board.records.items()}
            leaver = next(
                n
                for n, r in covering.items()
                if any(
                    all(not o.covers(b) for m, o in covering.items() if m != n)
                    for b in range(r.start, r.end)
                )
            )
            scopes[leaver].cancel()
            await trio.sleep(1)
            assert min(board.coverage()) == 0
            await trio.sleep(300)
            assert min(board.coverage()) > 0
            nursery.cancel_scope.cancel()


def test_serve_takes_blocks_or_num_blocks_not_both() -> None:
    from swarm_node.node.apps.cli import build_parser

    args = build_parser().parse_args(["serve", "--num-blocks", "3", "--min-gain", "0.5"])
    assert (args.num_blocks, args.blocks, args.min_gain) == (3, None, 0.5)
    for argv in (["serve"], ["serve", "--blocks", "0:3", "--num-blocks", "3"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_placement_and_recovery_settings_are_checked() -> None:
    from swarm_node.errors import ConfigError
    from swarm_node.node.config import ClientConfig, ServerConfig

    assert ServerConfig(model="m", num_blocks=2).end == 0  # chosen at start
    for fields, message in [
        ({}, "'blocks' must satisfy"),
        ({"num_blocks": 0}, "'num_blocks' must be an int >= 1"),
        ({"num_blocks": 2, "start": 1, "end": 4}, "must hold 'num_blocks' = 2"),
        ({"num_blocks": 2, "rebalance_interval": 0}, "'rebalance_interval'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ServerConfig(model="m", **fields)
    with pytest.raises(ConfigError, match="'max_attempts' must be an int"):
        ClientConfig(max_attempts=1.5)


def test_bans_grow_with_each_failure_and_expire() -> None:
    from swarm_node.dht.bans import BanList

    bans = BanList(base=10.0, cap=25.0)
    assert bans.ban("a", now=0.0) == 10.0
    assert bans.banned(now=5.0) == {"a"} and bans.is_banned("a", now=9.9)
    assert bans.banned(now=10.0) == frozenset()
    assert bans.ban("a", now=10.0) == 20.0  # the second failure in a row
    assert bans.ban("a", now=11.0) == 25.0  # capped
    bans.forgive("a")
    assert bans.ban("a", now=100.0) == 10.0


def test_claimed_moves_conflict_when_they_touch_the_same_blocks() -> None:
    me = rec("me", 0, 4)
    twin = rec("twin", 0, 4, moving_to=2)  # claims 2:6 from 0:4
    far = rec("far", 8, 10, moving_to=10)  # 8:10 -> 10:12: blocks neither of us touches
    done = rec("done", 4, 6)  # not moving
    gone = rec("gone", 0, 4, moving_to=2, state="OFFLINE")
    assert conflicting_moves([me, twin, far, done, gone], me=me, target=2, now=0) == [twin]
    assert (
        conflicting_moves([me, far, done], me=me, target=4, now=0) == []
    )  # 0:4 -> 4:8 misses 8:12
    assert conflicting_moves([me, far, done], me=me, target=7, now=0) == [
        far
    ]  # 7:11 meets 8:10 and 10:12
    assert (
        conflicting_moves([replace(me, moving_to=2)], me=me, target=2, now=0) == []
    )  # my own claim


@pytest.mark.parametrize(
    "offset", [0.0, 0.3, -0.3, 1.0, 2.4], ids=lambda o: f"second-look-{o:+.1f}s"
)
async def test_two_servers_seeing_the_same_gap_do_not_both_move_off_their_blocks(
    autojump_clock: trio.testing.MockClock, offset: float
) -> None:
    """Twins on 0:4 and nobody on 4-5: each sees that moving to 2:6 covers everything. Without claims
    both move when their re-checks fall within a load time (2 s) of each other, and blocks 0-1 go
    uncovered; with claims exactly one moves and 0-3 stay covered throughout."""
    board = Board()
    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(board.serve, "a", Scripted([1.0, 1.0]), start=0))
            await nursery.start(
                functools.partial(board.serve, "b", Scripted([1.0 + offset / 60, 1.2]), start=0)
            )
            await trio.sleep(200)  # three re-checks each, whatever happened in the first
            assert sorted((r.start, r.end) for r in board.records.values()) == [(0, 4), (2, 6)]
            assert board.moves == 1
            assert all(r.moving_to == -1 for r in board.records.values())  # no claim left behind
            assert all(min(c[:4]) > 0 for c in board.history)  # 0-3 were never uncovered
            nursery.cancel_scope.cancel()


async def test_a_move_that_fails_to_load_keeps_the_server_where_it_was(
    autojump_clock: trio.testing.MockClock,
) -> None:
    board = Board()
    claims: list[int | None] = []
    me = rec("me", 0, 4)
    board.write("me", me)
    board.write("twin", rec("twin", 0, 4))  # 0:4 twice, 4-5 uncovered: moving pays

    async def claim(target: int | None) -> None:
        claims.append(target)
        board.write("me", replace(board.records["me"], moving_to=-1 if target is None else target))

    async def move(target: int) -> None:
        await trio.sleep(2.0)
        raise OSError(28, "No space left on device")  # loading the new blocks failed

    with trio.fail_after(10_000):
        with trio.move_on_after(100):  # ~1 check a minute: one or two tries
            await rebalance_loop(
                board.fetch,
                me=lambda: board.records["me"],
                claim=claim,
                move=move,
                total_blocks=6,
                interval=60.0,
                min_gain=0.2,
                rng=Scripted([1.0]),
                now=trio.current_time,
            )
    assert claims == [2, None]  # claimed, failed, withdrew the claim, and went on serving
    assert board.records["me"] == replace(me, moving_to=-1)
