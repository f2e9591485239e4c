"""Speculative decoding for one generation: what to draft before a step and what the step accepts.

The decode loop (generation.py) asks ``drafts`` for tokens to send after the last one, runs them
through the chain in one step (every server computes all k + 1 positions with its cache), then asks
``verify`` which tokens to emit (model/speculation.py's rule: the same tokens as plain greedy
decoding, or exactly its distribution when sampling) and rolls the servers back to them
(``InferenceSession.truncate``). The head over k + 1 positions runs as the plain head does: on the
event loop while it is quick, else in a worker thread (quick_jobs.py), as one matrix product
(ClientHead.verify_logits) whose greedy near ties are decided by the plain head's row. Knows nothing
of streams or servers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import trio

from swarm_node.model.speculation import accept_drafts
from swarm_node.node.client.drafting import Drafter, DraftLength, DraftModel, PromptLookup
from swarm_node.node.quick_jobs import CLIENT_MAX_INLINE_S, QuickJobs


@dataclass(kw_only=True)
class Speculation:
    """A drafter and its adaptive draft length, for one generation (they keep state)."""

    drafter: Drafter = field(default_factory=PromptLookup)
    length: DraftLength = field(default_factory=DraftLength)
    jobs: QuickJobs = field(default_factory=lambda: QuickJobs(CLIENT_MAX_INLINE_S))

    @classmethod
    def of(
        cls, *, draft_model: Any = None, num_tokens: int = 10, adaptive: bool = True
    ) -> Speculation:
        """Prompt lookup, or ``draft_model`` (a DraftModel, or a transformers causal LM)."""
        if draft_model is None:
            drafter: Drafter = PromptLookup()
        elif isinstance(draft_model, DraftModel):
            drafter = draft_model
        else:
            drafter = DraftModel(draft_model)
        return cls(drafter=drafter, length=DraftLength(max_tokens=num_tokens, adaptive=adaptive))

    async def drafts(self, ids: torch.Tensor, room: int) -> list[int]:
        """Draft tokens to follow ``ids`` ``# (n,)``, at most ``room`` (none: a plain step)."""
        tokens = ids.tolist()
        if isinstance(self.drafter, PromptLookup):
            return self.lookup(self.drafter, tokens, room)
        k = self.length.next(room)
        if k < 1:
            return []
        return (await trio.to_thread.run_sync(self.drafter.draft, tokens, k))[:k]

    def lookup(self, drafter: PromptLookup, tokens: list[int], room: int) -> list[int]:
        """Prompt lookup's drafts, as many as its match's kind of evidence says pay."""
        found = drafter.match(tokens)
        if found is None:
            return []
        k = self.length.next(room, found.kind)
        return tokens[found.start : found.start + k]

    async def verify(
        self,
        head: Any,
        out: torch.Tensor,
        seen: torch.Tensor,
        drafts: list[int],
        sampling: Any,
        generator: torch.Generator | None,
    ) -> tuple[list[int], torch.Tensor]:
        """The tokens a verification step emits, from the chain's output ``out`` ``# (1, T, H)``
        whose last k + 1 positions follow ``seen`` ``# (n,)`` and each draft, and the next step's
        input ``# (1, 1, H)``: the last of them, embedded."""
        job = partial(self.accept, head, out, seen, drafts, sampling, generator)
        return await self.jobs.run(job)

    @staticmethod
    def accept(
        head: Any,
        out: torch.Tensor,
        seen: torch.Tensor,
        drafts: list[int],
        sampling: Any,
        generator: torch.Generator | None,
    ) -> tuple[list[int], torch.Tensor]:
        k = len(drafts)
        rows = out[:, -(k + 1) :, :]  # (1, k + 1, H)
        logits, bound = head.verify_logits(rows)  # (k + 1, V), (k + 1,) or None
        tokens = accept_drafts(
            logits.float().cpu(),
            drafts,
            seen,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty,
            generator=generator,
            bound=None if bound is None else bound.cpu(),
            exact_row=lambda j: head.row_logits(rows, j).float().cpu(),
        )
        with torch.inference_mode():
            return tokens, head.embed(torch.tensor([[tokens[-1]]]))
