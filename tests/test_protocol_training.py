"""Forward/backward messages on the wire, sans IO: optional tensors are absent from the frame."""

from __future__ import annotations

import msgpack
import pytest

from swarm_node.errors import LocalProtocolError, RemoteProtocolError
from swarm_node.protocol import (
    BackwardRequest,
    BackwardResponse,
    FrameDecoder,
    WireTensor,
    encode_message,
)
from swarm_node.protocol.messages import FIELD_RULES


def _wire(*shape: int) -> WireTensor:
    n = 1
    for d in shape:
        n *= d
    return WireTensor(
        "none", "float32", shape, bytes(range(256)) * (4 * n // 256) + bytes(4 * n % 256)
    )


def _round_trip(msg):
    decoder = FrameDecoder()
    frame = encode_message(msg)
    decoder.feed(frame)
    return decoder.next_message(), frame


@pytest.mark.parametrize("prompts", [None, _wire(3, 2, 8)])
@pytest.mark.parametrize("lora", [None, _wire(40)])
def test_backward_request_round_trips_with_and_without_optional_tensors(prompts, lora) -> None:
    msg = BackwardRequest(
        model="m",
        start=1,
        end=4,
        compression="none",
        hidden=_wire(2, 5, 8),
        grad_output=_wire(2, 5, 8),
        prompts=prompts,
        lora=lora,
        lora_manifest=(("model.layers.1.self_attn.q_proj", 2, 2.0),) if lora else (),
    )
    back, frame = _round_trip(msg)
    assert back == msg
    header = msgpack.Unpacker(raw=False)
    header.feed(frame[4:])
    keys = set(header.unpack())
    assert ("prompts" in keys) == (prompts is not None) and ("lora" in keys) == (lora is not None)


def test_backward_response_round_trips() -> None:
    msg = BackwardResponse(grad_input=_wire(1, 3, 8), grad_prompts=_wire(2, 1, 8))
    assert _round_trip(msg)[0] == msg
    assert _round_trip(BackwardResponse(grad_input=_wire(1, 3, 8)))[0].grad_prompts is None


def test_optional_tensor_rules_and_errors() -> None:
    rules = {r.name: r for r in FIELD_RULES[BackwardRequest]}
    assert rules["prompts"].kind is WireTensor and rules["prompts"].default is None
    assert rules["grad_output"].kind is WireTensor
    with pytest.raises(LocalProtocolError, match="'grad_output' must be a WireTensor"):
        encode_message(
            BackwardRequest(
                model="m",
                start=0,
                end=1,
                compression="none",
                hidden=_wire(1, 1, 8),
                grad_output=None,
            )
        )
    frame = bytearray(
        encode_message(BackwardResponse(grad_input=_wire(1, 1, 8), grad_prompts=_wire(1, 1, 8)))
    )
    decoder = FrameDecoder()
    decoder.feed(_cut(frame))
    with pytest.raises(RemoteProtocolError, match="tensor bytes after its header"):
        decoder.next_message()


def _cut(frame: bytearray) -> bytes:
    """The frame with its last 4 tensor bytes gone and its length prefix fixed: a short payload."""
    body = bytes(frame[4:-4])
    return len(body).to_bytes(4, "big") + body
