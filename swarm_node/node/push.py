"""Server-to-server push: the stream a server opens to the next span's server for one session.

After computing a step, a server sends its output to the next server's session (a PushStepRequest,
no reply) as well as to the client. A push that cannot be written (the stream broke, the next
server is gone or reset the stream) turns the link off: the client sees ``pushed=0`` in the step's
answer and sends that step to the next server itself (client-star). This module does NOT know
sessions, caches or models: the server decides what to push.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from swarm_node.node.message_stream import ConnectionLost, MessageStream, forget_closed_connections
from swarm_node.protocol import PROTOCOL_ID
from swarm_node.protocol import messages as m

log = logging.getLogger(__name__)

PUSH_OPEN_TIMEOUT = 10.0  # seconds to reach the next server when a session opens
PUSH_SEND_TIMEOUT = 5.0  # seconds one push may wait for the stream (flow control)
MAX_NEXT_ADDRS = 16
ADDR_TTL = 3600  # seconds the peerstore keeps the next server's addresses


class PushLink:
    """A stream to the next server, carrying one session's steps there."""

    def __init__(self, conn: MessageStream, next_session: str) -> None:
        self.conn: MessageStream | None = conn
        self.next_session = next_session

    @property
    def alive(self) -> bool:
        return self.conn is not None

    async def push(self, step_id: int, position: int, hidden: Any) -> bool:
        """Send one step's output on; False (and the link is off from now on) if it failed."""
        if self.conn is None:
            return False
        message = m.PushStepRequest(
            session_id=self.next_session, step_id=step_id, position=position, hidden=hidden
        )
        with trio.move_on_after(PUSH_SEND_TIMEOUT):
            try:
                await self.conn.send(message)
                return True
            except ConnectionLost as exc:
                log.info("push to %s failed (%s); the client sends steps there itself", self.conn.peer_id, exc)
        await self.aclose()
        return False

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await conn.close()


async def open_push_link(
    host: Any, *, peer_id: str, addrs: str, next_session: str, max_frame_size: int
) -> PushLink | None:
    """A push stream to ``peer_id`` (reached at the space-separated ``addrs``); None if unreachable."""
    try:
        peer = ID.from_base58(peer_id)
        multiaddrs = [Multiaddr(a) for a in addrs.split()[:MAX_NEXT_ADDRS]]
    except Exception as exc:  # libp2p and multiaddr raise several types for bad text
        log.info("not pushing: bad next server %r / %r: %r", peer_id, addrs, exc)
        return None
    if multiaddrs:
        host.get_peerstore().add_addrs(peer, multiaddrs, ADDR_TTL)
    try:
        forget_closed_connections(host, peer)  # else py-libp2p may refuse to dial (see there)
        with trio.fail_after(PUSH_OPEN_TIMEOUT):
            stream = await host.new_stream(peer, [PROTOCOL_ID])
    except Exception as exc:  # unreachable next server: the session runs client-star
        log.info("not pushing to %s: %r", peer_id, exc)
        return None
    return PushLink(MessageStream(stream, max_frame_size=max_frame_size), next_session)
