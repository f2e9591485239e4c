"""Typed messages over one libp2p stream: the trio shell around protocol/'s sans-IO framing."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from swarm_node.errors import ProtocolError, RemoteProtocolError
from swarm_node.protocol import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode_message
from swarm_node.protocol.client_session import answer
from swarm_node.protocol.messages import Message

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20

# what py-libp2p raises when a connection or stream breaks under us: the one spelling of it
TRANSPORT_ERRORS = (BaseLibp2pError, OSError)


class ConnectionLost(ProtocolError):
    """The stream closed or reset before a whole message arrived."""


class ReceiveRefused(RemoteProtocolError):
    """A frame would take the bytes being received past the receiver's budget."""


@dataclass(slots=True)
class ReceiveBudget:
    """Bytes of large frames a server is receiving (announced by their length prefixes, counted
    before their bodies arrive, until decoded): at most ``per_peer`` from one peer and ``total``
    from all, so that many streams each sending a maximum-size frame cannot take memory without
    bound. Frames under ``small`` bytes (every decode step and prefill chunk of one sequence) are
    not counted: a flood of big frames never refuses an honest session's steps."""

    total: int
    per_peer: int
    small: int = 1 << 20
    held: int = 0
    peak: int = 0
    _by_peer: Counter[str] = field(default_factory=Counter)

    def resize(self, peer: str, old: int, new: int) -> None:
        delta = new - old
        if delta > 0 and self._by_peer[peer] + delta > self.per_peer:
            raise ReceiveRefused(
                f"frames being received from one peer must stay under {self.per_peer} bytes, "
                f"this one needs {new} with {self._by_peer[peer] - old} already held"
            )
        if delta > 0 and self.held + delta > self.total:
            raise ReceiveRefused(
                f"frames being received from all peers must stay under {self.total} bytes: "
                "retry later or elsewhere"
            )
        self._by_peer[peer] += delta
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]
        self.held += delta
        self.peak = max(self.peak, self.held)


class MessageStream:
    """Send and receive whole protocol messages on a libp2p stream."""

    def __init__(
        self,
        stream: INetStream,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        budget: ReceiveBudget | None = None,
    ) -> None:
        self.stream = stream
        self.max_frame_size = max_frame_size
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self._send_lock = trio.Lock()  # whole frames: a server answers a client from several tasks
        self._budget = budget  # a server's: what this stream's frames take of it is ``_held``
        self._held = 0

    @property
    def peer_id(self) -> str:
        return self.stream.muxed_conn.peer_id.to_base58()

    async def send(self, message: Message) -> None:
        frame = encode_message(message, max_frame_size=self.max_frame_size)
        try:
            async with self._send_lock:
                await self.stream.write(frame)
        except TRANSPORT_ERRORS as exc:
            raise ConnectionLost(f"stream to {self.peer_id} broke while sending: {exc!r}") from exc

    async def receive(self) -> Message | None:
        """The next message, or None when the peer closed the stream cleanly between messages."""
        while True:
            message = self._decoder.next_message()
            self._reserve()
            if message is not None:
                return message
            try:
                data = await self.stream.read(READ_CHUNK)
            except EOFError:
                data = b""
            except TRANSPORT_ERRORS as exc:
                raise ConnectionLost(f"stream to {self.peer_id} broke: {exc!r}") from exc
            if not data:
                if self._decoder.buffered:
                    raise RemoteProtocolError(f"{self.peer_id} closed the stream mid-frame")
                return None
            self._decoder.feed(data)
            self._reserve()

    def _reserve(self) -> None:
        if self._budget is not None:
            needed = self._decoder.needed
            needed = needed if needed >= self._budget.small else 0
            self._budget.resize(self.peer_id, self._held, needed)
            self._held = needed

    def release(self) -> None:
        """Give back what this stream's frames held of the receive budget (the stream is done)."""
        if self._budget is not None:
            self._budget.resize(self.peer_id, self._held, 0)
            self._held = 0

    async def close(self) -> None:
        try:
            await self.stream.close()
        except TRANSPORT_ERRORS as exc:
            log.debug("closing a stream to %s: %r", self.peer_id, exc)

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except TRANSPORT_ERRORS as exc:
            log.debug("resetting a stream to %s: %r", self.peer_id, exc)


async def request(conn: MessageStream, message: Any, expect: type, *, timeout: float) -> Any:
    """Send one request and wait for its answer under a deadline; ErrorResponse -> RemoteError."""
    with trio.fail_after(timeout):
        await conn.send(message)
        reply = await conn.receive()
    return answer(reply, expect, peer=conn.peer_id, asked=type(message).__name__)
