"""Continuous batching of decode steps: the steps of different sessions that arrive while the server
computes are computed together in its next forward.

No window is waited for: a step that finds nothing being computed (a lone client) runs at once, alone,
on the same path as without batching. Steps that arrive while a computation runs (or waits for the
compute limiter behind a prefill chunk or a training request) queue; the first of them leads: once it
holds the limiter it lets the loop finish the work it has (the steps already received but still a few
task hops from here: trio's "all tasks blocked", at most MAX_SETTLE_S), takes every queued step and
runs them as one `BlockSpan.forward_batch` (grouped by
sub-span; each session keeps its own cache, so they may have any lengths and join or leave between
any two steps). A step cancelled while it waits leaves the queue; one already taken is computed and
its answer dropped. Steps of sessions with deep prompts or a LoRA (a server adapter or the client's
own) are never given to the batcher: they change the weights or inputs per session, so they run
alone (block_server.py decides).

Knows nothing of the wire, rules or budgets: a session's cache is what it always was.
"""

from __future__ import annotations

import functools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
import trio.testing

from swarm_node.node.quick_jobs import QuickJobs

# at most this long a leader lets the loop finish what it has (a loop that is never idle, e.g. an
# application's busy task beside the peer, must not hold a step longer)
MAX_SETTLE_S = 0.002
BATCH_WINDOW_S = 60.0  # `batch_lately` looks this far back


@dataclass(eq=False, slots=True)
class DecodeJob:
    hidden: torch.Tensor  # (B, 1, H)
    cache: Any  # model.SpanCache
    start: int
    end: int
    out: torch.Tensor | None = None
    error: BaseException | None = None
    handed: bool = False  # made the next leader
    led: bool = False
    woken: trio.Event = field(default_factory=trio.Event)

    @property
    def finished(self) -> bool:
        return self.out is not None or self.error is not None

    def result(self) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        if self.out is None:  # our invariant: a leader finishes every job it took
            raise AssertionError("a decode job left its batch without an answer")
        return self.out


class DecodeBatcher:
    """Runs decode steps of a span, several sessions' at once when they wait together."""

    def __init__(
        self,
        span: Any,
        limiter: trio.CapacityLimiter,
        *,
        max_inline_s: float,
        enabled: bool,
        alone: Callable[[torch.Tensor, Any, int, int], torch.Tensor] | None = None,
    ) -> None:
        self.span = span  # model.BlockSpan
        # a step computed by itself: (hidden, cache, start, end) -> output; default span.forward
        self.alone = alone or (lambda h, c, s, e: span.forward(h, c, start=s, end=e))
        self.limiter = limiter
        self.enabled = enabled  # False: every step runs alone (--no-batching)
        self.quick_jobs = QuickJobs(max_inline_s)  # the limiter is held around its runs
        self.pending: list[DecodeJob] = []
        self.leading = False
        self.batch_sizes: Counter[int] = Counter()  # sessions per forward -> forwards
        self.last_batch = 0  # sessions in the latest forward
        self.max_batch = 0
        self.recent: deque[tuple[float, int]] = deque(maxlen=1024)  # (trio time, sessions)

    def batch_lately(self, now: float, window: float = BATCH_WINDOW_S) -> int:
        """The most sessions one forward computed in the last ``window`` s (0: no step)."""
        return max((n for t, n in self.recent if t >= now - window), default=0)

    @property
    def waiting(self) -> int:
        return len(self.pending)

    async def step(self, hidden: torch.Tensor, cache: Any, *, start: int, end: int) -> torch.Tensor:
        """The span's output for one new position of one session; its cache grows by one."""
        job = DecodeJob(hidden=hidden, cache=cache, start=start, end=end)
        self.pending.append(job)
        try:
            if self.leading:
                await job.woken.wait()  # computed in a leader's batch, or handed the lead
            if not job.finished:
                await self._lead(job)
        finally:
            if job in self.pending:  # cancelled before any batch took it
                self.pending.remove(job)
            if job.handed and not job.led:  # cancelled after it was handed the lead
                self._pass_lead()
        return job.result()

    async def _lead(self, job: DecodeJob) -> None:
        job.led = True
        self.leading = True
        batch: list[DecodeJob] = []
        try:
            async with self.limiter:
                if self.enabled:
                    with trio.move_on_after(MAX_SETTLE_S):
                        # the steps already received (a stream's bytes take a few task hops to
                        # become a step here) join: no time window, only the loop's pending work
                        await trio.testing.wait_all_tasks_blocked()
                    batch, self.pending = self.pending, []
                else:
                    batch = [job]
                    self.pending.remove(job)
                run = functools.partial(self._compute, batch)
                await self.quick_jobs.run(run, small=True)
                self.recent.append((trio.current_time(), len(batch)))
        finally:
            if job in self.pending:  # cancelled before it held the limiter: not the next leader
                self.pending.remove(job)
            for taken in batch:
                if not taken.finished:
                    taken.error = RuntimeError("the batch of this step did not complete")
                taken.woken.set()
            self._pass_lead()

    def _pass_lead(self) -> None:
        if self.pending:
            nxt = self.pending[0]
            nxt.handed = True
            nxt.woken.set()
        else:
            self.leading = False

    def _compute(self, batch: list[DecodeJob]) -> None:
        """Every job's output, one forward per sub-span (in a worker thread or inline)."""
        self.last_batch = len(batch)
        self.max_batch = max(self.max_batch, len(batch))
        self.batch_sizes[len(batch)] += 1
        groups: dict[tuple[int, int], list[DecodeJob]] = {}
        for job in batch:
            groups.setdefault((job.start, job.end), []).append(job)
        for (start, end), jobs in groups.items():
            try:
                if len(jobs) == 1:
                    outs = [self.alone(jobs[0].hidden, jobs[0].cache, start, end)]
                else:
                    outs = self.span.forward_batch(
                        [j.hidden for j in jobs], [j.cache for j in jobs], start=start, end=end
                    )
            except Exception as exc:  # noqa: BLE001 (handed to each step's own caller)
                for j in jobs:
                    j.error = exc
                continue
            for j, out in zip(jobs, outs, strict=True):
                j.out = out
