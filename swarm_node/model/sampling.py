"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling.

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
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Logits `# (B, V)` -> token ids `# (B,)` (int64).

    temperature 0 picks the argmax (greedy, no randomness); otherwise softmax(logits / temperature)
    restricted to the smallest set of top tokens whose probability reaches `top_p` (always at least
    the most likely one), sampled with `generator` (seed it for reproducible output).
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

    with torch.inference_mode():
        logits = logits.detach()
        if temperature == 0:
            return logits.argmax(dim=-1)  # (B,)
        probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
        if top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
            sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
