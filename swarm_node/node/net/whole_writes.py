"""Whole frames on every connection: a cancelled writer no longer breaks the connection it shares.

py-libp2p 0.8.1's yamux writes each frame with ``secured_conn.write``: Noise encrypts it (using up
a nonce), then awaits the socket. A task cancelled at that await (a lookup's spare request when
enough answers came, a ping past its deadline) leaves the frame unsent or half sent, and the next
frame on the connection carries a nonce the other side does not expect: it fails authentication
there ("NoiseInvalidMessage: Failed authentication of message", seen in test_swarm_inference on a
2-core machine) and the connection dies under every session using it; the client then banned a
healthy server. A frame once begun is now written whole, shielded from the writer's cancellation,
within WRITE_DEADLINE seconds; a frame that cannot be written by then has broken the connection
anyway (its peer stopped reading), which is then closed.
"""

from __future__ import annotations

import logging
import weakref

import trio
from libp2p.io.exceptions import IOException
from libp2p.stream_muxer.yamux.yamux import Yamux

log = logging.getLogger(__name__)

WRITE_DEADLINE = 60.0  # seconds one frame may take to reach the socket once begun

PY_LIBP2P_WRITE_FRAME = Yamux._write_frame  # what install_whole_writes replaces (a test's control)


# one writer at a time on each connection (py-libp2p's own lock is private to it)
_write_locks: weakref.WeakKeyDictionary[Yamux, trio.Lock] = weakref.WeakKeyDictionary()


async def write_whole_frame(self: Yamux, data: bytes) -> None:
    """Yamux._write_frame: one writer at a time, each frame written whole or the connection closed."""
    lock = _write_locks.get(self)
    if lock is None:
        lock = _write_locks[self] = trio.Lock()
    async with lock:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + WRITE_DEADLINE
            await self.secured_conn.write(data)
        if scope.cancelled_caught:
            log.warning(
                "closing the connection to %s: a frame was not written within %.0f s",
                self.peer_id,
                WRITE_DEADLINE,
            )
            with trio.CancelScope(shield=True):
                try:
                    await self.secured_conn.close()
                except Exception as exc:  # noqa: BLE001 (closing a connection already broken)
                    log.debug("closing %s failed: %r", self.peer_id, exc)
            raise IOException(
                f"a frame to {self.peer_id} was not written within {WRITE_DEADLINE} s"
            )
    await trio.lowlevel.checkpoint()


def install_whole_writes() -> None:
    """Every yamux connection of this process writes through write_whole_frame. Idempotent."""
    Yamux._write_frame = write_whole_frame  # type: ignore[method-assign]
