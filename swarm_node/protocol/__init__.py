"""Sans-IO wire protocol: typed messages <-> length-prefixed msgpack frames, and the session rules
of both ends (server_session.py, client_session.py).

No sockets, trio or torch here: node/ moves the bytes, compression/ turns tensors into
``WireTensor`` payloads and back.
"""

from __future__ import annotations

from swarm_node.protocol.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_HEADER_SIZE,
    PROTOCOL_VERSION,
    FrameDecoder,
    encode_message,
)
from swarm_node.protocol.messages import (
    ERROR_CODES,
    MESSAGE_TYPES,
    BackwardRequest,
    BackwardResponse,
    CloseSessionRequest,
    CloseSessionResponse,
    ErrorResponse,
    ForwardRequest,
    ForwardResponse,
    InfoRequest,
    InfoResponse,
    Message,
    OpenSessionRequest,
    OpenSessionResponse,
    PushStepRequest,
    StepRequest,
    StepResponse,
)
from swarm_node.protocol.tensors import MAX_NDIM, WireTensor

PROTOCOL_ID = "/swarm-node/2.0.0"  # 2: list and boolean fields travel as themselves

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "ERROR_CODES",
    "MAX_HEADER_SIZE",
    "MAX_NDIM",
    "MESSAGE_TYPES",
    "BackwardRequest",
    "BackwardResponse",
    "PROTOCOL_ID",
    "PROTOCOL_VERSION",
    "CloseSessionRequest",
    "CloseSessionResponse",
    "ErrorResponse",
    "ForwardRequest",
    "ForwardResponse",
    "FrameDecoder",
    "InfoRequest",
    "InfoResponse",
    "Message",
    "OpenSessionRequest",
    "OpenSessionResponse",
    "PushStepRequest",
    "StepRequest",
    "StepResponse",
    "WireTensor",
    "encode_message",
]
