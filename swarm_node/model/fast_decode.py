"""One decode step (one new position) through Llama-like blocks, without transformers' module plumbing.

transformers' decoder layers spend part of a SmolLM2 decode step in Python between the tensor ops
(module calls, keyword plumbing, mask building, attention dispatch): the same 30 blocks take 1.05-1.07x
the time through them, step for step (`scripts/bench_decode_step.py`; a first probe, steps not
interleaved, saw 44.6 against 37.5 ms). This module replays, op for op, what
the pinned transformers' Llama, Mistral, Qwen2 and Qwen3 layers do for one new position with an
sdpa cache and no mask (and for a speculative step's few positions after cached ones: their
causal mask, key/value heads repeated), so the result is bit-for-bit theirs
(tests/test_fast_decode.py compares `torch.equal` per family) and the cache is the same
DynamicCache the slow path fills.

Anything else (prefill, LoRA, deep prompts, quantized or unknown layers, sliding windows, eager
attention) takes transformers' path: `supports(...)` says which. Knows nothing of sessions or peers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Layer classes whose forward (pinned transformers 5.24.0) `decode_step` replays exactly.
LAYER_CLASSES = frozenset(
    {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORM_CLASSES = ("RMSNorm",)  # LlamaRMSNorm, MistralRMSNorm, ...: x * rsqrt(mean(x^2) + eps) * w


def supports(layers: torch.nn.ModuleList, config: Any, kinds: list[str]) -> bool:
    """Whether every layer is one `decode_step` replays exactly (checked once per span)."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False  # eager attention sums in another order
    if any(kind != "full_attention" for kind in kinds):
        return False  # a sliding window masks old positions: transformers builds that mask
    for layer in layers:
        if type(layer).__name__ not in LAYER_CLASSES:
            return False
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return False
        linears = [getattr(attn, n, None) for n in _PROJECTIONS] + [
            getattr(mlp, n, None) for n in _MLP
        ]
        if any(type(m) is not torch.nn.Linear for m in linears):  # bitsandbytes layers, adapters
            return False
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]
        if any(not type(n).__name__.endswith(_NORM_CLASSES) for n in norms):
            return False
        groups = getattr(attn, "num_key_value_groups", 1)
        if groups > 1 and attn.head_dim > 256:  # transformers packs the query heads instead
            return False
        if getattr(attn, "attention_dropout", 0.0) != 0.0:  # transformers drops out in train mode
            return False
    return True


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    x = x[:, :, None, :, :].expand(batch, heads, groups, length, dim)
    return x.reshape(batch, heads * groups, length, dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decode_step(
    layers: torch.nn.ModuleList,
    hidden: torch.Tensor,
    dynamic: Any,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    past: int = 0,
) -> torch.Tensor:
    """`hidden` `# (B, T, H)` of T new positions after `past` cached ones through `layers`; layer j
    appends to cache layer j. Several positions (a speculative step's drafts) attend as transformers'
    sdpa path has them: through its causal mask, the key/value heads repeated for grouped queries.

    Call only where `supports(...)` holds, under inference mode (no autograd).
    """
    new_tokens = hidden.shape[1]
    mask = None
    if new_tokens > 1:  # position past + i sees keys 0..past + i
        keys = torch.arange(past + new_tokens, device=hidden.device)
        queries = torch.arange(past, past + new_tokens, device=hidden.device)
        mask = (keys[None, :] <= queries[:, None])[None, None]  # (1, 1, T, past + T)
    rows = [hidden.shape[0]]
    return decode_batch(layers, hidden, [dynamic], rows, position_embeddings, mask=mask)


def decode_batch(
    layers: torch.nn.ModuleList,
    hidden: torch.Tensor,
    dynamics: list[Any],
    rows: list[int],
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new position of several sessions at once: `hidden` `# (N, 1, H)` holds `rows[i]` rows of
    session i (in order), whose cache is `dynamics[i]`; `position_embeddings` `# (N or 1, 1, D)`.

    The linears and norms run over all N rows together (the weights are read once); attention runs
    per session over its own cache, so sessions of different lengths need no mask. With one session
    this is `decode_step` op for op; with more, a linear over N rows may round differently than over
    one (BLAS blocking), so a row's output is that of its lone step within float tolerance.
    `mask` (`decode_step`'s, one session only): several new positions, causal among themselves.
    """
    batch, new_tokens, _ = hidden.shape
    cos, sin = position_embeddings  # (N or 1, 1, D) each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (N or 1, 1, 1, D): broadcast over heads
    bounds = [0]
    for n in rows:
        bounds.append(bounds[-1] + n)
    for j, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        residual = hidden
        x = _rms_norm(hidden, layer.input_layernorm)
        shape = (batch, new_tokens, -1, attn.head_dim)
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(shape)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(shape)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(shape).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head norm before the rotation
            q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, 1, D)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        groups = getattr(attn, "num_key_value_groups", 1)
        gqa = {"enable_gqa": True} if groups > 1 and mask is None else {}
        outs = []
        for dynamic, a, b in zip(dynamics, bounds, bounds[1:], strict=False):
            if len(dynamics) > 1:
                qs, ks, vs = q[a:b], k[a:b], v[a:b]
            else:
                qs, ks, vs = q, k, v
            ks, vs = dynamic.update(ks, vs, j)  # (B, kv_heads, L, D): the past and this position
            if groups > 1 and mask is not None:  # transformers' sdpa repeats them under a mask
                ks, vs = _repeat_kv(ks, groups), _repeat_kv(vs, groups)
            outs.append(
                F.scaled_dot_product_attention(
                    qs,
                    ks,
                    vs,
                    attn_mask=mask,
                    dropout_p=0.0,
                    scale=attn.scaling,
                    is_causal=False,
                    **gqa,
                )
            )
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        out = out.reshape(out.shape[0], -1, new_tokens, v.shape[-1]).transpose(1, 2).contiguous()
        out = out.reshape(batch, new_tokens, -1).contiguous()
        hidden = residual + F.linear(out, attn.o_proj.weight, attn.o_proj.bias)
        residual = hidden
        x = _rms_norm(hidden, layer.post_attention_layernorm)
        gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
        up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
        hidden = residual + F.linear(
            mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias
        )
    return hidden  # (N, 1, H)
