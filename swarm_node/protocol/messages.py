"""The wire messages: frozen, slotted dataclasses listed in one table, ``MESSAGE_TYPES``.

Each message field has a rule (its type and, for ints, the smallest sensible value) that both ends
check: the sender raises ``LocalProtocolError``, the receiver ``RemoteProtocolError``. This module
does NOT know bytes, framing or msgpack (see framing.py), what a codec means (compression/), or
whether a request makes sense to a server (an unknown session, a span it does not hold): those are
answered with an ``ErrorResponse`` by node/.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from swarm_node.errors import ProtocolError
from swarm_node.protocol.tensors import WireTensor, short_repr

MAX_INT = 2**63 - 1  # every int field must fit an int64 on both ends
MAX_FORWARD_BATCH = 64  # sequences in one cache-less forward or backward (servers refuse more)
MAX_ITEM_CHARS = 1024  # each str of a list field
MAX_LORA_MODULES = 4096  # entries of a 'lora_manifest'
LoraEntry = tuple[str, int, float]  # a client-owned LoRA's module: [module key, rank, scale]


def _at_least(minimum: int, **kwargs: Any) -> Any:
    """A dataclass field whose int value must be >= ``minimum`` (the default minimum is 0)."""
    return field(metadata={"min": minimum}, **kwargs)


def _list(max_items: int) -> Any:
    """A list field (a tuple here, a msgpack array on the wire) of at most ``max_items`` items."""
    return field(metadata={"max_items": max_items}, default=())


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Ask a server what it serves."""


@dataclass(frozen=True, slots=True)
class InfoResponse:
    model: str
    start: int  # first block served
    end: int  # one past the last block served
    num_blocks: int  # blocks in the whole model
    hidden_size: int
    dtype: str
    throughput: float  # requests per second the server announces (>= 0, finite)
    cache_tokens_left: int
    version: str  # the server's swarm-node version


@dataclass(frozen=True, slots=True)
class OpenSessionRequest:
    model: str
    start: int
    end: int
    max_length: int = _at_least(1)
    dtype: str
    compression: str
    batch_size: int = _at_least(1, default=1)
    # Server-to-server push (all empty: client-star). Where the next span lives: its peer id, its
    # multiaddrs and the session the client opened there; this server then sends each step's output
    # to that session too (PushStepRequest), besides answering the client.
    next_peer: str = ""
    next_addrs: tuple[str, ...] = _list(16)
    next_session: str = ""
    prev_peer: str = ""  # the only peer whose pushes this session accepts (empty: none)
    # Deep prompt tuning: (end - start, P, H), added before each block to the positions [0, P) that a
    # step carries (absent: none). Sent once here, so replays and pushed steps use it too.
    prompts: WireTensor | None = None
    # name of a LoRA adapter the server holds, applied to every step (empty: none)
    adapter: str = ""
    # A client-owned LoRA instead (absent: none): model/lora_pack.py's flat A/B numbers (N,) and
    # their manifest ([module key, rank, scale] each), for blocks [start, end).
    lora: WireTensor | None = None
    lora_manifest: tuple[LoraEntry, ...] = _list(MAX_LORA_MODULES)


@dataclass(frozen=True, slots=True)
class OpenSessionResponse:
    session_id: str
    max_length: int = _at_least(1)
    push: bool = False  # this server will push every step's output to the next server
    keep: bool = False  # this server takes a step's 'keep' (rolls its attention cache back)


@dataclass(frozen=True, slots=True)
class StepRequest:
    session_id: str
    step_id: int
    position: int  # tokens the client believes are already in the server's cache
    hidden: WireTensor  # (B, T, H)
    # Roll back first (-1: no): the server cuts the session's attention cache to its first 'keep'
    # positions, then appends this step's; 'position' must then equal 'keep'. A server that does
    # not know the field ignores it and refuses the position (it only answers OpenSessionResponse
    # 'keep' = True when it knows it).
    keep: int = _at_least(-1, default=-1)
    # Beam search: before this step, row i of the session's cache becomes what row reorder[i] was
    # (one index per row of the session's batch; empty: the rows stay as they are).
    reorder: tuple[int, ...] = _list(MAX_FORWARD_BATCH)


@dataclass(frozen=True, slots=True)
class StepResponse:
    session_id: str
    step_id: int
    hidden: WireTensor  # (B, T, H)
    pushed: bool = False  # the output also went to the next server (the client need not send it)
    receipt: str = ""  # the server's signature (hex) of the step's receipt (dht/receipts.py)


@dataclass(frozen=True, slots=True)
class PushStepRequest:
    """A step pushed by the server of the previous span (no reply on this stream: the receiver
    answers the session's client with a StepResponse, as if the client had sent the step)."""

    session_id: str  # the receiver's session, opened there by the client
    step_id: int
    position: int
    hidden: WireTensor  # (B, T, H)
    keep: int = _at_least(-1, default=-1)  # the client's roll back, as in StepRequest
    reorder: tuple[int, ...] = _list(MAX_FORWARD_BATCH)  # the client's step's, passed on


