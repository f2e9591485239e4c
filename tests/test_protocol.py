"""The wire protocol, sans IO: round trips, stream cutting, and every garbage a peer can send."""

from __future__ import annotations

import struct
from dataclasses import FrozenInstanceError, fields

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm_node.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from swarm_node.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_NDIM,
    MESSAGE_TYPES,
    PROTOCOL_ID,
    PROTOCOL_VERSION,
    ErrorResponse,
    FrameDecoder,
    InfoRequest,
    OpenSessionRequest,
    StepRequest,
    StepResponse,
    WireTensor,
    encode_message,
)
from swarm_node.protocol.messages import FIELD_RULES, MAX_INT, MAX_ITEM_CHARS

# ---------------------------------------------------------------------------------------------
# strategies

names = st.text(min_size=1, max_size=32)
wire_tensors = st.builds(
    WireTensor,
    codec=names,
    dtype=names,
    shape=st.lists(st.integers(0, 2**20), max_size=MAX_NDIM).map(tuple),
    data=st.binary(max_size=256) | st.binary(max_size=64).map(memoryview),
)


def _field_strategy(rule):
    if rule.kind is int:
        return st.integers(rule.minimum, MAX_INT)
    if rule.kind is float:
        return st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
    if rule.kind is bool:
        return st.booleans()
    if rule.kind is tuple:
        item = st.text(max_size=40)
        if rule.item is int:  # row indices (a step's reorder)
            item = st.integers(0, MAX_INT)
        elif rule.item is not str:  # a LoraEntry
            item = st.tuples(
                item, st.integers(0, MAX_INT), st.floats(allow_nan=False, allow_infinity=False)
            )
        return st.lists(item, max_size=min(rule.max_items, 16)).map(tuple)
    if rule.kind is WireTensor:
        return wire_tensors
    if rule.name == "code":
        return st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True)
    return st.text(max_size=40)


def message_strategy(cls):
    return st.builds(cls, **{rule.name: _field_strategy(rule) for rule in FIELD_RULES[cls]})


any_message = st.one_of([message_strategy(cls) for cls in MESSAGE_TYPES.values()])


def decode_all(data: bytes, **kwargs) -> list:
    decoder = FrameDecoder(**kwargs)
    decoder.feed(data)
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    assert decoder.buffered == 0
    return out


def raw_frame(header: object, tail: bytes = b"") -> bytes:
    body = msgpack.packb(header, use_bin_type=True) + tail
    return struct.pack(">I", len(body)) + body


def step_header(**overrides) -> dict:
    header = {
        "t": "step_request",
        "v": PROTOCOL_VERSION,
        "session_id": "abc",
        "step_id": 3,
        "position": 0,
        "hidden": {"codec": "none", "dtype": "float32", "shape": [1, 2], "nbytes": 8},
    }
    header.update(overrides)
    return header


def decode_one(frame: bytes):
    [msg] = decode_all(frame)
    return msg


# ---------------------------------------------------------------------------------------------
# round trips and stream cutting


def test_constants():
    assert PROTOCOL_ID == "/swarm-node/2.0.0"
    assert PROTOCOL_VERSION == 2
    assert DEFAULT_MAX_FRAME_SIZE == 64 * 2**20


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
@settings(max_examples=40)
@given(data=st.data())
def test_round_trip_every_message_type(name, data):
    msg = data.draw(message_strategy(MESSAGE_TYPES[name]))
    assert decode_all(encode_message(msg)) == [msg]


def test_decoded_fields_have_wire_types():
    msg = StepRequest("s", 1, 2, WireTensor("none", "float32", (2, 3), bytes(range(24))))
    decoded = decode_one(encode_message(msg))
    assert type(decoded.hidden.shape) is tuple
    assert bytes(decoded.hidden.data) == bytes(range(24))
    assert decoded.hidden.nbytes == 24


def _open_header(**fields) -> dict:
    return {"t": "open_session_request", "v": PROTOCOL_VERSION, "model": "m", "start": 0, "end": 2,
            "max_length": 64, "dtype": "float32", "compression": "none", **fields}  # fmt: skip


def _header_of(frame: bytes) -> dict:
    header = msgpack.Unpacker(raw=False)
    header.feed(frame[4:])
    return header.unpack()


