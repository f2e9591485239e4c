"""The client's head, batched across sessions: the norm + LM head of decode steps that several
sessions of one process (an API serving many requests, many `generate` calls) reach while the head
is busy run as one matmul over all their rows; each session then samples its own token (its own
settings, generator and repetition penalty) and embeds it.

A lone session runs its head at once, as before (inline while quick, no settling); while several
sessions decode, a batch forms from the sessions whose answers arrived while the head computed or
while its leader let the loop settle (node/batch_queue.py). A row's logits
are its lone ones within float tolerance (a linear over N rows may round unlike one over one row).

Knows nothing of chains, servers or text.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from swarm_node.node.batch_queue import BatchJob, BatchQueue
from swarm_node.node.quick_jobs import CLIENT_MAX_INLINE_S

# logits (B, V) -> (token (B,), the token's embedding (B, 1, H))
Pick = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False, slots=True, kw_only=True)
class HeadJob(BatchJob):
    hidden: torch.Tensor  # (B, 1, H): a session's last position
    pick: Pick


class HeadBatcher(BatchQueue[HeadJob]):
    """One client head's decode steps, several sessions' at once when they wait together."""

    def __init__(self, head: Any, *, max_inline_s: float = CLIENT_MAX_INLINE_S) -> None:
        # a leader lets the loop settle only while other sessions decode; it computes where a lone
        # head would (a second thread's OpenMP team would spin beside the loop's: with the client
        # at torch's default threads, 2 sessions ran at half one session's aggregate tokens/s)
        super().__init__(
            self._compute,
            max_inline_s=max_inline_s,
            users=lambda: self.decoding,
            off_loop_when_crowded=False,
        )
        self.head = head  # model.ClientHead
        self.decoding = 0  # sessions decoding through this head now

    @contextmanager
    def using(self) -> Iterator[object]:
        """While a session decodes: yields its ``user`` for ``next_token``."""
        self.decoding += 1
        try:
            yield object()
        finally:
            self.decoding -= 1

    async def next_token(
        self, hidden: torch.Tensor, pick: Pick, *, user: Hashable = None
    ) -> tuple[torch.Tensor, Any]:
        """``pick(logits # (B, V))`` of a session's last hidden state ``# (B, 1, H)``."""
        return await self.submit(HeadJob(hidden=hidden, pick=pick, user=user))

    def _compute(self, batch: list[HeadJob]) -> None:
        with torch.inference_mode():
            try:
                hidden = torch.cat([job.hidden for job in batch])  # (N, 1, H)
                head = self.head.logits if hidden.shape[0] == 1 else self.head.batch_logits
                logits = head(hidden)[:, -1, :].float().cpu()  # (N, V), sampled on the host
            except Exception as exc:  # noqa: BLE001 (handed to each session's own caller)
                for job in batch:
                    job.error = exc
                return
            rows = logits.split([job.hidden.shape[0] for job in batch])
            for job, row in zip(batch, rows, strict=True):
                try:
                    job.out = job.pick(row)
                except Exception as exc:  # noqa: BLE001 (handed to the session's own caller)
                    job.error = exc


_BATCHERS: weakref.WeakKeyDictionary[Any, HeadBatcher] = weakref.WeakKeyDictionary()


def head_batcher(head: Any) -> HeadBatcher:
    """The batcher every session of this process shares for ``head``."""
    batcher = _BATCHERS.get(head)
    if batcher is None:
        batcher = _BATCHERS[head] = HeadBatcher(head)
    return batcher
