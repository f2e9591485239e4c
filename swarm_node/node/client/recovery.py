"""Client recovery: when a server fails mid-session, replace exactly its blocks and rebuild the caches.

A slot is the part of an inference chain one hop was chosen for (blocks ``start..end-1``); it keeps
every input the client sent it (step id, position, hidden states). When a server of the slot fails
(an error answer, a broken stream, a missed deadline), the client bans that server (growing
backoff), finds a new chain for exactly the slot's blocks (one or several servers), opens sessions
there, replays the history step by step (the same steps as the first time, so the new caches hold the
same numbers) and goes on with the step that failed. Attempts are bounded; when they run out the error
names the blocks: ``no server for blocks 3-5 of tiny after 5 attempts``.

This module does NOT know the DHT, sampling or the model: ``reroute`` finds the servers, and the
session (inference_session.py) owns the streams and the wire format.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import trio

from swarm_node.dht.bans import BanList
from swarm_node.dht.routing import Hop, format_blocks
from swarm_node.errors import LocalProtocolError, MissingBlocksError, ProtocolError, RemoteError
from swarm_node.node.client.step_deadlines import StepTimes
from swarm_node.node.net.message_stream import TRANSPORT_ERRORS

if TYPE_CHECKING:
    from swarm_node.node.client.inference_session import InferenceSession, RemoteSpan

log = logging.getLogger(__name__)

# error codes that are the caller's fault: another server would refuse too
CALLER_ERRORS = ("too_long",)
CLOSE_TIMEOUT = 0.5  # seconds to spend closing a failed server's stream


class HopFailed(Exception):
    """A server of the chain failed a step (``cause`` says how)."""

    def __init__(self, span: RemoteSpan | UnopenedSpan, cause: BaseException) -> None:
        super().__init__(
            f"{span.hop.server.peer_id} failed blocks {span.hop.start}:{span.hop.end}: {cause}"
        )
        self.span = span
        self.cause = cause

    @staticmethod
    @contextmanager
    def on_failure(span: RemoteSpan | UnopenedSpan) -> Iterator[None]:
        """Turn a server's failure inside the block into HopFailed; anything else passes through."""
        try:
            yield
        except Exception as exc:
            if is_server_failure(exc):
                raise HopFailed(span, exc) from exc
            raise


def is_server_failure(exc: BaseException) -> bool:
    """Is ``exc`` a server's fault (so another server may do better), not the caller's?"""
    if isinstance(exc, RemoteError):
        return exc.code not in CALLER_ERRORS
    if isinstance(exc, LocalProtocolError):  # we made a bad request: every server would refuse it
        return False
    failures = (ProtocolError, trio.TooSlowError, trio.BrokenResourceError, *TRANSPORT_ERRORS)
    return isinstance(exc, failures)


@dataclass(slots=True, eq=False)
class Slot:
    """Blocks ``start..end-1`` of the chain, the servers running them now, and what was sent to them."""

    start: int
    end: int
    spans: list[RemoteSpan]
    # (step id, position, (B, T, H))
    history: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    failures: int = 0  # recoveries since the slot last completed a step
    times: StepTimes = field(default_factory=StepTimes)  # of its steps on the servers it has now

    def remember(
        self, step_id: int, position: int, hidden: torch.Tensor, reorder: tuple[int, ...] = ()
    ) -> None:
        """Keep a step that the slot's servers computed; a step that reordered their caches' rows
        (``reorder``) reorders the rows of what came before, so a replay rebuilds the same caches."""
        if reorder:
            rows = torch.tensor(reorder, dtype=torch.int64)
            self.history = [(s, p, h.index_select(0, rows)) for s, p, h in self.history]
        self.history.append((step_id, position, hidden))
        self.failures = 0

    def truncate(self, length: int) -> None:
        """Forget the inputs of positions from ``length`` on (rejected draft tokens): a replay
        rebuilds a cache of exactly ``length`` positions."""
        kept = []
        for step_id, position, hidden in self.history:
            if position < length:
                kept.append((step_id, position, hidden[:, : length - position]))
        self.history = kept


