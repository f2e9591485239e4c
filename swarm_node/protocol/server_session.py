"""A server's session rules, sans IO: what an open, a step, a pushed step or a close may do.

The trio shell (node/server/block_server.py) holds the caches, streams and compute; for each message
it asks these rules what to do, computes only when they say so and sends what they answer. A
refusal is a ``RequestError`` with a code from ``ERROR_CODES``, turned into an ``ErrorResponse``
once, by ``refusal``. This module does NOT know torch, trio, streams or what a tensor holds (the
shell decodes it): only shapes, positions, step ids and peers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from swarm_node.errors import RemoteProtocolError, RequestError
from swarm_node.protocol.messages import (
    MAX_FORWARD_BATCH,
    CloseSessionResponse,
    ErrorResponse,
    OpenSessionRequest,
    PushStepRequest,
    StepRequest,
    StepResponse,
)
from swarm_node.protocol.tensors import WireTensor, short_repr

T = TypeVar("T")


class PushRefused(RemoteProtocolError):
    """A peer pushed a step to a session that takes no pushes from it: drop that peer's stream."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Holding:
    """What a session holds, in cache tokens: its attention cache, and in token-equivalents (their
    bytes over one cache token's) its deep prompts, its client-owned LoRA and the newest answer,
    kept for a repeated step (at most ``max_length`` tokens of every sequence)."""

    cache: int
    prompts: int = 0
    lora: int = 0
    answer: int = 0

    @property
    def total(self) -> int:
        return self.cache + self.prompts + self.lora + self.answer

    def __str__(self) -> str:
        parts = [
            f"{n} {what}"
            for what, n in (
                ("cache", self.cache),
                ("deep prompts", self.prompts),
                ("LoRA", self.lora),
                ("kept answer", self.answer),
            )
            if n
        ]
        return f"{self.total} tokens ({' + '.join(parts)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServedSpan:
    """What a server serves and the limits it puts on sessions."""

    model: str
    start: int
    end: int
    dtype: str
    compressions: tuple[str, ...]  # what 'compression' may name
    max_session_length: int
    max_sessions_per_peer: int
    cache_budget_tokens: int
    max_peer_share: float  # of the budget one peer may hold (at least one longest session)
    hidden_size: int
    element_bytes: int  # bytes of one number of the served dtype
    token_bytes: int  # bytes of one cache token: keys and values of every served block

    def in_tokens(self, numel: int) -> int:
        """The cache tokens whose bytes would hold ``numel`` numbers of the served dtype."""
        return -(-numel * self.element_bytes // self.token_bytes)

    def holding(
        self, max_length: int, batch_size: int = 1, *, prompt_numel: int = 0, lora_numel: int = 0
    ) -> Holding:
        return Holding(
            cache=max_length * batch_size,
            prompts=self.in_tokens(prompt_numel),
            lora=self.in_tokens(lora_numel),
            answer=self.in_tokens(max_length * batch_size * self.hidden_size),
        )

    @property
    def max_peer_tokens(self) -> int:
        """What one peer may hold here: its share of the budget, and at least one session of the
        longest length (so an honest user can always open one where the budget has room)."""
        share = int(self.max_peer_share * self.cache_budget_tokens)
        return max(share, self.holding(self.max_session_length).total)


def refusal(exc: RequestError) -> ErrorResponse:
    return ErrorResponse(code=exc.code, message=exc.message)


def check_span(served: ServedSpan, model: str, start: int, end: int) -> None:
    if model != served.model:
        raise RequestError("unknown_model", f"this server serves {served.model!r}, not {model!r}")
    if not served.start <= start < end <= served.end:
        raise RequestError(
            "out_of_range",
            f"blocks {start}:{end} are not within the served blocks {served.start}:{served.end}",
        )


def check_open(
    req: OpenSessionRequest,
    served: ServedSpan,
    *,
    peer_sessions: int,
    peer_tokens: int,
    cache_tokens_left: int,
    closing: bool,
    lora_numel: int = 0,
) -> int:
    """The cache tokens a session of ``req`` holds (``Holding``); RequestError when this server
    refuses it. ``peer_tokens``: what the peer holds here already; ``lora_numel``: the numbers of
    the client-owned LoRA its manifest declares (sizes come from declared shapes: nothing of the
    request is decoded yet)."""
    if closing:
        raise RequestError("shutting_down", "this server is shutting down; use another")
    check_span(served, req.model, req.start, req.end)
    if req.dtype != served.dtype:
        raise RequestError(
            "bad_request", f"'dtype' must be {served.dtype!r} here, got {req.dtype!r}"
        )
    if req.compression not in served.compressions:
        raise RequestError(
            "bad_request",
            f"'compression' must be one of {served.compressions}, got {req.compression!r}",
        )
    if not 1 <= req.max_length <= served.max_session_length:
        raise RequestError(
            "too_long",
            f"'max_length' must be in [1, {served.max_session_length}], got {req.max_length}",
        )
    if not 1 <= req.batch_size <= MAX_FORWARD_BATCH:
        raise RequestError(
            "bad_request", f"'batch_size' must be in [1, {MAX_FORWARD_BATCH}], got {req.batch_size}"
        )
    if peer_sessions >= served.max_sessions_per_peer:
        raise RequestError(
            "too_many_sessions",
            f"peer already holds {served.max_sessions_per_peer} sessions here (the limit); "
            "close one or use another server",
        )
    prompt_numel = 0 if req.prompts is None else math.prod(req.prompts.shape)
    holding = served.holding(
        req.max_length, req.batch_size, prompt_numel=prompt_numel, lora_numel=lora_numel
    )
    tokens = holding.total
    if peer_tokens + tokens > served.max_peer_tokens:
        raise RequestError(
            "peer_share",
            f"a peer may hold {served.max_peer_tokens} of the {served.cache_budget_tokens} cache "
            f"tokens here: it holds {peer_tokens} and the session needs {holding}; close one or "
            "use another server",
        )
    if tokens > cache_tokens_left:
        raise RequestError(
            "cache_full",
            f"attention cache full: the session needs {holding}, {cache_tokens_left} "
            f"of {served.cache_budget_tokens} are free; retry later or use another server",
        )
    return tokens


def find_session(sessions: Mapping[str, T], session_id: str) -> T:
    """The session a step or close names among those opened on this stream."""
    session = sessions.get(session_id)
    if session is None:
        raise RequestError("unknown_session", f"no session {session_id!r} on this stream")
    return session


class SessionRules:
    """One session's steps: each starts at the cache's length, ids only grow (the newest step's
    answer is kept for a duplicate), and pushes come only from ``prev_peer``."""

    def __init__(
        self,
        *,
        session_id: str,
        max_length: int,
        prev_peer: str = "",
        keeps: bool = False,
        batch_size: int = 1,
    ) -> None:
        self.session_id = session_id
        self.max_length = max_length
        self.batch_size = batch_size  # rows of the cache, which a step's 'reorder' indexes
        self.prev_peer = prev_peer  # the previous span's server ("": the session takes no pushes)
        self.keeps = keeps  # the cache can be rolled back: steps may carry 'keep'
        self.last_reply: StepResponse | None = None  # the answer to the newest step
        self.closed = False

    def step(self, req: StepRequest, cache_length: int) -> StepResponse | None:
        """None: compute this step from the client; else the answer it already has (a duplicate,
        e.g. the previous server pushed it here first)."""
        if self.closed:
            raise RequestError("unknown_session", f"no session {req.session_id!r} on this stream")
        last = self.last_reply
        if req.step_id > 0 and last is not None:  # step id 0: unnumbered, never a duplicate
            if req.step_id == last.step_id:
                return last
            if req.step_id < last.step_id:
                raise RequestError(
                    "bad_request",
                    f"'step_id' must be above the session's newest step {last.step_id} (or equal, "
                    f"to repeat it), got {req.step_id}",
                )
        self._check_tokens(req.position, req.hidden, cache_length, req.keep)
        self._check_reorder(req.reorder)
        return None

    def push(self, req: PushStepRequest, sender: str, cache_length: int) -> bool:
        """True: compute this pushed step; False: it is done already (the client sent it first).
        PushRefused when ``sender`` may not push here; RequestError when the step is wrong (answer
        the client with ``push_failed``)."""
        if self.closed or not self.prev_peer or sender != self.prev_peer:
            raise PushRefused(
                f"{sender} pushed to session {req.session_id}, which takes pushes only from "
                f"{self.prev_peer!r}"
            )
        if self.last_reply is not None and req.step_id <= self.last_reply.step_id:
            return False
        self._check_tokens(req.position, req.hidden, cache_length, req.keep)
        self._check_reorder(req.reorder)
        return True

    def _check_reorder(self, reorder: tuple[int, ...]) -> None:
        rows = self.batch_size
        if reorder and (len(reorder) != rows or max(reorder) >= rows):
            raise RequestError(
                "bad_request",
                f"'reorder' must be empty or {rows} row indices in [0, {rows}) (the session's "
                f"batch size), got {short_repr(list(reorder))}",
            )

    def _check_tokens(
        self, position: int, hidden: WireTensor, cache_length: int, keep: int = -1
    ) -> None:
        """The step's positions; with ``keep`` >= 0 the cache is first cut to ``keep`` positions
        (the shell cuts it once every check passed)."""
        if keep >= 0:
            if not self.keeps:
                raise RequestError(
                    "bad_request",
                    f"'keep' must be -1 here (this session's cache cannot be rolled back), got {keep}",
                )
            if keep > cache_length or position != keep:
                raise RequestError(
                    "bad_request",
                    f"'keep' must be at most the session's cache length {cache_length} and equal "
                    f"'position' {position}, got {keep}",
                )
            cache_length = keep
        if position != cache_length:
            raise RequestError(
                "bad_request",
                f"'position' must equal the session's cache length {cache_length}, got {position}",
            )
        shape = hidden.shape  # checked against the bytes when the shell decodes them
        if len(shape) == 3 and cache_length + shape[1] > self.max_length:
            raise RequestError(
                "too_long",
                f"session max_length is {self.max_length}: {cache_length} tokens cached + "
                f"{shape[1]} new would exceed it",
            )

    def answered(
        self, step_id: int, hidden: WireTensor, *, pushed: bool, receipt: str = ""
    ) -> StepResponse:
        """The answer to a computed step, kept for its duplicates."""
        self.last_reply = StepResponse(
            session_id=self.session_id,
            step_id=step_id,
            hidden=hidden,
            pushed=pushed,
            receipt=receipt,
        )
        return self.last_reply

    @staticmethod
    def push_failed(step_id: int, exc: RequestError) -> ErrorResponse:
        """What the client hears when a pushed step failed: it then sends the step itself. A push
        refused as a bad request (its hidden states' shape, dtype or finiteness, its position) is
        the pushing server's fault: ``bad_push``, so the client blames that server."""
        if exc.code == "bad_request":
            return ErrorResponse(code="bad_push", message=f"pushed step {step_id}: {exc.message}")
        return ErrorResponse(code="push_failed", message=f"pushed step {step_id}: {exc.message}")

    def close(self) -> CloseSessionResponse:
        self.closed = True
        return CloseSessionResponse(session_id=self.session_id)
