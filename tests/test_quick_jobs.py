"""QuickJobs: small quick jobs on the loop's thread, the rest in workers; decode steps inline in a swarm."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import trio
import trio.testing

from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from swarm_node.node.quick_jobs import QuickJobs
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm


def where() -> int:
    return threading.get_ident()


async def test_the_first_job_goes_to_a_thread_then_quick_ones_run_inline() -> None:
    jobs = QuickJobs(1.0)
    loop = threading.get_ident()
    with trio.fail_after(10):
        assert not jobs.inline
        assert await jobs.run(where) != loop  # nothing known yet: a worker thread
        assert jobs.inline
        assert [await jobs.run(where) for _ in range(3)] == [loop] * 3
    assert (jobs.thread_runs, jobs.inline_runs) == (1, 3)


async def test_a_slow_job_sends_the_next_ones_to_a_thread_and_quick_ones_bring_them_back() -> None:
    jobs = QuickJobs(0.004)
    loop = threading.get_ident()
    with trio.fail_after(10):
        await jobs.run(lambda: None)
        assert await jobs.run(lambda: time.sleep(0.02) or where()) == loop  # it was quick so far
        assert jobs.recent >= 0.02 and not jobs.inline
        threads = 0
        while await jobs.run(where) != loop:  # each quick job lowers the estimate: 0.02 * 0.7**k
            threads += 1
            assert threads <= 20
        assert threads >= 3  # 0.02 * 0.7**3 = 0.0069 > 0.004: not at once


async def test_jobs_not_called_small_always_take_a_thread_and_do_not_count() -> None:
    jobs = QuickJobs(1.0)
    loop = threading.get_ident()
    with trio.fail_after(10):
        await jobs.run(lambda: None)
        assert await jobs.run(lambda: time.sleep(0.01) or where(), small=False) != loop
        assert jobs.recent is not None and jobs.recent < 0.01
        assert await jobs.run(where) == loop


async def test_inline_jobs_wait_for_the_limiter_and_errors_come_out() -> None:
    limiter = trio.CapacityLimiter(1)
    jobs = QuickJobs(1.0, limiter)
    ran: list[str] = []
    with trio.fail_after(10):
        await jobs.run(lambda: None)
        async with trio.open_nursery() as nursery:
            await limiter.acquire()  # someone else computes
            nursery.start_soon(jobs.run, lambda: ran.append("inline"))
            await trio.testing.wait_all_tasks_blocked()
            assert ran == []
            limiter.release()
        assert ran == ["inline"] and jobs.inline_runs == 1
        with pytest.raises(ZeroDivisionError):
            await jobs.run(lambda: 1 / 0)
        assert limiter.borrowed_tokens == 0


async def test_a_cancelled_caller_does_not_run_the_job() -> None:
    jobs = QuickJobs(1.0)
    ran: list[int] = []
    with trio.fail_after(10):
        await jobs.run(lambda: None)
        with trio.CancelScope() as scope:
            scope.cancel()
            await jobs.run(lambda: ran.append(1))
    assert scope.cancelled_caught and ran == []


def test_a_negative_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="'max_inline_s' must be >= 0 seconds, got -1"):
        QuickJobs(-1)


@pytest.mark.parametrize("push", [False, True])
async def test_decode_steps_run_inline_in_a_swarm_and_give_transformers_tokens(
    tiny_llama: Path, push: bool
) -> None:
    torch.manual_seed(3)
    input_ids = torch.randint(0, 256, (1, 5))
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    new_tokens = 8
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)], client=ClientConfig(push=push)) as (
            peers,
            client,
        ):
            ids, _ = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                SamplingConfig(max_new_tokens=new_tokens),
            )
            # prefills run through the server's QuickJobs, decode steps through its batcher's
            jobs = [(p.server.quick_jobs, p.server.batcher.quick_jobs) for p in peers]
            runs = [(a.thread_runs + b.thread_runs, a.inline_runs + b.inline_runs) for a, b in jobs]
    expected = reference_model(tiny_llama).generate(
        input_ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert ids.tolist() == expected.tolist()
    # the prefill and the first decode step in a thread, the other 6 decode steps inline
    assert runs == [(2, new_tokens - 2)] * 2