# (start, end, attempt, servers to leave out besides the banned ones) -> a chain for exactly those blocks
Reroute = Callable[[int, int, int, frozenset[str]], Awaitable[list[Hop]]]


@dataclass(frozen=True, slots=True)
class RecoveryEvent:
    """One replaced slot: what failed, where its blocks went, and what it cost (seconds)."""

    start: int
    end: int
    failed: str  # peer id of the server that failed
    replacements: tuple[str, ...]  # peer ids now running blocks start..end-1
    attempts: int
    replayed_steps: int
    seconds: float  # from the failure to the replayed caches (the step itself not included)
    replay_seconds: float  # of which replaying the history


@dataclass(frozen=True, slots=True)
class HedgeEvent:
    """A late slot's step that spare servers answered first: they carry the slot from then on."""

    start: int
    end: int
    late: tuple[str, ...]  # peer ids of the late servers (not banned)
    replacements: tuple[str, ...]
    late_after: float  # seconds the step was allowed before it was late
    seconds: float  # from the step's start to the spare's answer


@dataclass(kw_only=True)
class Recovery:
    """How a session recovers: where to find servers, whom not to use, how many attempts."""

    reroute: Reroute
    bans: BanList
    max_attempts: int = 5
    retry_delay: float = 0.5  # seconds before the second attempt when no server was found; doubles
    clock: Callable[[], float] = time.monotonic  # the bans' clock
    events: list[RecoveryEvent] = field(default_factory=list)  # slots replaced so far
    hedges: list[HedgeEvent] = field(default_factory=list)  # late slots a spare took over
    # set (and replaced by a new one) each time ``events`` or ``hedges`` grows: watchers wait on it
    changed: trio.Event = field(default_factory=trio.Event)
    # the peer's recent late hops, hedges and recoveries, over all its sessions (the API's map)
    journal: deque[dict[str, object]] | None = None

    def _note(self, events: list, event: RecoveryEvent | HedgeEvent) -> None:
        events.append(event)
        self.changed.set()
        self.changed = trio.Event()
        if isinstance(event, HedgeEvent):
            self.log_event("hedge", event.start, event.end, event.replacements[0], event.seconds)
        else:
            self.log_event("recovery", event.start, event.end, event.failed, event.seconds)

    def log_event(self, kind: str, start: int, end: int, peer: str, seconds: float) -> None:
        """One line of ``journal``: a "late" hop (``peer`` no answer in ``seconds``), a "hedge"
        (``peer`` answered first, ``seconds`` into the step), a "recovery" (``peer`` failed;
        ``seconds`` to replace it) or "lost" (``peer`` failed and no server could replace it)."""
        if self.journal is not None:
            entry = {"at": time.time(), "kind": kind, "blocks": f"{start}:{end}", "peer": peer}
            self.journal.appendleft({**entry, "seconds": round(seconds, 3)})

    async def recover(self, session: InferenceSession, slot: Slot, failure: HopFailed) -> None:
        """Replace ``slot``'s servers by others and replay its history there; MissingBlocksError
        naming the slot's blocks when ``max_attempts`` attempts found no server that works."""
        t0 = time.perf_counter()
        ban(self.bans, failure, self.clock())
        slot.failures += 1
        if slot.failures > self.max_attempts:  # replacements keep failing the same step
            await close_quietly(slot.spans)
            raise MissingBlocksError(
                f"no server for blocks {format_blocks(range(slot.start, slot.end))} of {session.model} after "
                f"{self.max_attempts} attempts (every replacement failed: last {failure.cause})"
            ) from failure.cause
        old = slot.spans
        last_error: BaseException = failure.cause
        delay = self.retry_delay
        for attempt in range(self.max_attempts):
            try:
                chain = await self.reroute(slot.start, slot.end, attempt, frozenset())
            except (MissingBlocksError, trio.TooSlowError) as exc:
                last_error = exc
                log.info(
                    "attempt %d: no server for blocks %d:%d yet (%s)",
                    attempt + 1,
                    slot.start,
                    slot.end,
                    exc,
                )
                if attempt + 1 < self.max_attempts:
                    await trio.sleep(delay)
                    delay *= 2
                continue
            try:
                spans, replay_seconds = await self.open_and_replay(session, slot, chain)
            except HopFailed as exc:
                last_error = exc.cause
                ban(self.bans, exc, self.clock())
                continue
            slot.spans = spans
            for span in spans:  # it served a whole replay: trusted again
                self.bans.forgive(span.hop.server.peer_id)
            event = RecoveryEvent(
                start=slot.start,
                end=slot.end,
                failed=failure.span.hop.server.peer_id,
                replacements=tuple(s.hop.server.peer_id for s in spans),
                attempts=attempt + 1,
                replayed_steps=len(slot.history),
                seconds=time.perf_counter() - t0,
                replay_seconds=replay_seconds,
            )
            self._note(self.events, event)
            log.info(
                "blocks %d:%d moved to %s in %.2f s (replaying %d step(s): %.2f s)",
                slot.start,
                slot.end,
                ", ".join(p[-8:] for p in event.replacements),
                event.seconds,
                event.replayed_steps,
                replay_seconds,
            )
            await close_quietly(old)
            return
        await close_quietly(old)
        self.log_event("lost", slot.start, slot.end, failure.span.hop.server.peer_id, 0.0)
        blocks = format_blocks(range(slot.start, slot.end))
        first = f"{failure.span.hop.server.peer_id[-8:]}: {failure.cause}"
        last = "" if last_error is failure.cause else f"; then {last_error}"
        raise MissingBlocksError(
            f"no server for blocks {blocks} of {session.model} after {self.max_attempts} attempts "
            f"(first {first}{last})"
        ) from last_error

    async def hedge(
        self, session: InferenceSession, slot: Slot, late: frozenset[str]
    ) -> list[RemoteSpan] | None:
        """Spare servers for ``slot``'s blocks (none of ``late``, which are not banned: only slow)
        with the slot's history replayed, ready for the step in flight; None when there is none."""
        try:
            chain = await self.reroute(slot.start, slot.end, 0, late)
            spans, replay_seconds = await self.open_and_replay(session, slot, chain)
        except (MissingBlocksError, trio.TooSlowError) as exc:
            log.info("no spare for late blocks %d:%d: %s", slot.start, slot.end, exc)
            return None
        except HopFailed as exc:
            ban(self.bans, exc, self.clock())
            return None
        log.info(
            "hedge: blocks %d:%d also on %s (replayed %d step(s) in %.2f s)",
            slot.start,
            slot.end,
            ", ".join(s.hop.server.peer_id[-8:] for s in spans),
            len(slot.history),
            replay_seconds,
        )
        return spans

    def adopt(self, slot: Slot, spans: list[RemoteSpan], late_after: float, seconds: float) -> None:
        """``spans`` (a hedge) answered a step of ``slot`` first: they carry it from now on."""
        event = HedgeEvent(
            start=slot.start,
            end=slot.end,
            late=tuple(s.hop.server.peer_id for s in slot.spans),
            replacements=tuple(s.hop.server.peer_id for s in spans),
            late_after=late_after,
            seconds=seconds,
        )
        self._note(self.hedges, event)
        log.warning(
            "blocks %d:%d moved to %s: it answered in %.2f s, before the late server",
            slot.start,
            slot.end,
            ", ".join(p[-8:] for p in event.replacements),
            seconds,
        )
        slot.spans, slot.times = spans, StepTimes()

    async def rewind(self, session: InferenceSession, slot: Slot, position: int) -> None:
        """``slot``'s caches back to their first ``position`` positions: new sessions (on the same
        servers, or others where one is banned now) with its history up to there replayed."""
        slot.history = _truncated(slot.history, position)
        banned = self.bans.banned(self.clock())
        chain = [span.hop for span in slot.spans]
        for attempt in range(self.max_attempts + 1):
            if attempt or any(hop.server.peer_id in banned for hop in chain):
                chain = await self.reroute(slot.start, slot.end, attempt, frozenset())
            try:
                spans, _ = await self.open_and_replay(session, slot, chain)
                break
            except HopFailed as failure:
                ban(self.bans, failure, self.clock())
                if attempt == self.max_attempts:
                    raise
        old, slot.spans, slot.times = slot.spans, spans, StepTimes()
        await self.retire(old)

    async def retire(self, spans: list[RemoteSpan]) -> None:
        """Drop streams to servers the session stopped using (without a ban)."""
        await close_quietly(spans)

    async def open_and_replay(
        self, session: InferenceSession, slot: Slot, chain: list[Hop]
    ) -> tuple[list[RemoteSpan], float]:
        """Sessions on ``chain`` (no push: the client sends every step) with the slot's history
        replayed; returns them and the seconds the replay took."""
        spans: list[RemoteSpan] = []
        try:
            for hop in chain:
                with HopFailed.on_failure(UnopenedSpan(hop)):
                    spans.append(await session.open_span(hop))
            t0 = time.perf_counter()
            inputs = [hidden for _, _, hidden in slot.history]
            for span in spans:
                inputs = await replay(session, span, slot.history, inputs)
        except BaseException:
            await close_quietly(spans)
            raise
        return spans, time.perf_counter() - t0


