"""What a client holds of the model: token embeddings, the final norm and the LM head.

`embed(ids) -> hidden` before the first span, `logits(hidden) -> logits` after the last.
Knows nothing of spans, sampling or peers.

Every family in model/families.py has the same parts (an ``nn.Embedding``, a final norm, an
``nn.Linear``) and a few extras its row names (Gemma scales the embeddings and soft-caps the logits,
BLOOM normalises the embeddings), so the head is built here in plain torch from config.json's
numbers, never through transformers' model classes: a client starts ~2 s sooner (issue 21), and
each norm computes exactly what the family's transformers norm computes (tests/test_model.py and
tests/test_families_head.py compare with transformers' modules bit for bit).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from swarm_node.errors import ConfigError, ModelError
from swarm_node.model.checkpoint import Checkpoint
from swarm_node.model.families import Family
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


class GemmaRMSNorm(torch.nn.Module):
    """transformers' Gemma2RMSNorm / Gemma3RMSNorm: in float32, scaled by (1 + weight)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = x.float()
        output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + self.eps)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class ScaledEmbedding(torch.nn.Embedding):
    """transformers' Gemma*TextScaledWordEmbedding: rows times `scale`, rounded to the weights'
    dtype first (sqrt(hidden_size) as a float32 tensor, cast)."""

    def __init__(self, *args: Any, scale: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, device=self.weight.device).to(self.weight.dtype)
        return super().forward(input_ids) * scale


