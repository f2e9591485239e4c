"""Yamux window updates at half the window (node/net/window_updates.py), on real hosts.

Small messages going back and forth cost py-libp2p one WINDOW_UPDATE frame a read (the control);
with updates at half the window they cost one per 128 KiB consumed. Messages many times the window
still flow both ways at once (an echo that writes each chunk back as it reads it, so both sides'
windows run out and refill), on many streams of one connection together.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, YamuxStream
from multiaddr import Multiaddr

from swarm_node.node.net.host import build_host
from swarm_node.node.net.window_updates import PY_LIBP2P_WINDOW_UPDATE

ECHO = "/echo-chunks/1.0.0"
ROUND_TRIPS = 300
SMALL = 1000  # bytes, about a decode step's message for a small model


async def echo_chunks(stream: Any) -> None:
    """Writes back every chunk as soon as it is read, until the writer closes its side."""
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:  # noqa: BLE001 (the writer's side ended the stream)
        pass
    await stream.close()


async def exchanged(stream: Any, payload: bytes) -> bytes:
    """``payload`` written while its echo is read back, at once."""
    echoed = bytearray()

    async def read_back() -> None:
        while len(echoed) < len(payload):
            data = await stream.read(65536)
            if not data:
                return
            echoed.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_back)
        await stream.write(payload)
    return bytes(echoed)


async def with_connection(work: Any, *replaced: tuple[type, str, Any]) -> Any:
    """``work(new_stream)`` over a connection of two real hosts, with each ``(class, name,
    function)`` of ``replaced`` in place of what build_host installed (a test's control)."""
    server = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    client = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    installed = [(cls, name, getattr(cls, name)) for cls, name, _ in replaced]
    for cls, name, function in replaced:
        setattr(cls, name, function)
    try:
        return await _with_connection(server, client, work)
    finally:
        for cls, name, function in installed:
            setattr(cls, name, function)


async def _with_connection(server: Any, client: Any, work: Any) -> Any:
    server.set_stream_handler(ECHO, echo_chunks)
    loopback = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with server.run(listen_addrs=loopback), client.run(listen_addrs=loopback):
        info = info_from_p2p_addr(Multiaddr(f"{server.get_addrs()[0]}/p2p/{server.get_id()}"))
        await client.connect(info)

        async def new_stream() -> Any:
            return await client.new_stream(info.peer_id, [ECHO])

        return await work(new_stream)


@pytest.fixture
def window_updates(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the WINDOW_UPDATE frames sent ("frames") and the bytes they credit ("bytes")."""
    counts: Counter[str] = Counter()
    send = YamuxStream.send_window_update

    async def counted(self: YamuxStream, increment: int, skip_lock: bool = False) -> None:
        if increment > 0:
            counts["frames"] += 1
            counts["bytes"] += increment
        await send(self, increment, skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    return counts


async def ping_pong(new_stream: Any) -> None:
    stream = await new_stream()
    for i in range(ROUND_TRIPS):
        payload = bytes([i % 256]) * SMALL
        assert await exchanged(stream, payload) == payload
    await stream.close()


async def test_py_libp2p_sends_a_window_update_a_read(window_updates: Counter[str]) -> None:
    with trio.fail_after(60):
        await with_connection(
            ping_pong, (YamuxStream, "_auto_tune_and_send_window_update", PY_LIBP2P_WINDOW_UPDATE)
        )
    assert window_updates["frames"] >= ROUND_TRIPS  # the control: about one per read, each side


async def test_small_messages_send_a_window_update_per_half_window(
    window_updates: Counter[str],
) -> None:
    with trio.fail_after(60):
        await with_connection(ping_pong)
    consumed = 2 * ROUND_TRIPS * SMALL  # both sides
    assert window_updates["frames"] <= consumed // (DEFAULT_WINDOW_SIZE // 2)
    assert window_updates["frames"] >= 2  # each side passed half its window once


async def test_messages_larger_than_the_window_flow_both_ways_on_many_streams(
    window_updates: Counter[str],
) -> None:
    sizes = [3 * DEFAULT_WINDOW_SIZE + 17, 5 * DEFAULT_WINDOW_SIZE // 2, 4 << 20]
    streams = 12

    async def many(new_stream: Any) -> list[bool]:
        results: list[bool] = []

        async def one(i: int) -> None:
            stream = await new_stream()
            for size in sizes[:1] if i else sizes:  # one stream sends them all
                payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
                results.append(await exchanged(stream, payload) == payload)
            await stream.close()

        async with trio.open_nursery() as nursery:
            for i in range(streams):
                nursery.start_soon(one, i)
        return results

    with trio.fail_after(120):
        results = await with_connection(many)
    assert results == [True] * (len(sizes) + streams - 1)
    assert window_updates["frames"] > 0
