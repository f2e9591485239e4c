"""Speculative sampling is distributed exactly as plain sampling: chi-square tests on a tiny model's
real logits, seeded (deterministic), for drafts that are point masses (prompt lookup, a greedy draft
model) and drafts drawn from a draft distribution q."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from swarm_node.errors import ConfigError
from swarm_node.model import apply_repetition_penalty, sample_next_token
from swarm_node.model.sampling import sampling_probs
from swarm_node.model.speculation import accept_drafts
from tests.model_fixtures import reference_model

DRAWS = 10_000
SETTINGS = dict(temperature=0.9, top_p=0.8, top_k=50)
PENALTY = 1.1


def critical(df: int, z: float = 3.29) -> float:
    """The chi-square value a true fit exceeds with probability ~0.0005 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``probs``; bins expecting < 5 are pooled."""
    n = float(counts.sum())
    expected = probs.double() * n
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    expect = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expect > 0
    stat = float(((observed[keep] - expect[keep]) ** 2 / expect[keep]).sum())
    return stat, int(keep.sum()) - 1


def two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Chi-square of two equally large samples' counts; bins with < 10 draws in all are pooled."""
    a, b = a.double(), b.double()
    big = (a + b) >= 10
    a = torch.cat([a[big], a[~big].sum()[None]])
    b = torch.cat([b[big], b[~big].sum()[None]])
    keep = (a + b) > 0
    stat = float(((a[keep] - b[keep]) ** 2 / (a[keep] + b[keep])).sum())
    return stat, int(keep.sum()) - 1


def target_logits(model: Path, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(model)(torch.tensor([tokens])).logits[0].float()  # (T, V)


def probs_after(logits: torch.Tensor, seen: list[int]) -> torch.Tensor:
    row = apply_repetition_penalty(logits[None], torch.tensor([seen]), PENALTY)
    probs = sampling_probs(row, **SETTINGS)[0]
    return probs / probs.sum()


def test_point_mass_drafts_keep_the_distribution(tiny_llama: Path) -> None:
    prompt = [5, 77, 31, 200, 9, 31]
    p0_logits = target_logits(tiny_llama, prompt)[-1]
    p0 = probs_after(p0_logits, prompt)
    d1 = int(p0.argsort(descending=True)[1])  # likely but not the likeliest: accepted sometimes
    d2 = int(p0.argmax())
    logits = target_logits(tiny_llama, [*prompt, d1, d2])[-3:]  # (3, V): after prompt, d1, d2
    p1 = probs_after(logits[1], [*prompt, d1])
    generator = torch.Generator().manual_seed(0)
    first = torch.zeros(256, dtype=torch.int64)
    second = torch.zeros(256, dtype=torch.int64)
    seen = torch.tensor(prompt)
    for _ in range(DRAWS):
        out = accept_drafts(
            logits, [d1, d2], seen, **SETTINGS, repetition_penalty=PENALTY, generator=generator
        )
        first[out[0]] += 1
        if out[0] == d1:
            second[out[1]] += 1
    assert 0.05 < first[d1] / DRAWS < 0.95  # both branches were taken often
    stat, df = goodness_of_fit(first, p0)
    assert stat < critical(df), (stat, df)
    stat, df = goodness_of_fit(second, p1)
    assert stat < critical(df), (stat, df)
    plain = torch.zeros(256, dtype=torch.int64)
    row = apply_repetition_penalty(p0_logits[None], seen[None], PENALTY)
    plain_gen = torch.Generator().manual_seed(1)
    for token in sample_next_token(row.expand(DRAWS, -1), **SETTINGS, generator=plain_gen):
        plain[token] += 1
    stat, df = two_sample(first, plain)
    assert stat < critical(df), (stat, df)


def test_drafts_from_a_draft_distribution_keep_the_distribution(tiny_llama: Path) -> None:
    """d ~ q (a different, flatter distribution), accepted with min(1, p/q), else the residual."""
    prompt = [44, 3, 190, 3, 61]
    with torch.no_grad():  # the target after the prompt and after every possible draft token
        rows = torch.tensor([[*prompt, d] for d in range(256)])
        table = reference_model(tiny_llama)(rows).logits[:, -2:].float()  # (256, 2, V)
    p0 = probs_after(table[0, 0], prompt)
    q = torch.softmax(table[0, 0] / 2.0, dim=-1)  # a worse drafter's distribution
    generator = torch.Generator().manual_seed(2)
    drafts = torch.multinomial(q, DRAWS, replacement=True, generator=generator)
    first = torch.zeros(256, dtype=torch.int64)
    seen = torch.tensor(prompt)
    accepted = 0
    for d in drafts.tolist():
        out = accept_drafts(
            table[d],
            [d],
            seen,
            **SETTINGS,
            repetition_penalty=PENALTY,
            draft_probs=q[None],
            generator=generator,
        )
        first[out[0]] += 1
        accepted += len(out) == 2
    assert 0.05 < accepted / DRAWS < 0.95
    stat, df = goodness_of_fit(first, p0)
    assert stat < critical(df), (stat, df)


def test_greedy_acceptance_and_bad_shapes() -> None:
    logits = torch.zeros(3, 8)
    logits[0, 4] = logits[1, 2] = logits[2, 7] = 1.0
    seen = torch.tensor([1])
    assert accept_drafts(logits, [4, 2], seen, temperature=0) == [4, 2, 7]
    assert accept_drafts(logits, [4, 3], seen, temperature=0) == [4, 2]
    assert accept_drafts(logits, [5, 2], seen, temperature=0) == [4]
    with pytest.raises(ConfigError, match=r"'logits' must be \(len\(drafts\) \+ 1, V\) = \(2, V\)"):
        accept_drafts(logits, [4], seen, temperature=0)
