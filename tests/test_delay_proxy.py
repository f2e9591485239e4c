"""The delay proxy adds its one-way delay in each direction, keeps order, and caps bandwidth."""

from __future__ import annotations

import functools

import pytest
import trio

from tests.delay_proxy import DelayProxy

SLACK = 0.06  # seconds of scheduling noise allowed above the emulated delay


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def start_echo_behind_proxy(nursery: trio.Nursery, **proxy_args: object) -> trio.SocketStream:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    target = listeners[0].socket.getsockname()[1]
    port = await nursery.start(DelayProxy(target_port=target, **proxy_args).run)  # type: ignore[arg-type]
    return await trio.open_tcp_stream("127.0.0.1", port)


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await stream.receive_some(n - len(out))
        assert chunk, "the proxy closed the connection early"
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("timer_slack", [0.001, 0.0], ids=["spinning", "not-spinning"])
async def test_round_trip_is_twice_the_one_way_delay(timer_slack: float) -> None:
    # not spinning, each chunk is written up to ~1 ms late (trio's epoll rounds its timeout up),
    # never early
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            stream = await start_echo_behind_proxy(nursery, delay=0.05, timer_slack=timer_slack)
            for i in range(3):
                message = b"ping %d" % i
                t0 = trio.current_time()
                await stream.send_all(message)
                assert await receive_exactly(stream, len(message)) == message
                elapsed = trio.current_time() - t0
                assert 0.1 <= elapsed < 0.1 + SLACK
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_order_is_kept_and_eof_passes_through() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            stream = await start_echo_behind_proxy(nursery, delay=0.01)
            sent = b"".join(b"%05d" % i for i in range(2000))
            for i in range(0, len(sent), 777):
                await stream.send_all(sent[i : i + 777])
            await stream.send_eof()
            received = bytearray()
            async for chunk in stream:
                received += chunk
            assert bytes(received) == sent  # the echo server closed after our EOF reached it
            nursery.cancel_scope.cancel()


async def test_bandwidth_cap() -> None:
    size, rate = 100_000, 1_000_000  # 0.1 s of transmission each way, pipelined through the echo
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            stream = await start_echo_behind_proxy(nursery, delay=0.0, bandwidth=rate)
            t0 = trio.current_time()
            await stream.send_all(b"x" * size)
            await receive_exactly(stream, size)
            elapsed = trio.current_time() - t0
            assert size / rate <= elapsed < 2 * size / rate + SLACK
            await stream.aclose()
            nursery.cancel_scope.cancel()


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="'delay' must be finite"):
        DelayProxy(target_port=1, delay=-1)
    with pytest.raises(ValueError, match="'bandwidth' must be > 0"):
        DelayProxy(target_port=1, delay=0, bandwidth=0)
    with pytest.raises(ValueError, match="'timer_slack' must be 0..0.01"):
        DelayProxy(target_port=1, delay=0, timer_slack=-0.001)
