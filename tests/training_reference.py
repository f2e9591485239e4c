"""The ground truth for training tests: the whole Hugging Face model run locally, with prompts.

Deep prompts are added by forward pre-hooks on transformers' own decoder layers (not by our
BlockSpan), so the swarm's numbers are checked against code that shares nothing with the servers'.
All functions run the full sequence from position 0 without a cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F


@contextmanager
def deep_prompt_hooks(ref: Any, deep: torch.Tensor | None) -> Iterator[None]:
    """While open, layer i of ``ref`` adds ``deep[i]`` ``# (P, H)`` to its input's first P positions."""
    if deep is None:
        yield
        return

    def hook(i: int) -> Any:
        def add(module: Any, args: tuple, kwargs: dict) -> tuple:
            hidden = args[0]
            n = deep.shape[1]
            hidden = torch.cat([hidden[:, :n] + deep[i], hidden[:, n:]], dim=1)
            return (hidden, *args[1:]), kwargs

        return add

    handles = [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True)
        for i, layer in enumerate(ref.model.layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def blocks_output(ref: Any, hidden: torch.Tensor, deep: torch.Tensor | None = None) -> torch.Tensor:
    """The last decoder layer's output ``# (B, T, H)`` (before the final norm) for input embeddings."""
    seen: dict[str, torch.Tensor] = {}
    handle = ref.model.norm.register_forward_pre_hook(
        lambda module, args: seen.setdefault("x", args[0])
    )
    try:
        with deep_prompt_hooks(ref, deep):
            ref.model(inputs_embeds=hidden)
    finally:
        handle.remove()
    return seen["x"]


def embeds_with_prompt(
    ref: Any, input_ids: torch.Tensor, prompt: torch.Tensor | None
) -> torch.Tensor:
    embeds = ref.model.embed_tokens(input_ids)  # (B, T, H)
    if prompt is None:
        return embeds
    return torch.cat([prompt.expand(input_ids.shape[0], -1, -1), embeds], dim=1)  # (B, P + T, H)


def causal_lm_loss(
    ref: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    prompt: torch.Tensor | None,
    deep: torch.Tensor | None,
) -> torch.Tensor:
    """transformers' own loss (labels shifted inside) with the soft prompt's positions ignored; as in
    Petals, the first token is not predicted from the prompt's last position either."""
    n = 0 if prompt is None else prompt.shape[0]
    ignore = torch.full((labels.shape[0], n), -100, dtype=labels.dtype)
    labels = labels.clone()
    labels[:, 0] = -100
    with deep_prompt_hooks(ref, deep):
        out = ref(
            inputs_embeds=embeds_with_prompt(ref, input_ids, prompt),
            labels=torch.cat([ignore, labels], dim=1),
        )
    return out.loss


def greedy_tokens(
    ref: Any,
    input_ids: torch.Tensor,
    prompt: torch.Tensor | None,
    deep: torch.Tensor | None,
    new: int,
) -> torch.Tensor:
    """Greedy continuation, recomputing the whole sequence every step (no cache)."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(new):
            with deep_prompt_hooks(ref, deep):
                logits = ref(
                    inputs_embeds=embeds_with_prompt(ref, ids, prompt)
                ).logits  # (B, P + T, V)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def classifier_logits(
    ref: Any,
    score: torch.nn.Linear,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    prompt: torch.Tensor | None,
) -> torch.Tensor:
    """A score head on the normed state of each sequence's last real token (right padding)."""
    n = 0 if prompt is None else prompt.shape[0]
    hidden = ref.model(
        inputs_embeds=embeds_with_prompt(ref, input_ids, prompt)
    ).last_hidden_state  # normed
    last = hidden[torch.arange(input_ids.shape[0]), n + mask.sum(1) - 1]  # (B, H)
    return score(last)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


@contextmanager
def lora_hooks(ref: Any, lora: Any) -> Iterator[None]:
    """While open, every adapted Linear of ``ref`` adds ``scale * B (A x)`` (a model.LoraWeights)."""
    handles = []
    for block, modules in [] if lora is None else lora.modules.items():
        for name, mod in modules.items():
            linear = ref.model.layers[block].get_submodule(name)
            handles.append(
                linear.register_forward_hook(
                    lambda module, args, out, mod=mod: (
                        out + (args[0] @ mod.a.T @ mod.b.T) * mod.scale
                    )
                )
            )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def grads_across_a_freeze(
    remote: Any,
    hidden: torch.Tensor,
    prompts: torch.Tensor,
    weight: torch.Tensor,
    freeze: Any,
    *,
    warm: int,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``warm`` forward and backward passes of a RemoteSequential (the client learns what its
    requests cost), then one more whose backward comes after ``freeze(peer ids its forward used)``
    froze one of those servers and returned its id: the input's and prompts' gradients of that
    last pass ``(out * weight).sum()``, and the frozen id. Blocking: run it in a worker thread."""
    for _ in range(warm):
        (remote(hidden, prompts.clone().requires_grad_(True)) * weight).sum().backward()
    h, p = hidden.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    out = remote(h, p)
    frozen = freeze({hop.server.peer_id for trace in out.grad_fn.traces for hop, *_ in trace})
    (out * weight).sum().backward()
    return h.grad, p.grad, frozen
