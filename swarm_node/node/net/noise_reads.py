"""Buffered Noise reads: one socket read for one or more Noise messages, not two for each.

py-libp2p 0.8.1 reads each Noise transport message with two exact reads from the connection (its
2-byte length, then its body), each a socket call and a trip through trio. Here a connection's
transport reader asks the socket for up to READ_SIZE bytes at a time and cuts the messages out of
what came: a small message (a decode step's, a yamux window update) costs one socket read, and
messages that arrive together cost one between them. Only the transport phase reads this way: the
handshake's reader stays exact, so no byte meant for the transport reader is read before it starts.
"""

from __future__ import annotations

from libp2p.io.exceptions import IncompleteReadError
from libp2p.security.noise.io import SIZE_NOISE_MESSAGE_LEN, NoiseTransportReadWriter

READ_SIZE = 1 << 17  # bytes asked of the socket at once: two whole Noise messages

PY_LIBP2P_READ_MSG = NoiseTransportReadWriter.read_msg


async def next_noise_message(reader: NoiseTransportReadWriter) -> bytes:
    """The next Noise message's ciphertext, its length prefix removed."""
    buffer: bytearray | None = getattr(reader, "received_bytes", None)
    if buffer is None:
        buffer = reader.received_bytes = bytearray()
    connection = reader.read_writer.read_write_closer
    while True:
        if len(buffer) >= SIZE_NOISE_MESSAGE_LEN:
            end = SIZE_NOISE_MESSAGE_LEN + int.from_bytes(buffer[:SIZE_NOISE_MESSAGE_LEN], "big")
            if len(buffer) >= end:
                message = bytes(buffer[SIZE_NOISE_MESSAGE_LEN:end])
                del buffer[:end]
                return message
        data = await connection.read(READ_SIZE)
        if not data:
            raise IncompleteReadError(
                f"connection closed with {len(buffer)} bytes of a Noise message read",
                received_bytes=len(buffer),
            )
        buffer.extend(data)


async def buffered_read_msg(self: NoiseTransportReadWriter, prefix_encoded: bool = False) -> bytes:
    """NoiseTransportReadWriter.read_msg through next_noise_message."""
    ciphertext = await next_noise_message(self)
    return self.decrypt(ciphertext[len(self.prefix) :] if prefix_encoded else ciphertext)


def install_buffered_noise_reads() -> None:
    """Every Noise transport reader of this process reads through buffered_read_msg. Idempotent."""
    NoiseTransportReadWriter.read_msg = buffered_read_msg  # type: ignore[method-assign]
