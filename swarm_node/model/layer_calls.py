"""How a span calls one transformers decoder layer of each family (families.Family.call).

Llama-like layers take `(hidden, attention_mask, position_ids, cache, position_embeddings)` and
return the hidden states; Falcon's take the cache as `layer_past` and an `alibi` (None: rotary) and
return a tuple; BLOOM's take positions only as an alibi bias over every key so far (built here from
the cache's length, as BloomModel builds it) and return a tuple. Masks are built by transformers'
masking_utils per attention kind, as the families' own models build them. Knows nothing of
sessions, prompts or peers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from swarm_node.model.families import Family


@dataclass(frozen=True, slots=True)
class LayerInputs:
    """What every layer of one attention kind gets in one call."""

    mask: Any  # transformers' mask for the kind (None where it needs none)
    positions: Any  # (cos, sin) for rotary families; BLOOM's alibi `# (B * heads, 1, past + T)`


def layer_inputs(
    family: Family,
    config: Any,
    rotary: torch.nn.Module | None,
    hidden: torch.Tensor,
    cache: Any,
    position_ids: torch.Tensor,
    past: int,
    kinds: list[str],
) -> dict[str, LayerInputs]:
    """Masks and positions of new positions `position_ids` `# (1, T)` after `past` cached ones,
    `# hidden (B, T, H)`, per attention kind."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    batch, new_tokens, _ = hidden.shape
    mask_kwargs = dict(
        config=config,
        inputs_embeds=hidden,
        attention_mask=None,
        cache=cache,
        position_ids=position_ids,
    )
    out = {}
    for kind in dict.fromkeys(kinds):
        if kind == "sliding_attention":
            mask = create_sliding_window_causal_mask(**mask_kwargs)
        else:  # Falcon's model always materialises the mask (sdpa then gets it, not is_causal)
            skip = {"allow_is_causal_skip": False} if family.call == "falcon" else {}
            mask = create_causal_mask(**mask_kwargs, **skip)
        if rotary is None:
            positions = _alibi(config, batch, past + new_tokens, hidden)
        elif family.rotary_per_kind:
            positions = rotary(hidden, position_ids, kind)
        else:
            positions = rotary(hidden, position_ids=position_ids)
        out[kind] = LayerInputs(mask=mask, positions=positions)
    return out


def _alibi(config: Any, batch: int, keys: int, hidden: torch.Tensor) -> torch.Tensor:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    ones = torch.ones((batch, keys), dtype=torch.int64, device=hidden.device)
    return build_alibi_tensor(ones, int(config.num_attention_heads), dtype=hidden.dtype)


def run_layer(
    family: Family,
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    inputs: LayerInputs,
    position_ids: torch.Tensor,
    cache: Any,
) -> torch.Tensor:
    """One decoder layer: hidden `# (B, T, H)` -> `# (B, T, H)`; the cache (if any) grows by T."""
    use_cache = cache is not None
    if family.call == "bloom":
        return layer(
            hidden,
            alibi=inputs.positions,
            attention_mask=inputs.mask,
            layer_past=cache,
            use_cache=use_cache,
        )[0]
    if family.call == "falcon":
        return layer(
            hidden,
            alibi=None,
            attention_mask=inputs.mask,
            position_ids=position_ids,
            layer_past=cache,
            use_cache=use_cache,
            position_embeddings=inputs.positions,
        )[0]
    return layer(
        hidden,
        attention_mask=inputs.mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=inputs.positions,
    )
