"""Continuous batching without a window: jobs that arrive while a batch computes run together next.

A job that finds nothing computing while its user is the only one (a lone user) runs at once,
alone. Jobs that arrive while a batch computes (or waits for the limiter) queue; the first of them
leads: once it holds the limiter it gathers (``_gather``): it lets the loop finish the work it has
(jobs already received but still a few task hops from here: trio's "all tasks blocked", at most
``MAX_SETTLE_S``), then waits for the users whose next job is due soon: each user's jobs come at
a rhythm (a session's steps go round its chain), so a user whose job is expected within about one
batch's compute (never more than ``MAX_GATHER_S``) and not long overdue is waited for, as long as
jobs keep coming (each within ``GATHER_GAP_S`` of the one before: a due session may be held in
another server's or the client's gathering), and one that went quiet is not. Without this, the jobs of sessions that move through a
chain together reach a server one message apart and split into batches of one or two: every
split costs nearly a whole forward. The leader then takes every queued job and hands the list to
``compute``, which sets each job's ``out`` or ``error``. While ``users()`` says other users may
submit (a server with several sessions), the leader (``off_loop_when_crowded``) computes in a
worker thread, so the loop goes on receiving the jobs that will form the next batch; a lone
user's job skips the gathering and runs inline while such jobs are quick (node/quick_jobs.py): a
thread hop costs it ~0.5 ms. A job cancelled while it waits leaves the queue; one already taken is
computed and its answer dropped. The server batches its sessions' decode steps this way
(server/batching.py), the client its sessions' heads (client/head_batching.py).

Knows nothing of models, sessions or peers.
"""

from __future__ import annotations

import functools
from collections import Counter, deque
from collections.abc import Callable, Hashable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from swarm_node.node.quick_jobs import QuickJobs

# at most this long a leader lets the loop finish what it has (a loop that is never idle, e.g. an
# application's busy task beside the peer, must not hold a job longer)
MAX_SETTLE_S = 0.002
# a crowded leader waits for the jobs due within one batch's compute and this (at most MAX_GATHER_S)
MIN_GATHER_S = 0.003
MAX_GATHER_S = 0.25
GATHER_GAP_S = 0.004  # and while each job comes at most this long after the one before
BATCH_WINDOW_S = 60.0  # `batch_lately` looks this far back
MAX_RHYTHMS = 1024  # users whose rhythm is kept (quiet ones are forgotten first)


@dataclass(eq=False, slots=True, kw_only=True)
class BatchJob:
    user: Hashable = None  # whose job (a session): its rhythm tells when its next one is due
    out: Any = None
    error: BaseException | None = None
    handed: bool = False  # made the next leader
    led: bool = False
    woken: trio.Event = field(default_factory=trio.Event)

    @property
    def finished(self) -> bool:
        return self.out is not None or self.error is not None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        if self.out is None:  # our invariant: a leader finishes every job it took
            raise AssertionError("a job left its batch without an answer")
        return self.out


J = TypeVar("J", bound=BatchJob)


@dataclass(slots=True)
class Rhythm:
    """When a user's jobs came: the last one and the smoothed interval between them."""

    last: float
    period: float | None = None

    def arrived(self, now: float) -> None:
        gap = now - self.last
        self.period = gap if self.period is None else 0.7 * self.period + 0.3 * gap
        self.last = now

    def due(self, now: float, until: float) -> bool | None:
        """Whether the next job is due by ``until``; None: quiet for four intervals (forget it)."""
        if self.period is None:
            return False
        due = self.last + self.period
        if due < now - 4 * self.period:
            return None
        return now - self.period / 2 <= due <= until  # overdue by half an interval: gone quiet


