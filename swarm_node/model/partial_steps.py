"""A long step through a span computed a few blocks at a time, so that other sessions' steps can run
on the span between two parts (a server's prefill chunk gives way to decode steps waiting).

`PartialStep.begin` checks the step as `BlockSpan.forward` does; each `run` computes blocks until the
step is done or ``give_way()``, asked after every block, says others wait (at least one block a
call); `hidden` is the step's output once `run` returned True. Every part gives its layers the masks
and positions the whole forward gives them (made once, before the first layer's cache grows), so
the output and the cache are the forward's, bit for bit; the cache's length grows by T with the
last block. Between parts the cache holds the new positions in its first layers only: nothing but
the next part may use it (a step cut off there leaves it unusable, as a forward failing midway does).

Knows nothing of servers, sessions, threads or limiters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from swarm_node.model.kv_cache import SpanCache
from swarm_node.model.lora import LoraWeights, lora_applied
from swarm_node.model.span import BlockSpan


@dataclass(eq=False, slots=True, kw_only=True)
class PartialStep:
    """One session's step of new positions through blocks ``first..stop-1`` of ``span`` (indices in
    the span), computed part by part."""

    span: BlockSpan
    cache: SpanCache
    hidden: torch.Tensor  # (B, T, H): the input, then the output of the blocks run so far
    past: int  # positions the cache held before the step
    first: int
    stop: int
    next: int  # the next block to run
    prompts: torch.Tensor | None = None
    lora: LoraWeights | None = None
    inputs: dict[str, Any] | None = None  # the layers' masks and positions, made by the first part

    @classmethod
    def begin(
        cls,
        span: BlockSpan,
        hidden: torch.Tensor,
        cache: SpanCache,
        *,
        start: int,
        end: int,
        prompts: torch.Tensor | None = None,
        lora: LoraWeights | None = None,
    ) -> PartialStep:
        """The step of ``hidden`` `# (B, T, H)` through blocks ``start..end-1`` (checked: nothing
        is computed yet)."""
        start, end = span.check_step(
            hidden, cache, start=start, end=end, prompts=prompts, lora=lora
        )
        first = start - span.start
        if lora is not None and span.device.type != "cpu":
            lora = lora.to(span.device)
        return cls(
            span=span,
            cache=cache,
            hidden=hidden,
            past=cache.length,
            first=first,
            stop=end - span.start,
            next=first,
            prompts=None if prompts is None else prompts.to(span.device),
            lora=lora,
        )

    @property
    def done(self) -> bool:
        return self.next == self.stop

    def run(self, give_way: Callable[[], bool] = lambda: False) -> bool:
        """Compute blocks until the step is done (True) or ``give_way()`` after a block (False)."""
        span, dynamic = self.span, self.cache.dynamic
        new_tokens = self.hidden.shape[1]
        positions = torch.arange(self.past, self.past + new_tokens, device=span.device)[None]
        with torch.inference_mode(), lora_applied(span.layers, span.start, self.lora):
            if self.inputs is None:
                self.hidden = self.hidden.to(device=span.device, dtype=span.dtype)
                self.inputs = span.layer_inputs(
                    self.hidden, dynamic, positions, self.past, self.first, self.stop
                )
            while not self.done:
                block = self.next
                self.hidden = span.run_layers(
                    self.hidden,
                    dynamic,
                    self.inputs,
                    positions,
                    self.past,
                    block,
                    block + 1,
                    self.prompts,
                    base=self.first,
                )
                self.next = block + 1
                if not self.done and give_way():
                    return False
        self.cache.advance(new_tokens)
        return True
