"""Server-to-server push: the stream a server opens to the next span's server for one session.

After computing a step, a server sends its output to the next server's session (a PushStepRequest,
no reply) as well as to the client. A push that cannot be written (the stream broke, the next
server is gone or reset the stream) turns the link off: the client sees ``pushed=False`` in the step's
answer and sends that step to the next server itself (client-star). This module does NOT know
sessions, caches or models: the server decides what to push.

The next server is the client's word: it is believed only when that peer's own signed record
announces the blocks that follow, and it is reached at that record's addresses, not at the ones the
client named. Otherwise no link is opened (the session answers ``push=False`` and the client sends
every step there itself, as when the next server is unreachable): a client cannot make a server
send traffic to a host that is not a server of the next blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from swarm_node.dht.records import ServerRecord, push_target_problem
from swarm_node.node.net.dialing import open_stream, remember_addrs
from swarm_node.node.net.message_stream import ConnectionLost, MessageStream
from swarm_node.protocol import messages as m

log = logging.getLogger(__name__)

PUSH_OPEN_TIMEOUT = 10.0  # seconds to reach the next server when a session opens
PUSH_SEND_TIMEOUT = 5.0  # seconds one push may wait for the stream (flow control)


class PushLink:
    """A stream to the next server, carrying one session's steps there."""

    def __init__(self, conn: MessageStream, next_session: str) -> None:
        self.conn: MessageStream | None = conn
        self.next_session = next_session

    async def push(
        self,
        step_id: int,
        position: int,
        hidden: Any,
        keep: int = -1,
        reorder: tuple[int, ...] = (),
    ) -> bool:
        """Send one step's output on (with the client's roll back ``keep`` and row ``reorder``,
        as they came); False (and the link is off from now on) if it failed."""
        if self.conn is None:
            return False
        message = m.PushStepRequest(
            session_id=self.next_session,
            step_id=step_id,
            position=position,
            hidden=hidden,
            keep=keep,
            reorder=reorder,
        )
        with trio.move_on_after(PUSH_SEND_TIMEOUT):
            try:
                await self.conn.send(message)
                return True
            except ConnectionLost as exc:
                log.info(
                    "push to %s failed (%s); the client sends steps there itself",
                    self.conn.peer_id,
                    exc,
                )
        await self.aclose()
        return False

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await conn.close()


async def open_push_link(
    host: Any,
    *,
    peer_id: str,
    next_session: str,
    max_frame_size: int,
    model: str,
    digest: str = "",
    block: int,
    find_record: Callable[[str], Awaitable[ServerRecord | None]],
) -> PushLink | None:
    """A push stream to ``peer_id``, if its signed record (``find_record``) announces block ``block``
    of ``model`` (with model digest ``digest``, when given), at that record's addresses; None (no push) otherwise, or if unreachable."""
    record = None
    with trio.move_on_after(PUSH_OPEN_TIMEOUT):
        record = await find_record(peer_id)
    problem = push_target_problem(
        record, peer_id=peer_id, model=model, digest=digest, block=block, now=time.time()
    )
    if problem is not None:
        log.info("push target refused: %s", problem)
        return None
    try:
        remember_addrs(host, peer_id, record.addrs)
    except ValueError as exc:
        log.info("not pushing: %s", exc)
        return None
    try:
        conn = await open_stream(
            host, peer_id, max_frame_size=max_frame_size, timeout=PUSH_OPEN_TIMEOUT
        )
    except Exception as exc:  # noqa: BLE001 (an unreachable next server, however it fails: the session runs client-star)
        log.info("not pushing to %s: %r", peer_id, exc)
        return None
    return PushLink(conn, next_session)
