"""Yamux window updates once half the receive window is consumed, as go-yamux sends them.

py-libp2p 0.8.1 credits the sender back after nearly every read of a stream (``RELEASE_ON_READ``
on by default, and its "partial slack" branch fires whenever any credit is outstanding): every
decode step's message then costs a second Noise message each way, a WINDOW_UPDATE frame, which the
receiver encrypts and writes and the sender reads and decrypts (~1-1.5 ms of CPU a token per
process on a 2-core machine with 8 sessions: issue 19). Here a read credits nothing until what was
consumed and not yet credited reaches half the stream's target window; then it credits all of it
at once (py-libp2p's own GrowTo branch, with its window auto-tuning). A sender is never left with
less than half a window while its receiver keeps reading, so no stream stalls that did not before.
"""

from __future__ import annotations

from libp2p.stream_muxer.yamux.yamux import YamuxStream

PY_LIBP2P_WINDOW_UPDATE = YamuxStream._auto_tune_and_send_window_update


def owed_credit(stream: YamuxStream) -> int:
    """Bytes of the stream's target window the application consumed and the sender was not yet
    credited for (received bytes still buffered are not consumed)."""
    buffered = len(stream.conn.stream_buffers.get(stream.stream_id, b""))
    return stream.target_recv_window - (stream.recv_window + buffered)


async def update_at_half_window(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """YamuxStream._auto_tune_and_send_window_update, sending an update only once the credit
    owed reaches half the target window (``bytes_read`` is not needed: the owed credit counts it)."""
    if owed_credit(self) >= max(self.target_recv_window // 2, 1):
        await PY_LIBP2P_WINDOW_UPDATE(self, bytes_read=0)


def install_half_window_updates() -> None:
    """Every yamux stream of this process sends window updates through update_at_half_window.
    Idempotent."""
    YamuxStream._auto_tune_and_send_window_update = update_at_half_window  # type: ignore[method-assign]
