"""A client's inference session over a chain of servers: one stream and one remote session per hop.

Client-star (the default): each step sends the hidden states of the new positions to every hop in
order and returns the last hop's output (2N one-way delays a token). Push: the client sends a step
to the first hop only; each server sends its output straight to the next one and to the client (N + 1
delays). The client reads every hop's answer in order and, where a hop says it could not push
(``pushed=False``) or the next server says the push failed, sends that step on itself. The session is an
async context manager: leaving it closes every remote session and stream. Step ids and what an
answer means are protocol/client_session.py's rules.

Each hop of the chain is a slot (recovery.py): it keeps the inputs it was sent, and when one of its
servers fails the slot is re-routed to other servers and its history replayed there.

Which hop is blamed: every answer is checked (the shape and dtype sent, finite) before the client
uses or forwards it, so client-star, a hop that refuses its input refuses what the client checked
and is itself at fault. Push: a server refuses a bad pushed input with ``bad_push``, and the server
that pushed it is the one banned and replaced.

Checked sessions (verification.py) check the servers of a push chain as any other: the answer to a
pushed step counts only with the server's signed receipt of having computed it from exactly what
the pushing server answered the client (so the client holds the true input of every hop). Without
it (a server that signs no receipts, or a pusher that pushed something else than it answered) the
caches from that hop on go back to before the step, the client sends the step itself, and those
links carry no pushes again (``PushUnproven``); nobody is banned: either server may have lied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import trio

from swarm_node import compression
from swarm_node.dht.routing import Hop
from swarm_node.errors import ConfigError, RemoteError, RemoteProtocolError, SessionError
from swarm_node.node.client.early_spans import EarlySpans, close_session, open_session_on
from swarm_node.node.client.hedging import hedged
from swarm_node.node.client.push_proof import PushUnproven, last_answer, proven
from swarm_node.node.client.recovery import (
    HopFailed,
    Recovery,
    Slot,
    UnopenedSpan,
    ban,
    close_quietly,
    sole_error,
)
from swarm_node.node.client.settings import HopTuning, SessionSettings
from swarm_node.node.client.step_deadlines import HedgeBudget
from swarm_node.node.client.verification import Answer, RolledBack, Verifier
from swarm_node.node.config import SERVER_DEFAULT
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import MessageStream
from swarm_node.protocol import messages as m
from swarm_node.protocol.client_session import HopAnswers, SessionSteps
from swarm_node.protocol.tensors import WireTensor

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # tokens per step frame when a long prompt streams through the chain

Piece = tuple[int, int, torch.Tensor]  # (step id, position, hidden states # (B, T, H))


class RemoteSpan:
    def __init__(
        self,
        hop: Hop,
        conn: MessageStream,
        session_id: str,
        pushes: bool = False,
        keeps: bool = False,
    ) -> None:
        self.hop = hop
        self.conn = conn
        self.session_id = session_id
        self.pushes = pushes  # this server pushes its output to the next span's server
        self.keeps = keeps  # this server rolls its cache back on a step's 'keep'
        self.answers = HopAnswers(conn.peer_id)
        self.answered: list[Answer] | None = None  # what it was sent and answered, when checked
        self.answered_to = 0  # positions answered


@dataclass(frozen=True, kw_only=True)
class Verify:
    """How a session spot-checks its servers (verification.py)."""

    rate: float  # the chance that a step makes a server due a check
    ban_seconds: float  # how long a server caught lying is banned
    spawn: Callable[..., object]  # a nursery's start_soon: the checks run beside the steps
    on_found: Callable[..., object] | None = None  # hears of each liar found (its Finding)


@dataclass(frozen=True, kw_only=True)
class IdleWatch:
    """How a session checks its servers while it sits idle (a chat waiting for its user)."""

    every: float  # seconds idle before the servers are pinged
    ping: Callable[[str], Awaitable[object]]  # peer id -> its answer; raises when there is none
    spawn: Callable[..., object]  # a nursery's start_soon: the watch outlives no session


class InferenceSession:
    """Runs hidden states through ``chain`` with a KV cache kept on every server."""

    def __init__(
        self,
        host: Any,
        chain: list[Hop],
        settings: SessionSettings,
        *,
        step_timeout: float,
        max_frame_size: int,
        tuning: HopTuning | None = None,
        recovery: Recovery | None = None,
        observe: Callable[[Hop, float], None] | None = None,
        watch: IdleWatch | None = None,
        verify: Verify | None = None,
        early: EarlySpans | None = None,
    ) -> None:
        self.push = bool(settings.push)
        self.early = (
            early  # sessions opened on the chain's servers before this one (early_spans.py)
        )
        self.observe = observe  # told the seconds of each one-token client-star step of a hop
        self.tuning = tuning or HopTuning()  # each hop gets its blocks' part at open
        self.recovery = recovery  # None: a failed server ends the session
        self.host = host
        self.chain = chain
        self.model = settings.model
        self.max_length = settings.max_length
        self.dtype = settings.dtype
        self.uplink = settings.compression or "none"  # codec of what we send
        # the codec we ask the servers to answer in
        self.downlink = settings.compression or SERVER_DEFAULT
        self.step_timeout = step_timeout
        self.max_frame_size = max_frame_size
        self.batch_size = settings.batch_size
        self.steps = SessionSteps(settings.max_length)
        self._slots: list[Slot] = []
        self.hedges = HedgeBudget()
        self.watch = watch if recovery is not None else None
        self._busy = trio.Lock()  # a step, or the idle watch's pings and recovery
        self._idle_since = 0.0
        self._watching = trio.CancelScope()
        self.verifier: Verifier | None = None
        self._spawn_checks: Callable[..., object] | None = None
        if verify is not None and verify.rate > 0 and recovery is not None:
            self.verifier = Verifier(
                rate=verify.rate,
                reroute=recovery.reroute,
                bans=recovery.bans,
                clock=recovery.clock,
                ban_seconds=verify.ban_seconds,
                on_found=verify.on_found,
            )
            self._spawn_checks = verify.spawn
        self._checking = trio.CancelScope()
        self._keep: int | None = None  # a roll back the next step carries to every server
        self._reorder: tuple[int, ...] = ()  # rows the next step reorders the caches by
        self._step_reorder: tuple[int, tuple[int, ...]] = (0, ())  # (step id, rows) in flight

    @property
    def position(self) -> int:
        return self.steps.position

    def reorder(self, rows: Sequence[int]) -> None:
        """Beam search: row i of every server's cache becomes what row ``rows[i]`` is now. Sent
        with the next step (no round trip of its own); several calls before a step compose."""
        rows = tuple(rows)
        size = self.batch_size
        if len(rows) != size or not all(type(r) is int and 0 <= r < size for r in rows):
            raise ConfigError(
                f"'rows' must be {size} row indices in [0, {size}) (the session's batch size), "
                f"got {list(rows)[:16]}"
            )
        if self.verifier is not None and self._spawn_checks is not None:
            for stale in self.verifier.reordered(self._spans, rows):
                self._spawn_checks(self.verifier.drop_checker, stale)
        pending = self._reorder
        rows = tuple(pending[r] for r in rows) if pending else rows
        self._reorder = () if rows == tuple(range(size)) else rows

    def reorder_of(self, step_id: int) -> tuple[int, ...]:
        """The rows step ``step_id`` reorders the caches by (empty for every other step)."""
        at, rows = self._step_reorder
        return rows if step_id == at else ()

    @property
    def can_truncate(self) -> bool:
        """Whether every server of the chain now rolls its cache back (``truncate``)."""
        spans = self._spans
        return bool(spans) and all(span.keeps for span in spans)

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (rejected draft tokens), with no round trip of
        its own: the next step carries the roll back to each server (``StepRequest.keep``), and a
        server replaced before then is replayed only the first ``length`` positions. SessionError
        when a server cannot roll back (an older version; see ``can_truncate``)."""
        if length == self.position:
            return
        if not self.can_truncate:
            old = [s.conn.peer_id for s in self._spans if not s.keeps]
            raise SessionError(
                f"cannot roll the session back to {length} positions: servers {old} do not take "
                "'keep' (an older version, or sliding-window layers); check 'can_truncate'"
            )
        self.steps.truncate(length)
        for slot in self._slots:
            slot.truncate(length)
        self._keep = length
        if self.verifier is not None and self._spawn_checks is not None:
            for stale in self.verifier.truncated(self._spans, length):
                self._spawn_checks(self.verifier.drop_checker, stale)

    @property
    def _spans(self) -> list[RemoteSpan]:
        return [span for slot in self._slots for span in slot.spans]

    async def __aenter__(self) -> InferenceSession:
        opened: dict[int, RemoteSpan | Exception] = {}  # no push: every hop's, opened at once
        streams: dict[int, MessageStream | Exception] = {}  # push: every hop's stream, at once
        try:
            if not self.push:
                await self._open_together(opened)
            else:
                await self._streams_together(streams)
            following: RemoteSpan | None = None
            # push: open from the last hop back, so each server learns the next one's session id
            for i in reversed(range(len(self.chain))) if self.push else range(len(self.chain)):
                hop = self.chain[i]
                previous = self.chain[i - 1].server.peer_id if i > 0 else ""
                slot = Slot(start=hop.start, end=hop.end, spans=[])
                try:
                    with HopFailed.on_failure(UnopenedSpan(hop)):
                        done = opened.pop(i, None)
                        stream = streams.pop(i, None)
                        if isinstance(done, Exception):
                            raise done
                        if isinstance(stream, Exception):
                            raise stream
                        following = done or await self.open_span(
                            hop, conn=stream, **self._push_fields(following, previous)
                        )
                    slot.spans.append(following)
                except HopFailed as failure:  # gone since the lookup: its blocks go elsewhere now
                    if self.recovery is None:
                        raise failure.cause from None
                    await self.recovery.recover(self, slot, failure)
                    following = None  # the replacements take no pushes: the hop before sends to us
                self._slots.append(slot)
            if self.push:
                self._slots.reverse()
            if self.early is not None:
                self.early.close_rest()
        except BaseException:
            await close_quietly([span for span in opened.values() if isinstance(span, RemoteSpan)])
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                for stream in streams.values():
                    if isinstance(stream, MessageStream):
                        await stream.close()
            await self.aclose()
            raise
        if self.watch is not None:
            self._idle_since = trio.current_time()
            self.watch.spawn(self._watch_idle)
        if self._spawn_checks is not None:
            self._spawn_checks(self._run_checks)
        return self

    async def _run_checks(self) -> None:
        if self.verifier is not None:
            with self._checking:
                await self.verifier.run(self)

    def live_spans(self) -> list[RemoteSpan]:
        """The servers the session runs its steps on now."""
        return self._spans

    async def _watch_idle(self) -> None:
        """Every ``watch.every`` s without a step, ping the session's servers: one that does not
        answer has its blocks moved now (recovery), not when the next step needs them."""
        if self.watch is None:
            return
        with self._watching:
            while True:
                await trio.sleep_until(self._idle_since + self.watch.every)
                if trio.current_time() < self._idle_since + self.watch.every:
                    continue  # a step ran meanwhile
                async with self._busy:
                    try:
                        await self._ping_slots(self.watch)
                    except Exception as exc:  # noqa: BLE001 (the next step meets it and says so)
                        log.warning("checking an idle session's servers failed: %s", exc)
                    self._idle_since = trio.current_time()

    async def _ping_slots(self, watch: IdleWatch) -> None:
        for slot in list(self._slots):
            for span in list(slot.spans):
                try:
                    with HopFailed.on_failure(span):
                        await watch.ping(span.conn.peer_id)
                except HopFailed as failure:
                    log.warning(
                        "%s did not answer a ping while the session sat idle (%s): "
                        "moving blocks %d:%d now",
                        *(span.conn.peer_id, failure.cause, slot.start, slot.end),
                    )
                    await self._recover(slot, failure)
                    break

    async def _open_together(self, opened: dict[int, RemoteSpan | Exception]) -> None:
        """Open a session on every hop at once (without push none needs another's session id: a
        chain's opening costs one round of stream and request, not one per hop): each hop's span,
        or what opening it raised, into ``opened`` by index (raised again in chain order, where
        recovery sees it)."""

        async def open_one(i: int) -> None:
            try:
                opened[i] = await self.open_span(self.chain[i])
            except Exception as exc:  # noqa: BLE001 (raised again in order by __aenter__)
                opened[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(len(self.chain)):
                nursery.start_soon(open_one, i)

    async def _streams_together(self, streams: dict[int, MessageStream | Exception]) -> None:
        """A push chain's sessions open one after another (each server learns the next one's
        session id), but their streams need no such order: every hop's stream, or what opening
        it raised, into ``streams`` by index, all at once (one round of stream negotiation)."""

        async def open_one(i: int) -> None:
            try:
                streams[i] = await open_stream(
                    self.host,
                    self.chain[i].server.peer_id,
                    max_frame_size=self.max_frame_size,
                    timeout=self.step_timeout,
                )
            except Exception as exc:  # noqa: BLE001 (raised again in order by __aenter__)
                streams[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(len(self.chain)):
                nursery.start_soon(open_one, i)

    async def open_span(
        self, hop: Hop, *, conn: MessageStream | None = None, **push_fields: str
    ) -> RemoteSpan:
        """A session for ``hop``'s blocks on its server: on ``conn`` (a stream to it), the one
        opened early with this very request (early_spans.py), or on a new stream."""
        req = m.OpenSessionRequest(
            model=self.model,
            start=hop.start,
            end=hop.end,
            max_length=self.max_length,
            dtype=self.dtype,
            compression=self.downlink,
            batch_size=self.batch_size,
            **self.tuning.fields(hop.start, hop.end, self.dtype),
            **push_fields,
        )
        taken = None if conn is not None or self.early is None else await self.early.take(hop, req)
        conn, reply = taken or await open_session_on(
            self.host,
            hop.server.peer_id,
            req,
            max_frame_size=self.max_frame_size,
            timeout=self.step_timeout,
            conn=conn,
        )
        span = RemoteSpan(hop, conn, reply.session_id, pushes=reply.push, keeps=reply.keep)
        if self.verifier is not None:
            span.answered = []
        return span

    def _push_fields(self, following: RemoteSpan | None, previous: str) -> dict[str, Any]:
        """Where this hop pushes to (the session opened on the next hop) and whom it takes pushes from."""
        if not self.push:
            return {}
        fields = {"prev_peer": previous}
        if following is not None:
            fields.update(
                next_peer=following.hop.server.peer_id,
                next_addrs=tuple(following.hop.server.addrs),
                next_session=following.session_id,
            )
        return fields

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._watching.cancel()
        self._checking.cancel()
        if self.verifier is not None:
            await self.verifier.aclose()
        spans = self._spans
        self._slots = []
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:  # every hop at once: one round trip in all
                for span in spans:
                    nursery.start_soon(_close_span, span)

    @property
    def hops(self) -> list[Hop]:
        return [span.hop for span in self._spans]

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the new positions ``# (B, T, H)`` -> the chain's output ``# (B, T, H)``.

        A long step (a prefill) is cut into chunks that stream through the chain: while hop i runs
        chunk k, hop i-1 already runs chunk k+1, and no frame outgrows the frame-size limit.
        """
        async with self._busy:
            try:
                await self._apply_findings()
                return await self._step(hidden)
            finally:
                self._idle_since = trio.current_time()

    async def settle(self) -> None:
        """Check every server up to its last answer now (the end of a generation: nothing is left
        unchecked); RolledBack when one lied, like ``step``."""
        if self.verifier is None:
            return
        async with self._busy:
            await self.verifier.settle(self)
            await self._apply_findings()

    async def _apply_findings(self) -> None:
        """A check found a server lying: roll every hop back to the first position it got wrong
        and raise RolledBack (the caller redoes the steps from there)."""
        found = None if self.verifier is None else self.verifier.finding()
        if found is None or found.position >= self.position:
            return
        await self.roll_back(found.position)
        raise RolledBack(found.position, found.liar)

    async def roll_back(self, position: int) -> None:
        """Every hop's cache back to its first ``position`` positions: new sessions (on the same
        servers, or others where a server is banned now) with the slot's history up to there
        replayed."""
        assert self.recovery is not None and self.verifier is not None
        for slot in self._slots:
            old = slot.spans
            await self.recovery.rewind(self, slot, position)
            await self.verifier.forget(old)
        self.steps.position = position
        self.verifier.rollbacks.append(position)

    async def _step(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self._spans:
            raise SessionError("the inference session is not open")
        tokens = hidden.shape[1]
        self.steps.check(tokens)
        self._step_reorder, self._reorder = (self.steps.step_id + 1, self._reorder), ()
        chunk = self.chunk_tokens(hidden)
        if self.push:  # chunks one after another: each travels the whole chain by itself
            outs = []
            for a in range(0, tokens, chunk):
                piece = hidden[:, a : a + chunk]
                outs.append(await self._push_step(piece, self.steps.next_id(), self.position + a))
            out = torch.cat(outs, dim=1)
        elif tokens <= chunk:
            out = await self._through_chain(hidden, self.position)
        else:
            out = await self._pipelined(hidden, chunk)
        self.steps.advance(tokens)
        self._keep = None
        self.hedges.steps += 1
        if self.verifier is not None:
            self.verifier.stepped(self._spans)
        return out

    def chunk_tokens(self, hidden: torch.Tensor) -> int:
        """Tokens per chunk: at most PREFILL_CHUNK, and a frame of them well under the size limit."""
        batch, _, width = hidden.shape
        per_token = batch * width * 4  # bytes of one position in float32, the widest wire dtype
        return max(1, min(PREFILL_CHUNK, (self.max_frame_size // 2) // per_token))

    async def _through_chain(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        step_id = self.steps.next_id()  # one id per step, the same on every hop
        for slot in self._slots:
            hidden = await self._through_slot(slot, hidden, position, step_id)
        return hidden

    async def _through_slot(
        self, slot: Slot, hidden: torch.Tensor, position: int, step_id: int
    ) -> torch.Tensor:
        """One step through one slot, client-star; a failed server is replaced and the step redone,
        a late one hedged (step_deadlines.py)."""
        while True:
            t0 = trio.current_time()

            async def ours_step() -> tuple[torch.Tensor, bool]:
                return await self._run_spans(slot.spans, hidden, position, step_id), True

            try:
                out, _, _ = await self._hedged(slot, hidden, position, step_id, ours_step)
            except HopFailed as failure:
                await self._recover(slot, failure)
                continue
            slot.times.observe(hidden.shape[1], trio.current_time() - t0)
            slot.remember(step_id, position, hidden, self.reorder_of(step_id))
            return out

    async def _run_spans(
        self, spans: list[RemoteSpan], hidden: torch.Tensor, position: int, step_id: int
    ) -> torch.Tensor:
        for span in spans:
            hidden = await self._hop(span, hidden, position, step_id)
        return hidden

    async def _hedged(
        self,
        slot: Slot,
        hidden: torch.Tensor,
        position: int,
        step_id: int,
        ours_step: Callable[[], Awaitable[tuple[torch.Tensor, bool]]],
    ) -> tuple[torch.Tensor, bool, bool]:
        """``ours_step`` (the step on the slot's servers: its output and whether the client sends
        the next slot the step), hedged (hedging.py) once late (step_deadlines.py) by the step on
        spare servers with the slot's history replayed. A late server is not banned (it may be
        slow, not broken); one that fails is. Returns the output, whether the client sends the
        next slot the step, and whether spares took the slot over."""
        recovery, ours = self.recovery, slot.spans
        late_after = slot.times.late_after(hidden.shape[1], self.step_timeout)
        if recovery is None or late_after >= self.step_timeout:
            return (*await ours_step(), False)
        spares: list[RemoteSpan] = []

        async def spare_step() -> tuple[torch.Tensor, bool] | None:
            if not self.hedges.allows():
                return None
            self.hedges.spend()
            late = frozenset(span.hop.server.peer_id for span in ours)
            log.warning(
                "blocks %d:%d late on %s (no answer in %.2f s): hedging on a spare",
                *(slot.start, slot.end, ", ".join(p[-8:] for p in late), late_after),
            )
            recovery.log_event("late", slot.start, slot.end, ours[0].hop.server.peer_id, late_after)
            spares.extend(await recovery.hedge(self, slot, late) or ())
            try:
                return (
                    (await self._run_spans(spares, hidden, position, step_id), True)
                    if spares
                    else None
                )
            except HopFailed as failure:
                ban(recovery.bans, failure, recovery.clock())
                return None

        t0 = time.perf_counter()
        try:
            result = await hedged(ours_step, spare_step, late_after, (HopFailed, PushUnproven))
        except BaseException:
            await recovery.retire(spares)
            raise
        if isinstance(result.failure, PushUnproven):  # pushed on, maybe: _unpush redoes the step
            await recovery.retire(spares)
            raise result.failure
        if not result.by_spare:
            await recovery.retire(spares)
            return (*result.value, False)
        if isinstance(result.failure, HopFailed):
            ban(recovery.bans, result.failure, recovery.clock())
        await recovery.retire(ours)  # late or failed: the spares hold the slot's cache now
        recovery.adopt(slot, spares, late_after, time.perf_counter() - t0)
        return (*result.value, True)

    async def _recover(self, slot: Slot, failure: HopFailed) -> None:
        if self.recovery is None:
            raise failure.cause
        await self.recovery.recover(self, slot, failure)
        index = self._slots.index(slot)
        # the previous server pushes to the lost session: the client sends from now on
        if index > 0:
            self._slots[index - 1].spans[-1].pushes = False

    async def _hop(
        self, span: RemoteSpan, hidden: torch.Tensor, position: int, step_id: int
    ) -> torch.Tensor:
        """Send a step to one server and read its answer; a failure of the server -> HopFailed."""
        t0 = trio.current_time()
        with HopFailed.on_failure(span):
            await self.send_step(span, hidden, step_id, position)
            out = self.output(span, await self.receive_step(span, step_id), hidden)
        if self.observe is not None and hidden.shape[1] == 1:
            self.observe(span.hop, trio.current_time() - t0)
        return out

    def output(
        self,
        span: RemoteSpan,
        reply: m.StepResponse,
        sent: torch.Tensor,
        given: WireTensor | None = None,
    ) -> torch.Tensor:
        """The hidden states of a step's answer, checked before anything uses them: the shape and
        dtype of what was sent, and finite (a server answering otherwise has failed: recovery
        replaces it, rather than the next hop or the head being blamed for its output).
        ``given``: the input as another server pushed it (``sent`` is its decoding)."""
        out = compression.decode(reply.hidden, max_numel=sent.numel())
        if out.shape != sent.shape or out.dtype != sent.dtype:
            raise RemoteProtocolError(
                f"{span.conn.peer_id} returned {tuple(out.shape)} {out.dtype}, "
                f"expected {tuple(sent.shape)} {sent.dtype}"
            )
        if not bool(torch.isfinite(out).all()):
            raise RemoteProtocolError(f"{span.conn.peer_id} returned hidden states with inf or nan")
        if span.answered is not None:
            answer = Answer(
                span.answered_to, sent, out, reply.hidden, reply.step_id, reply.receipt, given
            )
            span.answered.append(answer)
            span.answered_to += sent.shape[1]
        return out

    async def _pipelined(self, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        """Chunks flow hop to hop through memory channels; one task per hop keeps each stream serial."""
        pieces = [
            (self.steps.next_id(), self.position + a, hidden[:, a : a + chunk])
            for a in range(0, hidden.shape[1], chunk)
        ]
        outputs: list[torch.Tensor] = []
        try:
            await self._run_pipeline(pieces, outputs)
        except BaseExceptionGroup as group:  # one failure of one hop: raise it as itself
            raise sole_error(group) or group from None
        return torch.cat(outputs, dim=1)

    async def _run_pipeline(self, pieces: list[Piece], outputs: list[torch.Tensor]) -> None:
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[Piece](len(pieces))
            for piece in pieces:
                send.send_nowait(piece)
            send.close()
            for slot in self._slots:
                next_send, next_receive = trio.open_memory_channel[Piece](len(pieces))
                nursery.start_soon(self._hop_worker, slot, receive, next_send)
                receive = next_receive
            async with receive:
                async for _, _, out in receive:
                    outputs.append(out)

    async def _hop_worker(
        self,
        slot: Slot,
        inbox: trio.MemoryReceiveChannel[Piece],
        outbox: trio.MemorySendChannel[Piece],
    ) -> None:
        async with inbox, outbox:
            async for step_id, position, piece in inbox:
                out = await self._through_slot(slot, piece, position, step_id)
                await outbox.send((step_id, position, out))

    async def _push_step(self, hidden: torch.Tensor, step_id: int, position: int) -> torch.Tensor:
        """One step with server-to-server push; any hop that did not get the step is sent it.

        A hop that refuses what the hop before pushed it (``bad_push``: not finite, a wrong shape or
        dtype) blames the pusher: that server is the one banned and replaced, and the client sends
        the refusing hop the step itself (what the pusher answered the client, checked)."""
        send = True  # the first hop always hears from us
        given: WireTensor | None = None  # the slot's input as the hop before answered it
        for index, slot in enumerate(self._slots):
            lost = False
            while True:
                t0 = trio.current_time()

                async def ours_step(
                    slot: Slot = slot,
                    hidden: torch.Tensor = hidden,
                    send: bool = send,
                    given: WireTensor | None = given,
                ) -> tuple[torch.Tensor, bool]:
                    nonlocal lost
                    out, send_next, lost = await self._push_slot(
                        slot, hidden, step_id, position, send, given
                    )
                    return out, send_next

                try:
                    out, send_next, moved = await self._hedged(
                        slot, hidden, position, step_id, ours_step
                    )
                except PushUnproven as unproven:
                    await self._unpush(index, slot, position, unproven)
                    send = True
                    continue
                except HopFailed as failure:
                    pusher = self._pusher(index, failure)
                    if pusher is None:
                        await self._recover(slot, failure)
                    else:
                        await self._recover(
                            self._slots[index - 1], HopFailed(pusher, failure.cause)
                        )
                    send = True  # the replacement servers were opened without push
                    continue
                break
            if lost or (moved and index > 0):  # the client sends this link's steps from now on
                self._slots[index - 1].spans[-1].pushes = False
            slot.times.observe(hidden.shape[1], trio.current_time() - t0)
            slot.remember(step_id, position, hidden, self.reorder_of(step_id))
            hidden, send, given = out, send_next, last_answer(slot.spans)
        return hidden

    async def _unpush(self, index: int, slot: Slot, position: int, unproven: PushUnproven) -> None:
        """A pushed step's answer came without proof of its input: the caches of ``slot`` and of
        every slot after it (pushes may have carried the step on) back to before the step, in
        fresh sessions on the same servers that take no pushes; the client sends them the step."""
        assert self.recovery is not None and self.verifier is not None
        log.warning("%s: the client sends the step itself from now on", unproven)
        if index > 0:
            self._slots[index - 1].spans[-1].pushes = False
        for later in self._slots[index:]:
            old = later.spans
            await self.recovery.rewind(self, later, position)
            await self.verifier.forget(old)

    def _pusher(self, index: int, failure: HopFailed) -> RemoteSpan | None:
        """The span that pushed what slot ``index``'s first span refused (``bad_push``), if so."""
        cause = failure.cause
        if not (isinstance(cause, RemoteError) and cause.code == "bad_push") or index == 0:
            return None
        if failure.span is not self._slots[index].spans[0]:
            return None  # only a slot's first span takes pushes
        pusher = self._slots[index - 1].spans[-1]
        return pusher if pusher.pushes else None

    async def _push_slot(
        self,
        slot: Slot,
        hidden: torch.Tensor,
        step_id: int,
        position: int,
        send: bool,
        given: WireTensor | None,
    ) -> tuple[torch.Tensor, bool, bool]:
        """The slot's output, whether the client must send the step to the next slot itself, and
        whether the step pushed to the slot never came (``_pushed_answer``). ``given``: the input
        as the hop before answered it; a checked session's server must prove it computed from
        exactly that (push_proof.py)."""
        lost = False
        for span in slot.spans:
            pushed = None
            with HopFailed.on_failure(span):
                if send:
                    await self.send_step(span, hidden, step_id, position)
                    reply = await self.receive_step(span, step_id)
                else:
                    reply, lost = await self._pushed_answer(span, step_id)
                    if reply is not None and self.verifier is not None:
                        pushed = proven(span, position, given, reply)
                if reply is None:  # the previous server's push failed here: send it ourselves
                    await self.send_step(span, hidden, step_id, position)
                    reply = await self.receive_step(span, step_id)
                hidden = self.output(span, reply, hidden, pushed)
            send, given = not (span.pushes and reply.pushed), reply.hidden
        return hidden, send, lost

    async def _pushed_answer(
        self, span: RemoteSpan, step_id: int
    ) -> tuple[m.StepResponse | None, bool]:
        """The answer to a step the previous server said it pushed here (None: the push failed,
        send the step), and whether the push never came within the step deadline. Then the client
        sends the step itself and neither server is banned: a pusher that did not push and a
        server that ignored the push look the same from here."""
        try:
            return await self.receive_step(span, step_id, sent=False), False
        except trio.TooSlowError:
            log.info(
                "no answer from %s to pushed step %d: the client sends it",
                span.conn.peer_id,
                step_id,
            )
            return None, True

    async def send_step(
        self, span: RemoteSpan, hidden: torch.Tensor, step_id: int, position: int
    ) -> None:
        wire = compression.encode(hidden, self.uplink)
        keep = self._keep if self._keep == position and span.keeps else -1
        req = m.StepRequest(
            session_id=span.session_id,
            step_id=step_id,
            position=position,
            hidden=wire,
            keep=keep,
            reorder=self.reorder_of(step_id),
        )
        with trio.fail_after(self.step_timeout):
            await span.conn.send(req)

    async def receive_step(
        self, span: RemoteSpan, step_id: int, *, sent: bool = True
    ) -> m.StepResponse | None:
        """The hop's answer to step ``step_id`` (older duplicates skipped); None: the push of a
        step we did not send failed there."""
        with trio.fail_after(self.step_timeout):
            while True:
                reply = span.answers.step_answer(await span.conn.receive(), step_id, sent=sent)
                if reply is False:
                    log.info("push to %s failed: the client sends the step", span.conn.peer_id)
                    return None
                if reply is not None:
                    return reply
                log.debug("dropped an answer to an older step from %s", span.conn.peer_id)


async def _close_span(span: RemoteSpan) -> None:
    """Ends a span's session on its server (best effort, within 2 s) and closes the stream."""
    await close_session(span.conn, span.session_id)
