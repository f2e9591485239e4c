"""Draft tokens for speculative decoding, and how many to draft.

Two drafters behind one method, ``draft(ids, k) -> up to k tokens`` (point masses: the verification
rule of model/speculation.py needs no draft distribution): ``PromptLookup`` (the continuation of the
earlier occurrence that agrees longest with the text's last tokens; no model, the default) and
``DraftModel`` (a small local causal LM with the swarm model's tokenizer, greedy, keeping its own
attention cache). ``DraftLength`` picks k for the most expected tokens per second from the measured
acceptance (kept apart per kind of match) and the measured cost of a draft token, and drafts nothing
while no k beats a plain step. Knows nothing of sessions, servers or text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from swarm_node.errors import ConfigError, check_int


class Drafter(Protocol):
    def draft(self, ids: list[int], k: int) -> list[int]:
        """At most ``k`` tokens likely to follow ``ids`` (none: no guess worth a try)."""
        ...


@dataclass(frozen=True, kw_only=True)
class Match:
    """Where the text's last tokens occurred before: the continuation starts at ``start`` in the
    text, and the ``context`` tokens before it agree with the text's last ``context`` tokens."""

    start: int
    context: int

    @property
    def kind(self) -> int:
        """The evidence class of drafts from such a match (DraftLength keeps each class's
        acceptance apart): 1 for a lone token, 2 for 2-5 tokens, 6 for 6 or more."""
        return max(k for k in MATCH_KINDS if k <= self.context)


MATCH_KINDS = (1, 2, 6)  # after 1, 2-5, 6+ agreeing tokens the first draft held ~25%, ~80%, ~95%


@dataclass(frozen=True, kw_only=True)
class PromptLookup:
    """Prompt lookup decoding (Saxena 2023, transformers' ``prompt_lookup_num_tokens``): find the
    earlier place in the text whose preceding tokens agree longest with the text's last tokens (at
    least ``min_ngram``, compared up to ``max_ngram``; on a tie the latest), and propose what
    followed it. The agreeing length is the match's kind of evidence: a short match's continuation
    is accepted less often than a long one's, so DraftLength keeps their acceptance apart."""

    max_ngram: int = 16
    min_ngram: int = 2  # a lone token's continuation: ~25% right, and a trip with drafts costs more

    def __post_init__(self) -> None:
        check_int("min_ngram", self.min_ngram, 1)
        check_int("max_ngram", self.max_ngram, self.min_ngram)

    def match(self, ids: list[int]) -> Match | None:
        """The best earlier occurrence of the text's last tokens (None: none of min_ngram)."""
        last = len(ids) - 1
        best: Match | None = None
        for end in range(last - 1, -1, -1):
            if ids[end] != ids[last]:
                continue
            context = 1
            while (
                context < self.max_ngram
                and end - context >= 0
                and ids[end - context] == ids[last - context]
            ):
                context += 1
            if context >= self.min_ngram and (best is None or context > best.context):
                best = Match(start=end + 1, context=context)
        return best

    def draft(self, ids: list[int], k: int) -> list[int]:
        found = self.match(ids) if k >= 1 else None
        return [] if found is None else ids[found.start : found.start + k]


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
PRIOR_ACCEPTANCE_OF = {1: 0.3, 6: 0.9}  # ... for prompt lookup's kinds of match (Match.kind)
PRIOR_COST = 0.05  # a draft token's seconds, in plain steps, before a speculative step is timed
MEMORY = 0.8  # weight of older evidence, per speculative step
MIN_GAIN = 1.02  # drafts only where the expected tokens/s beat a plain step's by this much
FIRST_BACKOFF = 16  # steps without drafts once they stop paying; doubles each time they fail again
MAX_BACKOFF = 256