class BatchQueue(Generic[J]):
    """Runs ``compute(jobs)`` for jobs submitted by many tasks, together when they wait together."""

    def __init__(
        self,
        compute: Callable[[list[J]], None],
        *,
        max_inline_s: float,
        limiter: trio.CapacityLimiter | None = None,
        enabled: bool = True,
        users: Callable[[], int] = lambda: 2,
        off_loop_when_crowded: bool = True,
    ) -> None:
        self.compute = compute  # sets every job's out or error (in a worker thread or inline)
        self.limiter = limiter
        self.enabled = enabled  # False: every job runs alone
        self.users = users  # how many users (sessions) may submit jobs now, this one's included
        self.off_loop_when_crowded = off_loop_when_crowded
        self.quick_jobs = QuickJobs(max_inline_s)  # the limiter is held around its runs
        self.pending: list[J] = []
        self.leading = False
        self.batch_sizes: Counter[int] = Counter()  # jobs per compute -> computes
        self.last_batch = 0
        self.max_batch = 0
        self.recent: deque[tuple[float, int]] = deque(maxlen=1024)  # (trio time, jobs)
        self.rhythms: dict[Hashable, Rhythm] = {}
        self.compute_s = 0.0  # a batch's compute lately (smoothed), which bounds the gathering
        self._changed = trio.Event()  # set, and replaced, whenever the queue changes

    def batch_lately(self, now: float, window: float = BATCH_WINDOW_S) -> int:
        """The most jobs one compute took in the last ``window`` s (0: none)."""
        return max((n for t, n in self.recent if t >= now - window), default=0)

    @property
    def waiting(self) -> int:
        return len(self.pending)

    async def wait_until_waiting(self, n: int) -> None:
        """Return once exactly ``n`` jobs wait (a busy limiter holds them)."""
        while len(self.pending) != n:
            await self._changed.wait()

    def _queue_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def submit(self, job: J) -> Any:
        """``job``'s result, computed alone or in a batch."""
        if job.user is not None:
            self._arrived(job.user, trio.current_time())
        self.pending.append(job)
        self._queue_changed()
        try:
            if self.leading:
                await job.woken.wait()  # computed in a leader's batch, or handed the lead
            if not job.finished:
                await self._lead(job)
        finally:
            if job in self.pending:  # cancelled before any batch took it
                self._remove(job)
            if job.handed and not job.led:  # cancelled after it was handed the lead
                self._pass_lead()
        return job.result()

    def _arrived(self, user: Hashable, now: float) -> None:
        rhythm = self.rhythms.get(user)
        if rhythm is not None:
            rhythm.arrived(now)
            return
        if len(self.rhythms) >= MAX_RHYTHMS:
            self._due(now, now)  # forgets the quiet ones
            while len(self.rhythms) >= MAX_RHYTHMS:
                del self.rhythms[next(iter(self.rhythms))]  # the one seen first
        self.rhythms[user] = Rhythm(now)

    def _remove(self, job: J) -> None:
        self.pending.remove(job)
        self._queue_changed()

    async def _lead(self, job: J) -> None:
        job.led = True
        self.leading = True
        batch: list[J] = []
        limiter: AbstractAsyncContextManager[Any] = self.limiter or nullcontext()
        try:
            async with limiter:
                crowded = self.enabled and self.users() > 1
                if self.enabled:
                    if crowded:
                        await self._gather()
                    batch, self.pending = self.pending, []
                else:
                    batch = [job]
                    self.pending.remove(job)
                self._queue_changed()
                self.last_batch = len(batch)
                self.max_batch = max(self.max_batch, len(batch))
                self.batch_sizes[len(batch)] += 1
                run = functools.partial(self.compute, batch)
                started = trio.current_time()
                await self.quick_jobs.run(run, small=not (crowded and self.off_loop_when_crowded))
                took = trio.current_time() - started
                self.compute_s = took if not self.compute_s else 0.8 * self.compute_s + 0.2 * took
                self.recent.append((trio.current_time(), len(batch)))
        finally:
            if job in self.pending:  # cancelled before it held the limiter: not the next leader
                self._remove(job)
            for taken in batch:
                if not taken.finished:
                    taken.error = RuntimeError("the batch of this job did not complete")
                taken.woken.set()
            self._pass_lead()

    async def _gather(self) -> None:
        """Let the jobs on their way join the batch: those already received, then those of the
        users due within about one batch's compute (see the module's docstring)."""
        # imported where first needed: trio.testing imports pytest where it is installed (0.07 s
        # of every cold client; servers import it at start: server/batching.py)
        import trio.testing

        with trio.move_on_after(MAX_SETTLE_S):
            # a stream's bytes take a few task hops to become a job here: the loop's pending work
            await trio.testing.wait_all_tasks_blocked()
        now = trio.current_time()
        deadline = now + min(MAX_GATHER_S, self.compute_s + MIN_GATHER_S)
        while self._due(now, deadline):
            # a due session held elsewhere (in another server's or the client's gathering) must not
            # hold this batch: wait only while jobs keep coming, each within GATHER_GAP_S
            with trio.move_on_at(min(deadline, now + GATHER_GAP_S)) as waited:
                await self._changed.wait()
            now = trio.current_time()
            if waited.cancelled_caught:
                return

    def _due(self, now: float, until: float) -> bool:
        """Whether a user not waiting now has a job due by ``until``."""
        waiting = {job.user for job in self.pending}
        due = False
        for user, rhythm in list(self.rhythms.items()):
            soon = rhythm.due(now, until)
            if soon is None:
                del self.rhythms[user]
            elif soon and user not in waiting:
                due = True
        return due

    def _pass_lead(self) -> None:
        if self.pending:
            nxt = self.pending[0]
            nxt.handed = True
            nxt.woken.set()
        else:
            self.leading = False
