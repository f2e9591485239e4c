"""A long step computed a few blocks at a time (model/partial_steps.py) is the forward, bit for bit.

A server computes a prefill chunk this way so that decode steps waiting run between two of its
blocks (server/block_server.py): the parts must give every layer what the whole forward gives it,
and another session's step between two parts must change neither session's numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm_node.model import BlockSpan, Checkpoint
from swarm_node.model.lora import LoraModule, LoraWeights
from swarm_node.model.partial_steps import PartialStep
from tests.family_fixtures import VARIANTS, make_variant_dir
from tests.model_fixtures import TINY_FAMILIES, TINY_HIDDEN, make_tiny_model_dir

H = TINY_HIDDEN


def in_parts(span: BlockSpan, hidden: torch.Tensor, cache, start: int, end: int, **extra) -> tuple:
    """The step through blocks start..end-1 giving way after every block: (output, parts)."""
    step = PartialStep.begin(span, hidden, cache, start=start, end=end, **extra)
    parts = 1
    while not step.run(lambda: True):
        parts += 1
    return step.hidden, parts


def load_span(tmp_path: Path, family: str) -> BlockSpan:
    if family in VARIANTS:
        path = make_variant_dir(tmp_path, family)
    else:
        path = make_tiny_model_dir(tmp_path, family)
    checkpoint = Checkpoint.open(path)
    return BlockSpan.load(checkpoint, 0, checkpoint.num_blocks)


@pytest.mark.parametrize("family", [*TINY_FAMILIES, *VARIANTS])
def test_a_step_in_parts_is_the_forward_bit_for_bit(tmp_path: Path, family: str) -> None:
    """Three long steps (past Gemma's sliding window of 4) and a decode step after them, on the
    whole span and on a sub-span of it: outputs and caches equal the plain forward's exactly."""
    span = load_span(tmp_path, family)
    torch.manual_seed(1)
    for start, end in ((span.start, span.end), (span.start + 1, span.end - 1)):
        plain = span.new_cache(64, start=start, end=end)
        parted = span.new_cache(64, start=start, end=end)
        for tokens in (5, 7, 3):
            hidden = torch.randn(1, tokens, H)
            with torch.inference_mode():
                expected = span(hidden, plain, start=start, end=end)
            out, parts = in_parts(span, hidden, parted, start, end)
            assert parts == end - start and parted.length == plain.length
            assert torch.equal(out, expected)
        step = torch.randn(1, 1, H)
        with torch.inference_mode():
            assert torch.equal(
                span(step, parted, start=start, end=end), span(step, plain, start=start, end=end)
            )


def test_deep_prompts_and_a_lora_in_parts(tmp_path: Path) -> None:
    """Each block gets its own prompt and its block's LoRA, as in the forward."""
    span = load_span(tmp_path, "llama")
    torch.manual_seed(2)
    prompts = torch.randn(4, 3, H)  # blocks 1..4, 3 prompt positions
    lora = LoraWeights(
        {
            b: {"self_attn.q_proj": LoraModule(torch.randn(2, H), torch.randn(H, 2), 0.5)}
            for b in (2, 4)
        }
    )
    for extra in ({"prompts": prompts}, {"lora": lora}):
        plain, parted = span.new_cache(32, start=1, end=5), span.new_cache(32, start=1, end=5)
        hidden = torch.randn(1, 6, H)
        with torch.inference_mode():
            expected = span(hidden, plain, start=1, end=5, **extra)
            without = span(hidden, span.new_cache(32, start=1, end=5), start=1, end=5)
        out, parts = in_parts(span, hidden, parted, 1, 5, **extra)
        assert parts == 4 and torch.equal(out, expected) and not torch.equal(out, without)


def test_another_sessions_steps_between_the_parts_change_nothing(tmp_path: Path) -> None:
    """Session A's prefill on a sub-span (its layers renumbered while a part runs) gives way after
    every block to session B's decode step on the whole span: both equal their steps alone."""
    span = load_span(tmp_path, "llama")
    torch.manual_seed(3)
    a_hidden, b_prompt = torch.randn(1, 9, H), torch.randn(1, 4, H)
    b_steps = [torch.randn(1, 1, H) for _ in range(span.end - span.start)]
    with torch.inference_mode():
        a_alone = span(a_hidden, span.new_cache(16, start=2, end=6), start=2, end=6)
        b_cache = span.new_cache(16)
        span(b_prompt, b_cache)
        b_alone = [span(h, b_cache) for h in b_steps]
        b_cache = span.new_cache(16)
        span(b_prompt, b_cache)
    a_cache = span.new_cache(16, start=2, end=6)
    step = PartialStep.begin(span, a_hidden, a_cache, start=2, end=6)
    b_out = []
    while not step.run(lambda: True):
        with torch.inference_mode():
            b_out.append(span(b_steps[len(b_out)], b_cache))
    assert len(b_out) == 3 and a_cache.length == 9 and b_cache.length == 7
    assert torch.equal(step.hidden, a_alone)
    assert all(torch.equal(x, y) for x, y in zip(b_out, b_alone, strict=False))


def test_a_step_checks_what_the_forward_checks(tmp_path: Path) -> None:
    span = load_span(tmp_path, "llama")
    cache = span.new_cache(8, start=0, end=6)
    with pytest.raises(Exception, match="cannot take 9 more"):
        PartialStep.begin(span, torch.randn(1, 9, H), cache, start=0, end=6)
    with pytest.raises(Exception, match="used with blocks 1:6"):
        PartialStep.begin(span, torch.randn(1, 2, H), cache, start=1, end=6)
    assert cache.length == 0
