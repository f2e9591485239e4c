"""The ASGI application (Starlette): routes, OpenAI-shaped errors, server-sent event streams.

Every route is a thin layer over ``ApiServer`` (service.py); this module knows HTTP and JSON, not
the swarm. Errors always come out as ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from swarm_node.node.apps.api.chat_page import HEADERS as CHAT_HEADERS
from swarm_node.node.apps.api.chat_page import PAGE as CHAT_PAGE
from swarm_node.node.apps.api.guard import Guard, allowed_host_names
from swarm_node.node.apps.api.map_page import PAGE as MAP_PAGE
from swarm_node.node.apps.api.schema import ApiError, parse_chat, parse_completion, parse_json

if TYPE_CHECKING:
    from swarm_node.node.apps.api.service import ApiServer

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]
BODY_TIMEOUT = 60.0  # seconds a client may take to send a request body


class EventStream:
    """``text/event-stream`` of JSON events, ended by ``data: [DONE]``. ``produce(emit)`` runs in its
    own task; a client that goes away cancels it (and with it the inference session)."""

    def __init__(self, produce: Callable[[Emit], Awaitable[None]]) -> None:
        self.produce = produce

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        events_in, events_out = trio.open_memory_channel[dict[str, Any]](math.inf)

        async def run() -> None:
            with events_in:
                try:
                    await self.produce(events_in.send_nowait)
                except ApiError as exc:  # headers are gone: the error travels as an event
                    events_in.send_nowait(exc.body())
                except Exception:  # our bug: say so in the stream, keep serving others
                    log.exception("a streamed request failed")
                    events_in.send_nowait(
                        ApiError(500, "internal error", type="server_error").body()
                    )

        async def watch(cancel_scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            nursery.start_soon(watch, nursery.cancel_scope)
            async with events_out:
                async for event in events_out:
                    data = json.dumps(event, separators=(",", ":")).encode()
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: " + data + b"\n\n",
                            "more_body": True,
                        }
                    )
            await send(
                {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
            )
            nursery.cancel_scope.cancel()


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body must be at most {limit} bytes (the API's --max-body-size)",
        code="request_too_large",
    )


async def _body(request: Request, limit: int) -> Any:
    """The JSON body, read no further than ``limit`` bytes (announced or not)."""
    declared = request.headers.get("content-length", "")
    if len(declared) > 18 or (declared.isdigit() and int(declared) > limit):
        raise _too_large(limit)
    raw = bytearray()
    with trio.move_on_after(BODY_TIMEOUT) as waited:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise _too_large(limit)
    if waited.cancelled_caught:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT:g} s")
    return parse_json(bytes(raw))


class Released:
    """A response that calls ``release`` once it is sent (or abandoned)."""

    def __init__(self, response: Any, release: Callable[[], None]) -> None:
        self.response = response
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.release()


def build_app(api: ApiServer) -> Guard:
    async def map_page(request: Request) -> Response:
        return HTMLResponse(MAP_PAGE)

    async def chat_page(request: Request) -> Response:
        return HTMLResponse(CHAT_PAGE, headers=CHAT_HEADERS)

    async def state(request: Request) -> Response:
        return JSONResponse(api.state())

    async def models(request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [api.model_card(name) for name in api.runtimes]}
        )

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        api.runtime(name)  # 404 for an unknown model
        return JSONResponse(api.model_card(name))

    async def generation(request: Request, parse: Callable[[Any], Any]) -> Any:
        release = api.admit()  # before the body: waiting requests, bodies included, are bounded
        try:
            response = await api.respond(parse(await _body(request, api.config.max_body_size)))
        except BaseException:
            release()
            raise
        return Released(response, release)

    async def completions(request: Request) -> Any:
        return await generation(request, parse_completion)

    async def chat(request: Request) -> Any:
        return await generation(request, parse_chat)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(
            ApiError(exc.status_code, message, type=kind).body(), status_code=exc.status_code
        )

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            ApiError(500, "internal error", type="server_error").body(), status_code=500
        )

    app = Starlette(
        routes=[
            Route("/", map_page),
            Route("/chat", chat_page),
            Route("/api/v1/state", state),
            Route("/v1/models", models),
            Route("/v1/models/{name:path}", model),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ],
        exception_handlers={
            ApiError: on_api_error,
            HTTPException: on_http_error,
            Exception: on_crash,
        },
    )
    hosts = allowed_host_names(api.config.host, api.config.allowed_hosts)
    return Guard(app, hosts=hosts, api_key=api.config.api_key)