def test_lists_and_bools_travel_as_themselves():
    addrs = ("/ip4/127.0.0.1/tcp/1", "/ip6/::1/tcp/2")
    entries = (("model.layers.0.mlp.up_proj", 2, 0.5), ("model.layers.1.mlp.up_proj", 4, 2.0))
    msg = OpenSessionRequest(
        "m", 0, 2, 64, "float32", "none", next_addrs=addrs, lora_manifest=entries
    )
    frame = encode_message(msg)
    header = _header_of(frame)
    assert header["next_addrs"] == list(addrs)  # a msgpack array, not one string
    assert header["lora_manifest"] == [list(e) for e in entries]  # not JSON text
    decoded = decode_one(frame)
    assert decoded == msg and type(decoded.next_addrs) is type(decoded.lora_manifest[0]) is tuple
    frame = encode_message(
        StepResponse("s", 1, WireTensor("none", "float32", (1,), bytes(4)), True)
    )
    assert _header_of(frame)["pushed"] is True and decode_one(frame).pushed is True


def test_float_field_sent_as_int_comes_back_float():
    header = {"t": "info_response", "v": PROTOCOL_VERSION, "model": "m", "start": 0, "end": 2, "num_blocks": 2,
              "hidden_size": 8, "dtype": "float32", "throughput": 3, "cache_tokens_left": 5,
              "version": "0.1.0"}  # fmt: skip
    msg = decode_one(raw_frame(header))
    assert type(msg.throughput) is float and msg.throughput == 3.0


@settings(max_examples=30)
@given(st.lists(any_message, min_size=1, max_size=5))
def test_several_frames_fed_byte_by_byte(messages):
    stream = b"".join(encode_message(m) for m in messages)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    assert out == messages


@settings(max_examples=60)
@given(st.lists(any_message, min_size=1, max_size=5), st.data())
def test_stream_split_arbitrarily(messages, data):
    stream = b"".join(encode_message(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    out = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    assert out == messages
    assert decoder.buffered == 0


def test_two_endpoints_back_to_back():
    client, server = FrameDecoder(), FrameDecoder()
    hidden = WireTensor("float16", "float32", (1, 1, 4), bytes(8))
    server.feed(encode_message(OpenSessionRequest("m", 0, 4, 128, "float32", "float16")))
    server.feed(encode_message(StepRequest("s1", 0, 0, hidden)))
    assert server.next_message() == OpenSessionRequest("m", 0, 4, 128, "float32", "float16", 1)
    request = server.next_message()
    assert server.next_message() is None
    client.feed(encode_message(StepResponse(request.session_id, request.step_id, request.hidden)))
    assert client.next_message() == StepResponse("s1", 0, hidden)


@settings(max_examples=40)
@given(any_message, st.data())
def test_truncated_frame_is_incomplete_not_an_error(msg, data):
    frame = encode_message(msg)
    cut = data.draw(st.integers(0, len(frame) - 1))
    decoder = FrameDecoder()
    decoder.feed(frame[:cut])
    assert decoder.next_message() is None
    decoder.feed(frame[cut:])
    assert decoder.next_message() == msg


# ---------------------------------------------------------------------------------------------
# garbage from a peer raises RemoteProtocolError and nothing else


def _drain_expecting_only_protocol_errors(data: bytes, max_frame_size: int = 2**16) -> None:
    decoder = FrameDecoder(max_frame_size=max_frame_size)
    try:
        decoder.feed(data)
        while decoder.next_message() is not None:
            pass
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_remote_protocol_error(data):
    _drain_expecting_only_protocol_errors(data)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_body_with_valid_length_raises_only_remote_protocol_error(body):
    _drain_expecting_only_protocol_errors(struct.pack(">I", len(body)) + body)


@settings(max_examples=300)
@given(any_message, st.data())
def test_corrupted_frames_raise_only_remote_protocol_error(msg, data):
    frame = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(4, len(frame) - 1))  # keep the length prefix, corrupt the body
        frame[i] = data.draw(st.integers(0, 255))
    _drain_expecting_only_protocol_errors(bytes(frame), max_frame_size=DEFAULT_MAX_FRAME_SIZE)


@settings(max_examples=100)
@given(
    st.dictionaries(
        st.sampled_from(["t", "v", "session_id", "step_id", "position", "hidden", "x"]),
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
        | st.text(max_size=5)
        | st.binary(max_size=5) | st.lists(st.integers(-1, 2**64 - 1), max_size=3)
        | st.dictionaries(st.text(max_size=6), st.integers(-1, 2**64 - 1), max_size=4),
    ),
    st.binary(max_size=16),
)  # fmt: skip
def test_random_headers_raise_only_remote_protocol_error(header, tail):
    _drain_expecting_only_protocol_errors(
        raw_frame({"t": "step_request", "v": PROTOCOL_VERSION, **header}, tail)
    )


def test_decoder_refuses_a_bad_limit():
    with pytest.raises(ConfigError, match="'max_frame_size' must be an int"):
        FrameDecoder(max_frame_size=0)


header_values = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=5) | st.binary(max_size=5) | st.lists(st.integers(-1, 9), max_size=10)
)  # fmt: skip


