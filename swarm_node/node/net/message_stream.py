"""Typed messages over one libp2p stream: the trio shell around protocol/'s sans-IO framing."""

from __future__ import annotations

import logging

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from swarm_node.errors import ProtocolError, RemoteProtocolError
from swarm_node.protocol import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode_message
from swarm_node.protocol.messages import Message

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20

# what py-libp2p raises when a connection or stream breaks under us: the one spelling of it
TRANSPORT_ERRORS = (BaseLibp2pError, OSError)


class ConnectionLost(ProtocolError):
    """The stream closed or reset before a whole message arrived."""


class MessageStream:
    """Send and receive whole protocol messages on a libp2p stream."""

    def __init__(self, stream: INetStream, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.stream = stream
        self.max_frame_size = max_frame_size
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self._send_lock = trio.Lock()  # whole frames: a server answers a client from several tasks

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
