"""Prompt tuning: trainable soft prompts (``ptune``) and a trainable prefix for every block (``deep_ptune``).

As in Petals: the soft prompt ``# (P, H)`` is prepended to the input embeddings on the client; a deep
prompt ``# (L, P, H)`` is added, before block i, to the hidden states of the positions [0, P) (the
positions of the soft prompt), on the servers. The deep prompts start at zero, so an untrained
``deep_ptune`` model computes what a ``ptune`` one does.

Knows nothing of peers or the wire: ``add_prompt`` is what a server runs, ``PromptTuning`` what a
client trains, ``check_prompts`` what a server asks of prompts a client sent.
"""

from __future__ import annotations

import torch

from swarm_node.errors import ConfigError, check_int

TUNING_MODES = (None, "ptune", "deep_ptune")
MAX_PRE_SEQ_LEN = 1024  # prompt positions a client may ask for


def add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, past: int) -> torch.Tensor:
    """Hidden states ``# (B, T, H)`` of positions [past, past + T) plus ``prompt[p]`` ``# (P, H)`` at
    every position p < P among them (out of place, so autograd reaches both)."""
    stop = min(prompt.shape[0], past + hidden.shape[1])
    if stop <= past:
        return hidden
    n = stop - past
    head = hidden[:, :n] + prompt[past:stop].to(hidden.dtype)  # (B, n, H)
    return torch.cat([head, hidden[:, n:]], dim=1)


def check_prompts(
    prompts: torch.Tensor, *, num_blocks: int, hidden_size: int, dtype: torch.dtype
) -> str | None:
    """Why ``prompts`` cannot be the deep prompts of ``num_blocks`` blocks (None: they can)."""
    shape = tuple(prompts.shape)
    if prompts.ndim != 3 or shape[0] != num_blocks or shape[2] != hidden_size:
        return f"prompts must have shape ({num_blocks}, P, {hidden_size}), got {shape}"
    if not 1 <= shape[1] <= MAX_PRE_SEQ_LEN:
        return f"prompts must have 1 to {MAX_PRE_SEQ_LEN} positions, got {shape[1]}"
    if prompts.dtype != dtype:
        return f"prompts must be {str(dtype).removeprefix('torch.')}, got {str(prompts.dtype).removeprefix('torch.')}"
    if not bool(torch.isfinite(prompts).all()):
        return "prompts must be finite, got inf or nan"
    return None


class PromptTuning(torch.nn.Module):
    """The trainable prompts of one client: ``prompts`` ``# (P, H)`` and, for ``deep_ptune``,
    ``deep_prompts`` ``# (L, P, H)`` (zeros at first)."""

    def __init__(
        self,
        *,
        mode: str,
        pre_seq_len: int,
        hidden_size: int,
        num_blocks: int,
        init_std: float = 0.02,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if mode not in TUNING_MODES[1:]:
            raise ConfigError(f"'tuning_mode' must be one of {TUNING_MODES}, got {mode!r}")
        check_int("pre_seq_len", pre_seq_len, 1, MAX_PRE_SEQ_LEN)
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        self.prompts = torch.nn.Parameter(
            torch.randn(pre_seq_len, hidden_size, dtype=dtype) * init_std
        )
        self.deep_prompts = (
            torch.nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size, dtype=dtype))
            if mode == "deep_ptune"
            else None
        )

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``# (B, T, H)`` -> the soft prompt followed by them ``# (B, P + T, H)``."""
        prefix = self.prompts.to(embeds.dtype).expand(embeds.shape[0], -1, -1)  # (B, P, H)
        return torch.cat([prefix, embeds], dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, pre_seq_len={self.pre_seq_len}"
