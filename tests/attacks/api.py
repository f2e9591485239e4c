"""Attacks on the OpenAI-compatible HTTP API (``target.api_url``): huge bodies, foreign Host headers,
missing keys, request floods, stop strings, prompts that stall the event loop, malformed JSON.

Each sends real HTTP (httpx, or raw sockets where a client library would not misbehave enough)."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from tests.attacks import AttackTarget

TIME_LIMIT = 20.0
ERROR_FIELDS = {"message", "type", "param", "code"}


def bounded(attack: Callable[[AttackTarget], Awaitable[bool]]) -> Any:
    """The attack within TIME_LIMIT seconds; running out of time, or the API failing the
    connection, is not stopped."""

    @functools.wraps(attack)
    async def run(target: AttackTarget) -> bool:
        with trio.move_on_after(TIME_LIMIT):
            try:
                return await attack(target)
            except (httpx.HTTPError, OSError, trio.BrokenResourceError):
                return False
        return False

    return run


def auth(target: AttackTarget) -> dict[str, str]:
    return {"authorization": f"Bearer {target.api_key}"} if target.api_key else {}


def client(target: AttackTarget) -> httpx.AsyncClient:
    assert target.api_url is not None, "an API attack needs target.api_url"
    return httpx.AsyncClient(base_url=target.api_url, headers=auth(target), timeout=TIME_LIMIT)


def openai_error(status: int, body: bytes | str, expected: int, param: str | None = None) -> bool:
    """An answer with status ``expected`` whose body is OpenAI's ``{"error": {...}}``."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if not isinstance(error, dict) or set(error) != ERROR_FIELDS or status != expected:
        return False
    return param is None or error["param"] == param


async def still_serving(target: AttackTarget) -> bool:
    async with client(target) as http:
        return (await http.get("/v1/models")).status_code == 200


def completion(target: AttackTarget, **fields: Any) -> dict[str, Any]:
    return {"model": target.model, "prompt": "hi", "max_tokens": 1, **fields}


