"""Draft tokens for speculative decoding, and how many to draft.

Two drafters behind one method, ``draft(ids, k) -> up to k tokens`` (point masses: the verification
rule of model/speculation.py needs no draft distribution): ``PromptLookup`` (the continuation of the
latest earlier occurrence of the text's last n-gram; no model, the default) and ``DraftModel`` (a small
local causal LM with the swarm model's tokenizer, greedy, keeping its own attention cache).
``DraftLength`` picks k for the most expected tokens per second from the measured acceptance and
the measured cost of a draft token, and drafts nothing while no k beats a plain step. Knows
nothing of sessions, servers or text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


PRIOR_ACCEPTANCE = 0.7  # a draft token's chance before any step says (after its predecessor's)
PRIOR_COST = 0.05  # a draft token's seconds, in plain steps, before a speculative step is timed
MEMORY = 0.8  # weight of older evidence, per speculative step
MIN_GAIN = 1.02  # drafts only where the expected tokens/s beat a plain step's by this much
FIRST_BACKOFF = 16  # steps without drafts once they stop paying; doubles each time they fail again
MAX_BACKOFF = 256


@dataclass(kw_only=True)
class DraftLength:
    """How many tokens to draft for the next step: the k that maximises the expected tokens per
    second ``E(k) / t(k)``. ``E(k) = 1 + a + ... + a^k`` (a draft is accepted with probability
    ``a`` once its predecessor was) and ``t(k) = plain + k * per_draft`` (drafting, and the k more
    positions every server and the client's head compute: ~0 on a GPU, a few % of a trip each on
    a CPU), all three measured as the generation goes, recent steps weighing more. With
    ``adaptive`` False: always ``max_tokens``. When no k beats a plain step by MIN_GAIN, drafting
    stops for FIRST_BACKOFF steps (twice as long each time it fails again), then the evidence is
    forgotten and it is tried again."""

    max_tokens: int = 10
    adaptive: bool = True
    plain_s: float | None = None  # a plain step's seconds (moving average)
    extra_s: float = 0.0  # seconds speculative steps took past plain ones (decaying sum) ...
    extra_tokens: float = 0.0  # ... for this many draft tokens (decaying sum)
    hits: float = PRIOR_ACCEPTANCE  # drafts accepted (decaying; the prior counts as one draft)
    misses: float = 1.0 - PRIOR_ACCEPTANCE  # steps whose drafts were cut by a rejection
    steps: int = 0
    off_until: int = 0  # no drafts before this step
    backoff: int = FIRST_BACKOFF
    drafted: int = 0  # draft tokens sent, over the whole generation
    accepted: int = 0  # of which the servers' model agreed with

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, 1)

    def next(self, room: int) -> int:
        """Tokens to draft, at most ``room`` (0: a plain step)."""
        if room < 1 or self.steps < self.off_until:
            return 0
        if not self.adaptive:
            return min(self.max_tokens, room)
        k = self.best()
        if k == 0:
            self.off_until = self.steps + self.backoff
            self.backoff = min(2 * self.backoff, MAX_BACKOFF)
            self.hits, self.misses = PRIOR_ACCEPTANCE, 1.0 - PRIOR_ACCEPTANCE
        return min(k, room)

    def best(self) -> int:
        """The draft length with the most expected tokens per second (0: drafts do not pay)."""
        plain = self.plain_s or 1.0  # before any step is timed, only ratios matter
        per_draft = self.per_draft_s
        a = self.acceptance_rate
        best, best_k, expected = MIN_GAIN / plain, 0, 1.0
        for k in range(1, self.max_tokens + 1):
            expected += a**k
            rate = expected / (plain + k * per_draft)
            if rate > best:
                best, best_k = rate, k
        return best_k

    @property
    def per_draft_s(self) -> float:
        """Seconds one more draft token adds to a step."""
        plain = self.plain_s or 1.0
        prior = PRIOR_COST * plain  # weighs as much as one timed draft token
        return max(0.0, (self.extra_s + prior) / (self.extra_tokens + 1.0))

    @property
    def acceptance_rate(self) -> float:
        """Recent chance of a draft being accepted once the one before it was."""
        return self.hits / (self.hits + self.misses)

    def observe(self, drafted: int, emitted: int, seconds: float) -> None:
        """A step with ``drafted`` draft tokens (0: plain) emitted ``emitted`` tokens in ``seconds``
        (drafting included)."""
        if drafted < 0 or not 1 <= emitted <= drafted + 1:
            raise ConfigError(f"'emitted' must be in [1, {drafted + 1}], got {emitted}")
        self.steps += 1
        if drafted == 0:
            self.plain_s = seconds if self.plain_s is None else 0.8 * self.plain_s + 0.2 * seconds
            return
        if self.plain_s is None:  # no plain step yet: the prior's split of this one
            self.plain_s = seconds / (1.0 + PRIOR_COST * drafted)
        accepted = emitted - 1
        self.drafted += drafted
        self.accepted += accepted
        self.hits = MEMORY * self.hits + accepted
        self.misses = MEMORY * self.misses + (accepted < drafted)
        self.extra_s = MEMORY * self.extra_s + (seconds - self.plain_s)
        self.extra_tokens = MEMORY * self.extra_tokens + drafted
        if accepted:
            self.backoff = FIRST_BACKOFF

    @property
    def acceptance(self) -> float:
        """Draft tokens accepted over those sent, over the whole generation."""
        return self.accepted / self.drafted if self.drafted else 0.0