@settings(max_examples=200)
@given(
    st.sampled_from(sorted(step_header())),
    st.sampled_from(["codec", "dtype", "shape", "nbytes", None]),
    header_values,
    st.integers(0, 12),
)
def test_one_bad_value_in_a_valid_header_raises_only_remote_protocol_error(key, sub, value, n):
    header = step_header()
    if key == "hidden" and sub is not None:
        header["hidden"] = {**header["hidden"], sub: value}
    else:
        header[key] = value
    _drain_expecting_only_protocol_errors(raw_frame(header, bytes(n)))


def test_oversize_length_prefix_raises_before_the_body_arrives():
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.feed(b"\x00\x00")
    assert decoder.next_message() is None
    with pytest.raises(RemoteProtocolError, match="at most 1000 bytes, got 1001"):
        decoder.feed(struct.pack(">I", 1001)[2:])
    with pytest.raises(RemoteProtocolError, match="out of sync"):
        decoder.next_message()


def test_oversize_prefix_after_a_good_frame_raises_with_that_frame():
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.feed(encode_message(InfoRequest()) + struct.pack(">I", 2**32 - 1))
    with pytest.raises(RemoteProtocolError, match="at most 1000 bytes"):
        decoder.next_message()


def test_encode_refuses_frames_over_the_limit():
    msg = StepRequest("s", 0, 0, WireTensor("none", "float32", (256,), bytes(1024)))
    with pytest.raises(LocalProtocolError, match="must be at most 1000 bytes"):
        encode_message(msg, max_frame_size=1000)
    assert len(encode_message(msg, max_frame_size=2000)) > 1024


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (raw_frame([1, 2]), "must be a msgpack map"),
        (struct.pack(">I", 0), "complete msgpack map"),
        (struct.pack(">I", 2) + b"\x81\xc1", "valid msgpack"),  # 0xc1 is never used
        (raw_frame(step_header(t="teleport")), "'t' must be one of"),
        (raw_frame(step_header(t=7)), "'t' must be one of"),
        (raw_frame(step_header(v=1)), "'v' must be protocol version 2, got 1"),
        (raw_frame(step_header(v=True)), "'v' must be protocol version 2, got True"),
        (raw_frame({k: v for k, v in step_header().items() if k != "v"}), "'v' must be"),
        (raw_frame({k: v for k, v in step_header().items() if k != "position"}, bytes(8)),
         "must have field 'position'"),
        (raw_frame(step_header(step_id=-3), bytes(8)), "'step_id' must be an int >= 0, got -3"),
        (raw_frame(step_header(step_id=True), bytes(8)), "'step_id' must be an int >= 0, got True"),
        (raw_frame(step_header(step_id=1.0), bytes(8)), "'step_id' must be an int"),
        (raw_frame(step_header(session_id=b"abc"), bytes(8)), "'session_id' must be a str"),
        (raw_frame(step_header(hidden=[1]), bytes(8)), "'hidden' must be a map"),
        (raw_frame(step_header(hidden={"codec": "none", "dtype": "float32", "shape": [2]}),
                   bytes(8)), "must have keys"),
        (raw_frame(step_header(hidden={"codec": "none", "dtype": "float32", "shape": [1] * 9,
                                       "nbytes": 4}), bytes(4)), "at most 8 ints"),
        (raw_frame(step_header(hidden={"codec": "none", "dtype": "float32", "shape": [-1],
                                       "nbytes": 4}), bytes(4)), "ints >= 0"),
        (raw_frame(step_header(hidden={"codec": "none", "dtype": "float32", "shape": [True],
                                       "nbytes": 4}), bytes(4)), "ints >= 0"),
        (raw_frame(step_header(hidden={"codec": "", "dtype": "float32", "shape": [1],
                                       "nbytes": 4}), bytes(4)), "'hidden.codec' must be a str"),
        (raw_frame(step_header(hidden={"codec": "none", "dtype": "float32", "shape": [1],
                                       "nbytes": -4}), bytes(4)), "'hidden.nbytes' must be"),
        (raw_frame(step_header(), bytes(7)), "got 7"),  # too few tensor bytes (whole frame came)
        (raw_frame(step_header(), bytes(9)), "got 9"),  # leftover bytes
        (raw_frame({"t": "error_response", "v": PROTOCOL_VERSION, "code": "Bad Code", "message": ""}),
         "'code' must be a snake_case str"),
        (raw_frame({"t": "info_response", "v": PROTOCOL_VERSION, "model": "m", "start": 0, "end": 2,
                    "num_blocks": 2, "hidden_size": 8, "dtype": "float32",
                    "throughput": float("nan"), "cache_tokens_left": 5, "version": "1"}),
         "'throughput' must be a finite number >= 0, got nan"),
        (raw_frame({"t": "open_session_request", "v": PROTOCOL_VERSION, "model": "m", "start": 0, "end": 2,
                    "max_length": 0, "dtype": "float32", "compression": "none"}),
         "'max_length' must be an int >= 1, got 0"),
        (raw_frame(_open_header(next_addrs="/ip4/1.2.3.4/tcp/1 /ip4/5.6.7.8/tcp/2")),
         "'next_addrs' must be a list of at most 16 strs \\(each str at most 1024 chars\\), got '/ip4"),
        (raw_frame(_open_header(next_addrs=["a"] * 17)), "'next_addrs' must be a list of at most 16"),
        (raw_frame(_open_header(lora_manifest='[["model.layers.0.mlp.up_proj", 2, 1.0]]')),
         "'lora_manifest' must be a list of at most 4096 \\[str, int, float\\] lists"),
        (raw_frame(_open_header(lora_manifest=[["model.layers.0.mlp.up_proj", 2]])),
         "'lora_manifest' must be a list"),
        (raw_frame(_open_header(lora_manifest=[["model.layers.0.mlp.up_proj", -2, 1.0]])),
         "'lora_manifest' must be a list"),
        (raw_frame(_open_header(lora_manifest=[["model.layers.0.mlp.up_proj", 2, float("inf")]])),
         "'lora_manifest' must be a list"),
        (raw_frame(_open_header(next_addrs=["a", 3])), "'next_addrs' must be a list .*got \\['a', 3\\]"),
        (raw_frame(_open_header(next_addrs=["a" * (MAX_ITEM_CHARS + 1)])), "'next_addrs' must be"),
        (raw_frame({"t": "open_session_response", "v": PROTOCOL_VERSION, "session_id": "s", "max_length": 4,
                    "push": 1}), "'push' must be a bool, got 1"),
        (raw_frame({"t": "forward_request", "v": PROTOCOL_VERSION, "model": "m", "start": 0, "end": 1,
                    "compression": "none", "keep_graph": 0,
                    "hidden": {"codec": "none", "dtype": "float32", "shape": [1], "nbytes": 4}},
                   bytes(4)), "'keep_graph' must be a bool, got 0"),
        (raw_frame(step_header(step_id=msgpack.ExtType(5, b"x")), bytes(8)), "extension types"),
        (raw_frame({1: 2}), "valid msgpack"),  # strict_map_key: only str keys
    ],
)  # fmt: skip
def test_malformed_frames_say_what_is_wrong(frame, match):
    # The fixed sizes above assume "nbytes": 8 in step_header's tensor; bytes(8) makes it whole.
    with pytest.raises(RemoteProtocolError, match=match):
        decode_all(frame)


