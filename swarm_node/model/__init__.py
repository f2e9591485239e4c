"""Pure torch over Hugging Face transformers: checkpoints, block spans with KV caches, client head.

Loads only the weights a part needs from safetensors; knows nothing of peers, trio or the wire.
transformers' model classes are imported lazily, inside the functions that need them.
"""

from swarm_node.model.bundled import (
    BUNDLED_MODELS,
    BundledModel,
    default_cache_dir,
    identity_of,
    load_tokenizer,
    model_id_of,
    resolve_model,
)
from swarm_node.model.checkpoint import Checkpoint
from swarm_node.model.client_head import ClientHead
from swarm_node.model.families import FAMILIES, Family, family_for
from swarm_node.model.identity import ModelIdentity
from swarm_node.model.kv_cache import SpanCache
from swarm_node.model.sampling import apply_repetition_penalty, sample_next_token
from swarm_node.model.span import BlockSpan

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
