"""The model families a span can be built from, one row each.

A family names where its parts live, both as module paths in transformers' `*ForCausalLM` skeleton
and as tensor names in the checkpoint (they are the same strings). A new Llama-like family is one
row; a family whose layers need more than `(hidden, mask, positions, cache)` needs code in span.py.
This module knows nothing of files, caches or peers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarm_node.errors import ModelError


@dataclass(frozen=True, slots=True)
class Family:
    model_type: str  # config.json's "model_type"
    layers: str = "model.layers"  # ModuleList of decoder layers; tensors "model.layers.{i}.*"
    embed: str = "model.embed_tokens"  # token embedding module
    norm: str = "model.norm"  # final norm, applied by the client head
    lm_head: str = "lm_head"  # output projection (absent from the file when tied)
    rotary: str = "model.rotary_emb"  # rotary embedding module, rebuilt fresh per span

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama"),  # Llama 2/3, SmolLM, TinyLlama
        Family("mistral"),
        Family("qwen2"),
        Family("qwen3"),  # adds q_norm/k_norm inside attention: same layer interface
    )
}

# Attention layer types span.py knows how to mask.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def family_for(config: Any) -> Family:
    """The family row for a transformers config, or ModelError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise ModelError(f"'model_type' must be one of {sorted(FAMILIES)}, got {model_type!r}")
    return family


def layer_types(config: Any) -> list[str]:
    """Attention type of every decoder layer ("full_attention" or "sliding_attention")."""
    count = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * count
    types = list(types)
    if len(types) != count:
        raise ModelError(
            f"config 'layer_types' must list {count} layers (num_hidden_layers), got {len(types)}"
        )
    unknown = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if unknown:
        raise ModelError(
            f"config 'layer_types' must only hold {list(SUPPORTED_LAYER_TYPES)}, got {unknown}"
        )
    return types
