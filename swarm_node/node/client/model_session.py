"""``with model.inference_session(max_length=...) as session:``: one inference session over the swarm,
kept open in the client loop's nursery until the block ends and continued by every ``generate`` call
inside it (a chat: only new tokens travel; the servers' caches hold the rest).

Knows nothing of sampling or text: ``generate`` does that; this module only holds the session open.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import trio

from swarm_node.errors import ConfigError, check_int
from swarm_node.node.client.generation import open_token_session


class ModelSession:
    def __init__(self, model: Any, max_length: int, *, batch_size: int = 1) -> None:
        check_int("max_length", max_length, 1)
        check_int("batch_size", batch_size, 1)
        self.model = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.token_session: Any = None
        self._close: trio.Event | None = None
        self._closed: trio.Event | None = None

    @property
    def position(self) -> int:
        """Tokens the session holds (the servers' caches hold all but the last sampled one)."""
        return 0 if self.token_session is None else int(self.token_session.ids.shape[1])

    async def _hold(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        model = self.model
        prefix, tuning = model.tuned_inputs()
        settings = replace(model.settings, max_length=self.max_length, batch_size=self.batch_size)
        self._close, self._closed = trio.Event(), trio.Event()
        try:
            async with open_token_session(
                model.loop.peer, settings, tuning=tuning, prefix=prefix
            ) as token_session:
                self.token_session = token_session
                task_status.started()
                await self._close.wait()
        finally:
            self._closed.set()

    def open(self) -> None:
        """Open the session in the client loop's nursery (``close`` ends it)."""
        loop = self.model.loop
        if loop.closed or loop.nursery is None:
            raise ConfigError("the model is closed")
        loop.run(loop.nursery.start, self._hold)

    def __enter__(self) -> ModelSession:
        model = self.model
        if model.active_session is not None:
            raise ConfigError("an inference session is already open on this model; close it first")
        self.open()
        model.active_session = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.model.active_session = None
        self.close()

    def close(self) -> None:
        model = self.model
        if model.loop.closed or self._close is None or self._closed is None:
            return
        close, closed = self._close, self._closed

        async def finish() -> None:
            close.set()
            await closed.wait()

        model.loop.run(finish)
