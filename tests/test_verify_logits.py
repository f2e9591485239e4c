"""The client head over a verification step's k + 1 positions (ClientHead.verify_logits): one matrix
product whose rows lie within the stated bound of the plain head's, the same argmax wherever the top
two are farther apart than that, and greedy acceptance taking the plain head's row at a near tie."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.model.speculation import accept_drafts

WINDOW = 9  # a step of 8 drafts: the bench's drafting trips carry 8.4 on average


def bench_prompts() -> list[str]:
    import scripts.bench_speculative as bench

    return [p for prompts in bench.PROMPTS.values() for p in prompts]


@pytest.mark.slow
def test_verify_logits_pick_the_plain_heads_tokens_on_smollm2(smollm2_path: Path) -> None:
    """Every position of the bench's prompts (chat template, then the passage or question copied
    as the answer), in windows of 9 as a step of 8 drafts: each row within its bound of the plain
    head's logits of that position alone, the same argmax where no near tie, and what greedy
    acceptance picks is the plain head's argmax everywhere."""
    from swarm_node.model import load_tokenizer
    from swarm_node.node.apps.commands import encode_prompt

    checkpoint = Checkpoint.open(smollm2_path)
    tokenizer = load_tokenizer(smollm2_path)
    head = ClientHead.load(checkpoint)
    span = BlockSpan.load(checkpoint, 0, checkpoint.num_blocks)
    rows = ties = 0
    for prompt in bench_prompts():
        ids = encode_prompt(tokenizer, prompt, chat=True)
        answer = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            hidden = span(head.embed(torch.cat([ids, answer], dim=1)))
        for start in range(0, hidden.shape[1], WINDOW):
            window = hidden[:, start : start + WINDOW]
            logits, bound = head.verify_logits(window)
            assert bound is not None
            for j in range(window.shape[1]):
                plain = head.row_logits(window, j)
                assert (logits[j] - plain).abs().max() <= bound[j]
                top = plain.topk(2).values
                tie = float(top[0] - top[1]) <= 2 * float(bound[j])
                ties += tie
                if not tie:
                    assert int(logits[j].argmax()) == int(plain.argmax())
                picked = accept_drafts(
                    logits[j : j + 1],
                    [],
                    torch.tensor([0]),
                    temperature=0,
                    bound=bound[j : j + 1],
                    exact_row=lambda _, w=window, r=j: head.row_logits(w, r),
                )
                assert picked == [int(plain.argmax())]
                rows += 1
    assert rows > 500
    assert ties < rows // 20  # the bound is float32's worst case, far above the real rounding


def test_a_near_tie_takes_the_plain_heads_row() -> None:
    logits = torch.zeros(2, 8)
    logits[0, 3], logits[0, 5] = 1.0, 1.0 - 1e-6  # the batched head: 3, by a hair
    logits[1, 2] = 1.0
    bound = torch.tensor([1e-5, 1e-5])
    plain = torch.zeros(8)
    plain[5] = 1.0  # the plain head: 5
    asked: list[int] = []

    def exact_row(j: int) -> torch.Tensor:
        asked.append(j)
        return plain

    seen = torch.tensor([1])
    assert accept_drafts(logits, [5], seen, temperature=0, bound=bound, exact_row=exact_row) == [
        5,
        2,
    ]
    assert asked == [0]  # row 1 is clear: not recomputed
    assert accept_drafts(logits, [5], seen, temperature=0) == [3]  # without the bound: 3


def test_verify_logits_bounds_a_tiny_heads_rounding(tiny_llama: Path) -> None:
    """On a tiny model with a bias-free tied head: rows within their bound of the plain head's."""
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    hidden = torch.randn(1, 11, head.hidden_size, generator=torch.Generator().manual_seed(0))
    logits, bound = head.verify_logits(hidden)
    assert bound is not None and logits.shape == (11, head.vocab_size)
    for j in range(11):
        assert (logits[j] - head.row_logits(hidden, j)).abs().max() <= bound[j]
