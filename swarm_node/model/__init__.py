"""Pure torch over Hugging Face transformers: checkpoints, block spans with KV caches, client head.

Loads only the weights a part needs from safetensors; knows nothing of peers, trio or the wire.
transformers' model classes are imported lazily, inside the functions that need them; the names
below load their module (and torch) on first use, so that a peer that only looks models up by name
(``model.bundled``, ``model.identity``: ``swarm-node status``) never imports torch.
"""

from __future__ import annotations

from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later uses are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