def chat(target: AttackTarget, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return {"model": target.model, "messages": messages, "max_tokens": 1, **fields}


# -- raw HTTP/1.1 over a socket -------------------------------------------------------------------------
def request_head(target: AttackTarget, path: str, headers: dict[str, str]) -> bytes:
    url = urlsplit(target.api_url or "")
    lines = [f"POST {path} HTTP/1.1", f"host: {url.netloc}", "content-type: application/json"]
    lines += [f"{k}: {v}" for k, v in {**auth(target), **headers}.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status, headers, body) of a whole HTTP/1.1 answer with a content-length, else None."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "-1"))
    if length < 0 or len(body) < length:
        return None
    return int(first.split()[1]), headers, body[:length]


async def raw_exchange(
    target: AttackTarget, head: bytes, write_body: Callable[[trio.SocketStream], Awaitable[None]]
) -> tuple[int, dict[str, str], bytes] | None:
    """Send ``head`` then whatever ``write_body`` writes while reading the answer; stop writing once
    it has come. The answer, or None when the connection ended without one."""
    answer = bytearray()
    parsed = None
    stream = await trio.open_tcp_stream(*host_port(target))
    async with stream, trio.open_nursery() as nursery:

        async def write() -> None:
            try:
                await stream.send_all(head)
                await write_body(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        nursery.start_soon(write)
        while parsed is None and len(answer) < 1 << 16:
            try:
                data = await stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            answer += data
            parsed = parse_answer(bytes(answer))
        nursery.cancel_scope.cancel()
    return parsed


def host_port(target: AttackTarget) -> tuple[str, int]:
    url = urlsplit(target.api_url or "")
    return url.hostname or "", url.port or 80


# -- the attacks ------------------------------------------------------------------------------------------
async def send_nothing(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


@bounded
async def attack_announced_huge_body(target: AttackTarget) -> bool:
    """Announce a 1 TB body and send none of it: refused (413) from the headers alone."""
    head = request_head(target, "/v1/completions", {"content-length": str(10**12)})
    answer = await raw_exchange(target, head, send_nothing)
    return (
        answer is not None
        and openai_error(answer[0], answer[2], 413)
        and await still_serving(target)
    )


@bounded
async def attack_unannounced_huge_body(target: AttackTarget) -> bool:
    """Stream up to 64 MiB of '[' in chunks with no length announced: refused (413) as soon as the
    body passes the limit, before all of it was sent (a server without a limit would read it all
    and answer 400)."""
    head = request_head(target, "/v1/chat/completions", {"transfer-encoding": "chunked"})
    chunk = b"10000\r\n" + b"[" * 0x10000 + b"\r\n"
    chunks = 1024
    sent = [0]

    async def flood(stream: trio.SocketStream) -> None:
        for _ in range(chunks):
            await stream.send_all(chunk)
            sent[0] += 1
        await stream.send_all(b"0\r\n\r\n")

    answer = await raw_exchange(target, head, flood)
    return (
        answer is not None
        and openai_error(answer[0], answer[2], 413)
        and sent[0] < chunks
        and await still_serving(target)
    )


FOREIGN_HOSTS = (
    "attacker.example",
    "attacker.example:80",
    "localhost.attacker.example",
    "127.0.0.1.nip.io",
)


@bounded
async def attack_foreign_host(target: AttackTarget) -> bool:
    """DNS rebinding: a page on attacker.example, its name now pointing at 127.0.0.1, calls the
    API; every route answers 421 to a Host that is not the API's."""
    async with client(target) as http:
        for host in FOREIGN_HOSTS:
            for method, path, body in (
                ("GET", "/v1/models", None),
                ("GET", "/api/v1/state", None),
                ("GET", "/", None),
                ("POST", "/v1/completions", completion(target)),
            ):
                reply = await http.request(method, path, json=body, headers={"host": host})
                if not openai_error(reply.status_code, reply.content, 421):
                    return False
        return (await http.get("/v1/models")).status_code == 200


@bounded
async def attack_without_api_key(target: AttackTarget) -> bool:
    """Every route but the map page needs the key: none, a wrong one, a prefix of it or another
    scheme get 401. Not stopped when the API has no key (``target.api_key`` None)."""
    key = target.api_key
    if not key:
        return False
    wrong: list[dict[str, str]] = [
        {},
        {"authorization": "Bearer not-the-key"},
        {"authorization": f"Bearer {key[:-1]}"},
        {"authorization": f"Bearer {key}x"},
        {"authorization": f"Basic {key}"},
        {"authorization": key},
    ]
    async with httpx.AsyncClient(base_url=target.api_url or "", timeout=TIME_LIMIT) as http:
        for headers in wrong:
            for method, path, body in (
                ("GET", "/v1/models", None),
                ("GET", f"/v1/models/{target.model}", None),
                ("GET", "/api/v1/state", None),
                ("GET", "/v1/no-such-route", None),
                ("POST", "/v1/completions", completion(target)),
                ("POST", "/v1/chat/completions", chat(target)),
            ):
                reply = await http.request(method, path, json=body, headers=headers)
                if not openai_error(reply.status_code, reply.content, 401):
                    return False
        page = await http.get("/")
        models = await http.get("/v1/models", headers=auth(target))
        return page.status_code == 200 and models.status_code == 200


FLOOD = 100  # more than the default --max-concurrent 16 + --max-waiting 64


@bounded
async def attack_request_flood(target: AttackTarget) -> bool:
    """Open 100 streamed completions at once and read none: past the API's bound on waiting
    requests they are answered 429 with Retry-After at once; then every connection closes."""
    body = json.dumps(completion(target, prompt="flood", stream=True, max_tokens=200)).encode()
    head = request_head(target, "/v1/completions", {"content-length": str(len(body))})
    statuses: list[tuple[int, str | None, bool]] = []
    async with AsyncExitStack() as streams:
        async with trio.open_nursery() as nursery:
            for _ in range(FLOOD):
                stream = await streams.enter_async_context(
                    await trio.open_tcp_stream(*host_port(target))
                )
                await stream.send_all(head + body)
                nursery.start_soon(read_status, stream, statuses)
    refused = [s for s in statuses if s[0] == 429]
    return (
        len(statuses) == FLOOD
        and all(status in (200, 429) for status, _, _ in statuses)
        and bool(refused)
        and all(retry is not None and retry.isdigit() and shaped for _, retry, shaped in refused)
        and await still_serving(target)
    )


async def read_status(stream: trio.SocketStream, out: list[tuple[int, str | None, bool]]) -> None:
    """The status, Retry-After and, for a refusal, whether its body is OpenAI's error."""
    raw = bytearray()
    answer = None
    while answer is None:
        try:
            data = await stream.receive_some(1 << 14)
        except trio.BrokenResourceError:
            return
        if not data:
            return
        raw += data
        if raw.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\n" in raw:
            out.append((200, None, True))  # a stream: it runs until the connection closes
            return
        answer = parse_answer(bytes(raw))
    status, headers, body = answer
    out.append((status, headers.get("retry-after"), openai_error(status, body, status)))


@bounded
async def attack_stop_strings(target: AttackTarget) -> bool:
    """Too many stop strings, or long ones (each is matched at every token): 400 naming 'stop'."""
    bad = (["a", "b", "c", "d", "e"], "x" * 100_000, ["x" * 10_000] * 4, ["ok", "y" * 257])
    async with client(target) as http:
        for stop in bad:
            for path, body in (
                ("/v1/completions", completion(target, stop=stop)),
                ("/v1/chat/completions", chat(target, stop=stop)),
            ):
                reply = await http.post(path, json=body)
                if not openai_error(reply.status_code, reply.content, 400, "stop"):
                    return False
    return True


BIG_PROMPT = 960_000  # characters: under the default --max-body-size (1 MiB), far over any context


@bounded
async def attack_huge_prompt_stalls_the_loop(target: AttackTarget) -> bool:
    """A prompt of ~1 MB takes its tokenizer most of a second; meanwhile other requests must be
    answered (tokenization runs off the event loop). Stopped when no GET /v1/models sent during the
    big request waited half as long as it, and it is refused (400 or 413) in OpenAI's shape."""
    latencies: list[float] = []
    big: list[tuple[int, bytes, float]] = []
    async with client(target) as http, client(target) as pinger, trio.open_nursery() as nursery:

        async def send_big() -> None:
            began = trio.current_time()
            prompt = "a " * (BIG_PROMPT // 2)
            reply = await http.post("/v1/completions", json=completion(target, prompt=prompt))
            big.append((reply.status_code, reply.content, trio.current_time() - began))
            nursery.cancel_scope.cancel()

        nursery.start_soon(send_big)
        while True:
            began = trio.current_time()
            if (await pinger.get("/v1/models")).status_code != 200:
                return False
            latencies.append(trio.current_time() - began)
    status, content, took = big[0]
    refused = openai_error(status, content, 400) or openai_error(status, content, 413)
    return refused and (took < 0.2 or max(latencies, default=0.0) < took / 2)


def malformed_bodies(target: AttackTarget) -> list[tuple[str, bytes]]:
    """(path, body) pairs that must each be answered 400."""
    raw = [
        b"{not json",
        b"\xff\xfe{}",
        b'{"model": "\xc3\x28"}',
        b"[" * 100_000,
        b'{"a":' * 50_000,
        b'{"model": ' + b"7" * 5000 + b"}",
        b'{"model": "m", "prompt": "x", "temperature": NaN}',
        b'{"model": "m", "prompt": "x", "temperature": Infinity}',
        b'{"model": "m", "prompt": "x", "top_p": -Infinity}',
        b"[1, 2]",
        b'"a string"',
        b"5",
        b"null",
        b"",
        b"{}",
        b"\x00",
    ]
    wrong: dict[str, list[Any]] = {
        "model": [5, None, [], {}, ""],
        "max_tokens": ["5", 0, -1, 1.5, True, 10**30, [], {}],
        "temperature": ["hot", -1, 3, 10**400, 1e300 * 10, [], True],
        "top_p": [0, "x", 2],
        "stop": [5, [1], [""], {}, [None]],
        "seed": [1.5, "1", 2**64, True],
        "stream": ["yes", 1, []],
        "stream_options": [[], "x", {"include_usage": "yes"}],
        "n": [2, "1", 1.5],
        "logprobs": [True],
        "echo": [True],
        "presence_penalty": [1, "x"],
        "repetition_penalty": [0, -1, "x"],
    }
    prompts: list[Any] = [5, None, {}, [], [1, "a"], [-1], [10**30], [True], "", [[1]], "\ud800"]
    prompts.append([1] * 100_000)  # token ids far past any context
    messages: list[Any] = [
        "hi",
        [],
        [5],
        [{"role": "user"}],
        [{"role": "wizard", "content": "x"}],
        [{"role": ["user"], "content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "user", "content": "\udfff"}],
    ]
    for depth in (900, 950, 970, 990):  # values nested about as deep as Python's parser goes
        nested = b"[" * depth + b"]" * depth
        raw.append(b'{"model": "%s", "stop": %s}' % (target.model.encode(), nested))
        raw.append(b'{"model": "%s", "prompt": "x", "seed": %s}' % (target.model.encode(), nested))
    out = [(path, body) for path in ("/v1/completions", "/v1/chat/completions") for body in raw]
    for name, values in wrong.items():
        for value in values:
            out.append(("/v1/completions", _dumps(completion(target, **{name: value}))))
            out.append(("/v1/chat/completions", _dumps(chat(target, **{name: value}))))
    out += [("/v1/completions", _dumps(completion(target, prompt=p))) for p in prompts]
    out += [("/v1/chat/completions", _dumps(chat(target, messages=m))) for m in messages]
    return out


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()  # json writes lone surrogates as \\u escapes


@bounded
async def attack_malformed_json(target: AttackTarget) -> bool:
    """Invalid JSON and UTF-8, nesting too deep for Python's parser, 5000-digit integers, NaN and
    Infinity, a top level that is no object, and a wrong type for every field: each a 400 in
    OpenAI's shape, never a 500."""
    async with client(target) as http:
        for path, body in malformed_bodies(target):
            reply = await http.post(
                path, content=body, headers={"content-type": "application/json"}
            )
            if not openai_error(reply.status_code, reply.content, 400):
                return False
        return (await http.get("/v1/models")).status_code == 200


ATTACKS = (
    ("announced_huge_body", attack_announced_huge_body),
    ("unannounced_huge_body", attack_unannounced_huge_body),
    ("foreign_host", attack_foreign_host),
    ("without_api_key", attack_without_api_key),
    ("request_flood", attack_request_flood),
    ("stop_strings", attack_stop_strings),
    ("huge_prompt_stalls_the_loop", attack_huge_prompt_stalls_the_loop),
    ("malformed_json", attack_malformed_json),
)
