"""Continuous batching (server/batching.py, BlockSpan.forward_batch) and fair prefill.

Decode steps of sessions that wait together run as one forward: each session's output is its lone
step's within float tolerance (a linear over N rows may round unlike one over a single row: measured
~3e-5 absolute on tiny models whose hidden states reach ~10, so atol 1e-4 relative to |h|), and the
greedy tokens of every session equal transformers' for that session alone.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import trio

from swarm_node.dht.records import decode_record, encode_record
from swarm_node.dht.routing import Hop
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.node.apps.swarm_status import coverage_report, format_report
from swarm_node.node.batch_queue import BatchJob, BatchQueue
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import HopTuning, SessionSettings
from swarm_node.node.config import ClientConfig
from swarm_node.node.server.batching import DecodeBatcher
from tests.model_fixtures import TINY_FAMILIES, TINY_HIDDEN, make_tiny_model_dir, reference_model
from tests.swarm_helpers import local_swarm

H = TINY_HIDDEN
TOL = {"atol": 1e-4, "rtol": 1e-4}
FAST = ClientConfig(step_timeout=10.0, retry_delay=0.05, max_attempts=4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_forward_batch_rows_equal_lone_steps(tmp_path: Path, family: str) -> None:
    checkpoint = Checkpoint.open(make_tiny_model_dir(tmp_path / family, family, seed=7))
    span = BlockSpan.load(checkpoint, 0, 6)
    gen = torch.Generator().manual_seed(1)
    shapes = [(1, 3), (2, 7), (1, 12)]  # (batch, prompt length): caches of different lengths
    lone = [span.new_cache(32, batch_size=b, start=1, end=5) for b, _ in shapes]
    together = [span.new_cache(32, batch_size=b, start=1, end=5) for b, _ in shapes]
    with torch.inference_mode():
        for (b, t), c1, c2 in zip(shapes, lone, together, strict=True):
            prompt = torch.randn(b, t, H, generator=gen)
            span(prompt, c1, start=1, end=5)
            span(prompt, c2, start=1, end=5)
        for _ in range(3):
            steps = [torch.randn(b, 1, H, generator=gen) for b, _ in shapes]
            want = [span(x, c, start=1, end=5) for x, c in zip(steps, lone, strict=True)]
            got = span.forward_batch(steps, together, start=1, end=5)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, **TOL)
    assert [c.length for c in together] == [t + 3 for _, t in shapes]
    for a, b in zip(lone, together, strict=True):  # the caches hold the same keys and values
        for la, lb in zip(a.dynamic.layers, b.dynamic.layers, strict=True):
            torch.testing.assert_close(la.keys, lb.keys, **TOL)


def test_forward_batch_elsewhere_runs_each_session_exactly(tmp_path: Path) -> None:
    sliding = make_tiny_model_dir(tmp_path / "sliding", "mistral", seed=2, sliding_window=3)
    span = BlockSpan.load(Checkpoint.open(sliding), 0, 6)
    gen = torch.Generator().manual_seed(2)
    lone, together = [span.new_cache(16) for _ in range(2)], [span.new_cache(16) for _ in range(2)]
    with torch.inference_mode():
        for n, c1, c2 in zip((2, 6), lone, together, strict=True):
            prompt = torch.randn(1, n, H, generator=gen)
            span(prompt, c1), span(prompt, c2)
        steps = [torch.randn(1, 1, H, generator=gen) for _ in range(2)]
        want = [span(x, c) for x, c in zip(steps, lone, strict=True)]
        got = span.forward_batch(steps, together)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


async def test_steps_that_wait_together_run_in_one_forward(tiny_llama: Path) -> None:
    span = BlockSpan.load(Checkpoint.open(tiny_llama), 0, 6)
    limiter = trio.CapacityLimiter(1)
    batcher = DecodeBatcher(span, limiter, max_inline_s=0.1, enabled=True)
    gen = torch.Generator().manual_seed(3)
    caches = [span.new_cache(16) for _ in range(4)]
    with torch.inference_mode():
        for n, cache in enumerate(caches):
            span(torch.randn(1, n + 2, H, generator=gen), cache)
    outs: dict[int, torch.Tensor] = {}

    async def step(i: int, x: torch.Tensor) -> None:
        outs[i] = await batcher.step(x, caches[i], start=0, end=6)

    x = [torch.randn(1, 1, H, generator=gen) for _ in range(4)]
    with trio.fail_after(30):
        await step(0, x[0])  # alone: at once, no waiting window
        assert batcher.batch_sizes == {1: 1}
        cancelled = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            async with limiter:  # the server is busy: steps queue
                for i in (1, 2, 3):
                    nursery.start_soon(step, i, x[i])
                await batcher.wait_until_waiting(3)

                async def leaves() -> None:
                    with cancelled:
                        await batcher.step(x[0], caches[0], start=0, end=6)

                nursery.start_soon(leaves)
                await batcher.wait_until_waiting(4)
                cancelled.cancel()  # its client went away before the batch formed
                await batcher.wait_until_waiting(3)
        assert batcher.batch_sizes == {1: 1, 3: 1} and batcher.max_batch == 3
    assert [c.length for c in caches] == [3, 4, 5, 6]  # the leaver's cache did not grow
    with torch.inference_mode():
        alone = [span.new_cache(16) for _ in range(4)]
        gen = torch.Generator().manual_seed(3)
        for n, cache in enumerate(alone):
            span(torch.randn(1, n + 2, H, generator=gen), cache)
        for i in range(4):
            torch.testing.assert_close(outs[i], span(x[i], alone[i]), **TOL)


async def rhythm_batches(
    clock: trio.testing.MockClock, starts: dict[str, float], steps: dict[str, int]
) -> tuple[list[list[str]], dict[str, list[float]]]:
    """Users submitting ``steps[u]`` jobs each, at ``starts[u]`` + 0, 1, 2, ... s (a session going
    round its chain at a steady rhythm), to a queue whose batches take 0.2 s of (virtual) compute:
    the users of each batch, and how long each job waited beyond its compute."""
    batches: list[list[str]] = []
    waits: dict[str, list[float]] = {u: [] for u in starts}

    def compute(jobs: list[BatchJob]) -> None:
        batches.append([job.user for job in jobs])
        clock.jump(0.2)
        for job in jobs:
            job.out = job.user

    queue: BatchQueue[BatchJob] = BatchQueue(
        compute, max_inline_s=1.0, users=lambda: 2, off_loop_when_crowded=False
    )
    queue.quick_jobs.recent = 0.0  # inline: the compute moves the clock on the loop's thread

    begin = trio.current_time()

    async def user(name: str) -> None:
        for k in range(steps[name]):
            await trio.sleep_until(begin + starts[name] + k)
            sent = trio.current_time()
            await queue.submit(BatchJob(user=name))
            waits[name].append(trio.current_time() - sent - 0.2)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for name in starts:
                nursery.start_soon(user, name)
    return batches, waits


async def test_a_leader_waits_for_the_sessions_due_and_not_for_quiet_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # b comes 2 ms after a: once b's rhythm is known, a's batch waits for it (due within one
    # batch's compute, and coming within the gap), and they go on together
    batches, _ = await rhythm_batches(autojump_clock, {"a": 0.0, "b": 0.002}, {"a": 6, "b": 6})
    assert batches[:2] == [["a"], ["b"]] and [sorted(b) for b in batches[-3:]] == [["a", "b"]] * 3
    # b comes 0.6 s after a: later than a batch's compute, so nobody waits for anybody
    batches, waits = await rhythm_batches(autojump_clock, {"a": 0.0, "b": 0.6}, {"a": 5, "b": 5})
    assert all(len(b) == 1 for b in batches) and max(waits["a"] + waits["b"]) < 0.01
    # c stops after 2 jobs: a waits for it no longer than the gap, and soon not at all
    batches, waits = await rhythm_batches(autojump_clock, {"a": 0.0, "c": 0.1}, {"a": 8, "c": 2})
    assert max(waits["a"]) <= 0.0041 and max(waits["a"][-4:]) < 1e-9


async def test_a_leader_cancelled_before_it_computes_hands_the_lead_on(tiny_llama: Path) -> None:
    span = BlockSpan.load(Checkpoint.open(tiny_llama), 0, 6)
    limiter = trio.CapacityLimiter(1)
    batcher = DecodeBatcher(span, limiter, max_inline_s=0.1, enabled=True)
    caches = [span.new_cache(8) for _ in range(3)]
    leader = trio.CancelScope()

    async def lead() -> None:
        with leader:
            await batcher.step(torch.randn(1, 1, H), caches[0], start=0, end=6)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with limiter:
                nursery.start_soon(lead)
                await batcher.wait_until_waiting(1)
                for cache in caches[1:]:
                    nursery.start_soon(
                        lambda c=cache: batcher.step(torch.randn(1, 1, H), c, start=0, end=6)
                    )
                await batcher.wait_until_waiting(3)
                leader.cancel()  # the leader goes while it waits for the limiter
                await batcher.wait_until_waiting(2)
        async with trio.open_nursery() as nursery:  # and later steps still run
            nursery.start_soon(
                lambda: batcher.step(torch.randn(1, 1, H), caches[1], start=0, end=6)
            )
    assert [c.length for c in caches] == [0, 2, 1] and not batcher.leading


async def test_no_batching_runs_every_step_alone(tiny_llama: Path) -> None:
    span = BlockSpan.load(Checkpoint.open(tiny_llama), 0, 6)
    limiter = trio.CapacityLimiter(1)
    batcher = DecodeBatcher(span, limiter, max_inline_s=0.1, enabled=False)
    caches = [span.new_cache(8) for _ in range(3)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with limiter:
                for cache in caches:
                    nursery.start_soon(
                        lambda c=cache: batcher.step(torch.randn(1, 1, H), c, start=0, end=6)
                    )
                await batcher.wait_until_waiting(3)
    assert batcher.batch_sizes == {1: 3} and [c.length for c in caches] == [1, 1, 1]


class WatchedLane:
    """The server's prefill lane (a trio.Lock) that says when a chunk queues behind another."""

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.queued = trio.Event()

    async def __aenter__(self) -> None:
        if self.lock.locked():
            self.queued.set()
        await self.lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.lock.release()


@pytest.mark.parametrize("batch_s", [0.0, 3600.0])
async def test_a_decode_step_runs_between_two_blocks_of_a_long_prefill(
    tiny_llama: Path, batch_s: float
) -> None:
    """Session A's 16-token prefill in chunks of 4 through 6 blocks; session B's decode step, sent
    while A's first chunk computes its first block, runs right after that block, before the chunk's
    second; session C's 8-token prefill, sent then too, waits for A's chunk to end (long steps'
    chunks take turns, a chunk each; only decode steps come between blocks). The order is read off the span's
    own calls (the rotary embedding once a step, each block of a chunk; A's first block holds its
    worker thread until B's step waits in the server's batcher and C's in the prefill lane). A's
    chunks give way only while decode steps wait: the other chunks run their 6 blocks in one go.
    Equal turns: a chunk gives way only once it has computed as long as a decode batch takes
    (``batch_s``, the batcher's recent compute); with an hour, B waits for A's whole chunk."""
    model = tiny_llama.name
    seen: list[tuple[str, int]] = []  # ("rotary", positions) of each step, ("block", i) of A's
    first_block = trio.Event()
    go = threading.Event()

    def rotary_called(mod, args, kwargs, out) -> None:
        seen.append(("rotary", kwargs["position_ids"].shape[1]))

    def block_called(i: int):
        def hook(mod, args, kwargs, out) -> None:
            if (
                args[0].shape[1] == 4
            ):  # A's and C's chunks (B's decode step replays its layers' ops)
                seen.append(("block", i))
            if seen == [("rotary", 4), ("block", 0)]:
                trio.from_thread.run_sync(first_block.set)
                go.wait(60)

        return hook

    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 6)], prefill_chunk=4) as (peers, client):
            server = peers[0].server
            (record,) = await client.find_servers(model, 6)
            chain = [Hop(record, 0, 6)]
            settings = SessionSettings(model=model, max_length=32)
            async with (
                client.inference_session(chain, settings) as a,
                client.inference_session(chain, settings) as b,
                client.inference_session(chain, settings) as c,
            ):
                await b.step(torch.randn(1, 3, H))
                server.prefill_lane = lane = WatchedLane()
                server.batcher.compute_s = batch_s
                server.span.rotary.register_forward_hook(rotary_called, with_kwargs=True)
                for i, layer in enumerate(server.span.layers):
                    layer.register_forward_hook(block_called(i), with_kwargs=True)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(a.step, torch.randn(1, 16, H))
                        await first_block.wait()  # A's first block ran (in a worker thread)
                        nursery.start_soon(c.step, torch.randn(1, 8, H))
                        await lane.queued.wait()  # C's chunk waits for A's in the lane
                        nursery.start_soon(b.step, torch.randn(1, 1, H))
                        await server.batcher.wait_until_waiting(1)  # B waits for the limiter
                        go.set()
                finally:
                    go.set()
    chunk = [("rotary", 4), *(("block", i) for i in range(6))]
    cut = 2 if batch_s == 0 else len(chunk)
    assert seen == [*chunk[:cut], ("rotary", 1), *chunk[cut:], *chunk * 5]  # C, A, C, A, A


