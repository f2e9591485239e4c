"""Tiny random models of the families beyond Llama-like ones (tests/test_families*.py).

Each variant is a real architecture's shape in miniature: Mixtral's experts, Phi-3's fused
projections, Gemma 2's alternating sliding windows with attention and logit soft-capping, Gemma 3's
per-kind rotary tables and q/k norms, Falcon 40B/180B's grouped keys and Falcon 7B's multi-query
parallel attention, BLOOM's alibi. Every norm gets random weights (Gemma's start at zero, LayerNorm
biases too): a norm computed wrongly then changes the tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.model_fixtures import TINY_HIDDEN, TINY_VOCAB

SLIDING = 4  # Gemma's window in the tiny models: prompts of 7+ tokens slide past it

VARIANTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        model_type="mixtral",
        num_local_experts=4,
        num_experts_per_tok=2,
        num_key_value_heads=2,
        intermediate_size=96,
        sliding_window=None,
    ),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, intermediate_size=128),
    "gemma2": dict(
        model_type="gemma2",
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        sliding_window=SLIDING,
        query_pre_attn_scalar=16,
        tie_word_embeddings=False,  # tied, a random model repeats its input token
    ),  # soft-capping on by default: attention 50, logits 30
    "gemma3": dict(
        model_type="gemma3_text",
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        sliding_window=SLIDING,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],  # repeated over the layers
        final_logit_softcapping=20.0,  # None in Gemma 3's own configs; on here to test it
        tie_word_embeddings=False,
    ),
    "falcon": dict(  # Falcon 40B/180B: grouped key/value heads, two norms in parallel attention
        model_type="falcon", new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=128
    ),
    "falcon-7b": dict(  # multi-query, one norm, parallel attention
        model_type="falcon",
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        ffn_hidden_size=128,
    ),
    "bloom": dict(model_type="bloom", tie_word_embeddings=False, initializer_range=0.05),
}


def variant_config(variant: str, *, num_layers: int = 4, **overrides: Any) -> Any:
    from transformers import AutoConfig

    settings = dict(VARIANTS[variant])
    model_type = settings.pop("model_type")
    if "layer_types" in settings:
        settings["layer_types"] = [settings["layer_types"][i % 2] for i in range(num_layers)]
    kwargs: dict[str, Any] = dict(
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    kwargs.update(settings)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_variant_dir(
    path: Path, variant: str, *, num_layers: int = 4, seed: int = 0, **overrides: Any
) -> Path:
    """Save a tiny random float32 model of ``variant`` (VARIANTS) into ``path``."""
    from transformers import AutoModelForCausalLM

    config = variant_config(variant, num_layers=num_layers, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__:
                for param in module.parameters(recurse=False):
                    param.add_(torch.randn_like(param) * 0.3)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path
