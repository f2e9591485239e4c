"""A hedged call: the work on its server and, once that is late, the same work on a spare server;
the first answer wins and the other is cancelled. Used for inference steps (inference_session.py)
and training requests (remote_sequential.py); when a call is late: step_deadlines.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Hedged(Generic[T]):
    value: T
    by_spare: bool  # the spare answered first
    failure: Exception | None  # the primary's failure, when the spare answered after it


async def hedged(
    primary: Callable[[], Awaitable[T]],
    spare: Callable[[], Awaitable[T | None]],
    late_after: float,
    failures: tuple[type[Exception], ...],
) -> Hedged[T]:
    """``primary()``; after ``late_after`` s without its answer, ``spare()`` too (None: it had
    nothing to offer; it handles its own failures). The first answer wins. A failure of ``primary``
    (one of ``failures``) before the spare started, or with no spare answer after it, is raised."""
    won: list[Hedged[T]] = []
    failed: list[Exception] = []
    running = {"primary": True, "spare": False}

    def done(side: str, nursery: trio.Nursery) -> None:
        running[side] = False
        if won or not any(running.values()):
            nursery.cancel_scope.cancel()

    async def first(nursery: trio.Nursery) -> None:
        try:
            value = await primary()
        except failures as exc:
            failed.append(exc)
        else:
            won.append(Hedged(value, False, None))
        done("primary", nursery)

    async def second(nursery: trio.Nursery) -> None:
        await trio.sleep(late_after)
        if not running["primary"]:
            return
        running["spare"] = True
        value = await spare()
        if value is not None and not won:
            won.append(Hedged(value, True, failed[0] if failed else None))
        done("spare", nursery)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first, nursery)
        nursery.start_soon(second, nursery)
    if won:
        return won[0]
    raise failed[0]