def test_step_header_fixture_is_valid():
    msg = decode_one(raw_frame(step_header(), bytes(8)))
    assert msg == StepRequest("abc", 3, 0, WireTensor("none", "float32", (1, 2), bytes(8)))


def test_unknown_header_fields_are_ignored():
    header = step_header(future_field={"a": [1, 2]}, priority=3)
    header["hidden"] = {**header["hidden"], "scale": 0.5}
    msg = decode_one(raw_frame(header, bytes(8)))
    assert msg == StepRequest("abc", 3, 0, WireTensor("none", "float32", (1, 2), bytes(8)))


def test_default_field_may_be_absent():
    header = {"t": "open_session_request", "v": PROTOCOL_VERSION, "model": "m", "start": 0, "end": 2,
              "max_length": 64, "dtype": "float32", "compression": "none"}  # fmt: skip
    assert decode_one(raw_frame(header)).batch_size == 1


def test_error_is_sticky_and_later_frames_are_not_read():
    decoder = FrameDecoder()
    decoder.feed(raw_frame(step_header(t="nope")) + encode_message(InfoRequest()))
    with pytest.raises(RemoteProtocolError, match="'t' must be"):
        decoder.next_message()
    with pytest.raises(RemoteProtocolError, match="out of sync"):
        decoder.feed(b"")