@dataclass(frozen=True, slots=True)
class CloseSessionRequest:
    session_id: str


@dataclass(frozen=True, slots=True)
class CloseSessionResponse:
    session_id: str


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """A cache-less forward pass through blocks [start, end)."""

    model: str
    start: int
    end: int
    compression: str
    hidden: WireTensor  # (B, T, H)
    # (end - start, P, H), added to positions [0, P) before each block
    prompts: WireTensor | None = None
    adapter: str = ""  # name of a LoRA adapter the server holds (empty: none)
    # a client-owned LoRA instead, as in OpenSessionRequest (absent: none)
    lora: WireTensor | None = None
    lora_manifest: tuple[LoraEntry, ...] = _list(MAX_LORA_MODULES)
    # Keep this forward's autograd graph for a later BackwardRequest from the same peer (the answer
    # names it in 'graph_id'; the server may decline, answering "").
    keep_graph: bool = False


@dataclass(frozen=True, slots=True)
class ForwardResponse:
    hidden: WireTensor  # (B, T, H)
    graph_id: str = ""  # the kept graph, for BackwardRequest.graph_id ("": none kept)


@dataclass(frozen=True, slots=True)
class BackwardRequest:
    """Gradients through blocks [start, end): the server recomputes the forward of ``hidden`` (or uses
    the graph it kept, see ``graph_id``) and
    returns the gradient of ``sum(output * grad_output)`` with respect to its inputs. Its own
    weights get no gradient and never change."""

    model: str
    start: int
    end: int
    compression: str  # codec of the answer's gradients
    hidden: WireTensor  # (B, T, H): the input of block `start`, as in the forward
    grad_output: WireTensor  # (B, T, H): gradient of the loss with respect to the output
    prompts: WireTensor | None = None  # (end - start, P, H), as in ForwardRequest
    adapter: str = ""  # name of a LoRA adapter the server holds, as in ForwardRequest (empty: none)
    # a client-owned LoRA (N,), as in ForwardRequest: its gradient comes back
    lora: WireTensor | None = None
    lora_manifest: tuple[LoraEntry, ...] = _list(MAX_LORA_MODULES)
    # ForwardResponse.graph_id of this span's forward ("": none): the server then runs the backward
    # on that kept graph instead of recomputing, when it still holds it and the inputs match; the
    # result is the same either way. Used once.
    graph_id: str = ""


@dataclass(frozen=True, slots=True)
class BackwardResponse:
    grad_input: WireTensor  # (B, T, H)
    grad_prompts: WireTensor | None = None  # (end - start, P, H), summed over the batch
    grad_lora: WireTensor | None = None  # (N,): the client-owned LoRA's gradient, in its layout


# The one table of error codes a server sends: code -> (to which request) what it means. A test pins
# it to the codes in the code; a receiver accepts any snake_case code (newer servers may add some).
ERROR_CODES: dict[str, str] = {
    "bad_request": "(any) a field or tensor it cannot take; a broken frame also closes the stream",
    "unknown_model": "(open, forward, backward) the server serves another model",
    "out_of_range": "(open, forward, backward) blocks outside the span it serves",
    "unknown_adapter": "(open, forward, backward) no LoRA adapter of that name here",
    "unknown_session": "(step, close) no such session open on this stream",
    "too_long": "(open) 'max_length' over the server's limit; (step) past the session's",
    "too_many_sessions": "(open) the peer holds as many sessions here as one peer may",
    "peer_share": "(open) the session would take the peer past its share of the attention cache",
    "cache_full": "(open) the attention cache has no room for the session now",
    "shutting_down": "(open) the server is leaving or moving: no new sessions",
    "too_large": "(any with tensors) more tokens, estimated activation memory or decoded bytes "
    "than the server takes (--max-request-tokens, --max-activation-mb, --max-queued-mb-per-peer)",
    "busy": "(any with tensors) too many requests wait for this server's compute, or too many bytes "
    "of large frames are arriving (--max-receiving-mb), from this peer or all: retry later or "
    "elsewhere",
    "out_of_memory": "(any with tensors) the server's device ran out of memory computing it: "
    "refused (a step's session is closed, its cache freed), the server goes on; retry later or "
    "elsewhere",
    "push_failed": "(a pushed step, told its client) it failed here: the client sends it itself",
    "bad_push": "(a pushed step, told its client) refused as bad_request: the pushing server is "
    "at fault; the client sends the step itself",
    "idle_timeout": "(none, told a client) its sessions were idle too long: closed, with the stream",
}
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """A refusal: the peer is alive and says why it will not answer (see ``ERROR_CODES``)."""

    code: str
    message: str


