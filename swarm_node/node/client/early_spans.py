"""Sessions opened on a chain's servers before the session that uses them exists.

A cold `generate` knows its chain (the lookup and the pings run while torch loads) and its prompt's
length (a plain tokenizer needs no torch) long before its side of the model is loaded; opening the
chain's sessions then, instead of after the load, takes a round of stream negotiation and open
requests (two to three round trips: ~0.13 s at 25 ms a hop, measured) off its first token.

This module imports no torch: node/apps/commands.py uses it before torch is loaded. An
InferenceSession takes an opened span only where it would have sent the very request the span was
opened with (``EarlySpans.take``), so what it computes does not depend on whether a span was opened
early; a span it does not take is closed once the session is open (``close_rest``), and every span
still open when the ``early_spans`` block ends is closed then.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from swarm_node.dht.routing import Hop
from swarm_node.errors import RemoteError, RemoteProtocolError
from swarm_node.node.config import SERVER_DEFAULT
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import MessageStream, request
from swarm_node.protocol import messages as m

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0  # seconds a session's close waits for its server's answer (best effort)


async def open_session_on(
    host: Any,
    peer_id: str,
    req: m.OpenSessionRequest,
    *,
    max_frame_size: int,
    timeout: float,
    conn: MessageStream | None = None,
) -> tuple[MessageStream, m.OpenSessionResponse]:
    """``req`` sent to ``peer_id`` on ``conn`` (a stream to it) or a new stream: that stream and the
    server's answer; the stream is closed when the request fails."""
    if conn is None:
        conn = await open_stream(host, peer_id, max_frame_size=max_frame_size, timeout=timeout)
    try:
        reply = await request(conn, req, m.OpenSessionResponse, timeout=timeout)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await conn.close()
        raise
    return conn, reply


async def close_session(conn: MessageStream, session_id: str) -> None:
    """End session ``session_id`` on the server at the other end of ``conn`` (best effort, within
    CLOSE_TIMEOUT), then close the stream."""
    close = m.CloseSessionRequest(session_id=session_id)
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await request(conn, close, m.CloseSessionResponse, timeout=CLOSE_TIMEOUT)
        except (RemoteError, RemoteProtocolError, trio.TooSlowError) as exc:
            log.debug("closing session on %s: %s", conn.peer_id, exc)
        except Exception as exc:  # noqa: BLE001 (the server may be gone; the close is best effort)
            log.debug("closing session on %s failed: %r", conn.peer_id, exc)
        await conn.close()


@dataclass(eq=False)
class _Opening:
    request: m.OpenSessionRequest
    done: trio.Event = field(default_factory=trio.Event)
    opened: tuple[MessageStream, m.OpenSessionResponse] | None = None
    error: Exception | None = None
    claimed: bool = False  # a session asked for it, or it is being closed
    adopted: bool = False  # a session took it: the session closes it
    closed: bool = False


class EarlySpans:
    """Sessions being opened (or opened) on servers, each for one hop's request, until a session
    takes them (``take``) or they are closed."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._openings: dict[tuple[str, int, int], _Opening] = {}
        self.started = 0  # sessions asked for early
        self.taken = 0  # of those, opened and taken by a session

    def start(
        self,
        host: Any,
        chain: Sequence[Hop],
        requests: Sequence[m.OpenSessionRequest],
        *,
        max_frame_size: int,
        timeout: float,
    ) -> None:
        """Open ``requests[i]`` on ``chain[i]``'s server, every hop at once, in the background."""
        for hop, req in zip(chain, requests, strict=True):
            key = (hop.server.peer_id, hop.start, hop.end)
            if key in self._openings:
                continue
            opening = self._openings[key] = _Opening(req)
            self.started += 1
            self._nursery.start_soon(self._open, host, hop, opening, max_frame_size, timeout)

    async def _open(
        self, host: Any, hop: Hop, opening: _Opening, max_frame_size: int, timeout: float
    ) -> None:
        try:
            opening.opened = await open_session_on(
                host,
                hop.server.peer_id,
                opening.request,
                max_frame_size=max_frame_size,
                timeout=timeout,
            )
        except Exception as exc:  # noqa: BLE001 (raised again by take, where recovery sees it)
            opening.error = exc
        finally:
            opening.done.set()

    async def settled(self) -> None:
        """Return once every session started so far is opened, or failed to."""
        for opening in list(self._openings.values()):
            await opening.done.wait()

    async def take(
        self, hop: Hop, req: m.OpenSessionRequest
    ) -> tuple[MessageStream, m.OpenSessionResponse] | None:
        """The stream and answer of the session opened early on ``hop``'s server with exactly
        ``req`` (waiting for it while it opens), or None: none was, or with another request (that
        one is closed). What opening it raised is raised here."""
        opening = self._openings.get((hop.server.peer_id, hop.start, hop.end))
        if opening is None or opening.claimed:
            return None
        opening.claimed = True
        if opening.request != req:
            log.debug("a session opened early on %s is not the one asked for", hop.server.peer_id)
            self._nursery.start_soon(self._close, opening)
            return None
        await opening.done.wait()
        if opening.error is not None:
            raise opening.error
        if opening.opened is None:  # its opening was cancelled
            return None
        opening.adopted = True
        self.taken += 1
        return opening.opened

    def close_rest(self) -> None:
        """Close, in the background, every session opened early that no session has taken."""
        for opening in self._openings.values():
            if not opening.claimed:
                opening.claimed = True
                self._nursery.start_soon(self._close, opening)

    async def _close(self, opening: _Opening) -> None:
        await opening.done.wait()
        if opening.opened is not None and not opening.closed:
            conn, reply = opening.opened
            await close_session(conn, reply.session_id)
            opening.closed = True

    async def _close_all(self) -> None:
        """Close every session opened early that no session took (and none closed yet)."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for opening in self._openings.values():
                    if not opening.adopted:
                        nursery.start_soon(self._close, opening)


def open_plain_sessions(
    early: EarlySpans, peer: Any, chain: Sequence[Hop], *, model: str, max_length: int, dtype: str
) -> bool:
    """Start opening, in ``early``, the sessions that ``peer.inference_session(chain,
    SessionSettings(model=model, max_length=max_length, dtype=dtype))`` would open for one
    sequence; False (nothing started) where ``peer``'s sessions carry more than such a request
    (push, a named adapter)."""
    config = peer.client_config
    if config.push or config.adapter:
        return False
    requests = [
        m.OpenSessionRequest(
            model=model,
            start=hop.start,
            end=hop.end,
            max_length=max_length,
            dtype=dtype,
            compression=config.compression or SERVER_DEFAULT,
            batch_size=1,
        )
        for hop in chain
    ]
    early.start(
        peer.host,
        chain,
        requests,
        max_frame_size=peer.config.max_frame_size,
        timeout=config.step_timeout,
    )
    return True


@asynccontextmanager
async def early_spans() -> AsyncIterator[EarlySpans]:
    """An EarlySpans whose openings run inside the block: those still running when it ends are
    cancelled, and every session opened early that no session took is closed."""
    spans: EarlySpans | None = None
    try:
        async with trio.open_nursery() as nursery:
            spans = EarlySpans(nursery)
            yield spans
            nursery.cancel_scope.cancel()  # openings still under way are of no use now
    finally:
        if spans is not None:
            await spans._close_all()
