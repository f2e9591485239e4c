"""What a server lets through to its compute thread, judged from a request's declared shapes before
any tensor is decoded or allocated.

A request is refused ``too_large`` when its hidden states carry more tokens (batch x positions) than
``max_request_tokens`` or when the activation memory it needs, estimated from the shapes and the
model's sizes, passes ``max_activation_bytes``. The estimate is an upper bound per token:
``(kept_blocks + 1) * (8 * hidden + 3 * intermediate) + 2 * heads * context`` numbers, i.e. the
tensors autograd saves in every block a backward or kept graph runs through (measured with
kept_graphs.SavedBytes: 11.2 x hidden on the tiny test llama, 12.7 x hidden for SmolLM2's sizes,
under 8 x hidden + 3 x intermediate on both), one more block's worth for what the block being
computed holds, and an attention's scores and probabilities over ``context`` positions.

Requests holding tensors wait in a bounded room for the one compute thread (``ComputeQueue``):
``max_queued`` of them and ``max_queued_bytes`` of decoded tensors server-wide, and a smaller share
per peer; past it the request is refused ``busy`` (clients take it as a server failure: they back
off from this server and retry elsewhere). Knows no streams: block_server.py and training.py ask here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from swarm_node.errors import RequestError
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.protocol.tensors import WireTensor

MB = 1 << 20
UNKNOWN_ITEMSIZE = 8  # bytes per number of a dtype the codecs will refuse anyway


@dataclass(frozen=True, kw_only=True)
class ComputeLimits:
    max_request_tokens: int  # batch x positions of one request's hidden states
    max_activation_bytes: int  # estimated activation memory one request may need
    max_queued: int  # requests holding tensors, server-wide
    max_queued_per_peer: int
    max_queued_bytes: int  # their declared decoded bytes, server-wide
    max_queued_bytes_per_peer: int

    @classmethod
    def of(cls, config: Any) -> ComputeLimits:  # node.config.ServerConfig
        return cls(
            max_request_tokens=config.max_request_tokens,
            max_activation_bytes=config.max_activation_mb * MB,
            max_queued=config.max_queued,
            max_queued_per_peer=config.max_queued_per_peer,
            max_queued_bytes=config.max_queued_mb * MB,
            max_queued_bytes_per_peer=config.max_queued_mb_per_peer * MB,
        )


def itemsize(dtype: str) -> int:
    torch_dtype = TORCH_DTYPES.get(dtype)
    return UNKNOWN_ITEMSIZE if torch_dtype is None else torch_dtype.itemsize


def tensor_bytes(wire: WireTensor) -> int:
    """The bytes ``wire`` takes once decoded, from its declared shape and dtype."""
    return math.prod(wire.shape) * itemsize(wire.dtype)


def declared_bytes(message: Any) -> int:
    """The bytes the tensors of ``message`` take once decoded."""
    return sum(
        tensor_bytes(wire)
        for f in fields(message)
        if isinstance(wire := getattr(message, f.name), WireTensor)
    )


def activation_bytes(
    *, batch: int, tokens: int, context: int, kept_blocks: int, model_config: Any, itemsize: int
) -> int:
    """The upper bound of the module docstring, in bytes."""
    hidden = int(model_config.hidden_size)
    intermediate = int(getattr(model_config, "intermediate_size", None) or 4 * hidden)
    heads = int(model_config.num_attention_heads)
    per_token = (kept_blocks + 1) * (8 * hidden + 3 * intermediate) + 2 * heads * context
    return itemsize * batch * tokens * per_token


def check_compute(
    limits: ComputeLimits,
    wire: Any,
    *,
    model_config: Any,
    dtype: str,
    kept_blocks: int = 0,
    past: int = 0,
) -> None:
    """Refuse (``too_large``) hidden states ``wire``, declared ``(B, T, H)``, that carry more tokens
    than the limit or need more activation memory than the budget: through ``kept_blocks`` blocks
    with their graphs kept (a backward, a kept forward; 0: computed without grad), after ``past``
    cached positions. Shapes that are not (B, T, H) are left to the decoder's checks."""
    if not isinstance(wire, WireTensor) or len(wire.shape) != 3:
        return
    batch, tokens, _ = wire.shape
    if batch * tokens > limits.max_request_tokens:
        raise RequestError(
            "too_large",
            f"hidden states must carry at most {limits.max_request_tokens} tokens (batch x "
            f"positions) here, got {batch} x {tokens}",
        )
    need = activation_bytes(
        batch=batch,
        tokens=tokens,
        context=past + tokens,
        kept_blocks=kept_blocks,
        model_config=model_config,
        itemsize=itemsize(dtype),
    )
    if need > limits.max_activation_bytes:
        raise RequestError(
            "too_large",
            f"a request may need at most {limits.max_activation_bytes // MB} MB of activations "
            f"here, got {batch} x {tokens} tokens through {kept_blocks} kept blocks: about "
            f"{-(-need // MB)} MB; send fewer tokens",
        )


class ComputeQueue:
    """The requests admitted to wait for (or run in) compute, with their declared bytes."""

    def __init__(self, limits: ComputeLimits) -> None:
        self.limits = limits
        self.count = 0
        self.nbytes = 0
        self.per_peer: Counter[str] = Counter()
        self.bytes_per_peer: Counter[str] = Counter()
        self.peak_per_peer = 0  # the most requests one peer had admitted at once
        self.refused = 0

    @contextmanager
    def admit(self, peer: str, message: Any) -> Iterator[None]:
        """Hold ``message``'s place while the block runs; ``busy`` when there is no room for it, and
        ``too_large`` when it alone is over a byte bound. Messages without tensors pass free."""
        nbytes = declared_bytes(message)
        if nbytes == 0:
            yield
            return
        self._check(peer, nbytes)
        self.count += 1
        self.nbytes += nbytes
        self.per_peer[peer] += 1
        self.bytes_per_peer[peer] += nbytes
        self.peak_per_peer = max(self.peak_per_peer, self.per_peer[peer])
        try:
            yield
        finally:
            self.count -= 1
            self.nbytes -= nbytes
            self.per_peer[peer] -= 1
            self.bytes_per_peer[peer] -= nbytes
            if self.per_peer[peer] <= 0:
                del self.per_peer[peer], self.bytes_per_peer[peer]

    def _check(self, peer: str, nbytes: int) -> None:
        limits = self.limits
        alone = min(limits.max_queued_bytes, limits.max_queued_bytes_per_peer)
        if nbytes > alone:
            raise RequestError(
                "too_large",
                f"a request's tensors may take at most {alone // MB} MB decoded here, got "
                f"{-(-nbytes // MB)} MB",
            )
        full = (
            ("this peer's requests", self.per_peer[peer] + 1, limits.max_queued_per_peer),
            ("requests", self.count + 1, limits.max_queued),
            (
                "this peer's bytes",
                self.bytes_per_peer[peer] + nbytes,
                limits.max_queued_bytes_per_peer,
            ),
            ("bytes", self.nbytes + nbytes, limits.max_queued_bytes),
        )
        for what, would_be, limit in full:
            if would_be > limit:
                self.refused += 1
                raise RequestError(
                    "busy",
                    f"waiting {what} must stay at most {limit}, this one would make {would_be}; "
                    "retry later or use another server",
                )
