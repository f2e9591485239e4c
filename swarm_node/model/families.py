"""The model families a span can be built from, one row each.

A family names where its parts live, both as module paths in transformers' `*ForCausalLM` skeleton
and as tensor names in the checkpoint (they are the same strings), how span.py calls one of its
decoder layers (`call`: the keyword names differ between Llama-like, Falcon and BLOOM layers), and
what the client's plain-torch head must compute around the blocks (client_head.py). A new Llama-like
family is one row. This module knows nothing of files, caches or peers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarm_node.errors import ModelError

CALLS = ("llama", "falcon", "bloom")  # layer calling conventions span.py knows
NORMS = ("rms", "gemma_rms", "layer")  # final norms client_head.py builds in plain torch


@dataclass(frozen=True, slots=True)
class Stacked:
    """A module tensor the file keeps one per expert (transformers 5 fuses them on load): the
    module's ``target`` is, for each of ``parts`` (file names with ``{e}``), the experts' tensors
    stacked on a new first dimension, the parts then concatenated on dimension 1."""

    target: str  # local name in the layer, e.g. "mlp.experts.gate_up_proj"
    parts: tuple[str, ...]  # local file names, e.g. "block_sparse_moe.experts.{e}.w1.weight"
    count: str  # config setting naming how many experts


@dataclass(frozen=True, slots=True)
class Family:
    model_type: str  # config.json's "model_type"
    layers: str = "model.layers"  # ModuleList of decoder layers; tensors "model.layers.{i}.*"
    embed: str = "model.embed_tokens"  # token embedding module
    norm: str = "model.norm"  # final norm, applied by the client head
    lm_head: str = "lm_head"  # output projection (absent from the file when tied)
    rotary: str | None = "model.rotary_emb"  # rebuilt fresh per span; None: no rotary (alibi)
    attention: str = "self_attn"  # a layer's attention module (holds the cache's layer_idx)
    call: str = "llama"  # one of CALLS
    rotary_per_kind: bool = False  # rotary(x, positions, layer_type): one table per attention kind
    # the client head (client_head.py)
    head_norm: str = "rms"  # one of NORMS
    eps: str = "rms_norm_eps"  # config setting of the final norm's epsilon
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the weights' dtype (Gemma)
    embed_norm: str | None = None  # a LayerNorm of the embeddings, client side (BLOOM)
    softcap: str | None = None  # config setting: logits = cap * tanh(logits / cap) (Gemma)
    # the checkpoint
    aliases: tuple[tuple[str, str], ...] = ()  # (transformers' name, config.json's name)
    renames: tuple[tuple[str, str], ...] = ()  # (module local prefix, file local prefix)
    stacked: tuple[Stacked, ...] = ()

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."

    def file_name(self, local: str) -> str:
        """The file's local name of a layer's module tensor ``local`` (its renames applied)."""
        for module_prefix, file_prefix in self.renames:
            if local.startswith(module_prefix):
                return file_prefix + local[len(module_prefix) :]
        return local

    def setting_name(self, name: str) -> str:
        """The name config.json stores transformers' setting ``name`` under."""
        return dict(self.aliases).get(name, name)


_GEMMA = dict(head_norm="gemma_rms", embed_scale=True, softcap="final_logit_softcapping")
_TRANSFORMER = dict(
    layers="transformer.h",
    embed="transformer.word_embeddings",
    norm="transformer.ln_f",
    attention="self_attention",
    head_norm="layer",
    eps="layer_norm_epsilon",
)

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama"),  # Llama 2/3, SmolLM, TinyLlama
        Family("mistral"),
        Family("qwen2"),
        Family("qwen3"),  # adds q_norm/k_norm inside attention: same layer interface
        Family("phi3"),  # fused qkv_proj / gate_up_proj, partial rotary: inside the layer
        Family(
            "mixtral",  # experts fused by transformers 5; files keep one tensor per expert
            renames=(("mlp.gate.", "block_sparse_moe.gate."),),
            stacked=(
                Stacked(
                    "mlp.experts.gate_up_proj",
                    (
                        "block_sparse_moe.experts.{e}.w1.weight",
                        "block_sparse_moe.experts.{e}.w3.weight",
                    ),
                    "num_local_experts",
                ),
                Stacked(
                    "mlp.experts.down_proj",
                    ("block_sparse_moe.experts.{e}.w2.weight",),
                    "num_local_experts",
                ),
            ),
        ),
        Family("gemma2", **_GEMMA),  # attention soft-capping and sliding windows: in the layer
        Family("gemma3_text", rotary_per_kind=True, **_GEMMA),
        Family("falcon", call="falcon", rotary="transformer.rotary_emb", **_TRANSFORMER),
        Family(
            "bloom",
            call="bloom",
            rotary=None,  # alibi: span.py builds the bias from the cache's length
            embed_norm="transformer.word_embeddings_layernorm",
            aliases=(("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head")),
            **_TRANSFORMER,
        ),
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


def check_config(config: Any) -> None:
    """ModelError for settings of a supported family that its span cannot run (yet)."""
    family = family_for(config)
    if family.call == "falcon" and getattr(config, "alibi", False):
        raise ModelError(
            "falcon config 'alibi' must be false (rotary Falcon: 7B/40B/180B), got true "
            "(Falcon-RW's alibi is not supported)"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelError("config 'use_bidirectional_attention' must be false (causal LM), got true")
    layer_types(config)


def cache_heads(config: Any) -> int:
    """Key/value heads one position holds in a layer's attention cache."""
    if family_for(config).call == "falcon":
        if config.new_decoder_architecture:  # keys are broadcast to every query head first
            return int(config.num_attention_heads)
        return 1 if config.multi_query else int(config.num_attention_heads)
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


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
