"""What a server keeps per session and gauges of work; the session's rules are in
protocol/server_session.py. Plain state for block_server.py; no streams are read or written here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from swarm_node.node.net.message_stream import MessageStream
from swarm_node.node.server.push import PushLink
from swarm_node.protocol.server_session import SessionRules


@dataclass(slots=True)
class ServerSession:
    rules: SessionRules  # step ids, positions, whose pushes count; the newest answer
    peer_id: str
    start: int
    end: int
    batch_size: int
    dtype: str
    compression: str
    cache: Any  # model.SpanCache
    reserved_tokens: int  # all it holds, in cache tokens (protocol/server_session.py: Holding)
    conn: MessageStream  # the client's stream: answers to pushed steps go there
    steps: int = 0
    last_active: float = 0.0  # trio time of the last step
    push: PushLink | None = None  # to the next span's server, when the client asked for push
    prompts: Any = None  # deep prompts (end - start, P, H) the client opened with
    lock: trio.Lock = field(default_factory=trio.Lock)  # one step at a time, client's or pushed
    lora: Any = None  # model.LoraWeights of the adapter the session named, or None

    @property
    def session_id(self) -> str:
        return self.rules.session_id

    @property
    def cache_length(self) -> int:
        return 0 if self.cache is None else self.cache.length  # None: closed (the rules refuse)


class Gauge:
    """A count of things in progress that can be waited on until it drops to zero (or any value)."""

    def __init__(self) -> None:
        self.value = 0
        self._zero = trio.Event()
        self._zero.set()
        self._changed = trio.Event()  # set, and replaced, on every change

    def add(self, delta: int) -> None:
        if self.value == 0 and delta > 0:
            self._zero = trio.Event()
        self.value += delta
        if self.value <= 0:
            self.value = 0
            self._zero.set()
        self._changed.set()
        self._changed = trio.Event()

    async def wait_value(self, value: int) -> None:
        """Return once the count is ``value``."""
        while self.value != value:
            await self._changed.wait()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.add(1)
        try:
            yield
        finally:
            self.add(-1)

    async def wait_zero(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s for the count to be zero; True if it is."""
        with trio.move_on_after(timeout):
            await self._zero.wait()
        return self.value == 0
