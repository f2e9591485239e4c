"""A client peer for plain (non-trio) Python: its own trio loop in a background thread.

``ClientLoop(peer_config, client_config)`` starts the thread and waits until the peer has joined the
swarm (or raises what stopped it); ``run(async_fn, *args)`` runs a coroutine function there from any
other thread and returns its result; ``nursery`` hosts tasks that outlive one call; ``close()`` leaves the swarm and ends the thread. Inside a trio
application use ``open_peer`` directly instead.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from swarm_node.errors import ConfigError
from swarm_node.node.config import ClientConfig, PeerConfig
from swarm_node.node.peer import open_peer

T = TypeVar("T")


class ClientLoop:
    def __init__(self, peer_config: PeerConfig, client_config: ClientConfig) -> None:
        self.peer: Any = None
        self.nursery: trio.Nursery | None = None
        self.client_config = client_config
        self.token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main,
            args=(peer_config, client_config),
            name="swarm-node-client",
            daemon=True,
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self, peer_config: PeerConfig, client_config: ClientConfig) -> None:
        async def main() -> None:
            try:
                async with (
                    open_peer(peer_config, client=client_config) as peer,
                    trio.open_nursery() as nursery,
                ):
                    self.peer = peer
                    # for tasks that outlive one call (an open inference session)
                    self.nursery = nursery
                    self.token = trio.lowlevel.current_trio_token()
                    self._stop = trio.Event()
                    self._ready.set()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                if not isinstance(exc, Exception):
                    raise

        trio.run(main)

    @property
    def closed(self) -> bool:
        return self.token is None

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self.token is None:
            raise ConfigError("the model is closed")
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self) -> None:
        if self.token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
            self.token = None
            self._thread.join(timeout=10)
