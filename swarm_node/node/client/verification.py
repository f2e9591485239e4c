"""Spot checks of what servers compute: the same hop input, run again on another server.

Every server of a session keeps a log of what it was sent and what it answered (``RemoteSpan.
answered``: one entry per step, positions from 0). After each step, with probability ``rate``, a
server is due a check: a background task (the session's, off the token's path) sends every input
the server answered since its last check to a *checker*, a session on another server holding the
same blocks (other peers; the one carrying the blocks is never its own checker), as one prefill that
continues the checker's own cache, and compares the answers position by position within the
calibrated bound (tolerances.py). So every position a server answered is compared once a check
comes; ``rate`` sets how soon (a check every 1/rate steps on average) and how many round trips the
checkers take, not which positions are looked at. A server of a push chain is checked as any
other: its answer to a pushed step is logged only once its signed receipt shows that it computed
from exactly what the pushing server answered the client (inference_session.py), so the client
holds its true input.

A mismatch is settled by a third server (other than both), which replays the whole log as a
prefill: the one of the two it agrees with is honest; the other is banned for ``ban_seconds``. A
lying server yields a ``Finding`` (the first position it got wrong): the session rolls every hop
back to there and the caller redoes the steps from it (``RolledBack``). When there is no third
server, or it agrees with neither, nobody is banned and the checker is replaced.

This module knows neither tokens nor sampling (generation.py redoes the steps) nor the DHT
(``reroute`` finds servers).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import trio

from swarm_node import compression
from swarm_node.dht.bans import BanList
from swarm_node.dht.receipts import Receipt
from swarm_node.dht.routing import Hop
from swarm_node.errors import MissingBlocksError, SwarmError
from swarm_node.node.client.evidence import Evidence, SignedStep, digest
from swarm_node.node.client.recovery import HopFailed, Reroute, UnopenedSpan, close_quietly
from swarm_node.node.client.tolerances import bound, position_errors, weights_kind
from swarm_node.protocol.tensors import WireTensor

if TYPE_CHECKING:
    from swarm_node.node.client.inference_session import InferenceSession, RemoteSpan

log = logging.getLogger(__name__)

NO_CHECKER_RETRY = 30.0  # seconds before looking again for a checker of blocks that had none


class RolledBack(SwarmError):
    """A server's lie was found: every hop went back to ``position`` (the positions before it
    agreed on checks); the caller sends the steps from there again."""

    def __init__(self, position: int, liar: str) -> None:
        super().__init__(f"{liar} answered wrongly from position {position}: rolled back there")
        self.position = position
        self.liar = liar


@dataclass(frozen=True, slots=True)
class Answer:
    """One step a server answered: its input and output ``# (B, T, H)``, the answer as it
    travelled, the server's signature of the step's receipt, and the input as it travelled when
    another server pushed it (its receipt proved it: inference_session.py)."""

    position: int
    sent: torch.Tensor
    out: torch.Tensor
    wire: WireTensor
    step_id: int
    receipt: str
    given: WireTensor | None = None

    @property
    def codec(self) -> str:
        return self.wire.codec


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """A server that answered wrongly, found by a check and confirmed by a third server."""

    liar: str
    start: int
    end: int
    position: int  # the first position it got wrong
    error: float  # its relative distance from the checker there
    bound: float
    epoch: int  # rollbacks the session had done when the check began
    evidence: Evidence | None = None  # its signed steps up to the wrong one (evidence.py)


@dataclass(slots=True, eq=False)
class Checker:
    """Another server's session kept level with one checked server's, up to ``done`` answers."""

    spans: list[RemoteSpan] | None = None
    done: int = 0  # answers of the checked server compared so far
    position: int = 0  # positions the checker's cache holds
    step_id: int = 0
    no_checker_until: float = 0.0
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass(kw_only=True)
class VerifyStats:
    checks: int = 0  # checks that compared at least one position
    positions: int = 0  # positions compared
    mismatches: int = 0
    tie_breaks: int = 0
    liars: list[str] = field(default_factory=list)  # servers found lying (each also banned)
    inconclusive: int = 0
    worst: float = 0.0  # the largest error / bound seen where the two agreed


class Verifier:
    """The spot checks of one inference session (see the module's docstring)."""

    def __init__(
        self,
        *,
        rate: float,
        reroute: Reroute,
        bans: BanList,
        clock: Callable[[], float],
        ban_seconds: float,
        rng: random.Random | None = None,
        on_found: Callable[[Finding], object] | None = None,
    ) -> None:
        self.rate = rate
        self.on_found = on_found  # hears of each server caught lying (evidence to publish)
        self.reroute = reroute
        self.bans = bans
        self.clock = clock
        self.ban_seconds = ban_seconds
        self.rng = rng or random.Random()
        self.checkers: dict[RemoteSpan, Checker] = {}
        self.findings: list[Finding] = []  # not acted on yet
        self.found: list[Finding] = []  # every server caught lying in this session
        self.rollbacks: list[int] = []  # positions the session rolled back to, in order
        self.stats = VerifyStats()
        self._due: list[RemoteSpan] = []
        self._wake = trio.Event()

    def stepped(self, spans: list[RemoteSpan]) -> None:
        """A step went through ``spans``: each is due a check with probability ``rate``, and after
        its first step (the prompt, or a replacement's replayed history) always."""
        for span in spans:
            first = span not in self.checkers
            if span not in self._due and (first or self.rng.random() < self.rate):
                self._due.append(span)
                self.checkers.setdefault(span, Checker())
                self._wake.set()

    async def run(self, session: InferenceSession) -> None:
        """Check the due servers, one at a time, until cancelled (the session's background task)."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._due:
                span = self._due.pop(0)
                if span in session.live_spans():
                    try:
                        await self.check(session, span)
                    except Exception as exc:  # noqa: BLE001 (a check's failure never ends the session)
                        log.warning("checking %s failed: %r", span.hop.server.peer_id[-8:], exc)

    async def settle(self, session: InferenceSession) -> None:
        """Check every server of the session now, up to its last answer."""
        async with trio.open_nursery() as nursery:
            for span in session.live_spans():
                nursery.start_soon(self._check_quietly, session, span)

    async def _check_quietly(self, session: InferenceSession, span: RemoteSpan) -> None:
        try:
            await self.check(session, span)
        except Exception as exc:  # noqa: BLE001 (settling is best effort, like any check)
            log.warning("checking %s failed: %r", span.hop.server.peer_id[-8:], exc)

    def finding(self) -> Finding | None:
        """The earliest finding still meaning something (not undone by a later rollback)."""
        valid = []
        for found in self.findings:
            later = self.rollbacks[found.epoch :]
            if not later or found.position < min(later):
                valid.append(found)
        self.findings = []
        return min(valid, key=lambda f: f.position) if valid else None

    async def forget(self, spans: list[RemoteSpan]) -> None:
        """``spans`` left the session: drop their checkers."""
        for span in spans:
            checker = self.checkers.pop(span, None)
            if checker is not None and checker.spans:
                await close_quietly(checker.spans)

    async def aclose(self) -> None:
        await self.forget(list(self.checkers))

    async def check(self, session: InferenceSession, span: RemoteSpan) -> None:
        checker = self.checkers.setdefault(span, Checker())
        async with checker.lock:
            answered = span.answered or []
            new = answered[checker.done :]
            if not new or self.clock() < checker.no_checker_until:
                return
            if checker.spans is None and not await self._open_checker(session, span, checker):
                return
            assert checker.spans is not None
            epoch = len(self.rollbacks)
            base = checker.position
            if new[0].position != base:  # never: a server's answers are contiguous from 0
                log.warning("the answers of %s have a gap: not checked", span.hop.server.peer_id)
                return
            sent = torch.cat([a.sent for a in new], dim=1)  # (B, T, H)
            theirs = torch.cat([a.out for a in new], dim=1)  # (B, T, H)
            try:
                ours, codecs = await run_chain(session, checker.spans, sent, base, checker)
            except HopFailed as failure:  # the checker failed: another one next time
                log.info("checker for %s failed: %s", span.hop.server.peer_id[-8:], failure)
                await self.drop_checker(checker)
                return
            checker.done += len(new)
            checker.position += sent.shape[1]
            limit = self._bound(span, new, checker.spans, codecs)
            errors = position_errors(ours, theirs)  # (T,)
            self.stats.checks += 1
            self.stats.positions += int(errors.numel())
            worst = float(errors.max())
            if worst <= limit:
                self.stats.worst = max(self.stats.worst, worst / limit)
                return
            self.stats.mismatches += 1
            first = int((errors > limit).nonzero()[0, 0])
            wrong = Finding(
                liar=span.hop.server.peer_id,
                start=span.hop.start,
                end=span.hop.end,
                position=base + first,
                error=float(errors[first]),
                bound=limit,
                epoch=epoch,
                evidence=evidence_of(session, span, answered, base + first),
            )
            await self._break_tie(session, span, checker, answered[: checker.done], ours, wrong)

    def _bound(
        self,
        span: RemoteSpan,
        answers: list[Answer],
        others: list[RemoteSpan],
        codecs: set[str],
    ) -> float:
        """The loosest bound between ``span``'s server and any of ``others``' servers."""
        kind = _kind(span.hop)
        ours = {a.codec for a in answers}
        return max(
            bound((kind, _kind(other.hop)), (mine, theirs))
            for other in others
            for mine in ours
            for theirs in codecs
        )

    async def _open_checker(
        self, session: InferenceSession, span: RemoteSpan, checker: Checker
    ) -> bool:
        avoid = frozenset({span.hop.server.peer_id})
        spans = await self._open_other(session, span.hop, avoid)
        if spans is None:
            checker.no_checker_until = self.clock() + NO_CHECKER_RETRY
            return False
        checker.spans, checker.done, checker.position, checker.step_id = spans, 0, 0, 0
        return True

    async def _open_other(
        self, session: InferenceSession, hop: Hop, avoid: frozenset[str]
    ) -> list[RemoteSpan] | None:
        """Sessions for ``hop``'s blocks on servers none of ``avoid`` (None: there are none)."""

        async def find(avoiding: frozenset[str]) -> list[Hop] | None:
            try:
                chain = await self.reroute(hop.start, hop.end, 0, avoiding)
            except (MissingBlocksError, trio.TooSlowError) as exc:
                log.debug("no other server for blocks %d:%d: %s", hop.start, hop.end, exc)
                return None
            return None if any(h.server.peer_id in avoiding for h in chain) else chain

        chain, avoid = await other_operator(find, hop, avoid)
        if chain is None:
            return None
        unlike = frozenset(h.server.peer_id for h in chain if _kind(h) != _kind(hop))
        if unlike:  # servers rounding as ``hop``'s does give the tightest bound: any there?
            alike = await find(avoid | unlike)
            if alike and all(_kind(h) == _kind(hop) for h in alike):
                chain = alike
        spans: list[RemoteSpan] = []
        try:
            for other in chain:
                with HopFailed.on_failure(UnopenedSpan(other)):
                    opened = await session.open_span(other)
                opened.answered = None  # a checker's own answers are not checked
                spans.append(opened)
        except HopFailed as failure:
            log.info("could not open a checker for blocks %d:%d: %s", hop.start, hop.end, failure)
            await close_quietly(spans)
            return None
        return spans

    def truncated(self, spans: list[RemoteSpan], length: int) -> list[Checker]:
        """The session forgot every position from ``length`` on (speculative decoding's rejected
        drafts): each server's answers past it are forgotten too (one that straddles it is cut;
        its wire and receipt stay whole, as signed), and a checker whose cache went past it starts
        over. Returns the checkers left behind: close them (``drop_checker``)."""
        stale: list[Checker] = []
        for span in spans:
            if span.answered is None:
                continue
            kept: list[Answer] = []
            for answer in span.answered:
                if answer.position >= length:
                    break
                cut = length - answer.position
                if cut < answer.sent.shape[1]:
                    answer = replace(answer, sent=answer.sent[:, :cut], out=answer.out[:, :cut])
                kept.append(answer)
            span.answered = kept
            span.answered_to = min(span.answered_to, length)
            checker = self.checkers.get(span)
            if checker is not None and checker.position > length:
                stale.append(checker)
                self.checkers[span] = Checker()
        return stale

    def reordered(self, spans: list[RemoteSpan], rows: tuple[int, ...]) -> list[Checker]:
        """Beam search moved the caches' rows (row i becomes what row ``rows[i]`` was): what each
        server answered moves the same way (a checker's replay of it then builds the moved
        cache), and every checker starts over. Returns the checkers left behind: close them."""
        index = torch.tensor(rows, dtype=torch.long)
        stale: list[Checker] = []
        for span in spans:
            if span.answered is None:
                continue
            span.answered = [
                replace(a, sent=a.sent.index_select(0, index), out=a.out.index_select(0, index))
                for a in span.answered
            ]
            checker = self.checkers.get(span)
            if checker is not None and checker.position > 0:
                stale.append(checker)
                self.checkers[span] = Checker()
        return stale

    async def drop_checker(self, checker: Checker) -> None:
        if checker.spans:
            await close_quietly(checker.spans)
        checker.spans, checker.done, checker.position = None, 0, 0

    async def _break_tie(
        self,
        session: InferenceSession,
        span: RemoteSpan,
        checker: Checker,
        history: list[Answer],
        ours: torch.Tensor,
        wrong: Finding,
    ) -> None:
        """A third server replays ``history``; the one of the two it disagrees with is banned
        (``wrong``: the finding, should it be ``span``'s server)."""
        assert checker.spans is not None
        limit = wrong.bound
        base = history[-1].position + history[-1].sent.shape[1] - ours.shape[1]
        theirs = torch.cat([a.out for a in history], dim=1)[:, base:]
        checked = span.hop.server.peer_id
        helpers = [s.hop.server.peer_id for s in checker.spans]
        self.stats.tie_breaks += 1
        third = await self._open_other(session, span.hop, frozenset({checked, *helpers}))
        verdict = "no third server"
        if third is not None:
            try:
                sent = torch.cat([a.sent for a in history], dim=1)  # (B, T, H)
                out, _ = await run_chain(session, third, sent, 0, Checker())
            except HopFailed as failure:
                verdict = f"the third server failed: {failure}"
            else:
                window = out[:, base : base + ours.shape[1]]
                vs_theirs = float(position_errors(window, theirs).max())
                vs_ours = float(position_errors(window, ours).max())
                if vs_ours <= limit < vs_theirs:
                    self._condemn(checked, span.hop, vs_theirs, limit)
                    self.findings.append(wrong)
                    self.found.append(wrong)
                    if self.on_found is not None:
                        self.on_found(wrong)
                    return
                if vs_theirs <= limit < vs_ours:
                    for helper, other in zip(helpers, checker.spans, strict=True):
                        self._condemn(helper, other.hop, vs_ours, limit)
                    await self.drop_checker(checker)
                    return
                verdict = f"it agrees with neither ({vs_theirs:.2e}, {vs_ours:.2e} > {limit:.2e})"
            finally:
                await close_quietly(third)
        self.stats.inconclusive += 1
        log.warning(
            "%s and its checker %s disagree on blocks %d:%d and no tie-break (%s): nobody banned",
            *(checked[-8:], ",".join(p[-8:] for p in helpers), span.hop.start, span.hop.end),
            verdict,
        )
        await self.drop_checker(checker)

    def _condemn(self, peer: str, hop: Hop, error: float, limit: float) -> None:
        """Ban a server two others outvoted."""
        self.bans.ban_for(peer, self.clock(), self.ban_seconds)
        self.stats.liars.append(peer)
        log.warning(
            "%s answered blocks %d:%d wrongly (relative error %.2e > %.2e, confirmed by a third "
            "server): banned for %.0f s",
            *(peer, hop.start, hop.end, error, limit, self.ban_seconds),
        )


def _kind(hop: Hop) -> str:
    return weights_kind(hop.server.dtype, hop.server.quant)


OPERATOR_TRIES = 4  # lookups for a checker of another operator before taking one of the same


async def other_operator(
    find: Callable[[frozenset[str]], Awaitable[list[Hop] | None]],
    hop: Hop,
    avoid: frozenset[str],
) -> tuple[list[Hop] | None, frozenset[str]]:
    """``find(avoid)``'s chain for ``hop``'s blocks, preferring one with no server of ``hop``'s
    operator (when its record names one): servers of that operator are left out while others
    are found. The chain (None: none at all) and what a further lookup should avoid."""
    chain = await find(avoid)
    operator = hop.server.operator
    for _ in range(OPERATOR_TRIES if operator else 0):
        same = frozenset(h.server.peer_id for h in chain or () if h.server.operator == operator)
        if not same:
            break
        other = await find(avoid | same)
        if other is None:  # only servers of the same operator hold the blocks: still other peers
            log.debug(
                "no checker of another operator than %r for blocks %d:%d",
                operator,
                hop.start,
                hop.end,
            )
            break
        avoid, chain = avoid | same, other
    return chain, avoid


async def run_chain(
    session: InferenceSession,
    spans: list[RemoteSpan],
    hidden: torch.Tensor,
    position: int,
    checker: Checker,
) -> tuple[torch.Tensor, set[str]]:
    """``hidden`` ``# (B, T, H)`` at ``position`` through ``spans`` in prefill chunks; the output
    and the codecs the last span answered in. A failure of a server -> HopFailed."""
    chunk = session.chunk_tokens(hidden)
    outs: list[torch.Tensor] = []
    codecs: set[str] = set()
    for a in range(0, hidden.shape[1], chunk):
        piece = hidden[:, a : a + chunk]
        checker.step_id += 1
        for span in spans:
            with HopFailed.on_failure(span):
                await session.send_step(span, piece, checker.step_id, position + a)
                reply: Any = await session.receive_step(span, checker.step_id)
                if span is spans[-1]:
                    codecs.add(reply.hidden.codec)
                piece = session.output(span, reply, piece)
        outs.append(piece)
    return torch.cat(outs, dim=1), codecs


def evidence_of(
    session: InferenceSession, span: RemoteSpan, answered: list[Answer], wrong: int
) -> Evidence:
    """``span``'s signed steps from position 0 to the end of the one holding position ``wrong``
    (the inputs as they travelled: pushed, or as the client sent them, ``session.uplink``,
    deterministic)."""
    steps = []
    hop = span.hop
    for answer in answered:
        if answer.position > wrong:
            break
        sent = answer.given
        if sent is None:
            sent = compression.encode(answer.sent, session.uplink)
        receipt = Receipt(
            model=hop.server.model_digest,
            start=hop.start,
            end=hop.end,
            session_id=span.session_id,
            step_id=answer.step_id,
            position=answer.position,
            input_digest=digest(sent),
            output_digest=digest(answer.wire),
        )
        steps.append(
            SignedStep(receipt=receipt, signature=answer.receipt, sent=sent, answer=answer.wire)
        )
    return Evidence(server=hop.server.peer_id, steps=tuple(steps), wrong=wrong)
