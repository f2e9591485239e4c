"""Runs one API request through the swarm: prompt -> token ids -> ``generate_tokens`` -> text pieces.

A ``ModelRuntime`` holds what a client needs of one model (client head, tokenizer, config);
``run_generation`` turns token ids back into text as they come, holds back text that may turn out to
be the start of a stop string, and ends generation at a stop string. Knows nothing of HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trio

from swarm_node.errors import ConfigError, MissingBlocksError, ModelError, SwarmError
from swarm_node.node.apps.api.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
)
from swarm_node.node.client.generation import GenerationStats, SamplingConfig, generate_tokens
from swarm_node.node.client.generation_options import find_stop, model_eos_ids
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.client.speculative import Speculation

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ModelRuntime:
    """A served model: its name in the swarm, the client head, tokenizer and limits."""

    name: str
    path: Path
    head: Any
    tokenizer: Any
    num_blocks: int
    context_length: int  # prompt + completion tokens one request may use
    eos_token_ids: tuple[int, ...]
    dtype: str

    @classmethod
    def load(cls, model: str, *, dtype: str, max_context: int, device: str = "cpu") -> ModelRuntime:
        """Blocking (files, torch): call it from a worker thread."""
        from swarm_node.model import Checkpoint, ClientHead, load_tokenizer, resolve_model
        from swarm_node.model.bundled import model_id_of
        from swarm_node.model.dtypes import TORCH_DTYPES

        path = resolve_model(model)
        checkpoint = Checkpoint.open(path)
        tokenizer = load_tokenizer(path)
        limit = int(checkpoint.setting("max_position_embeddings") or max_context)
        return cls(
            name=model_id_of(model),
            path=path,
            head=ClientHead.load(checkpoint, dtype=TORCH_DTYPES[dtype], device=device),
            tokenizer=tokenizer,
            num_blocks=checkpoint.num_blocks,
            context_length=min(limit, max_context),
            eos_token_ids=model_eos_ids(checkpoint.setting("eos_token_id"), tokenizer),
            dtype=dtype,
        )

    def encode(self, request: CompletionRequest | ChatRequest) -> list[int]:
        """The prompt's token ids (the chat template applied to chat messages)."""
        if isinstance(request, ChatRequest):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(
                    400,
                    f"model {self.name!r} has no chat template; use /v1/completions",
                    param="model",
                )
            try:
                ids = self.tokenizer.apply_chat_template(
                    list(request.messages),
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                )["input_ids"]
            except Exception as exc:  # noqa: BLE001 (jinja raises its own errors for conversations a template refuses)
                raise ApiError(
                    400,
                    f"the chat template of {self.name!r} refused these messages: {exc}",
                    param="messages",
                ) from None
            return [int(t) for t in ids]
        if isinstance(request.prompt, list):
            vocab = int(self.head.vocab_size)
            bad = [t for t in request.prompt if not 0 <= t < vocab]
            if bad:
                raise ApiError(
                    400,
                    f"'prompt' token ids must lie in [0, {vocab}), got {bad[:5]}",
                    param="prompt",
                )
            return list(request.prompt)
        return [int(t) for t in self.tokenizer(request.prompt).input_ids]

    def sampling(
        self, request: GenerationRequest, prompt_tokens: int, default_max_tokens: int
    ) -> SamplingConfig:
        """The request's settings; a prompt that leaves no room is a 400 like OpenAI's."""
        room = self.context_length - prompt_tokens
        param = "messages" if isinstance(request, ChatRequest) else "prompt"
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            asked = request.max_tokens or 1
            raise ApiError(
                400,
                f"this model's maximum context length is {self.context_length} tokens; the request has "
                f"{prompt_tokens} prompt tokens and asks for {asked} completion tokens "
                f"({prompt_tokens + asked}); shorten the {param} or lower 'max_tokens'",
                param=param,
                code="context_length_exceeded",
            )
        return SamplingConfig(
            max_new_tokens=min(room, request.max_tokens or default_max_tokens),
            temperature=request.temperature,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            seed=request.seed,
            eos_token_ids=self.eos_token_ids,
        )


