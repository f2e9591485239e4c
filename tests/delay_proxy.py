"""A userspace TCP proxy on loopback that adds a fixed one-way delay, optionally a bandwidth cap.

Linux netem is not available here, so wide-area behaviour is emulated in front of a server: start
a DelayProxy to the server's port and announce the proxy's address instead. Each direction of each
connection is a link: a chunk read at time t starts "transmitting" when the link is free, takes
len / bandwidth seconds, and is written ``delay`` seconds after that (order preserved). With no cap
a chunk is written exactly ``delay`` seconds after it was read.

    proxy = DelayProxy(target_port=server_port, delay=0.05)
    port = await nursery.start(proxy.run)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

READ_SIZE = 64 * 1024
QUEUE_CHUNKS = 1024  # chunks in flight per direction before the reader waits (backpressure)
# trio's epoll wait rounds its timeout up to whole milliseconds, so sleep_until alone writes a chunk
# 0.5 ms late on average (up to 0.9; a worker thread's nanosleep is later still on these VMs, 0.8 ms,
# its wake-up being slow): the proxy wakes TIMER_SLACK early and spins the rest (0.5 ms of CPU a
# chunk on average), so a link's delay is what was asked within microseconds. ``timer_slack=0``
# spins not at all: each chunk up to 1 ms late (0.5 on average), for a run where the proxies' CPU
# would be taken from what is measured (bench_first_token.py: 32 proxies and their servers share
# 2 cores with the client; spinning cost them ~0.45 CPU-seconds more a generate, measured).
TIMER_SLACK = 0.001


@dataclass(kw_only=True)
class DelayProxy:
    target_port: int
    delay: float  # seconds added to each direction
    bandwidth: float | None = None  # bytes/s per direction per connection; None: no cap
    timer_slack: float = TIMER_SLACK  # seconds spun before each write (see TIMER_SLACK); 0: none
    target_host: str = "127.0.0.1"
    listen_host: str = "127.0.0.1"
    port: int | None = None  # the listening port, once run() has started

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError(f"'delay' must be finite and >= 0 seconds, got {self.delay}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError(f"'bandwidth' must be > 0 bytes/s or None, got {self.bandwidth}")
        if not (math.isfinite(self.timer_slack) and 0 <= self.timer_slack <= 0.01):
            raise ValueError(f"'timer_slack' must be 0..0.01 seconds, got {self.timer_slack}")

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.listen_host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:
            for src, dst in ((client, upstream), (upstream, client)):
                send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUE_CHUNKS)
                nursery.start_soon(self._read, src, send, nursery.cancel_scope)
                nursery.start_soon(self._write, receive, dst, nursery.cancel_scope)

    async def _read(
        self,
        src: trio.SocketStream,
        queue: trio.MemorySendChannel[tuple[float, bytes]],
        scope: trio.CancelScope,
    ) -> None:
        link_free = 0.0  # when the last chunk has finished "transmitting" on this link
        async with queue:
            while True:
                try:
                    data = await src.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    scope.cancel()  # a reset on one side ends the connection
                    return
                now = trio.current_time()
                if not data:
                    await queue.send((max(now, link_free) + self.delay, b""))  # EOF, in order
                    return
                if self.bandwidth is not None:
                    link_free = max(now, link_free) + len(data) / self.bandwidth
                    now = link_free
                await queue.send((now + self.delay, data))

    async def _write(
        self,
        queue: trio.MemoryReceiveChannel[tuple[float, bytes]],
        dst: trio.SocketStream,
        scope: trio.CancelScope,
    ) -> None:
        async with queue:
            async for release, data in queue:
                await trio.sleep_until(release - self.timer_slack)
                while self.timer_slack and trio.current_time() < release:
                    pass  # at most timer_slack + the loop's lateness; see TIMER_SLACK
                try:
                    if not data:
                        await dst.send_eof()
                        return
                    await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    scope.cancel()
                    return
