"""Continuous batching of decode steps: the steps of different sessions that arrive while the server
computes are computed together in its next forward.

No window is waited for: a step that finds nothing being computed (a lone client) runs at once, alone,
on the same path as without batching. Steps that arrive while a computation runs (or waits for the
compute limiter behind a prefill chunk or a training request) queue and run as one
`BlockSpan.forward_batch` (node/batch_queue.py has the queue's rules), grouped by sub-span; each
session keeps its own cache, so they may have any lengths and join or leave between any two steps.
Steps of sessions with deep prompts or a LoRA (a server adapter or the client's own) are never given
to the batcher: they change the weights or inputs per session, so they run alone (block_server.py
decides).

Knows nothing of the wire, rules or budgets: a session's cache is what it always was.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
import trio
import trio.testing  # noqa: F401 (node/batch_queue.py's gathering: imported at start, not mid-batch)

from swarm_node.node.batch_queue import BatchJob, BatchQueue


@dataclass(eq=False, slots=True, kw_only=True)
class DecodeJob(BatchJob):
    hidden: torch.Tensor  # (B, 1, H)
    cache: Any  # model.SpanCache
    start: int
    end: int


class DecodeBatcher(BatchQueue[DecodeJob]):
    """Runs decode steps of a span, several sessions' at once when they wait together."""

    def __init__(
        self,
        span: Any,
        limiter: trio.CapacityLimiter,
        *,
        max_inline_s: float,
        enabled: bool,
        alone: Callable[[torch.Tensor, Any, int, int], torch.Tensor] | None = None,
        users: Callable[[], int] = lambda: 2,
    ) -> None:
        super().__init__(
            self._compute,
            max_inline_s=max_inline_s,
            limiter=limiter,
            enabled=enabled,
            users=users,  # how many sessions may send decode steps (see BatchQueue)
        )
        self.span = span  # model.BlockSpan
        # a step computed by itself: (hidden, cache, start, end) -> output; default span.forward
        self.alone = alone or (lambda h, c, s, e: span.forward(h, c, start=s, end=e))

    async def step(
        self, hidden: torch.Tensor, cache: Any, *, start: int, end: int, user: Hashable = None
    ) -> torch.Tensor:
        """The span's output for one new position of one session (``user``: its id); its cache
        grows by one."""
        job = DecodeJob(hidden=hidden, cache=cache, start=start, end=end, user=user)
        return await self.submit(job)

    def _compute(self, batch: list[DecodeJob]) -> None:
        """Every job's output, one forward per sub-span (in a worker thread or inline)."""
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
