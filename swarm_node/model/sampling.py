"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling,
and the repetition penalty that reshapes logits before it.

Pure function of (logits, settings, generator). Knows nothing of models or tokenizers.
"""

from __future__ import annotations

import math

import torch

from swarm_node.errors import ConfigError


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Logits `# (B, V)` -> token ids `# (B,)` (int64).

    temperature 0 picks the argmax (greedy, no randomness); otherwise softmax(logits / temperature)
    restricted to the smallest set of top tokens whose probability reaches `top_p` (always at least
    the most likely one) and, when `top_k` > 0, to the `top_k` most likely tokens, sampled with
    `generator` (seed it for reproducible output).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or 0 in logits.shape:
        raise ConfigError(
            f"'logits' must be a non-empty (B, V) tensor, got {getattr(logits, 'shape', logits)!r}"
        )
    if not logits.is_floating_point():
        raise ConfigError(f"'logits' must be a floating tensor, got {logits.dtype}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ConfigError(f"'temperature' must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ConfigError(f"'top_p' must be a number in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"'top_k' must be an int >= 0 (0: no limit), got {top_k!r}")

    with torch.inference_mode():
        logits = logits.detach()
        if temperature == 0:
            return logits.argmax(dim=-1)  # (B,)
        probs = sampling_probs(logits, temperature=temperature, top_p=top_p, top_k=top_k)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def sampling_probs(
    logits: torch.Tensor, *, temperature: float, top_p: float, top_k: int = 0
) -> torch.Tensor:
    """Logits `# (B, V)` -> the distribution `sample_next_token` draws from `# (B, V)` (temperature
    > 0; settings as checked there), not normalised after top-p (as `torch.multinomial` takes it)."""
    with torch.inference_mode():
        logits = logits.detach().float()
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
        if top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
            sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return probs


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Logits `# (B, V)` with every token of `seen` `# (B, T)` made less likely (CTRL's rule, as in
    transformers): a positive logit is divided by `penalty`, a negative one multiplied by it.
    `penalty` 1.0 changes nothing; > 1 discourages repeats."""
    if (
        isinstance(penalty, bool)
        or not isinstance(penalty, int | float)
        or not (math.isfinite(penalty) and penalty > 0)
    ):
        raise ConfigError(f"'repetition_penalty' must be a finite number > 0, got {penalty!r}")
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    if seen.dim() != 2 or seen.shape[0] != logits.shape[0]:
        raise ConfigError(
            f"'seen' must be (B, T) with B = {logits.shape[0]}, got {tuple(seen.shape)}"
        )
    with torch.inference_mode():
        scores = logits.gather(-1, seen)  # (B, T)
        scores = torch.where(scores > 0, scores / penalty, scores * penalty)
        return logits.scatter(-1, seen, scores)  # (B, V)
