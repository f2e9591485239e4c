"""A bound on what multistream-select negotiation reads, installed over py-libp2p 0.8.1's reader.

py-libp2p 0.8.1 reads each negotiation message (a varint length, then that many bytes) with no
bound, before authentication, on every inbound TCP connection, swarm key or not: one varint
announcing 1 GiB and the bytes that follow were buffered whole (fixed upstream in 0.8.2, which the
package index here lacks). Here a message longer than MAX_NEGOTIATION_MESSAGE is refused on its
length prefix, before its body is read, and the negotiation fails: the connection is closed.
Protocol ids are short ("/noise", "/yamux/1.0.0", "/swarm-node/2.0.0").
"""

from __future__ import annotations

from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IOException
from libp2p.protocol_muxer.exceptions import MultiselectCommunicatorError
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

MAX_NEGOTIATION_MESSAGE = 1024  # bytes, the newline included


async def bounded_read(self: MultiselectCommunicator) -> str:
    """MultiselectCommunicator.read, refusing a message over MAX_NEGOTIATION_MESSAGE bytes."""
    try:
        data = await read_varint_prefixed_bytes_limited(self.read_writer, MAX_NEGOTIATION_MESSAGE)
    except (ParseError, IOException) as error:  # MessageTooLarge is an IOException
        raise MultiselectCommunicatorError(
            f"multistream negotiation message refused or cut off: {error!r}"
        ) from error
    if data[-1:] != b"\n":
        raise MultiselectCommunicatorError(
            f"multistream negotiation message must end with a newline, got {data[:64]!r}"
        )
    try:
        return data[:-1].decode()
    except UnicodeDecodeError as error:
        raise MultiselectCommunicatorError(
            f"multistream negotiation message must be UTF-8, got {data[:64]!r}"
        ) from error


def install_negotiation_bound() -> None:
    """Every multistream negotiation of this process (connections and streams) reads through
    bounded_read from now on. Idempotent."""
    MultiselectCommunicator.read = bounded_read  # type: ignore[method-assign]