def _norm(kind: str, hidden: int, eps: float) -> torch.nn.Module:
    if kind == "gemma_rms":
        return GemmaRMSNorm(hidden, eps=eps)
    if kind == "layer":
        return torch.nn.LayerNorm(hidden, eps=eps)
    return RMSNorm(hidden, eps=eps)


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
        embed_norm: torch.nn.Module | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens  # with the family's scaling (Gemma) inside
        self.embed_norm = embed_norm  # BLOOM's LayerNorm of the embeddings, else None
        self.norm = norm
        self.lm_head = lm_head
        self.softcap = softcap  # Gemma's final logit soft-capping, else None
        self.dtype = dtype
        self.tied = tied  # lm_head.weight is embed_tokens.weight
        self.hidden_size = int(embed_tokens.embedding_dim)
        self.vocab_size = int(embed_tokens.num_embeddings)
        self._row_norm: torch.Tensor | None = None  # verify_logits' bound, for _row_norm_key
        self._row_norm_key: tuple[int, int] | None = None

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
        eps = float(checkpoint.setting(family.eps))
        with torch.device("meta"):
            # given its weight, nn.Embedding skips its random init, whose meta version imports
            # torch._dynamo (~1.4 s)
            shape = torch.empty((vocab, hidden))
            embed = _embedding(family, vocab, hidden, checkpoint.setting("pad_token_id"), shape)
            norm = _norm(family.head_norm, hidden, eps)
            embed_norm = None if family.embed_norm is None else _norm("layer", hidden, eps)
            bias = checkpoint.has_tensor(family.lm_head + ".bias")
            lm_head = torch.nn.Linear(hidden, vocab, bias=bias)
        materialize(embed, checkpoint, family.embed + ".", dtype=dtype, device=device)
        materialize(norm, checkpoint, family.norm + ".", dtype=dtype, device=device)
        if embed_norm is not None:
            materialize(embed_norm, checkpoint, f"{family.embed_norm}.", dtype=dtype, device=device)
        tied = not checkpoint.has_tensor(family.lm_head + ".weight") or bool(
            checkpoint.setting("tie_word_embeddings")
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
            embed_norm=embed_norm,
            softcap=_softcap(checkpoint, family),
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
            # (B, T, H), on the head's device
            return self.block_input(self.embed_tokens(input_ids.to(self.device)))

    def block_input(self, embeds: torch.Tensor) -> torch.Tensor:
        """Embeddings (``embed_tokens``' output, or a caller's own) -> what the first block takes:
        the family's embedding norm applied (BLOOM), else as they are."""
        if self.embed_norm is None:
            return embeds
        with self._mode(embeds.requires_grad):
            return self.embed_norm(embeds.to(self.device, self.dtype))  # (B, T, H)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last span's hidden states `# (B, T, H)` -> logits `# (B, T, V)` (norm, then head)."""
        self._check_hidden(hidden)
        with self._mode(hidden.requires_grad):
            logits = self.lm_head(self.norm(hidden.to(self.device, self.dtype)))  # (B, T, V)
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits

    def batch_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Several sessions' last positions `# (N, 1, H)` -> logits `# (N, 1, V)`, inference only:
        `logits` within float tolerance, computed as the head's weight times the rows' transpose.
        On a CPU that reads the weight once for every row: SmolLM2's 576 x 49152 head took
        13, 16, 17, 21, 25 ms of CPU for 1, 2, 3, 4, 8 rows this way against 15, 37, 48, 33, 44 ms
        as `logits` (torch's linear over 2-3 rows takes a slower path than over one or four)."""
        if type(self.lm_head) is not torch.nn.Linear or hidden.dim() != 3 or hidden.shape[1] != 1:
            return self.logits(hidden)
        with torch.inference_mode():
            rows = self.norm(hidden.to(self.device, self.dtype))[:, 0, :]  # (N, H)
            return self._rows_logits(rows)[:, None, :]  # (N, 1, V)

    def verify_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sequence's positions `# (1, T, H)` -> logits `# (T, V)`, inference only, and a bound
        `# (T,)` on how far each row's logits may lie from `logits` of that position alone (None:
        they are `logits`' own rows).

        On a CPU in float32 the rows run as the weight times their transpose (`batch_logits`: 8-9
        ms of CPU for 2-3 SmolLM2 rows against 29-39 ms as one linear), which sums in another
        order than `logits`; the bound is float32's worst case for a dot product of H terms
        (Higham's gamma_{H+2}, any order: ``gamma * |w_v| * |x|`` from the exact sum for each,
        with the largest row norm of the weight, plus the bias and the soft cap), so a caller
        that needs `logits`' argmax recomputes the rows whose top two lie closer than twice the
        bound (``row_logits``). Elsewhere (a GPU, half precision, another head) `logits` itself.
        """
        self._check_hidden(hidden)
        cpu_f32 = self.device.type == "cpu" and self.dtype == torch.float32
        if type(self.lm_head) is not torch.nn.Linear or not cpu_f32 or hidden.shape[0] != 1:
            with torch.inference_mode():
                return self.logits(hidden)[0], None
        with torch.inference_mode():
            rows = self.norm(hidden.to(self.device, self.dtype))[0]  # (T, H)
            logits = self._rows_logits(rows)  # (T, V)
            unit = torch.finfo(torch.float32).eps / 2
            terms = (self.hidden_size + 2) * unit
            gamma = terms / (1 - terms)
            size = rows.norm(dim=-1) * self._max_row_norm()  # (T,)
            if self.lm_head.bias is not None:
                size = size + self.lm_head.bias.abs().max()
            bound = 2 * gamma * size  # each within gamma * size of the exact sum
            if self.softcap is not None:  # tanh is 1-Lipschitz; its own rounding near the cap
                bound = bound + 4 * unit * self.softcap
            return logits, bound

    def row_logits(self, hidden: torch.Tensor, row: int) -> torch.Tensor:
        """`logits` of position ``row`` of ``hidden`` `# (1, T, H)` alone `# (V,)`: what a plain
        decode step computes for it."""
        with torch.inference_mode():
            return self.logits(hidden[:, row : row + 1, :])[0, 0]

    def _rows_logits(self, rows: torch.Tensor) -> torch.Tensor:
        logits = (self.lm_head.weight @ rows.T).T  # (N, V)
        if self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.contiguous()

    def _max_row_norm(self) -> torch.Tensor:
        """The largest norm of a row of the head's weight, computed once per weight tensor (the
        head is frozen at inference; a weight replaced or moved is measured again)."""
        weight = self.lm_head.weight
        key = (id(weight), weight.data_ptr())
        if self._row_norm is None or self._row_norm_key != key:
            self._row_norm = weight.detach().norm(dim=1).max()
            self._row_norm_key = key
        return self._row_norm

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if (
            not isinstance(hidden, torch.Tensor)
            or hidden.dim() != 3
            or (hidden.shape[2] != self.hidden_size)
        ):
            raise ConfigError(
                f"'hidden' must have shape (B, T, {self.hidden_size}), "
                f"got {tuple(getattr(hidden, 'shape', ()))}"
            )

    def _mode(self, input_requires_grad: bool) -> contextlib.AbstractContextManager[Any]:
        needs_grad = torch.is_grad_enabled() and (
            input_requires_grad or any(p.requires_grad for p in self.parameters())
        )
        return contextlib.nullcontext() if needs_grad else torch.inference_mode()


def _embedding(
    family: Family, vocab: int, hidden: int, pad: int | None, weight: torch.Tensor
) -> torch.nn.Embedding:
    if family.embed_scale:
        return ScaledEmbedding(vocab, hidden, pad, _weight=weight, scale=hidden**0.5)
    return torch.nn.Embedding(vocab, hidden, pad, _weight=weight)


def _softcap(checkpoint: Checkpoint, family: Family) -> float | None:
    cap = None if family.softcap is None else checkpoint.setting(family.softcap)
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 < cap < float("inf"):
        raise ModelError(f"config '{family.softcap}' must be a number > 0 or null, got {cap!r}")
    return float(cap)