class TextAssembler:
    """Token ids -> text pieces safe to send: whole characters, no part of a possible stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; the new text that may be sent now."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # half a character; wait for the rest
        at = find_stop(text, self.stops)
        if at is not None:
            self.stopped = True
            self.text = text[:at]
            return self._release(at)
        self.text = text
        return self._release(len(text) - self._held_back(text))

    def finish(self) -> str:
        """Generation ended: whatever was held back goes out (a cut-off character as U+FFFD)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(len(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        piece = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece


def swarm_report(stats: GenerationStats) -> dict[str, Any]:
    """The ``swarm`` field of a response (an extension OpenAI clients ignore): which blocks ran on
    which server, the servers replaced mid-reply (recoveries) or overtaken by spares (hedges), and
    the client's timings."""
    return {
        "chain": [{"blocks": f"{h.start}:{h.end}", "peer": h.server.peer_id} for h in stats.chain],
        "recoveries": [
            {
                "blocks": f"{e.start}:{e.end}",
                "failed": e.failed,
                "replacements": list(e.replacements),
                "seconds": round(e.seconds, 3),
            }
            for e in stats.recoveries
        ],
        "hedges": [
            {
                "blocks": f"{e.start}:{e.end}",
                "late": list(e.late),
                "replacements": list(e.replacements),
                "seconds": round(e.seconds, 3),
            }
            for e in stats.hedges
        ],
        "time_to_first_token_s": round(stats.time_to_first_token, 4),
        "tokens_per_s": round(stats.tokens_per_second, 2),
    }


def missing_blocks(model: str, exc: MissingBlocksError) -> ApiError:
    return ApiError(
        503,
        f"the swarm cannot serve {model!r} now: {exc}",
        type="server_error",
        code="missing_blocks",
    )


async def run_generation(
    peer: Any,
    runtime: ModelRuntime,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    stops: Sequence[str],
    *,
    chain: Sequence[Any] | None = None,
    on_text: Callable[[str], None] | None = None,
    on_token: Callable[[int], None] | None = None,
    speculative: bool = False,
) -> tuple[str, str, GenerationStats]:
    """Generate in its own inference session: (text, finish reason "stop"/"length", stats).
    ``on_text`` receives each piece of text as soon as it is safe to send; ``speculative``: with
    prompt lookup drafts (the same output distribution)."""
    assembler = TextAssembler(runtime.tokenizer, stops)
    shown: list[int] = []  # the tokens generated so far, for a rollback to rebuild the text

    def on_retract(n: int) -> None:
        """A server was caught lying: the last ``n`` tokens are redone (verification.py). The
        text is rebuilt from the rest; what a stream already sent stays sent."""
        nonlocal assembler
        del shown[len(shown) - n :]
        assembler = TextAssembler(runtime.tokenizer, stops)
        for token_id in shown:
            if token_id not in runtime.eos_token_ids:
                assembler.add(token_id)

    def on_tokens(token: torch.Tensor) -> None:
        token_id = int(token[0])
        shown.append(token_id)
        if on_token is not None:
            on_token(token_id)
        if token_id in runtime.eos_token_ids:
            return
        piece = assembler.add(token_id)
        if piece and on_text is not None:
            on_text(piece)

    input_ids = torch.tensor([prompt_ids], dtype=torch.int64)  # (1, T)
    try:
        _, stats = await generate_tokens(
            peer,
            runtime.head,
            input_ids,
            SessionSettings(model=runtime.name, num_blocks=runtime.num_blocks, dtype=runtime.dtype),
            sampling,
            on_tokens=on_tokens,
            stopping=lambda _ids: assembler.stopped,
            chain=chain,
            speculation=Speculation.of() if speculative else None,
            on_retract=on_retract,
        )
    except MissingBlocksError as exc:
        raise missing_blocks(runtime.name, exc) from None
    except (ConfigError, ModelError) as exc:
        raise ApiError(400, str(exc)) from None
    except (SwarmError, trio.TooSlowError) as exc:
        log.warning("a request to %s failed in the swarm: %r", runtime.name, exc)
        raise ApiError(
            502, f"the swarm failed this request: {exc!r}", type="server_error", code="swarm_error"
        ) from None
    rest = assembler.finish()
    if rest and on_text is not None:
        on_text(rest)
    finish = "stop" if stats.finish_reason in ("eos", "stop") else "length"
    return assembler.text, finish, stats