Message = (
    InfoRequest
    | InfoResponse
    | OpenSessionRequest
    | OpenSessionResponse
    | StepRequest
    | StepResponse
    | PushStepRequest
    | CloseSessionRequest
    | CloseSessionResponse
    | ForwardRequest
    | ForwardResponse
    | BackwardRequest
    | BackwardResponse
    | ErrorResponse
)

# The one table of messages: wire name -> class. A wire name never changes meaning once released.
MESSAGE_TYPES: dict[str, type] = {
    "info_request": InfoRequest,
    "info_response": InfoResponse,
    "open_session_request": OpenSessionRequest,
    "open_session_response": OpenSessionResponse,
    "step_request": StepRequest,
    "step_response": StepResponse,
    "push_step_request": PushStepRequest,
    "close_session_request": CloseSessionRequest,
    "close_session_response": CloseSessionResponse,
    "forward_request": ForwardRequest,
    "forward_response": ForwardResponse,
    "backward_request": BackwardRequest,
    "backward_response": BackwardResponse,
    "error_response": ErrorResponse,
}
WIRE_NAMES: dict[type, str] = {cls: name for name, cls in MESSAGE_TYPES.items()}


@dataclass(frozen=True, slots=True)
class FieldRule:
    """What one message field must hold on the wire."""

    name: str
    kind: type  # int, float, bool, str, tuple (a list) or WireTensor
    minimum: int  # for ints only
    default: Any  # dataclasses.MISSING when the field is required; None for an optional tensor
    max_items: int = 0  # for lists only
    item: Any = None  # a list's item: str, or a fixed tuple of str/int/float like LoraEntry


def _kind(hint: Any) -> type:
    """The field's wire kind; ``WireTensor | None`` is an optional tensor (absent from the frame)."""
    args = typing.get_args(hint)
    if args and set(args) == {WireTensor, type(None)}:
        return WireTensor
    return typing.get_origin(hint) or hint


def _rules(cls: type) -> tuple[FieldRule, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        FieldRule(
            f.name,
            _kind(hints[f.name]),
            f.metadata.get("min", 0),
            f.default,
            f.metadata.get("max_items", 0),
            typing.get_args(hints[f.name])[0] if _kind(hints[f.name]) is tuple else None,
        )
        for f in fields(cls)
    )


FIELD_RULES: dict[type, tuple[FieldRule, ...]] = {cls: _rules(cls) for cls in WIRE_NAMES}


def check_field(rule: FieldRule, value: Any, error: type[ProtocolError]) -> Any:
    """Check a field that is not a tensor against its rule; returns the value as the message holds
    it (floats as float, lists as tuples)."""
    name = rule.name
    if rule.kind is int:
        if type(value) is not int or not rule.minimum <= value <= MAX_INT:
            raise error(f"{name!r} must be an int >= {rule.minimum}, got {short_repr(value)}")
        return value
    if rule.kind is float:
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise error(f"{name!r} must be a finite number >= 0, got {short_repr(value)}")
        return float(value)
    if rule.kind is bool:
        if type(value) is not bool:
            raise error(f"{name!r} must be a bool, got {short_repr(value)}")
        return value
    if rule.kind is tuple:
        if type(value) in (tuple, list) and len(value) <= rule.max_items:
            items = tuple(_item(v, rule.item) for v in value)
            if None not in items:
                return items
        kinds = typing.get_args(rule.item)
        what = f"[{', '.join(k.__name__ for k in kinds)}] lists" if kinds else "strs"
        what = "ints >= 0" if rule.item is int else what
        raise error(
            f"{name!r} must be a list of at most {rule.max_items} {what} (each str at most "
            f"{MAX_ITEM_CHARS} chars), got {short_repr(value)}"
        )
    if rule.kind is str:
        if type(value) is not str:
            raise error(f"{name!r} must be a str, got {short_repr(value)}")
        if name == "code" and not _ERROR_CODE.fullmatch(value):
            raise error(
                f"'code' must be a snake_case str of at most 64 chars, got {short_repr(value)}"
            )
        return value
    raise AssertionError(f"no rule for field {name!r} of kind {rule.kind!r}")  # our bug


def _item(value: Any, kind: Any) -> Any:
    """A list field's item as the message holds it, or None when it is not of ``kind``."""
    if kind is str:
        return value if type(value) is str and len(value) <= MAX_ITEM_CHARS else None
    if kind is int:
        return value if type(value) is int and 0 <= value <= MAX_INT else None
    if kind is float:
        ok = type(value) in (int, float) and math.isfinite(value)
        return float(value) if ok else None
    kinds = typing.get_args(kind)  # a fixed-length list
    if type(value) not in (tuple, list) or len(value) != len(kinds):
        return None
    items = tuple(_item(v, k) for v, k in zip(value, kinds, strict=True))
    return None if None in items else items


def is_required(rule: FieldRule) -> bool:
    return rule.default is MISSING