def ban(bans: BanList, failure: HopFailed, now: float) -> None:
    """Leave the server that failed out of chains for a while (longer with each failure in a row)."""
    hop = failure.span.hop
    seconds = bans.ban(hop.server.peer_id, now)
    log.warning(
        "server %s failed blocks %d:%d (%s); banned for %.0f s",
        hop.server.peer_id,
        hop.start,
        hop.end,
        failure.cause,
        seconds,
    )


@dataclass(slots=True)
class UnopenedSpan:
    """A hop without a session (one that did not open, or a training hop), standing in for a
    RemoteSpan in HopFailed."""

    hop: Hop


async def replay(
    session: InferenceSession,
    span: RemoteSpan,
    history: list[tuple[int, int, torch.Tensor]],
    inputs: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Send ``inputs`` as the steps of ``history`` to ``span`` and return its outputs.

    One task sends while another reads, so neither side's buffers fill up while the other waits.
    """
    outputs: list[torch.Tensor] = []

    async def send_all() -> None:
        with HopFailed.on_failure(span):
            for (step_id, position, _), hidden in zip(history, inputs, strict=True):
                await session.send_step(span, hidden, step_id, position)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            with HopFailed.on_failure(span):
                for (step_id, _, _), hidden in zip(history, inputs, strict=True):
                    reply = await session.receive_step(span, step_id)  # sent by us: never None
                    outputs.append(session.output(span, reply, hidden))
    except BaseExceptionGroup as group:
        raise sole_error(group) or group from None
    return outputs


def sole_error(group: BaseExceptionGroup) -> BaseException | None:
    """The one real error inside nested groups (ignoring Cancelled), or None if there are several."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None


async def close_quietly(spans: list[RemoteSpan]) -> None:
    """Drop streams to servers we stopped using, without waiting on a server that may be hung."""
    with trio.CancelScope(shield=True):
        for span in spans:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await span.conn.reset()


def _truncated(
    history: list[tuple[int, int, torch.Tensor]], position: int
) -> list[tuple[int, int, torch.Tensor]]:
    """The steps of ``history`` before ``position`` (a step across it cut there)."""
    kept = []
    for step_id, at, hidden in history:
        if at + hidden.shape[1] <= position:
            kept.append((step_id, at, hidden))
        elif at < position:
            kept.append((step_id, at, hidden[:, : position - at]))
    return kept
