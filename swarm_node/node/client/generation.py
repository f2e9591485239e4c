"""The client's decode loop: embed locally, run the chain remotely, norm + LM head + sampling locally
(the head batched with the other sessions of this process that wait with it: head_batching.py).

``generate_tokens`` opens a session for one call; ``open_token_session`` keeps one open across
``continue_tokens`` calls (a chat): each sends only the tokens the servers' caches do not hold yet. Knows nothing of
tokenizers or text: stopping on strings is the caller's ``stopping`` callback.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import trio

from swarm_node.dht.routing import Hop
from swarm_node.errors import ConfigError, check_int
from swarm_node.node.client.early_spans import EarlySpans
from swarm_node.node.client.head_batching import head_batcher
from swarm_node.node.client.settings import HopTuning, SessionSettings
from swarm_node.node.client.speculative import Speculation
from swarm_node.node.client.verification import RolledBack

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        if not self.temperature >= 0:
            raise ConfigError(f"'temperature' must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"'top_p' must be in (0, 1], got {self.top_p!r}")
        check_int("top_k", self.top_k, 0)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ConfigError(
                f"'repetition_penalty' must be a finite number > 0, got {self.repetition_penalty!r}"
            )


@dataclass(kw_only=True)
class GenerationStats:
    chain: list[Hop] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    remote_time: float = 0.0  # seconds spent waiting for the chain (steps)
    finish_reason: str = "length"  # "length", "eos" or "stop" (the stopping callback said so)
    steps: int = 0  # trips through the chain (fewer than new_tokens when drafts were accepted)
    draft_tokens: int = 0  # draft tokens the servers verified (speculative decoding)
    accepted_tokens: int = 0  # of which were accepted
    recoveries: list[Any] = field(default_factory=list)  # a RecoveryEvent per replaced server
    hedges: list[Any] = field(default_factory=list)  # a HedgeEvent per late slot a spare took
    rollbacks: int = 0  # times a server caught lying sent the session back (verification.py)
    checked_positions: int = 0  # server answers (positions) spot checks compared, this session
    findings: list[Any] = field(default_factory=list)  # servers caught lying (verification.Finding)

    @property
    def tokens_per_second(self) -> float:
        """Steady decode rate: tokens after the first over the time after the first."""
        steady = self.total_time - self.time_to_first_token
        return (self.new_tokens - 1) / steady if self.new_tokens > 1 and steady > 0 else 0.0


class TokenSession:
    """An inference session plus the tokens behind it: ``ids`` ``# (B, n)``, of which the first
    ``fed`` went through the chain (the servers cache them); the rest wait for the next call."""

    def __init__(
        self,
        session: Any,
        chain: list[Hop],
        *,
        max_length: int,
        batch_size: int,
        prefix: torch.Tensor | None = None,
    ) -> None:
        self.session = session
        self.chain = chain
        self.max_length = max_length
        self.batch_size = batch_size
        self.prefix = prefix  # (P, H) soft prompt before the first tokens (prompt tuning), or None
        self.prefix_len = 0 if prefix is None else prefix.shape[0]
        self.ids = torch.zeros(batch_size, 0, dtype=torch.int64)  # (B, n)
        self.fed = 0

    @property
    def pending(self) -> torch.Tensor:
        return self.ids[:, self.fed :]  # (B, n - fed)


@asynccontextmanager
async def open_token_session(
    peer: Any,
    settings: SessionSettings,
    *,
    tuning: HopTuning | None = None,
    prefix: torch.Tensor | None = None,
    chain: Sequence[Hop] | None = None,
    early: EarlySpans | None = None,
) -> AsyncIterator[TokenSession]:
    """A session holding up to ``settings.max_length`` positions for ``continue_tokens`` calls.

    Fine-tuning results: ``tuning`` (model/prompts.py's deep prompts ``# (L, P, H)``, a named adapter
    or a client-owned LoRA) goes to the servers; a soft prompt ``prefix`` ``# (P, H)`` goes before the
    first tokens' embeddings (it takes P of the ``max_length`` positions). ``early``: sessions
    opened on ``chain``'s servers before this one (early_spans.py).
    """
    if settings.max_length < 1:
        raise ConfigError(f"'max_length' must be an int >= 1, got {settings.max_length!r}")
    tuning = (tuning or HopTuning()).resolved(peer.client_config.adapter)
    if chain is None:
        chain = await peer.route(settings, 0, settings.num_blocks, adapter=tuning.adapter)
    async with peer.inference_session(list(chain), settings, tuning, early=early) as session:
        yield TokenSession(
            session,
            list(chain),
            max_length=settings.max_length,
            batch_size=settings.batch_size,
            prefix=prefix,
        )


async def generate_tokens(
    peer: Any,
    head: Any,
    input_ids: torch.Tensor,
    settings: SessionSettings,
    sampling: SamplingConfig,
    *,
    tuning: HopTuning | None = None,
    prefix: torch.Tensor | None = None,
    chain: Sequence[Hop] | None = None,
    early: EarlySpans | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
    stopping: Callable[[torch.Tensor], bool] | None = None,
    on_retract: Callable[[int], None] | None = None,
    speculation: Speculation | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """input_ids ``# (B, T)`` -> ``# (B, T + new)``, like transformers' generate, in a session of
    ``settings`` sized for this call (its max_length and batch size); ``tuning``, ``prefix``,
    ``chain`` and ``early`` are those of ``open_token_session``, the callbacks and ``speculation``
    those of ``continue_tokens``."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ConfigError(
            f"'input_ids' must have shape (batch, tokens >= 1), got {tuple(input_ids.shape)}"
        )
    prefix_len = 0 if prefix is None else prefix.shape[0]
    max_length = input_ids.shape[1] + sampling.max_new_tokens + prefix_len
    settings = replace(settings, max_length=max_length, batch_size=input_ids.shape[0])
    async with open_token_session(
        peer, settings, tuning=tuning, prefix=prefix, chain=chain, early=early
    ) as session:
        return await continue_tokens(
            head, session, input_ids, sampling, on_tokens, stopping, on_retract, speculation
        )


