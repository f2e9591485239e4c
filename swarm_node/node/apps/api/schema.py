"""OpenAI request bodies -> validated settings, and our results -> OpenAI-shaped response objects.

Pure: JSON values in, frozen dataclasses or dicts out; every bad value raises ``ApiError`` carrying
the HTTP status and OpenAI's error fields. Knows nothing of HTTP servers, tokenizers or the swarm.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass
from typing import Any

MAX_STOPS = 4  # OpenAI's limit on 'stop' strings
MAX_STOP_CHARS = 256  # of each stop string (every generated token is matched against each)


class ApiError(Exception):
    """An error the client caused (or a swarm failure), rendered as OpenAI's ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


_SHOWN = reprlib.Repr()  # a value in an error message, briefly (nesting, long strings, ints cut)
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxlong, _SHOWN.maxother = 3, 80, 40, 80


def _bad(param: str, expectation: str, got: Any) -> ApiError:
    return ApiError(
        400,
        f"'{param}' must be {expectation}, got {_SHOWN.repr(got)}",
        param=param,
        code="invalid_value",
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    """A request body: UTF-8 JSON without NaN/Infinity; anything else (nesting too deep for
    Python's parser, integers past its digit limit) is a 400 like invalid JSON."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        reason = "it is nested too deeply"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit, NaN
        reason = str(exc)[:200]
    raise ApiError(400, f"the request body must be valid JSON: {reason}", code="invalid_json")


def _text(value: Any, param: str) -> bool:
    """A string a tokenizer can take: encodable as UTF-8 (JSON allows lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(param, "valid Unicode text (no lone surrogate)", value) from None
    return True


def _number(
    body: dict[str, Any],
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    open_low: bool = False,
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise _bad(name, "a number", value)
    if value < low or value > high or (open_low and value == low):
        raise _bad(name, f"in {'(' if open_low else '['}{low}, {high}]", value)
    return float(value)


def _int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        raise _bad(
            name,
            f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]",
            value,
        )
    return value


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """What both endpoints share once parsed."""

    model: str
    max_tokens: int | None  # None: until the context or the server's default limit
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage counts
    repetition_penalty: float  # an extension (as in vLLM): > 1 discourages tokens already seen


@dataclass(frozen=True, kw_only=True)
class CompletionRequest(GenerationRequest):
    prompt: str | list[int]


@dataclass(frozen=True, kw_only=True)
class ChatRequest(GenerationRequest):
    messages: tuple[dict[str, str], ...]


def _common(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "the name of a served model (see /v1/models)", model)
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise _bad("n", "1 (one choice per request)", n)
    for flag in ("logprobs", "echo"):
        if body.get(flag) not in (None, False, 0):
            raise ApiError(
                400,
                f"'{flag}' is not supported by this server",
                param=flag,
                code="unsupported_parameter",
            )
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(body, penalty, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(
                400,
                f"'{penalty}' is not supported by this server; use 'repetition_penalty' (> 1 discourages repeats)",
                param=penalty,
                code="unsupported_parameter",
            )
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    if stops is None:
        stops = ()
    if (
        not isinstance(stops, tuple)
        or len(stops) > MAX_STOPS
        or not all(_text(s, "stop") and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise _bad(
            "stop",
            f"a string of 1 to {MAX_STOP_CHARS} characters or a list of at most {MAX_STOPS} of them",
            stop,
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream", "true or false", stream)
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise _bad("stream_options", "an object", options)
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool) and include_usage is not None:
        raise _bad("stream_options.include_usage", "true or false", include_usage)
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    return dict(
        model=model,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        stop=stops,
        seed=_int(body, "seed", -(2**63), 2**63 - 1),
        stream=bool(stream),
        include_usage=bool(include_usage),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, open_low=True),
    )


def parse_completion(body: Any) -> CompletionRequest:
    common = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return CompletionRequest(prompt=list(prompt), **common)
    if not _text(prompt, "prompt") or not prompt:
        raise _bad(
            "prompt", "a non-empty string (or a list of one string, or of token ids)", prompt
        )
    return CompletionRequest(prompt=prompt, **common)


def _text_content(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if _text(content, param):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and _text(p.get("text"), param)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _bad(param, "a string or a list of {type: text, text} parts", content)


def parse_chat(body: Any) -> ChatRequest:
    common = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of {role, content} objects", messages)
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
        ):
            raise _bad(
                f"messages[{i}]",
                "an object with role system, developer, user or assistant",
                message,
            )
        role = "system" if message["role"] == "developer" else message["role"]
        parsed.append({"role": role, "content": _text_content(message.get("content"), i)})
    return ChatRequest(messages=tuple(parsed), **common)


# -- responses ----------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    chat: bool,
    usage_counts: dict[str, int] | None,
) -> dict[str, Any]:
    """A whole response (``chat.completion`` / ``text_completion``) with one choice."""
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    out = {
        "id": id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "system_fingerprint": None,
    }
    if usage_counts is not None:
        out["usage"] = usage_counts
    return out


def chunk_object(
    *,
    id: str,
    created: int,
    model: str,
    text: str | None,
    finish_reason: str | None,
    chat: bool,
    first: bool = False,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One server-sent event of a stream; ``text=None`` with ``usage_counts``: the last, usage chunk."""
    choices: list[dict[str, Any]] = []
    if text is not None:
        if chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choices.append(
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            )
        else:
            choices.append(
                {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            )
    return {
        "id": id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_counts,
        "system_fingerprint": None,
    }
