"""Pure torch over Hugging Face transformers: checkpoints, block spans with KV caches, client head.

Loads only the weights a part needs from safetensors; knows nothing of peers, trio or the wire.
transformers' model classes are imported lazily, inside the functions that need them; the names
below load their module (and torch) on first use, so that a peer that only looks models up by name
(``model.bundled``, ``model.identity``: ``swarm-node status``) never imports torch.
"""

from __future__ import annotations

from swarm_node.lazy_names import lazy_names

__all__ = [
    "BUNDLED_MODELS",
    "FAMILIES",
    "BlockSpan",
    "BundledModel",
    "Checkpoint",
    "ClientHead",
    "Family",
    "ModelIdentity",
    "SpanCache",
    "apply_repetition_penalty",
    "default_cache_dir",
    "family_for",
    "identity_of",
    "load_tokenizer",
    "model_id_of",
    "resolve_model",
    "sample_next_token",
]

_LAZY = {
    "Checkpoint": "checkpoint",
    "ClientHead": "client_head",
    "FAMILIES": "families",
    "Family": "families",
    "family_for": "families",
    "ModelIdentity": "identity",
    "SpanCache": "kv_cache",
    "apply_repetition_penalty": "sampling",
    "sample_next_token": "sampling",
    "BlockSpan": "span",
} | dict.fromkeys(
    (
        "BUNDLED_MODELS",
        "BundledModel",
        "default_cache_dir",
        "identity_of",
        "load_tokenizer",
        "model_id_of",
        "resolve_model",
    ),
    "bundled",
)


__getattr__ = lazy_names(__name__, {k: f"{__name__}.{v}" for k, v in _LAZY.items()}, globals())
