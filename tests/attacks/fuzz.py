"""Fuzzed frames at a live server over real Noise/yamux streams of its protocol.

Each frame is one of: random bytes (half of them behind a plausible length prefix), a valid frame cut
short, or a valid message mutated (bit flips, a changed length prefix or tensor size/shape, a header
field given a value of another msgpack type, dropped or added). The valid messages are built from
the server's own InfoResponse (its model, blocks, hidden size and dtype), so mutations reach the
server's checks behind the framing. Frames go out in batches on one stream: those this module's own
FrameDecoder reads as exactly one message (the server answers each and keeps the stream) and, to end
the batch, at most one it would not (the server refuses it and closes the stream: a broken or
truncated frame, or a push, which is answered by a reset). The sender then half-closes the stream and
reads every answer until the server closes it.

Knows nothing of processes, crashes or memory: the harness (scripts/attack_swarm.py) and the tests
check the server's health around it.
"""

from __future__ import annotations

import math
import random
import struct
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from swarm_node import compression
from swarm_node.errors import ProtocolError, RemoteProtocolError
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.host import build_host
from swarm_node.node.net.message_stream import TRANSPORT_ERRORS, MessageStream
from swarm_node.protocol import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode_message
from swarm_node.protocol import messages as m

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
KINDS = ("random", "truncated", "bitflip", "length", "type_confusion")
MAX_BATCH = 32  # frames on one stream
# values of every msgpack type (and odd ones of the right type) to put where a field was
CONFUSIONS: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    2**63,
    2**64 - 1,
    -(2**63),
    1.5,
    -0.0,
    math.nan,
    math.inf,
    "",
    "x" * 5000,
    "\u0000\ud7ff",
    b"",
    b"\xff" * 64,
    [],
    [1, "a", None],
    [0] * 4096,
    {},
    {"codec": "none"},
    {"a": {"b": {"c": []}}},
)