# ---------------------------------------------------------------------------------------------
# what we refuse to send


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (StepRequest("s", -3, 0, WireTensor("none", "float32", (), bytes(4))),
         "'step_id' must be an int >= 0, got -3"),
        (StepRequest("s", True, 0, WireTensor("none", "float32", (), bytes(4))), "'step_id'"),
        (StepRequest("s", 0, 0, b"raw"), "'hidden' must be a WireTensor"),
        (StepRequest("s", 0, 0, WireTensor("none", "float32", [1], bytes(4))),
         "'hidden.shape' must be a tuple"),
        (StepRequest("s", 0, 0, WireTensor("none", "float32", (1,) * 9, bytes(4))), "at most 8"),
        (StepRequest("s", 0, 0, WireTensor("none", "float32", (1,), "abcd")), "bytes"),
        (StepRequest("s", 0, 2**63, WireTensor("none", "float32", (), bytes(4))), "'position'"),
        (StepRequest("\ud800", 0, 0, WireTensor("none", "float32", (), bytes(4))),
         "cannot be packed"),
        (ErrorResponse("Not Snake", "x"), "'code'"),
        (OpenSessionRequest("m", 0, 1, 4, "float32", "none", next_addrs="/ip4/1.2.3.4/tcp/1"),
         "'next_addrs' must be a list"),
        (OpenSessionRequest("m", 0, 1, 4, "float32", "none", next_addrs=("a",) * 17),
         "'next_addrs' must be a list of at most 16"),
        (StepResponse("s", 0, WireTensor("none", "float32", (), bytes(4)), pushed=1),
         "'pushed' must be a bool, got 1"),
        (InfoRequest, "must be one of MESSAGE_TYPES"),
        ("hello", "must be one of MESSAGE_TYPES"),
    ],
)  # fmt: skip
def test_encode_refuses_invalid_messages(msg, match):
    with pytest.raises(LocalProtocolError, match=match):
        encode_message(msg)


def test_messages_are_frozen_and_slotted():
    for cls in MESSAGE_TYPES.values():
        assert cls.__dataclass_params__.frozen
        assert "__slots__" in vars(cls)
        assert [f.name for f in fields(cls)] == [r.name for r in FIELD_RULES[cls]]
    msg = StepResponse("s", 0, WireTensor("none", "float32", (), bytes(4)))
    with pytest.raises(FrozenInstanceError):
        msg.step_id = 1  # type: ignore[misc]
    assert msg.step_id == 0


def test_wire_tensor_equality_compares_bytes():
    a = WireTensor("none", "float32", (1,), b"\x00\x01\x02\x03")
    b = WireTensor("none", "float32", (1,), memoryview(bytearray(b"\x00\x01\x02\x03")))
    assert a == b and hash(a) == hash(b)
    assert a != WireTensor("none", "float32", (1,), b"\x00\x01\x02\x04")
    assert "nbytes=4" in repr(a)
