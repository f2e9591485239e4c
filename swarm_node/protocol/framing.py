"""Messages <-> length-prefixed msgpack frames, sans IO: bytes in, messages out, and back.

A frame is ``[u32 big-endian length of the rest][msgpack header map][tensor bytes ...]``. The header
is ``{"t": wire_name, "v": PROTOCOL_VERSION, ...fields}``; a WireTensor field becomes
``{"codec", "dtype", "shape", "nbytes"}`` in the header and its bytes follow the header, in field
order; an optional tensor (``WireTensor | None``) left as None is absent from the header. Unknown
header fields are ignored so that newer peers can add some.

This module does NOT know sockets, streams or time (the trio shell in node/ reads bytes and feeds
them here), nor what a codec means or whether a tensor's bytes fit its shape (compression/ checks
that when it decodes). Everything a peer can send is checked here; the only exception that leaves
``FrameDecoder`` is ``RemoteProtocolError``, and the only one ``encode_message`` raises on purpose
is ``LocalProtocolError``.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from swarm_node.errors import ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError
from swarm_node.protocol.messages import (
    FIELD_RULES,
    MESSAGE_TYPES,
    WIRE_NAMES,
    Message,
    check_field,
    is_required,
)
from swarm_node.protocol.tensors import (
    WireTensor,
    check_name,
    check_payload,
    check_shape,
    check_wire_tensor,
    short_repr,
)

PROTOCOL_VERSION = 2  # 2: next_addrs and lora_manifest are lists, push/pushed/keep_graph booleans
DEFAULT_MAX_FRAME_SIZE = 64 * 2**20  # bytes after the length prefix
MAX_HEADER_SIZE = 2**20  # a header is names and numbers; tensors travel after it
_PREFIX = struct.Struct(">I")


def encode_message(msg: Message, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """One frame for ``msg``; raises LocalProtocolError if a field is invalid or it is too big."""
    cls = type(msg)
    name = WIRE_NAMES.get(cls)
    if name is None:
        raise LocalProtocolError(f"message must be one of MESSAGE_TYPES, got {cls.__name__}")
    header: dict[str, Any] = {"t": name, "v": PROTOCOL_VERSION}
    payloads: list[memoryview] = []
    for rule in FIELD_RULES[cls]:
        value = getattr(msg, rule.name)
        if value is None and rule.kind is WireTensor and rule.default is None:
            continue  # an optional tensor left out: absent from the frame
        if rule.kind is WireTensor:
            check_wire_tensor(rule.name, value, LocalProtocolError)
            data = check_payload(rule.name, value.data, LocalProtocolError)
            header[rule.name] = {
                "codec": value.codec,
                "dtype": value.dtype,
                "shape": list(value.shape),
                "nbytes": data.nbytes,
            }
            payloads.append(data)
        else:
            header[rule.name] = check_field(rule, value, LocalProtocolError)
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a str with lone surrogates
        raise LocalProtocolError(f"{name} cannot be packed as msgpack: {exc}") from None
    if len(packed) > MAX_HEADER_SIZE:
        raise LocalProtocolError(
            f"message header must be at most {MAX_HEADER_SIZE} bytes, got {len(packed)}"
        )
    size = len(packed) + sum(p.nbytes for p in payloads)
    if size > max_frame_size:
        raise LocalProtocolError(f"{name} frame must be at most {max_frame_size} bytes, got {size}")
    return b"".join([_PREFIX.pack(size), packed, *payloads])


class FrameDecoder:
    """Accumulates bytes from a stream and cuts them into messages.

    ``feed`` what arrived, then call ``next_message`` until it returns None (it needs more bytes).
    After a RemoteProtocolError the stream is out of sync: every later call raises it again, and the
    shell should close the connection.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if type(max_frame_size) is not int or not 0 < max_frame_size <= 2**32 - 1:
            raise ConfigError(
                f"'max_frame_size' must be an int in [1, 2**32 - 1], got {max_frame_size!r}"
            )
        self._max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buffer)

    @property
    def needed(self) -> int:
        """Bytes the buffer holds once the frame being received is whole (what it holds now
        when even the frame's length prefix is incomplete)."""
        size = self._frame_size() if self._error is None else None
        return len(self._buffer) if size is None else max(len(self._buffer), _PREFIX.size + size)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; raises at once if the next frame announces an oversize length."""
        self._raise_if_broken()
        self._buffer += data
        self._frame_size()

    def next_message(self) -> Message | None:
        """The next complete message, or None when more bytes are needed."""
        self._raise_if_broken()
        size = self._frame_size()
        if size is None or len(self._buffer) < _PREFIX.size + size:
            return None
        with memoryview(self._buffer) as view:  # one copy, and the bytearray may resize after
            body = bytes(view[_PREFIX.size : _PREFIX.size + size])
        del self._buffer[: _PREFIX.size + size]
        try:
            msg = _decode_body(memoryview(body))
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        self._frame_size()  # a following oversize prefix fails now, not after its body arrives
        return msg

    def _frame_size(self) -> int | None:
        if len(self._buffer) < _PREFIX.size:
            return None
        (size,) = _PREFIX.unpack_from(self._buffer)
        if size > self._max_frame_size:
            self._error = RemoteProtocolError(
                f"frame length must be at most {self._max_frame_size} bytes, got {size}"
            )
            raise self._error
        return size

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(
                f"stream is out of sync after an earlier error: {self._error}"
            )


def _reject_ext(code: int, data: bytes) -> None:
    raise ValueError(f"msgpack extension types are not allowed, got ext type {code}")


def _unpack_header(body: memoryview) -> tuple[Any, int]:
    """The msgpack object at the start of ``body`` and the number of bytes it took."""
    unpacker = msgpack.Unpacker(
        max_buffer_size=MAX_HEADER_SIZE, strict_map_key=True, raw=False, ext_hook=_reject_ext
    )
    unpacker.feed(body[:MAX_HEADER_SIZE])
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        if body.nbytes >= MAX_HEADER_SIZE:
            raise RemoteProtocolError(
                f"frame header must be at most {MAX_HEADER_SIZE} bytes, got more"
            ) from None
        raise RemoteProtocolError(
            f"frame header must be a complete msgpack map, got {body.nbytes} bytes that end early"
        ) from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"frame header must be valid msgpack, got error: {exc}") from None
    return header, unpacker.tell()


def _decode_body(body: memoryview) -> Message:
    header, offset = _unpack_header(body)
    if type(header) is not dict:
        raise RemoteProtocolError(f"frame header must be a msgpack map, got {short_repr(header)}")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"'v' must be protocol version {PROTOCOL_VERSION}, got {short_repr(version)}"
        )
    name = header.get("t")
    cls = MESSAGE_TYPES.get(name) if type(name) is str else None
    if cls is None:
        raise RemoteProtocolError(
            f"'t' must be one of {sorted(MESSAGE_TYPES)}, got {short_repr(name)}"
        )
    values: dict[str, Any] = {}
    tensors: list[tuple[str, str, str, tuple[int, ...], int]] = []
    for rule in FIELD_RULES[cls]:
        if rule.name not in header:
            if is_required(rule):
                raise RemoteProtocolError(f"{name} must have field {rule.name!r}, got none")
            continue
        value = header[rule.name]
        if rule.kind is WireTensor:
            tensors.append((rule.name, *_tensor_meta(rule.name, value, RemoteProtocolError)))
        else:
            values[rule.name] = check_field(rule, value, RemoteProtocolError)
    expected = sum(t[4] for t in tensors)
    if body.nbytes - offset != expected:
        raise RemoteProtocolError(
            f"{name} must carry {expected} tensor bytes after its header (the sum of 'nbytes'), "
            f"got {body.nbytes - offset}"
        )
    for field_name, codec, dtype, shape, nbytes in tensors:
        values[field_name] = WireTensor(codec, dtype, shape, body[offset : offset + nbytes])
        offset += nbytes
    return cls(**values)


def _tensor_meta(
    field: str, value: Any, error: type[ProtocolError]
) -> tuple[str, str, tuple[int, ...], int]:
    """(codec, dtype, shape, nbytes) from a tensor's header map."""
    if type(value) is not dict:
        raise error(
            f"{field!r} must be a map with codec, dtype, shape, nbytes, got {short_repr(value)}"
        )
    missing = [k for k in ("codec", "dtype", "shape", "nbytes") if k not in value]
    if missing:
        raise error(f"{field!r} must have keys codec, dtype, shape, nbytes, got no {missing}")
    codec = check_name(f"{field}.codec", value["codec"], error)
    dtype = check_name(f"{field}.dtype", value["dtype"], error)
    shape = check_shape(f"{field}.shape", value["shape"], error)
    nbytes = value["nbytes"]
    if type(nbytes) is not int or nbytes < 0:
        raise error(f"'{field}.nbytes' must be an int >= 0, got {short_repr(nbytes)}")
    return codec, dtype, shape, nbytes
