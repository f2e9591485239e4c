"""What every HTTP request passes before a route sees it: a Host header naming this API (no DNS
rebinding) and, with an API key, ``Authorization: Bearer <key>``. Pure ASGI around the app."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from starlette.responses import JSONResponse

from swarm_node.node.apps.api.schema import ApiError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS = frozenset({"/", "/chat"})  # the pages' static HTML (their scripts send the key)


def host_name(header: str) -> str:
    """``"Example.com:8000"`` -> ``"example.com"``, ``"[::1]:80"`` -> ``"::1"``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def allowed_host_names(bound: str, extra: tuple[str, ...]) -> frozenset[str] | None:
    """The Host names to accept (``None``: any, when ``extra`` holds ``*``)."""
    if "*" in extra:
        return None
    names = set(LOOPBACK_NAMES) | {host_name(h) for h in extra}
    if bound not in ("0.0.0.0", "::", ""):
        names.add(host_name(bound if ":" not in bound else f"[{bound}]"))
    return frozenset(names)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    """Refuses a foreign Host (421) and, with ``api_key``, a request without it (401)."""

    def __init__(self, app: Any, *, hosts: frozenset[str] | None, api_key: str | None) -> None:
        self.app = app
        self.hosts = hosts
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                response = JSONResponse(error.body(), error.status, headers=error.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Any) -> ApiError | None:
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return ApiError(
                421,
                f"this API does not answer to the Host {host[:100]!r}; it answers to "
                f"{', '.join(sorted(self.hosts))} (add names with --api-allowed-hosts)",
                code="host_not_allowed",
            )
        if self.key is None or scope["path"] in OPEN_PATHS:
            return None
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return None
        return ApiError(
            401,
            "this API needs its key: send 'Authorization: Bearer <key>' (OpenAI clients: api_key)",
            code="invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )
