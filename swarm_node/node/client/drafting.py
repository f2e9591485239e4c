"""Draft tokens for speculative decoding, and how many to draft.

Two drafters behind one method, ``draft(ids, k) -> up to k tokens`` (point masses: the verification
rule of model/speculation.py needs no draft distribution): ``PromptLookup`` (the continuation of the
latest earlier occurrence of the text's last n-gram; no model, the default) and ``DraftModel`` (a small
local causal LM with the swarm model's tokenizer, greedy, keeping its own attention cache).
``DraftLength`` adapts k to what the drafts earn and drafts nothing while speculative steps make
fewer tokens per second than plain ones. Knows nothing of sessions, servers or text.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from swarm_node.errors import ConfigError, check_int


class Drafter(Protocol):
    def draft(self, ids: list[int], k: int) -> list[int]:
        """At most ``k`` tokens likely to follow ``ids`` (none: no guess worth a try)."""
        ...


@dataclass(frozen=True, kw_only=True)
class PromptLookup:
    """Prompt lookup decoding (Saxena 2023, transformers' ``prompt_lookup_num_tokens``): find the
    text's last ``max_ngram``..``min_ngram`` tokens earlier in the text, latest occurrence first, and
    propose what followed them."""

    max_ngram: int = 3
    min_ngram: int = 2  # a lone token's earlier continuation is mostly a wasted draft

    def __post_init__(self) -> None:
        check_int("min_ngram", self.min_ngram, 1)
        check_int("max_ngram", self.max_ngram, self.min_ngram)

    def draft(self, ids: list[int], k: int) -> list[int]:
        if k < 1:
            return []
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    return ids[start + n : start + n + k]
        return []


class DraftModel:
    """A small local causal LM (transformers, the swarm model's tokenizer) proposing its greedy
    continuation; its cache keeps the text it saw, cut back to what the next call shares."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.cache: Any = None
        self.cached: list[int] = []  # the tokens self.cache holds

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str]) -> DraftModel:
        """A bundled model's name or a local model folder (ModelError if it is neither)."""
        from transformers import AutoModelForCausalLM

        from swarm_node.model import resolve_model

        path = resolve_model(name_or_path)
        return cls(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))

    def draft(self, ids: list[int], k: int) -> list[int]:
        from transformers import DynamicCache

        if k < 1 or not ids:
            return []
        common = 0
        limit = min(len(self.cached), len(ids) - 1)  # the last token is always fed
        while common < limit and self.cached[common] == ids[common]:
            common += 1
        if self.cache is None or common == 0:
            self.cache, common = DynamicCache(), 0
        elif common < len(self.cached):
            self.cache.crop(common - len(self.cached))
        feed = ids[common:]
        drafts: list[int] = []
        with torch.inference_mode():
            for _ in range(k):
                out = self.model(input_ids=torch.tensor([feed]), cache=self.cache, use_cache=True)
                token = int(out.logits[0, -1].argmax())
                drafts.append(token)
                feed = [token]
        self.cached = ids + drafts[:-1]
        return drafts


OFF_MARGIN = 0.97  # drafting turns off when it makes fewer than this many times plain tokens/s
WINDOW = 6  # speculative steps compared with plain ones
FIRST_BACKOFF = 16  # plain steps before drafting is tried again; doubles each time it fails
MAX_BACKOFF = 256


@dataclass(kw_only=True)
class DraftLength:
    """How many tokens to draft for the next step. Grows by 2 after a step that accepted every
    draft, shrinks by 1 after one that did not (transformers' heuristic for assistant models); with
    ``adaptive``, drafting stops for a while (growing) when the last WINDOW speculative steps made
    fewer tokens per second than plain steps do (a plain step is timed first)."""

    max_tokens: int = 10
    adaptive: bool = True
    tokens: int = field(default=0)  # the length now (0: max_tokens at the start)
    plain_s: float | None = None  # moving average of a plain step's seconds
    window: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    steps: int = 0
    off_until: int = 0  # no drafts before this step
    backoff: int = FIRST_BACKOFF
    drafted: int = 0  # draft tokens sent, over the whole generation
    accepted: int = 0  # of which the servers' model agreed with

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, 1)
        if not self.tokens:
            self.tokens = self.max_tokens

    def next(self, room: int) -> int:
        """Tokens to draft, at most ``room`` (0: a plain step)."""
        if room < 1 or self.steps < self.off_until:
            return 0
        if self.adaptive and self.plain_s is None:
            return 0  # time a plain step first
        return min(self.tokens, room)

    def observe(self, drafted: int, emitted: int, seconds: float) -> None:
        """A step with ``drafted`` draft tokens (0: plain) emitted ``emitted`` tokens in ``seconds``
        (drafting included)."""
        if drafted < 0 or not 1 <= emitted <= drafted + 1:
            raise ConfigError(f"'emitted' must be in [1, {drafted + 1}], got {emitted}")
        self.steps += 1
        if drafted == 0:
            self.plain_s = seconds if self.plain_s is None else 0.8 * self.plain_s + 0.2 * seconds
            return
        self.drafted += drafted
        self.accepted += emitted - 1
        if emitted == drafted + 1:
            self.tokens = min(self.tokens + 2, self.max_tokens)
        else:
            self.tokens = max(1, self.tokens - 1)
        self.window.append((emitted, seconds))
        if not self.adaptive or self.plain_s is None or len(self.window) < WINDOW:
            return
        tokens_per_s = sum(e for e, _ in self.window) / max(sum(s for _, s in self.window), 1e-9)
        if tokens_per_s < OFF_MARGIN / self.plain_s:
            self.off_until = self.steps + self.backoff
            self.backoff = min(2 * self.backoff, MAX_BACKOFF)
            self.window.clear()
            self.tokens = max(1, self.tokens // 2)
        else:
            self.backoff = FIRST_BACKOFF

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0