@dataclass
class FuzzStats:
    """What a fuzzing run sent and what came back."""

    frames: int = 0  # fuzzed frames sent
    streams: int = 0  # streams they went out on
    replies: int = 0  # messages the server answered with
    refusals: int = 0  # of which ErrorResponse
    stalled: int = 0  # streams the server neither answered to the end nor closed in time
    bad_replies: int = 0  # answers the client could not decode
    dial_failures: int = 0  # streams that could not be opened
    kinds: Counter[str] = field(default_factory=Counter)

    def add(self, other: FuzzStats) -> None:
        for name in ("frames", "streams", "replies", "refusals", "stalled", "bad_replies"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dial_failures += other.dial_failures
        self.kinds.update(other.kinds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "streams": self.streams,
            "replies": self.replies,
            "refusals": self.refusals,
            "stalled": self.stalled,
            "bad_replies": self.bad_replies,
            "dial_failures": self.dial_failures,
            "kinds": dict(sorted(self.kinds.items())),
        }


def valid_messages(info: m.InfoResponse) -> list[Any]:
    """One valid message of every kind a client may send this server (and two it should not)."""
    hidden_size, dtype = info.hidden_size, info.dtype
    tensor_dtype = TORCH_DTYPES.get(dtype, torch.float32)

    def hidden(tokens: int) -> m.WireTensor:
        return compression.encode(torch.zeros(1, tokens, hidden_size, dtype=tensor_dtype), "none")

    span = dict(model=info.model, start=info.start, end=info.end)
    return [
        m.InfoRequest(),
        m.OpenSessionRequest(**span, max_length=8, dtype=dtype, compression="none"),
        m.StepRequest(session_id="00" * 8, step_id=1, position=0, hidden=hidden(2)),
        m.PushStepRequest(session_id="00" * 8, step_id=1, position=0, hidden=hidden(1)),
        m.CloseSessionRequest(session_id="00" * 8),
        m.ForwardRequest(**span, compression="none", hidden=hidden(2)),
        m.BackwardRequest(**span, compression="none", hidden=hidden(2), grad_output=hidden(2)),
        m.ErrorResponse(code="bad_request", message="a reply where a request belongs"),
        info,
    ]


def _split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """A valid frame's header map and the tensor bytes after it."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(frame[4:])
    header = unpacker.unpack()
    return header, frame[4 + unpacker.tell() :]


def _join(header: dict[Any, Any], payload: bytes) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed) + len(payload)) + packed + payload


def _paths(header: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every field of the header, and every key of its tensors' maps."""
    paths: list[tuple[str, ...]] = []
    for key, value in header.items():
        paths.append((key,))
        if isinstance(value, dict):
            paths += [(key, sub) for sub in value]
    return paths


def _set(header: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    target = header
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _del(header: dict[str, Any], path: tuple[str, ...]) -> None:
    target = header
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


def fuzzed_frame(rng: random.Random, valid: list[bytes], kind: str) -> bytes:
    """One frame of ``kind`` (see KINDS) built from the encoded valid messages ``valid``."""
    frame = rng.choice(valid)
    if kind == "random":
        body = rng.randbytes(rng.randrange(0, 512))
        if rng.random() < 0.5:
            return struct.pack(">I", max(0, len(body) + rng.randrange(-8, 9))) + body
        return body
    if kind == "truncated":
        return frame[: rng.randrange(1, len(frame))]
    if kind == "bitflip":
        data = bytearray(frame)
        for _ in range(rng.randrange(1, 9)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    header, payload = _split(frame)
    if kind == "length":
        choice = rng.randrange(4)
        if choice == 0:  # the frame's own length prefix
            size = rng.choice(
                [0, 1, len(frame) - 5, len(frame) - 3, DEFAULT_MAX_FRAME_SIZE + 1, 2**32 - 1]
            )
            return struct.pack(">I", max(0, size)) + frame[4:]
        tensors = [k for k, v in header.items() if isinstance(v, dict) and "nbytes" in v]
        if not tensors:
            return struct.pack(">I", rng.randrange(2**32)) + frame[4:]
        meta = header[rng.choice(tensors)]
        if choice == 1:  # a tensor's nbytes
            meta["nbytes"] = rng.choice([0, meta["nbytes"] - 1, meta["nbytes"] + 1, 2**40, -1])
        elif choice == 2:  # its shape, bytes unchanged
            meta["shape"] = rng.choice(
                [[], [0], [1, 1, 1], [1, 2**20, 576], [2**31, 2**31], [1] * 64, [-1, 2, 3]]
            )
        else:  # its shape and the bytes that would fit it
            shape = [rng.randrange(0, 5), rng.randrange(0, 9), rng.randrange(0, 1200)]
            meta["shape"] = shape
            payload = bytes(math.prod(shape) * 4)[:65536]
            meta["nbytes"] = len(payload)
        return _join(header, payload)
    assert kind == "type_confusion", kind
    action = rng.randrange(6)
    paths = _paths(header)
    if action == 0:
        _del(header, rng.choice(paths))
    elif action == 1:
        header[rng.choice(["x", "t2", "", "hidden_extra"])] = rng.choice(CONFUSIONS)
    elif action == 2:
        header["t"] = rng.choice([*m.MESSAGE_TYPES, "nope", "INFO_REQUEST"])
    else:
        _set(header, rng.choice(paths), rng.choice(CONFUSIONS))
    return _join(header, payload)


def read_locally(frame: bytes, max_frame_size: int) -> Any:
    """The one message ``frame`` holds as the server will read it, or None if the server will close
    the stream after it (a broken or incomplete frame, several messages, or a push)."""
    decoder = FrameDecoder(max_frame_size=max_frame_size)
    try:
        decoder.feed(frame)
        message = decoder.next_message()
    except RemoteProtocolError:
        return None
    if message is None or decoder.buffered or isinstance(message, m.PushStepRequest):
        return None
    return message


def batches(
    rng: random.Random, valid: list[bytes], count: int, max_frame_size: int
) -> Iterator[tuple[list[bytes], Counter[str]]]:
    """``count`` fuzzed frames in batches for one stream each: clean frames, then one that ends it."""
    left = count
    while left > 0:
        frames: list[bytes] = []
        kinds: Counter[str] = Counter()
        while left > 0 and len(frames) < MAX_BATCH:
            kind = rng.choice(KINDS)
            frame = fuzzed_frame(rng, valid, kind)
            frames.append(frame)
            kinds[kind] += 1
            left -= 1
            if read_locally(frame, max_frame_size) is None:
                break
        yield frames, kinds


async def send_batch(
    host: Any, peer_id: str, frames: list[bytes], *, max_frame_size: int, reply_timeout: float
) -> FuzzStats:
    """Send ``frames`` on a new stream, half-close it and read every answer until the server closes
    it (or ``reply_timeout`` passes: counted as stalled)."""
    stats = FuzzStats(frames=len(frames))
    try:
        conn = await open_stream(host, peer_id, max_frame_size=max_frame_size, timeout=10)
    except (trio.TooSlowError, *TRANSPORT_ERRORS):
        stats.dial_failures += 1
        return stats
    stats.streams = 1
    try:
        with trio.move_on_after(reply_timeout) as deadline:
            try:
                await conn.stream.write(b"".join(frames))
                await conn.stream.close()
            except TRANSPORT_ERRORS:
                pass  # the server closed it early (a bad length prefix): read what it said
            await _read_replies(conn, stats)
        if deadline.cancelled_caught:
            stats.stalled += 1
    finally:
        await conn.reset()
    return stats


async def _read_replies(conn: MessageStream, stats: FuzzStats) -> None:
    while True:
        try:
            reply = await conn.receive()
        except RemoteProtocolError:
            stats.bad_replies += 1
            return
        except ProtocolError:  # reset or broken: the server is done with this stream
            return
        if reply is None:
            return
        stats.replies += 1
        stats.refusals += isinstance(reply, m.ErrorResponse)


@asynccontextmanager
async def attacker_host(addr: str) -> AsyncIterator[Any]:
    """A fresh swarm-node host (a new identity, Noise + yamux) connected to ``addr``."""
    host = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    async with host.run(listen_addrs=[Multiaddr(LOOPBACK)]):
        with trio.fail_after(10):
            await host.connect(info_from_p2p_addr(Multiaddr(addr)))
        yield host


async def server_info(host: Any, peer_id: str, *, timeout: float = 10.0) -> m.InfoResponse:
    conn = await open_stream(host, peer_id, max_frame_size=DEFAULT_MAX_FRAME_SIZE, timeout=timeout)
    try:
        with trio.fail_after(timeout):
            await conn.send(m.InfoRequest())
            reply = await conn.receive()
    finally:
        await conn.close()
    if not isinstance(reply, m.InfoResponse):
        raise RemoteProtocolError(f"an InfoRequest must get an InfoResponse, got {reply!r}")
    return reply


async def fuzz_server(
    addr: str,
    *,
    frames: int,
    seed: int = 0,
    concurrency: int = 4,
    reply_timeout: float = 30.0,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> FuzzStats:
    """Send ``frames`` fuzzed frames to the server at ``addr`` (a full multiaddr), ``concurrency``
    streams at a time, from a new identity (``seed`` makes the frames)."""
    peer_id = addr.rsplit("/p2p/", 1)[1]
    rng = random.Random(seed)
    total = FuzzStats()
    async with attacker_host(addr) as host:
        info = await server_info(host, peer_id)
        valid = [encode_message(msg) for msg in valid_messages(info)]
        work = batches(rng, valid, frames, max_frame_size)

        async def worker() -> None:
            for batch, kinds in work:  # the workers share one generator: each batch goes once
                stats = await send_batch(
                    host, peer_id, batch, max_frame_size=max_frame_size, reply_timeout=reply_timeout
                )
                stats.kinds.update(kinds)
                total.add(stats)

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return total
