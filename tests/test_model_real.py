"""model/ on the real SmolLM2-135M weights (converted once from the bundled GGUF into the cache)."""

from __future__ import annotations

import pytest
import torch

from swarm_node.model import (
    BlockSpan,
    Checkpoint,
    ClientHead,
    load_tokenizer,
    resolve_model,
    sample_next_token,
)
from tests.model_fixtures import reference_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model("smollm2-135m")  # $SWARM_CACHE_DIR or ~/.cache/swarm-node
    return path, load_tokenizer(path)


def test_two_spans_generate_like_transformers(smollm2):
    path, tokenizer = smollm2
    checkpoint = Checkpoint.open(path)
    assert (checkpoint.model_type, checkpoint.num_blocks) == ("llama", 30)
    head = ClientHead.load(checkpoint)
    spans = [BlockSpan.load(checkpoint, 0, 15), BlockSpan.load(checkpoint, 15, 30)]
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids  # (1, T)

    caches = [span.new_cache(max_length=64) for span in spans]
    ids, step = prompt, prompt
    for _ in range(16):
        hidden = head.embed(step)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, cache)
        token = sample_next_token(head.logits(hidden)[:, -1], temperature=0, top_p=1.0)
        ids = torch.cat([ids, token[:, None]], dim=1)
        step = token[:, None]

    reference = reference_model(path)
    expected = reference.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=None,  # compare all 16 tokens even past an end-of-text
    )
    assert ids.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(ids[0, prompt.shape[1] :])


def test_bfloat16_spans_still_answer_paris(smollm2):
    path, tokenizer = smollm2
    checkpoint = Checkpoint.open(path)
    head = ClientHead.load(checkpoint, dtype=torch.bfloat16)
    spans = [
        BlockSpan.load(checkpoint, 0, 15, dtype=torch.bfloat16),
        BlockSpan.load(checkpoint, 15, 30, dtype=torch.bfloat16),
    ]
    # 15 layers x (K, V) x 3 KV heads x head_dim 64 x 2 bytes
    assert spans[0].cache_bytes_per_token() == 15 * 2 * 3 * 64 * 2
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    caches = [span.new_cache(max_length=32) for span in spans]
    ids, step = prompt, prompt
    for _ in range(4):
        hidden = head.embed(step)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, cache)
        token = sample_next_token(head.logits(hidden)[:, -1].float(), temperature=0, top_p=1.0)
        ids = torch.cat([ids, token[:, None]], dim=1)
        step = token[:, None]
    assert "Paris" in tokenizer.decode(ids[0, prompt.shape[1] :])
