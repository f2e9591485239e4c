"""model/fast_decode.py: a decode step (one position, or a speculative step's several after others)
gives transformers' layers' bits, and runs only where it may."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm_node.model import BlockSpan, Checkpoint
from swarm_node.model.lora import lora_applied, lora_from_state
from swarm_node.model.span import FAST_TOKENS
from tests.model_fixtures import TINY_FAMILIES, TINY_HIDDEN, make_tiny_model_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fast")
    made = {f: make_tiny_model_dir(root / f, f, seed=i) for i, f in enumerate(TINY_FAMILIES)}
    made["qwen2-bias"] = make_tiny_model_dir(root / "qwen2b", "qwen2", seed=11)  # q/k/v biases
    made["mha"] = make_tiny_model_dir(root / "mha", "llama", seed=12, num_key_value_heads=4)
    made["dropout"] = make_tiny_model_dir(root / "dropout", "llama", seed=14, attention_dropout=0.1)
    made["sliding"] = make_tiny_model_dir(root / "sliding", "mistral", seed=13, sliding_window=3)
    return made


def _slow(span: BlockSpan) -> BlockSpan:
    span._fast_decode = False  # the same weights through transformers' layers
    return span


def _decode(
    span: BlockSpan, prompt: torch.Tensor, steps: list[torch.Tensor], **sub
) -> list[torch.Tensor]:
    """Outputs of a prefill and of each step, then each layer's cached keys and values."""
    cache = span.new_cache(32, batch_size=prompt.shape[0], **sub)
    with torch.inference_mode():
        outs = [span(prompt, cache, **sub)]
        outs += [span(step, cache, **sub) for step in steps]
    return outs + [torch.cat([layer.keys, layer.values]) for layer in cache.dynamic.layers]


@pytest.mark.parametrize("name", [*TINY_FAMILIES, "qwen2-bias", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_are_bit_for_bit_transformers(dirs, name, dtype) -> None:
    checkpoint = Checkpoint.open(dirs[name])
    fast = BlockSpan.load(checkpoint, 0, 6, dtype=dtype)
    slow = _slow(BlockSpan.load(checkpoint, 0, 6, dtype=dtype))
    assert fast.uses_fast_decode(1) is False  # not under inference mode: autograd may be wanted
    with torch.inference_mode():
        assert fast.uses_fast_decode(1) and fast.uses_fast_decode(FAST_TOKENS)
        assert not fast.uses_fast_decode(FAST_TOKENS + 1)
        assert not slow.uses_fast_decode(1)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randn(2, 5, TINY_HIDDEN, generator=gen)
    # one-position steps and a speculative step's several (causal among themselves)
    steps = [torch.randn(2, t, TINY_HIDDEN, generator=gen) for t in (1, 3, 1, 5, 1, 2)]
    got, want = _decode(fast, prompt, steps), _decode(slow, prompt, steps)
    assert len(got) == 1 + 6 + 6 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # a sub-span: its cache holds only its own layers, numbered from 0
    got = _decode(fast, prompt, steps, start=2, end=5)
    want = _decode(slow, prompt, steps, start=2, end=5)
    assert len(got) == 1 + 6 + 3 and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_what_takes_transformers_path(dirs, tiny_llama) -> None:
    with torch.inference_mode():
        sliding = BlockSpan.load(Checkpoint.open(dirs["sliding"]), 0, 6)
        assert not sliding.uses_fast_decode(1)  # its window is a mask transformers builds
        checkpoint = Checkpoint.open(dirs["llama"])
        span = BlockSpan.load(checkpoint, 0, 6)
        assert span.uses_fast_decode(1)
        dropout = BlockSpan.load(Checkpoint.open(dirs["dropout"]), 0, 6)
        assert not dropout.uses_fast_decode(1)  # transformers drops attention out in train mode
        eager = BlockSpan.load(checkpoint, 0, 6)
        eager.config._attn_implementation = "eager"  # another summation order
        eager._fast_decode = None
        assert not eager.uses_fast_decode(1)
        eager.config._attn_implementation = "sdpa"
    # a LoRA: the step goes through the hooked Linears, so the adapter changes it
    tensors, scales = {}, {}
    gen = torch.Generator().manual_seed(5)
    for i in range(6):
        key = f"model.layers.{i}.self_attn.v_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(4, TINY_HIDDEN, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(32, 4, generator=gen)
        scales[key] = 1.0
    lora = lora_from_state(tensors, scales, shapes=span.lora_shapes, start=0, end=6)
    with torch.inference_mode():
        hidden = torch.randn(1, 4, TINY_HIDDEN)
        plain, adapted = span.new_cache(8), span.new_cache(8)
        span(hidden, plain)
        span(hidden, adapted, lora=lora)
        with lora_applied(span.layers, 0, lora):
            assert not span.uses_fast_decode(1)
        assert span.uses_fast_decode(1)
        step = torch.randn(1, 1, TINY_HIDDEN)
        assert (span(step, adapted, lora=lora) - span(step, plain)).abs().max() > 1e-2
