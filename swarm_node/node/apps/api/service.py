"""The API service inside a peer: ``async with open_api(peer, config) as api:`` or
``await nursery.start(serve_api, peer, config)``.

Hypercorn's trio worker serves the Starlette app in the caller's nursery; each request runs in its
own task and its own inference session, so requests run concurrently. A background task reads the
swarm's state from the DHT every ``refresh_interval`` seconds for the map.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
from starlette.responses import JSONResponse, Response

from swarm_node.errors import ConfigError, MissingBlocksError
from swarm_node.node.apps.api.app import EventStream, build_app
from swarm_node.node.apps.api.engine import (
    ModelRuntime,
    missing_blocks,
    run_generation,
    swarm_report,
)
from swarm_node.node.apps.api.guard import is_loopback
from swarm_node.node.apps.api.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chunk_object,
    completion_object,
    usage,
)
from swarm_node.node.apps.swarm_map import GenerationTracker, model_view, swarm_state
from swarm_node.node.client.generation import GenerationStats
from swarm_node.node.client.recovery import sole_error
from swarm_node.node.config import ApiConfig

log = logging.getLogger(__name__)

RETRY_AFTER = 2  # seconds a refused request (429) is told to wait


class ApiServer:
    """A running API: its runtimes, the map's state, and how a request becomes a response."""

    def __init__(self, peer: Any, config: ApiConfig, runtimes: dict[str, ModelRuntime]) -> None:
        self.peer = peer
        self.config = config
        self.runtimes = runtimes
        self.tracker = GenerationTracker()
        self.limiter = trio.CapacityLimiter(config.max_concurrent)
        self.admitted = 0  # generation requests in the house: reading, waiting or generating
        self.tokenizing = trio.CapacityLimiter(1)  # one prompt at a time in a worker thread
        self.created = int(time.time())
        self.url = ""  # http://host:port, once listening
        self.refreshed_at: float | None = None
        self._chains: dict[str, tuple[float, int, list[Any]]] = {}  # model: (found at, room, chain)
        self._lookup_locks: dict[str, trio.Lock] = {}
        self._views = {
            name: model_view(None, model=name, num_blocks=r.num_blocks, error=None)
            for name, r in runtimes.items()
        }

    # -- the map ------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read every model's servers from the DHT now (the map shows the result)."""
        from swarm_node.node.apps.swarm_status import gather_status

        for name, runtime in self.runtimes.items():
            try:
                pin = self.peer.pins.get(name)
                report = await gather_status(
                    self.peer,
                    name,
                    num_blocks=runtime.num_blocks,
                    expected_digest="" if pin is None else pin.digest,
                )
                self._views[name] = model_view(
                    report, model=name, num_blocks=runtime.num_blocks, error=None
                )
            except Exception as exc:  # noqa: BLE001 (any failure of one model's lookup: the map shows it, the API goes on)
                log.warning("reading the swarm state of %s failed: %r", name, exc)
                self._views[name] = {**self._views[name], "error": f"DHT lookup failed: {exc!r}"}
        self.refreshed_at = time.time()

    async def _refresh_loop(self) -> None:
        while True:
            await self.refresh()
            await trio.sleep(self.config.refresh_interval)

    def state(self) -> dict[str, Any]:
        return swarm_state(
            self._views,
            self.tracker.snapshot(trio.current_time()),
            now=time.time(),
            refreshed_at=self.refreshed_at,
            api_peer=self.peer.peer_id,
            refresh_interval=self.config.refresh_interval,
            events=self.peer.journal,
        )

    # -- requests -----------------------------------------------------------------------------------
    def admit(self) -> Callable[[], None]:
        """Count a generation request in, or refuse it (429) when ``max_concurrent`` generate and
        ``max_waiting`` wait already; the returned function counts it out (once)."""
        if self.admitted >= self.config.max_concurrent + self.config.max_waiting:
            raise ApiError(
                429,
                f"this API is busy: {self.config.max_concurrent} requests are generating and "
                f"{self.config.max_waiting} waiting; retry in {RETRY_AFTER} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"retry-after": str(RETRY_AFTER)},
            )
        self.admitted += 1
        released = [False]

        def release() -> None:
            if not released[0]:
                released[0] = True
                self.admitted -= 1

        return release

    def runtime(self, name: str) -> ModelRuntime:
        if name not in self.runtimes:
            raise ApiError(
                404,
                f"the model {name[:100]!r} does not exist here; served models: {sorted(self.runtimes)}",
                param="model",
                code="model_not_found",
            )
        return self.runtimes[name]

    def model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "swarm-node"}

    async def respond(self, request: CompletionRequest | ChatRequest) -> Response | EventStream:
        runtime = self.runtime(request.model)
        chat = isinstance(request, ChatRequest)
        prompt_ids = await trio.to_thread.run_sync(runtime.encode, request, limiter=self.tokenizing)
        sampling = runtime.sampling(request, len(prompt_ids), self.config.default_max_tokens)
        chain = await self._chain(runtime, len(prompt_ids) + sampling.max_new_tokens)
        meta = dict(
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=runtime.name,
            chat=chat,
        )

        async def generate(on_text: Any) -> tuple[str, str, GenerationStats]:
            async with self.limiter:
                request_id = self.tracker.start(
                    model=runtime.name,
                    kind="chat" if chat else "completion",
                    prompt_tokens=len(prompt_ids),
                    now=trio.current_time(),
                )
                error: str | None = "cancelled"
                try:
                    text, finish, stats = await run_generation(
                        self.peer,
                        runtime,
                        prompt_ids,
                        sampling,
                        request.stop,
                        chain=chain,
                        on_text=on_text,
                        on_token=lambda _t: self.tracker.token(request_id, trio.current_time()),
                        speculative=self.config.speculative,
                    )
                    error = None
                except ApiError as exc:
                    error = exc.message
                    if exc.status >= 500:
                        self.forget_chain(runtime.name)
                    raise
                except Exception as exc:  # our bug: the map shows it, the app answers 500
                    error = repr(exc)
                    raise
                finally:
                    self.tracker.finish(
                        request_id,
                        trio.current_time(),
                        error=error,
                        chain=[f"{h.start}:{h.end}@{h.server.peer_id[-8:]}" for h in chain],
                    )
            return text, finish, stats

        if not request.stream:
            text, finish, stats = await generate(None)
            body = completion_object(
                **meta,
                text=text,
                finish_reason=finish,
                usage_counts=usage(len(prompt_ids), stats.new_tokens),
            )
            return JSONResponse({**body, "swarm": swarm_report(stats)})

        async def produce(emit: Any) -> None:
            first = [True]

            def on_text(piece: str) -> None:
                emit(chunk_object(**meta, text=piece, finish_reason=None, first=first[0]))
                first[0] = False

            _, finish, stats = await generate(on_text)
            last = chunk_object(**meta, text="", finish_reason=finish, first=first[0])
            emit({**last, "swarm": swarm_report(stats)})
            if request.include_usage:
                emit(
                    chunk_object(
                        **meta,
                        text=None,
                        finish_reason=None,
                        usage_counts=usage(len(prompt_ids), stats.new_tokens),
                    )
                )

        return EventStream(produce)

    async def _chain(self, runtime: ModelRuntime, max_length: int) -> list[Any]:
        """A chain for ``max_length`` tokens: the one found for this model in the last
        ``chain_ttl`` seconds when it has room, else a new lookup. One lookup at a time per model:
        a burst of requests waits for one DHT lookup instead of making as many."""
        name = runtime.name
        async with self._lookup_locks.setdefault(name, trio.Lock()):
            cached = self._chains.get(name)
            now = trio.current_time()
            if cached and now - cached[0] < self.config.chain_ttl and cached[1] >= max_length:
                return cached[2]
            room = max(max_length, runtime.context_length // 4)  # room for most requests
            try:
                chain = await self.peer.find_chain(name, runtime.num_blocks, max_length=room)
            except MissingBlocksError as exc:
                raise missing_blocks(name, exc) from None
            except trio.TooSlowError:
                raise ApiError(
                    503,
                    f"looking up the servers of {name!r} timed out",
                    type="server_error",
                    code="lookup_timeout",
                ) from None
            self._chains[name] = (now, room, chain)
            return chain

    def forget_chain(self, name: str) -> None:
        """A request failed in the swarm: the next one looks the servers up again."""
        self._chains.pop(name, None)


async def serve_api(
    peer: Any, config: ApiConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Load the client side of every model, listen, report the ``ApiServer`` (``.url``), serve."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve

    runtimes: dict[str, ModelRuntime] = {}
    load = partial(
        ModelRuntime.load, dtype=config.dtype, device=config.device, max_context=config.max_context
    )
    for model in config.models:
        runtime = await trio.to_thread.run_sync(load, model)
        await peer.pin_model(str(runtime.path))
        runtimes[runtime.name] = runtime
    api = ApiServer(peer, config, runtimes)
    hconfig = HypercornConfig()
    hconfig.bind = [
        f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    ]
    hconfig.accesslog = None
    hconfig.errorlog = logging.getLogger("hypercorn.error")
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, build_app(api), hconfig))
            api.url = binds[0]
            if not is_loopback(config.host) and config.api_key is None:
                log.warning(
                    "the API listens on %s without --api-key: anyone who reaches it can use "
                    "the swarm through it (set SWARM_API_KEY)",
                    api.url,
                )
            log.info(
                "OpenAI-compatible API, swarm map and chat (%s/chat) at %s (models: %s)",
                api.url,
                api.url,
                ", ".join(runtimes),
            )
            nursery.start_soon(api._refresh_loop)
            task_status.started(api)
    except BaseExceptionGroup as group:
        raise _unwrapped(group, hconfig.bind[0]) from None
    except OSError as exc:
        raise _unwrapped(exc, hconfig.bind[0]) from None


def _unwrapped(error: BaseException, bind: str) -> BaseException:
    """The one real error out of nurseries' groups; a socket error as a ConfigError a user can act on."""
    leaf = sole_error(error) if isinstance(error, BaseExceptionGroup) else error
    if leaf is None:
        return error
    if isinstance(leaf, OSError):
        return ConfigError(
            f"the API cannot listen on {bind}: {leaf.strerror or leaf} (choose another --port/--host)"
        )
    return leaf


@asynccontextmanager
async def open_api(peer: Any, config: ApiConfig | None = None) -> AsyncIterator[ApiServer]:
    """Serve the API beside ``peer`` until the block ends."""
    try:
        async with trio.open_nursery() as nursery:
            api = await nursery.start(serve_api, peer, config or ApiConfig())
            try:
                yield api
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise sole_error(group) or group from None  # one failure comes out as itself