@dataclass(kw_only=True)
class Evidence:
    """What the steps said of one kind of draft: accepted drafts and steps cut by a rejection
    (decaying, the prior counting as one draft), and when this kind may draft again."""

    prior: float = PRIOR_ACCEPTANCE
    hits: float = field(init=False)
    misses: float = field(init=False)
    off_until: int = 0  # no drafts of this kind before this step
    backoff: int = FIRST_BACKOFF

    def __post_init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        self.hits, self.misses = self.prior, 1.0 - self.prior

    @property
    def rate(self) -> float:
        """Recent chance of a draft being accepted once the one before it was."""
        return self.hits / (self.hits + self.misses)


@dataclass(kw_only=True)
class DraftLength:
    """How many tokens to draft for the next step: the k that maximises the expected tokens per
    second ``E(k) / t(k)``. ``E(k) = 1 + a + ... + a^k`` (a draft is accepted with probability
    ``a`` once its predecessor was) and ``t(k) = plain + k * per_draft`` (drafting, and the k more
    positions every server and the client's head compute: ~0 on a GPU, a few % of a trip each on
    a CPU), all three measured as the generation goes, recent steps weighing more. ``a`` is kept
    apart for each kind of draft the drafter tells (prompt lookup: how long its match is), the
    time per draft is shared. With ``adaptive`` False: always ``max_tokens``. When no k beats a
    plain step by MIN_GAIN, that kind of draft stops for FIRST_BACKOFF steps (twice as long each
    time it fails again), then its evidence is forgotten and it is tried again."""

    max_tokens: int = 10
    adaptive: bool = True
    plain_s: float | None = None  # a plain step's seconds (moving average)
    extra_s: float = 0.0  # seconds speculative steps took past plain ones (decaying sum) ...
    extra_tokens: float = 0.0  # ... for this many draft tokens (decaying sum)
    evidence: dict[int, Evidence] = field(default_factory=dict)  # by kind of draft
    kind: int = 0  # the kind of the drafts last asked for
    steps: int = 0
    drafted: int = 0  # draft tokens sent, over the whole generation
    accepted: int = 0  # of which the servers' model agreed with

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, 1)

    def of(self, kind: int) -> Evidence:
        if kind not in self.evidence:
            self.evidence[kind] = Evidence(prior=PRIOR_ACCEPTANCE_OF.get(kind, PRIOR_ACCEPTANCE))
        return self.evidence[kind]

    def next(self, room: int, kind: int = 0) -> int:
        """Tokens to draft of ``kind``, at most ``room`` (0: a plain step)."""
        self.kind = kind
        evidence = self.of(kind)
        if room < 1 or self.steps < evidence.off_until:
            return 0
        if not self.adaptive:
            return min(self.max_tokens, room)
        k = self.best(kind)
        if k == 0:
            evidence.off_until = self.steps + evidence.backoff
            evidence.backoff = min(2 * evidence.backoff, MAX_BACKOFF)
            evidence.forget()
        return min(k, room)

    def best(self, kind: int = 0) -> int:
        """The draft length with the most expected tokens per second (0: drafts do not pay)."""
        plain = self.plain_s or 1.0  # before any step is timed, only ratios matter
        per_draft = self.per_draft_s
        a = self.of(kind).rate
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

    def acceptance_rate(self, kind: int = 0) -> float:
        """Recent chance of a draft of ``kind`` being accepted once the one before it was."""
        return self.of(kind).rate

    def observe(self, drafted: int, emitted: int, seconds: float) -> None:
        """A step with ``drafted`` draft tokens (0: plain; else of the kind last asked for)
        emitted ``emitted`` tokens in ``seconds`` (drafting included)."""
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
        evidence = self.of(self.kind)
        evidence.hits = MEMORY * evidence.hits + accepted
        evidence.misses = MEMORY * evidence.misses + (accepted < drafted)
        self.extra_s = MEMORY * self.extra_s + (seconds - self.plain_s)
        self.extra_tokens = MEMORY * self.extra_tokens + drafted
        if accepted:
            evidence.backoff = FIRST_BACKOFF

    @property
    def acceptance(self) -> float:
        """Draft tokens accepted over those sent, over the whole generation."""
        return self.accepted / self.drafted if self.drafted else 0.0
