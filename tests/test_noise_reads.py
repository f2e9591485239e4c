"""Buffered Noise reads (node/net/noise_reads.py), on real hosts.

py-libp2p reads every Noise message with two reads of the connection (the control); buffered, a
small message costs at most one. Messages of every size around a Noise message's limit (65535
bytes) and far beyond it flow both ways at once, on many streams of one connection.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.noise.io import NoiseTransportReadWriter

from swarm_node.node.net.noise_reads import PY_LIBP2P_READ_MSG
from tests.test_window_updates import ROUND_TRIPS, exchanged, ping_pong, with_connection


@pytest.fixture
def connection_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the reads of every raw connection (a TCP socket's receive each)."""
    counts: Counter[str] = Counter()
    read = RawConnection.read

    async def counted(self: RawConnection, n: int | None = None) -> bytes:
        counts["reads"] += 1
        return await read(self, n)

    monkeypatch.setattr(RawConnection, "read", counted)
    return counts


async def test_py_libp2p_reads_the_connection_twice_a_message(
    connection_reads: Counter[str],
) -> None:
    with trio.fail_after(60):
        await with_connection(ping_pong, (NoiseTransportReadWriter, "read_msg", PY_LIBP2P_READ_MSG))
    assert connection_reads["reads"] >= 4 * ROUND_TRIPS  # the control: 2 messages a round trip


async def test_buffered_reads_take_at_most_one_read_a_small_message(
    connection_reads: Counter[str],
) -> None:
    with trio.fail_after(60):
        await with_connection(ping_pong)
    assert connection_reads["reads"] <= 2 * ROUND_TRIPS + 50  # + the handshakes and negotiation


async def test_messages_of_every_size_flow_both_ways_on_many_streams() -> None:
    sizes = [1, 2, 65519, 65520, 65535, 65536, 131071, 1 << 20]

    async def many(new_stream: Any) -> list[bool]:
        results: list[bool] = []

        async def one(i: int) -> None:
            stream = await new_stream()
            for size in sizes[i % 2 :: 2]:
                payload = bytes((i + j) % 256 for j in range(size))
                results.append(await exchanged(stream, payload) == payload)
            await stream.close()

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        return results

    with trio.fail_after(120):
        results = await with_connection(many)
    assert results == [True] * (4 * len(sizes))
