"""The servers' attention caches as transformers sees them: a ``Cache`` holding an inference session.

transformers' ``generate()`` asks a cache its sequence length, reorders its rows (beam search) and
crops it (assisted decoding); here those go to the servers: a reorder travels with the next step
(``InferenceSession.reorder``), a crop is ``InferenceSession.truncate`` (server-side rollback, the
speculative-decoding work). The session opens at the first step, when the batch is known, unless
the cache continues one already open (``with model.inference_session(...)``).

Knows nothing of tokens, sampling or the head: the model's forward embeds and calls ``step``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import torch
from transformers.cache_utils import Cache

from swarm_node.errors import ConfigError
from swarm_node.node.client.inference_session import InferenceSession

NO_ROLLBACK = (
    "cropping the remote caches (assisted generation: assistant_model=, prompt_lookup_num_tokens=) "
    "needs server-side rollback (InferenceSession.truncate, from the speculative-decoding work), "
    "which this build does not have"
)


def can_crop() -> bool:
    """Can the servers' caches be cut back (the speculative-decoding work's truncate)?"""
    return hasattr(InferenceSession, "truncate")


# (batch size, max_length) -> a TokenSession (generation.py) opened for them, and its closer
Opener = Callable[[int, int], tuple[Any, Callable[[], None]]]


class RemoteCache(Cache):
    """``token_session``: generation.py's TokenSession, whose ``fed`` positions the servers hold."""

    def __init__(
        self,
        *,
        run: Callable[..., Any],  # ClientLoop.run: an async function, run in the client's loop
        max_length: int,  # positions the session holds (the soft prompt's not included)
        opener: Opener | None = None,
        token_session: Any = None,
        prompt_tokens: int = 0,  # of the call; a first step with more (PEFT's virtual tokens) adds room
    ) -> None:
        super().__init__(layers=[])
        if (opener is None) == (token_session is None):  # our invariant, not user input
            raise AssertionError("a RemoteCache needs an opener or an open session, not both")
        self.run = run
        self.max_cache_length = max_length
        self.opener = opener
        self.token_session = token_session
        self.prompt_tokens = prompt_tokens
        self._close: Callable[[], None] | None = None

    def open(self, batch_size: int, tokens: int) -> Any:
        """The session, opened for ``batch_size`` rows at the first step (of ``tokens``)."""
        ts = self.token_session
        if ts is None:
            assert self.opener is not None
            self.max_cache_length += max(0, tokens - self.prompt_tokens)
            ts, self._close = self.opener(batch_size, self.max_cache_length)
            self.token_session = ts
        elif ts.batch_size != batch_size:
            raise ConfigError(
                f"the inference session holds {ts.batch_size} row(s), this step has {batch_size}: "
                "beam search and num_return_sequences > 1 need a generate() call of their own "
                "(outside 'with model.inference_session()')"
            )
        return ts

    def close(self) -> None:
        """Close the session if this cache opened it (one it continues stays open)."""
        close, self._close = self._close, None
        if close is not None:
            close()

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """The chain's output ``# (B, T, H)`` for the new positions ``# (B, T, H)``; the soft prompt
        (prompt tuning) goes first, once per session."""
        tokens = hidden.shape[1]
        ts = self.open(hidden.shape[0], tokens)
        if ts.fed == 0 and ts.prefix is not None:
            prefix = ts.prefix.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([prefix, hidden], dim=1)  # (B, P + T, H)
        out = self.run(ts.session.step, hidden)
        ts.fed += tokens
        return out[:, -tokens:]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.token_session is None else self.token_session.fed

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_cache_length

    @property
    def batch_size(self) -> int:
        return -1 if self.token_session is None else self.token_session.batch_size

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the servers reorder their rows with the next step (no round trip)."""
        ts = self.token_session
        if ts is None:
            raise ConfigError("reorder_cache before the first step: the session holds no rows yet")
        rows = beam_idx.to("cpu", torch.int64)
        self.run(_awaited, ts.session.reorder, rows.tolist())  # in the loop that owns the session
        if ts.ids.shape[0] == rows.shape[0]:
            ts.ids = ts.ids.index_select(0, rows)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (transformers' rule: a count <= 0; a legacy
        positive number is the length to keep) on every server."""
        ts = self.token_session
        held = self.get_seq_length()
        keep = held + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        if keep == held:
            return
        if not 0 <= keep < held:
            raise ConfigError(f"crop to {keep} positions: the cache holds {held}")
        truncate = getattr(ts.session, "truncate", None)
        if truncate is None:
            raise NotImplementedError(NO_ROLLBACK)
        self.run(_awaited, truncate, ts.prefix_len + keep)  # the servers hold the soft prompt too
        ts.fed = keep
        ts.ids = ts.ids[:, :keep]

    @property
    def is_croppable(self) -> bool:
        ts = self.token_session
        if ts is None or not hasattr(ts.session, "truncate"):
            return False
        return bool(getattr(ts.session, "can_truncate", True))  # every server rolls back

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.token_session is not None

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the remote caches' rows cannot be repeated (contrastive search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the remote caches' rows cannot be selected (contrastive search)")

    def reset(self) -> None:
        raise NotImplementedError("the remote caches cannot be reset: open a new session")

    def __repr__(self) -> str:
        return f"RemoteCache({self.get_seq_length()}/{self.max_cache_length} positions)"


async def _awaited(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, awaited if it is a coroutine function's result (truncate may be either)."""
    result = fn(*args)
    return await result if isinstance(result, Awaitable) else result