async def continue_tokens(
    head: Any,
    ts: TokenSession,
    input_ids: torch.Tensor,
    sampling: SamplingConfig,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
    stopping: Callable[[torch.Tensor], bool] | None = None,
    on_retract: Callable[[int], None] | None = None,
    speculation: Speculation | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """Go on with what ``ts`` holds: ``input_ids`` ``# (B, T)`` (may be empty, ``# (B, 0)``, to just
    go on) -> ``# (B, T + new)``. ``on_tokens(token # (B,))`` sees each new token;
    ``stopping(ids # (B, T + new))`` returning True ends generation after that token.

    When a spot check finds that a server lied (verification.py), the session goes back to the
    last position that agreed and the tokens after it are generated again: ``on_retract(n)`` hears
    that the last ``n`` tokens ``on_tokens`` saw are taken back. Before returning, every server is
    checked up to its last answer, so the tokens returned are those of honest servers.

    ``speculation`` (batch 1, every server able to roll its cache back; else plain decoding): a
    step carries drafted tokens after the last one, the chain verifies them all in one trip, and
    the servers forget the rejected ones with the next step (speculative.py)."""
    from swarm_node.model import apply_repetition_penalty, sample_next_token

    if input_ids.ndim != 2:
        raise ConfigError(
            f"'input_ids' must have shape (batch, tokens), got {tuple(input_ids.shape)}"
        )
    if input_ids.shape[0] != ts.batch_size:
        raise ConfigError(
            f"'input_ids' must have batch size {ts.batch_size} (the session's), got {input_ids.shape[0]}"
        )
    new = torch.cat([ts.pending, input_ids.to(torch.int64)], dim=1)  # (B, T')
    if new.shape[1] < 1:
        raise ConfigError("'input_ids' must have at least one token when the session holds none")
    needed = ts.prefix_len + ts.fed + new.shape[1] + sampling.max_new_tokens - 1
    if needed > ts.max_length:
        raise ConfigError(
            f"the session holds {ts.prefix_len + ts.fed} positions and max_length {ts.max_length}: "
            f"{new.shape[1]} more plus {sampling.max_new_tokens} new tokens do not fit ({needed})"
        )
    t0 = time.perf_counter()
    batch = new.shape[0]
    stats = GenerationStats(prompt_tokens=input_ids.shape[1], chain=list(ts.chain))
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    eos = torch.tensor(sampling.eos_token_ids or [-1])
    pad = sampling.pad_token_id
    if pad is None:
        pad = (sampling.eos_token_ids or (0,))[0]
    finished = torch.zeros(batch, dtype=torch.bool)
    ts.ids = torch.cat([ts.ids, input_ids.to(torch.int64)], dim=1)
    given = ts.ids.shape[1]  # tokens before the first one generated here
    recovery = getattr(ts.session, "recovery", None)
    recoveries_before = 0 if recovery is None else len(recovery.events)
    hedges_before = 0 if recovery is None else len(recovery.hedges)
    hidden = await trio.to_thread.run_sync(head.embed, new)  # (B, T', H)
    heads = head_batcher(head)  # the head runs batched with other sessions' that wait with it
    if ts.fed == 0 and ts.prefix is not None:  # the soft prompt goes first, once per session
        prefix = ts.prefix.to(hidden.device, hidden.dtype).expand(batch, -1, -1)
        hidden = torch.cat([prefix, hidden], dim=1)  # (B, P + T', H)
    spec = speculation if batch == 1 else None
    with heads.using() as user:  # while this session decodes, a batch may wait a moment for it
        done = False
        while True:
            drafts: list[int] = []
            try:
                if done:  # every server checked up to its last answer before the tokens are final
                    settle = getattr(ts.session, "settle", None)
                    if settle is not None:
                        await settle()
                    break
                t_step = time.perf_counter()
                if spec is not None and getattr(ts.session, "can_truncate", False):
                    left = sampling.max_new_tokens - stats.new_tokens - 1
                    drafts = await spec.drafts(ts.ids[0], left)
                    if drafts:
                        hidden = torch.cat([hidden, head.embed(torch.tensor([drafts]))], dim=1)
                position = ts.session.position
                out = await ts.session.step(hidden)  # (B, T', H)
            except RolledBack as back:
                taken = rewind(ts, back.position, given)
                stats.rollbacks += 1
                stats.new_tokens = ts.ids.shape[1] - given
                finished = torch.isin(ts.ids[:, given:], eos).any(dim=1)
                log.warning("%s; %d token(s) taken back", back, taken)
                if on_retract is not None and taken:
                    on_retract(taken)
                hidden = await trio.to_thread.run_sync(
                    rewound_input, head, ts, back.position, batch
                )
                done = False
                continue
            ts.fed = ts.ids.shape[1]  # the drafts are not in ids (yet)
            stats.remote_time += time.perf_counter() - t_step
            stats.steps += 1
            seen = ts.ids

            def pick(
                logits: torch.Tensor, seen: torch.Tensor = seen, finished: torch.Tensor = finished
            ) -> tuple[torch.Tensor, torch.Tensor]:
                logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
                token = sample_next_token(
                    logits,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    generator=generator,
                )
                token = torch.where(finished, torch.full_like(token, pad), token)  # (B,)
                return token, head.embed(token[:, None])  # the next input, in the same hop

            if drafts and spec is not None:  # [1 + accepted], (1, 1, H)
                picked, next_hidden = await spec.verify(
                    head, out, seen[0], drafts, sampling, generator
                )
                tokens = [torch.tensor([t]) for t in picked]
            else:
                token, next_hidden = await heads.next_token(out[:, -1:, :], pick, user=user)
                tokens = [token]
            emitted = 0
            for token in tokens:
                emitted += 1
                ts.ids = torch.cat([ts.ids, token[:, None]], dim=1)
                if stats.new_tokens == 0 and not stats.time_to_first_token:
                    stats.time_to_first_token = time.perf_counter() - t0
                stats.new_tokens += 1
                if on_tokens is not None:
                    on_tokens(token)
                finished |= torch.isin(token, eos)
                if bool(finished.all()):
                    stats.finish_reason = "eos"
                elif stopping is not None and stopping(
                    torch.cat([input_ids, ts.ids[:, given:]], dim=1)
                ):
                    stats.finish_reason = "stop"
                elif stats.new_tokens < sampling.max_new_tokens:
                    continue
                else:
                    stats.finish_reason = "length"
                done = True
                break
            if spec is not None and hidden.shape[1] == len(drafts) + 1:  # a prefill is not timed
                spec.length.observe(len(drafts), len(tokens), time.perf_counter() - t_step)
            if drafts:
                stats.draft_tokens += len(drafts)
                stats.accepted_tokens += len(tokens) - 1
                # the servers keep what they were sent up to the newest emitted token's predecessor
                rejected = len(drafts) - (emitted - 1)
                ts.fed = ts.ids.shape[1] - 1
                ts.session.truncate(position + hidden.shape[1] - rejected)
            hidden = next_hidden
    ids = torch.cat([input_ids.to(torch.int64), ts.ids[:, given:]], dim=1)
    verifier = getattr(ts.session, "verifier", None)
    if verifier is not None:
        stats.checked_positions = verifier.stats.positions
        stats.findings = list(verifier.found)
    if recovery is not None:
        stats.recoveries = list(recovery.events[recoveries_before:])
        stats.hedges = list(recovery.hedges[hedges_before:])
    stats.total_time = time.perf_counter() - t0
    return ids, stats


def rewind(ts: TokenSession, position: int, given: int) -> int:
    """The session went back to ``position``: keep the tokens whose positions it still holds, the
    one after them and every one of the first ``given`` (the caller's); return how many generated
    tokens were taken back."""
    fed = max(0, position - ts.prefix_len)
    keep = max(fed + 1, given)
    taken = max(0, ts.ids.shape[1] - keep)
    ts.ids, ts.fed = ts.ids[:, :keep], fed
    return taken


def rewound_input(head: Any, ts: TokenSession, position: int, batch: int) -> torch.Tensor:
    """What to send after a rewind to ``position``: the soft prompt's rest, if any, and the
    tokens the caches lack ``# (B, T, H)``."""
    hidden = head.embed(ts.pending)
    if ts.prefix is not None and position < ts.prefix_len:
        prefix = ts.prefix[position:].to(hidden.dtype).expand(batch, -1, -1)
        hidden = torch.cat([prefix, hidden], dim=1)
    return hidden
