"""A writer cancelled mid-write no longer breaks the connection it shares (node/net/whole_writes.py).

Two real hosts on loopback; on one connection, 200 streams each begin a 200 KB write and are
cancelled after 0 to 10 scheduling points. With py-libp2p's own yamux writes (the control) a
cancelled frame leaves the Noise nonces out of step: the other side fails to authenticate the next
frame and resets the connection within a few rounds (measured: rounds 5-6 of every run). With whole
frames the same connection carries all 200 rounds and then an echo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from swarm_node.node.net.host import build_host
from swarm_node.node.net.whole_writes import PY_LIBP2P_WRITE_FRAME, write_whole_frame

ROUNDS = 200
PAYLOAD = bytes(200_000)  # several Noise messages: a frame has awaits between its chunks


async def cancelled_writes(write_frame: Callable[..., Any]) -> tuple[int | None, bool]:
    """(the round the connection broke at or None, whether an echo then came back), yamux
    writing its frames with ``write_frame``."""
    server = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    client = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    Yamux._write_frame = write_frame  # after build_host, which installs whole frames
    try:
        return await _cancelled_writes(server, client)
    finally:
        Yamux._write_frame = write_whole_frame


async def _cancelled_writes(server: Any, client: Any) -> tuple[int | None, bool]:

    async def sink(stream) -> None:
        try:
            while await stream.read(65536):
                pass
        except Exception:  # noqa: BLE001 (the writer reset it: that is the test)
            pass

    async def echo(stream) -> None:
        await stream.write(await stream.read(4))
        await stream.close()

    server.set_stream_handler("/sink/1.0.0", sink)
    server.set_stream_handler("/echo/1.0.0", echo)
    loopback = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with server.run(listen_addrs=loopback), client.run(listen_addrs=loopback):
        info = info_from_p2p_addr(Multiaddr(f"{server.get_addrs()[0]}/p2p/{server.get_id()}"))
        await client.connect(info)
        (conn,) = client.get_network().get_connections(info.peer_id)
        for i in range(ROUNDS):
            try:
                stream = await client.new_stream(info.peer_id, ["/sink/1.0.0"])
            except Exception:  # noqa: BLE001 (the connection broke: the control's outcome)
                return i, False

            async def write(stream=stream) -> None:
                await stream.write(PAYLOAD)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                for _ in range(i % 11):
                    await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()
            with trio.move_on_after(1):
                await stream.reset()
            if conn.is_closed:
                return i, False
        stream = await client.new_stream(info.peer_id, ["/echo/1.0.0"])
        await stream.write(b"ping")
        echoed = await stream.read(4) == b"ping"
        return None, echoed and not conn.is_closed


async def test_py_libp2p_writes_break_the_connection_when_a_writer_is_cancelled() -> None:
    with trio.fail_after(60):
        broke_at, _ = await cancelled_writes(PY_LIBP2P_WRITE_FRAME)
    assert broke_at is not None  # the attack on ourselves is real


async def test_whole_frames_keep_the_connection_through_cancelled_writers() -> None:
    with trio.fail_after(120):
        broke_at, echoed = await cancelled_writes(write_whole_frame)
    assert broke_at is None
    assert echoed
