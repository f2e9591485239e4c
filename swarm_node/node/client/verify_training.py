"""Spot checks of training hops (remote_sequential.py): a forward or backward sent to a server is,
with probability ``rate``, also sent to another server of the same blocks, at the same time (the
pass waits for the slower of the two, not for one after the other). The answers (a forward's
output; a backward's gradients for the input, the deep prompts and the client-owned LoRA) are
compared position by position within the calibrated bound (tolerances.py), as inference checks
are. A mismatch goes to a third server: the
one of the two it disagrees with is banned for ``ban_seconds`` and the answer of the honest one is
used, so the pass goes on with honest numbers. No third server, or one agreeing with neither:
nobody is banned and the first answer is used (logged).

Training hops hold no cache, so the check is the request itself, sent again; the checker keeps no
graph (a backward it is asked to check recomputes its forward).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
import trio

from swarm_node.dht.bans import BanList
from swarm_node.dht.routing import Hop
from swarm_node.errors import MissingBlocksError
from swarm_node.node.client.recovery import HopFailed
from swarm_node.node.client.tolerances import bound, position_errors, weights_kind
from swarm_node.node.client.verification import other_operator

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(kw_only=True)
class TrainingCheckStats:
    checks: int = 0  # hops compared with another server's answer
    mismatches: int = 0
    liars: list[str] = field(default_factory=list)  # servers banned for a wrong answer
    inconclusive: int = 0


@dataclass(frozen=True, kw_only=True)
class CheckedCall(Generic[T]):
    """One training hop to check: how to ask a server, and where its answer's tensor is."""

    primary: Callable[[], Awaitable[tuple[Hop, T]]]  # the hop as the pass sends it (hedged)
    again: Callable[[Hop], Awaitable[T]]  # the same request to another server (keeps no graph)
    other: Callable[
        [frozenset[str]], Awaitable[Hop | None]
    ]  # a server of the blocks, none of these
    tensors: Callable[[T], list[torch.Tensor | None]]  # the answer's compared tensors
    codec: str  # the codec both answers travel in
    hop: Hop  # the hop as the pass chose it


class TrainingChecks:
    """The spot checks of one RemoteSequential's hops (see the module's docstring)."""

    def __init__(
        self,
        *,
        rate: float,
        bans: BanList,
        ban_seconds: float,
        rng: random.Random | None = None,
    ) -> None:
        self.rate = rate
        self.bans = bans
        self.ban_seconds = ban_seconds
        self.rng = rng or random.Random()
        self.stats = TrainingCheckStats()

    def due(self) -> bool:
        return self.rate > 0 and self.rng.random() < self.rate

    async def run(self, call: CheckedCall[T]) -> tuple[Hop, T]:
        """``call.primary()``, checked against another server when one exists (of another
        operator where any): the hop whose answer to use and that answer."""
        hop = call.hop
        checked: list[tuple[Hop, T]] = []
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ask_other, call, frozenset({hop.server.peer_id}), checked)
            try:
                used, answer = await call.primary()
            except BaseException as exc:  # noqa: BLE001 (raised below, outside the nursery)
                failure = exc
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if not checked or checked[0][0].server.peer_id == used.server.peer_id:
            return used, answer
        other, theirs = checked[0]
        limit = _bound(used, other, call.codec)
        error = _error(call.tensors(answer), call.tensors(theirs))
        self.stats.checks += 1
        if error <= limit:
            return used, answer
        self.stats.mismatches += 1
        return await self._break_tie(call, (used, answer), (other, theirs), error, limit)

    async def _ask_other(
        self, call: CheckedCall[T], avoid: frozenset[str], into: list[tuple[Hop, T]]
    ) -> None:
        async def find(avoiding: frozenset[str]) -> list[Hop] | None:
            try:
                other = await call.other(avoiding)
            except (MissingBlocksError, trio.TooSlowError):
                return None
            return None if other is None else [other]

        try:
            chain, _ = await other_operator(find, call.hop, avoid)
            if chain is not None:
                into.append((chain[0], await call.again(chain[0])))
        except (HopFailed, MissingBlocksError, trio.TooSlowError) as exc:
            log.info("no check of a training hop: %s", exc)
        except Exception as exc:  # noqa: BLE001 (a check's failure never ends the pass)
            log.warning("checking a training hop failed: %r", exc)

    async def _break_tie(
        self,
        call: CheckedCall[T],
        first: tuple[Hop, T],
        second: tuple[Hop, T],
        error: float,
        limit: float,
    ) -> tuple[Hop, T]:
        avoid = frozenset({first[0].server.peer_id, second[0].server.peer_id})
        third: list[tuple[Hop, T]] = []
        await self._ask_other(call, avoid, third)
        if third:
            judge = call.tensors(third[0][1])
            for honest, liar in ((first, second), (second, first)):
                vs_honest = _error(call.tensors(honest[1]), judge)
                vs_liar = _error(call.tensors(liar[1]), judge)
                if vs_honest <= _bound(honest[0], third[0][0], call.codec) and vs_liar > _bound(
                    liar[0], third[0][0], call.codec
                ):
                    self._condemn(liar[0], vs_liar)
                    return honest
        self.stats.inconclusive += 1
        log.warning(
            "%s and %s disagree on a training hop of blocks %d:%d (%.2e > %.2e) and no third "
            "server settles it: nobody banned",
            *(first[0].server.peer_id[-8:], second[0].server.peer_id[-8:]),
            *(first[0].start, first[0].end, error, limit),
        )
        return first

    def _condemn(self, hop: Hop, error: float) -> None:
        self.bans.ban_for(hop.server.peer_id, trio.current_time(), self.ban_seconds)
        self.stats.liars.append(hop.server.peer_id)
        log.warning(
            "%s answered a training hop of blocks %d:%d wrongly (relative error %.2e, confirmed "
            "by a third server): banned for %.0f s",
            *(hop.server.peer_id, hop.start, hop.end, error, self.ban_seconds),
        )


def _bound(a: Hop, b: Hop, codec: str) -> float:
    kinds = (
        weights_kind(a.server.dtype, a.server.quant),
        weights_kind(b.server.dtype, b.server.quant),
    )
    return bound(kinds, (codec, codec))


def _error(ours: list[torch.Tensor | None], theirs: list[torch.Tensor | None]) -> float:
    """The largest relative distance between two answers' tensors, each compared along its last
    dimension (a flat gradient as one vector); a tensor one answer lacks counts as a mismatch."""
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        if a is None or b is None:
            if (a is None) != (b is None):
                return float("inf")
            continue
        if a.shape != b.shape:
            return float("inf")
        rows = a.reshape(1, -1, a.shape[-1]) if a.ndim else a.reshape(1, 1, 1)
        worst = max(worst, float(position_errors(rows, b.reshape(rows.shape)).max()))
    return worst
