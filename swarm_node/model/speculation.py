"""Which draft tokens one verification step accepts, so that speculative decoding emits exactly what
decoding one token at a time would (greedy) or tokens of exactly its distribution (sampling).

Greedy: the drafts the target's argmax agrees with, then the target's own next token. Sampling
(Leviathan et al. 2023, Chen et al. 2023): draft ``d_j`` drawn with probability ``q_j(d_j)`` is
accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection the token comes from
the residual ``max(0, p_j - q_j)`` normalised, and when every draft is accepted one more comes from
``p_k``. A drafter that proposes one token for sure (prompt lookup, a greedy draft model) has ``q_j``
a point mass: accept with probability ``p_j(d_j)``, else draw from ``p_j`` without ``d_j``.
``p_j`` is what ``sample_next_token`` draws from (temperature, top-k, top-p, the repetition penalty
over the tokens before position j).

Pure torch: the target's logits in, tokens out. Knows nothing of models, drafters or sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from swarm_node.errors import ConfigError
from swarm_node.model.sampling import apply_repetition_penalty, sampling_probs


def accept_drafts(
    logits: torch.Tensor,
    drafts: Sequence[int],
    seen: torch.Tensor,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    bound: torch.Tensor | None = None,
    exact_row: Callable[[int], torch.Tensor] | None = None,
) -> list[int]:
    """The tokens a step emits: the accepted drafts and one more (1 to k + 1 tokens).

    ``logits`` ``# (k + 1, V)``: the target's, after the last emitted token and after each draft;
    ``seen`` ``# (n,)``: the tokens before the drafts (for the repetition penalty);
    ``draft_probs`` ``# (k, V)``: the distributions the drafts were drawn from (None: point masses);
    ``bound`` ``# (k + 1,)``: how far each row of ``logits`` may lie from the plain decoder's logits
    of that position (ClientHead.verify_logits): greedy takes row j from ``exact_row(j)`` ``# (V,)``
    where its top two lie within twice that (times the repetition penalty), so that a near tie goes
    the plain decoder's way.
    """
    k = len(drafts)
    if logits.dim() != 2 or logits.shape[0] != k + 1:
        raise ConfigError(
            f"'logits' must be (len(drafts) + 1, V) = ({k + 1}, V), got {tuple(logits.shape)}"
        )
    if draft_probs is not None and tuple(draft_probs.shape) != (k, logits.shape[1]):
        raise ConfigError(
            f"'draft_probs' must be ({k}, {logits.shape[1]}), got {tuple(draft_probs.shape)}"
        )
    emitted: list[int] = []
    for j in range(k + 1):
        context = torch.cat([seen, torch.tensor(emitted, dtype=seen.dtype)])[None]  # (1, n + j)
        row = apply_repetition_penalty(logits[j : j + 1].float(), context, repetition_penalty)
        if temperature == 0:
            if exact_row is not None and bound is not None:
                scale = max(repetition_penalty, 1 / repetition_penalty)
                if _near_tie(row[0], 2 * scale * float(bound[j])):
                    row = apply_repetition_penalty(
                        exact_row(j)[None].float(), context, repetition_penalty
                    )
            token = int(row.argmax(dim=-1))
            emitted.append(token)
            if j == k or token != drafts[j]:
                return emitted
            continue
        probs = sampling_probs(row, temperature=temperature, top_p=top_p, top_k=top_k)[0]  # (V,)
        probs = probs / probs.sum()  # top-p leaves the kept mass unnormalised
        if j == k:
            emitted.append(_draw(probs, generator))
            return emitted
        draft = drafts[j]
        q = None if draft_probs is None else draft_probs[j].float() / draft_probs[j].sum()
        q_draft = 1.0 if q is None else float(q[draft])
        u = float(torch.rand((), generator=generator))
        if q_draft > 0 and u * q_draft < float(probs[draft]):  # u < p / q
            emitted.append(draft)
            continue
        if q is None:
            residual = probs.clone()
            residual[draft] = 0.0
        else:
            residual = (probs - q).clamp(min=0.0)
        emitted.append(_draw(residual if float(residual.sum()) > 0 else probs, generator))
        return emitted
    raise AssertionError("unreachable: the last position always returns")


def _near_tie(row: torch.Tensor, within: float) -> bool:
    if row.shape[0] < 2:
        return False
    top = row.topk(2).values
    return float(top[0] - top[1]) <= within


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(weights, 1, generator=generator))
