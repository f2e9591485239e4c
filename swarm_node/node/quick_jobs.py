"""Where a small synchronous torch job runs: on the event loop's own thread while such jobs have been
quick, else in trio's worker threads.

A hand-off to a worker thread and back costs two thread wake-ups, 0.2-0.8 ms each on these VMs.
Through a 2-server push chain at 50 ms one way (scripts/trace_token.py), a token's six hand-offs
(a step on each server, the client's head) took ~2.5 ms of its ~230 ms, as much as the push
target's whole margin. A decode step of a small span (SmolLM2, 15 blocks: ~25 ms) or a small head
(~10 ms) is short enough to run on the loop itself: the loop is then busy for that long, which
delays other tasks' network I/O by as much, while the steps themselves are computed one at a time
anyway (under the compute limiter). A ``QuickJobs`` runner times the jobs it is given and runs them
inline only while the recent ones took at most ``max_inline_s``; the first job, a slow one, and
every job its caller does not call small (a prefill, a training step) go to a worker thread.

``off_loop`` does the same for a tensor's encode or decode by its size: past ``OFF_LOOP_BYTES`` it
goes to a worker thread (without the compute limiter: it is not the model's work), below it stays
inline. Measured here (2 shared cores): a thread hop ~0.06 ms idle, 0.2-0.8 ms busy; decoding 256 KB
0.01-0.2 ms and 1 MB 0.05-4 ms depending on the codec (none, float16, blockwise8), 4 MB 0.2-7 ms, so
below 1 MB the hop costs as much as the work, and above it a big tensor would stall the loop for ms.

Knows nothing of models or peers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import TypeVar

import trio

T = TypeVar("T")

# a server's decode step: its loop answers pings and DHT queries meanwhile
SERVER_MAX_INLINE_S = 0.1
CLIENT_MAX_INLINE_S = 0.025  # a client's head and sampling: the loop may be an application's
OFF_LOOP_BYTES = 1 << 20  # encodes and decodes of tensors this big or bigger run in a worker thread


async def off_loop(fn: Callable[[], T], nbytes: int) -> T:
    """``fn()``, a codec's work on ``nbytes`` of tensor: in a worker thread when that is big."""
    if nbytes < OFF_LOOP_BYTES:
        return fn()
    return await trio.to_thread.run_sync(fn)


class QuickJobs:
    """Runs small jobs inline while they stay quick; everything else in a worker thread."""

    def __init__(self, max_inline_s: float, limiter: trio.CapacityLimiter | None = None) -> None:
        if not max_inline_s >= 0:
            raise ValueError(f"'max_inline_s' must be >= 0 seconds, got {max_inline_s}")
        self.max_inline_s = max_inline_s
        self.limiter = limiter
        # seconds a small job took lately (slow ones count at once)
        self.recent: float | None = None
        self.inline_runs = 0
        self.thread_runs = 0

    @property
    def inline(self) -> bool:
        """Whether the next small job runs on the loop's thread."""
        return self.recent is not None and self.recent <= self.max_inline_s

    async def run(self, fn: Callable[[], T], *, small: bool = True) -> T:
        """``fn()``, under the limiter, inline when ``small`` and recent small jobs were quick."""
        if not (small and self.inline):
            self.thread_runs += 1
            return await trio.to_thread.run_sync(self._timed(fn, small), limiter=self.limiter)
        self.inline_runs += 1
        limiter: AbstractAsyncContextManager[object] = (
            self.limiter if self.limiter is not None else nullcontext()
        )
        async with limiter:
            await trio.lowlevel.checkpoint()  # a cancellation point, as entering a thread is
            return self._timed(fn, small)()

    def _timed(self, fn: Callable[[], T], small: bool) -> Callable[[], T]:
        def timed() -> T:
            start = time.perf_counter()
            try:
                return fn()
            finally:
                if small:
                    self._record(time.perf_counter() - start)

        return timed

    def _record(self, seconds: float) -> None:
        # A slow job moves the next ones to a thread at once; quick ones bring them back gradually.
        if self.recent is None or seconds >= self.recent:
            self.recent = seconds
        else:
            self.recent = 0.7 * self.recent + 0.3 * seconds