async def test_concurrent_sessions_batch_and_give_each_ones_own_tokens(tiny_llama: Path) -> None:
    """Four sessions (two client-star, two push) at once through two servers: the tokens of each
    are transformers' for it alone; then a forced batch of three, one leaving and one joining."""
    model = tiny_llama.name
    reference = reference_model(tiny_llama)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    torch.manual_seed(5)
    prompts = [torch.randint(0, 256, (1, n)) for n in (4, 7, 5, 9)]
    expected = [
        reference.generate(p, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        for p in prompts
    ]
    got: dict[int, list[list[int]]] = {}
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (peers, client):

            async def generate(i: int) -> None:
                settings = SessionSettings(model=model, num_blocks=6, push=i % 2 == 1)
                ids, _ = await generate_tokens(
                    client, head, prompts[i], settings, SamplingConfig(max_new_tokens=10)
                )
                got[i] = ids.tolist()

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(generate, i)
            assert [got[i] for i in range(4)] == [e.tolist() for e in expected]

            # a batch forced by a busy server: three sessions, then one leaves and one joins
            checkpoint = Checkpoint.open(tiny_llama)
            local = BlockSpan.load(checkpoint, 0, 3)
            records = {r.peer_id: r for r in await client.find_servers(model, 6)}
            chain = [Hop(records[peers[0].peer_id], 0, 3)]
            batcher = peers[0].server.batcher
            gen = torch.Generator().manual_seed(6)
            sessions: dict[int, dict] = {}
            caches: dict[int, object] = {}
            async with trio.open_nursery() as keep:

                async def open_one(i: int, n: int) -> None:
                    box: dict = {"opened": trio.Event(), "done": trio.Event()}

                    async def hold() -> None:
                        settings = SessionSettings(model=model, max_length=16)
                        async with client.inference_session(chain, settings) as s:
                            box["s"] = s
                            box["opened"].set()
                            await box["done"].wait()

                    keep.start_soon(hold)
                    await box["opened"].wait()
                    prompt = torch.randn(1, n, H, generator=gen)
                    caches[i] = local.new_cache(16)
                    with torch.inference_mode():
                        local(prompt, caches[i])
                    await box["s"].step(prompt)
                    sessions[i] = box

                async def batched_round(members: list[int]) -> None:
                    xs = {i: torch.randn(1, 1, H, generator=gen) for i in members}
                    outs: dict[int, torch.Tensor] = {}
                    before = batcher.batch_sizes[len(members)]

                    async def one(i: int) -> None:
                        outs[i] = await sessions[i]["s"].step(xs[i])

                    async with trio.open_nursery() as nursery:
                        async with peers[0].compute_limiter:
                            for i in members:
                                nursery.start_soon(one, i)
                            await batcher.wait_until_waiting(len(members))
                    assert batcher.batch_sizes[len(members)] == before + 1
                    with torch.inference_mode():
                        for i in members:
                            torch.testing.assert_close(outs[i], local(xs[i], caches[i]), **TOL)

                for i, n in enumerate((2, 5, 3)):
                    await open_one(i, n)
                await batched_round([0, 1, 2])
                sessions[1]["done"].set()  # session 1 leaves
                await peers[0].server.open_sessions.wait_value(2)
                await open_one(3, 6)  # session 3 joins, its cache longer than the others'
                await batched_round([0, 2, 3])
                await batched_round([0, 2, 3])
                # visible: the server's record (what `swarm-node status` and the map show)
                record = decode_record(encode_record(peers[0].make_record("ONLINE", 60.0)))
                # (the largest batch of the last 60 s: 3 here, or 4 if the generations above met)
                assert record.sessions == 3 and record.batch == batcher.max_batch >= 3
                report = coverage_report([record], model=model, num_blocks=6, rtt={})
                text = f"3 session(s), decode batch up to {record.batch}"
                assert text in format_report(report)
                for box in sessions.values():
                    box["done"].set()


async def test_one_sessions_failure_and_recovery_leave_the_others_alone(tiny_llama: Path) -> None:
    """Three sessions at once; the server stream of one breaks mid-generation (server side): it
    recovers onto the spare server, and every session's tokens are transformers'."""
    model = tiny_llama.name
    reference = reference_model(tiny_llama)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    torch.manual_seed(8)
    prompts = [torch.randint(0, 256, (1, n)) for n in (5, 8, 6)]  # max_length 17 marks session 1
    expected = [
        reference.generate(p, max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)
        for p in prompts
    ]
    got: dict[int, list[list[int]]] = {}
    third_token = trio.Event()
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6), (3, 6)], client=FAST) as (
            peers,
            client,
        ):

            async def generate(i: int) -> None:
                count = [0]

                def on_tokens(_: torch.Tensor) -> None:
                    count[0] += 1
                    if i == 1 and count[0] == 3:
                        third_token.set()

                settings = SessionSettings(model=model, num_blocks=6)
                ids, _ = await generate_tokens(
                    client,
                    head,
                    prompts[i],
                    settings,
                    SamplingConfig(max_new_tokens=9),
                    on_tokens=on_tokens,
                )
                got[i] = ids.tolist()

            async def break_session_1() -> None:
                await third_token.wait()
                for peer in peers[1:]:
                    for session in list(peer.server.sessions.values()):
                        if session.rules.max_length == 17:
                            await session.conn.reset()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(break_session_1)
                for i in range(3):
                    nursery.start_soon(generate, i)
    assert [got[i] for i in range(3)] == [e.tolist() for e in expected]


