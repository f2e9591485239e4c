"""What a client holds of the model: token embeddings, the final norm and the LM head.

`embed(ids) -> hidden` before the first span, `logits(hidden) -> logits` after the last.
Knows nothing of spans, sampling or peers.

Every family in model/families.py has the same three parts (an ``nn.Embedding``, an RMS norm, a
bias-free ``nn.Linear``), so the head is built here in plain torch from config.json's numbers, never
through transformers' model classes: a client starts ~2 s sooner (issue 21), and ``RMSNorm``
computes exactly what transformers' Llama/Mistral/Qwen2/Qwen3 norms compute (the tests compare
logits with transformers' model bit for bit).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from swarm_node.errors import ConfigError
from swarm_node.model.checkpoint import Checkpoint
from swarm_node.model.skeleton import materialize


class RMSNorm(torch.nn.Module):
    """transformers' LlamaRMSNorm (and its Mistral/Qwen copies), operation for operation."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class ClientHead(torch.nn.Module):
    """Embeddings + final norm + LM head of one model; load with `ClientHead.load`."""

    def __init__(
        self,
        *,
        embed_tokens: torch.nn.Embedding,
        norm: torch.nn.Module,
        lm_head: torch.nn.Linear,
        dtype: torch.dtype,
        tied: bool,
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        self.dtype = dtype
        self.tied = tied  # lm_head.weight is embed_tokens.weight
        self.hidden_size = int(embed_tokens.embedding_dim)
        self.vocab_size = int(embed_tokens.num_embeddings)

    @property
    def device(self) -> torch.device:
        """Where the head's weights are and its embeddings and logits come out."""
        return self.embed_tokens.weight.device

    @classmethod
    def load(
        cls,
        checkpoint: Checkpoint,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ClientHead:
        """Reads only the embeddings, the final norm and the LM head (when not tied), each tensor
        streamed to ``device``."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"'dtype' must be a floating torch.dtype, got {dtype!r}")
        device = torch.device(device)
        family = checkpoint.family
        hidden, vocab = (
            int(checkpoint.setting("hidden_size")),
            int(checkpoint.setting("vocab_size")),
        )
        with torch.device("meta"):
            # given its weight, nn.Embedding skips its random init, whose meta version imports
            # torch._dynamo (~1.4 s)
            shape = torch.empty((vocab, hidden))
            embed = torch.nn.Embedding(
                vocab, hidden, checkpoint.setting("pad_token_id"), _weight=shape
            )
            norm = RMSNorm(hidden, eps=float(checkpoint.setting("rms_norm_eps")))
            lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        materialize(embed, checkpoint, family.embed + ".", dtype=dtype, device=device)
        materialize(norm, checkpoint, family.norm + ".", dtype=dtype, device=device)
        tied = bool(checkpoint.setting("tie_word_embeddings")) or not (
            checkpoint.has_tensor(family.lm_head + ".weight")
        )
        # Tied: the head shares the embedding's Parameter (one copy, one set of gradients);
        # anything else it has (a bias) still comes from the file.
        extra = {"weight": embed.weight} if tied else None
        materialize(
            lm_head, checkpoint, family.lm_head + ".", dtype=dtype, extra=extra, device=device
        )
        return cls(
            embed_tokens=embed,
            norm=norm,
            lm_head=lm_head,
            dtype=dtype,
            tied=tied,
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids `# (B, T)` -> hidden states `# (B, T, H)`."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ConfigError(
                f"'input_ids' must be a (B, T) tensor, "
                f"got {getattr(input_ids, 'shape', input_ids)!r}"
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"'input_ids' must be int64 or int32, got {input_ids.dtype}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ConfigError(
                f"'input_ids' must lie in [0, {self.vocab_size}), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        with self._mode(False):
            return self.embed_tokens(input_ids.to(self.device))  # (B, T, H), on the head's device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last span's hidden states `# (B, T, H)` -> logits `# (B, T, V)` (norm, then head)."""
        if (
            not isinstance(hidden, torch.Tensor)
            or hidden.dim() != 3
            or (hidden.shape[2] != self.hidden_size)
        ):
            raise ConfigError(
                f"'hidden' must have shape (B, T, {self.hidden_size}), "
                f"got {tuple(getattr(hidden, 'shape', ()))}"
            )
        with self._mode(hidden.requires_grad):
            return self.lm_head(self.norm(hidden.to(self.device, self.dtype)))  # (B, T, V)

    def _mode(self, input_requires_grad: bool) -> contextlib.AbstractContextManager[Any]:
        needs_grad = torch.is_grad_enabled() and (
            input_requires_grad or any(p.requires_grad for p in self.parameters())
        )
        return contextlib.nullcontext() if needs_grad else torch.inference_mode()