async def test_sessions_with_deep_prompts_stay_out_of_batches(tiny_llama: Path) -> None:
    """A session with deep prompts runs its decode steps alone (its inputs differ per session);
    two plain sessions beside it batch; every output is its lone forward's."""
    model = tiny_llama.name
    local = BlockSpan.load(Checkpoint.open(tiny_llama), 0, 6)
    gen = torch.Generator().manual_seed(11)
    deep = torch.randn(6, 2, H, generator=gen) * 0.3
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 6)]) as (peers, client):
            batcher = peers[0].server.batcher
            (record,) = await client.find_servers(model, 6)
            chain = [Hop(record, 0, 6)]
            settings = SessionSettings(model=model, max_length=16)
            async with (
                client.inference_session(chain, settings, HopTuning(prompts=deep)) as tuned,
                client.inference_session(chain, settings) as q,
                client.inference_session(chain, settings) as r,
            ):
                sessions = {"tuned": tuned, "q": q, "r": r}
                caches = {name: local.new_cache(16) for name in sessions}
                prompts = {"tuned": deep}
                with torch.inference_mode():
                    for name, session in sessions.items():
                        x = torch.randn(1, 3, H, generator=gen)
                        local(x, caches[name], prompts=prompts.get(name))
                        await session.step(x)
                xs = {name: torch.randn(1, 1, H, generator=gen) for name in sessions}
                outs: dict[str, torch.Tensor] = {}

                async def one(name: str) -> None:
                    outs[name] = await sessions[name].step(xs[name])

                async with trio.open_nursery() as nursery:
                    async with peers[0].compute_limiter:
                        for name in sessions:
                            nursery.start_soon(one, name)
                        await batcher.wait_until_waiting(2)
    assert sum(n * count for n, count in batcher.batch_sizes.items()) == 2  # q's and r's steps
    assert batcher.batch_sizes[2] == 1
    with torch.inference_mode():
        for name in sessions:
            want = local(xs[name], caches[name], prompts=prompts.get(name))
            torch.testing.assert_close(outs[name], want, **TOL)
