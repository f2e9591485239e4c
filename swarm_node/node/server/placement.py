"""Where a ``serve --num-blocks N`` server sits: chosen at start, re-checked now and then.

The trio shell around dht/span_selection.py. At start: a random delay (servers joining together do
not all see the same swarm and pile onto the same blocks), a lookup of the model's servers, the
choice, then the span is loaded and served. Then every ~``rebalance_interval`` seconds (jittered)
it looks again and moves when span_selection says the move pays and uncovers nothing. A move is
claimed in the record first and checked once more (rebalance_loop says why). A move loads
the new span first, sends new sessions there and announces it, then gives the sessions on the old
span up to ``move_grace`` seconds to finish; those left are cut, and their clients' recovery hands
them to other servers. Knows nothing of what sessions compute or of the wire.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import trio

from swarm_node.dht.records import ServerRecord
from swarm_node.dht.span_selection import (
    better_start,
    block_coverage,
    choose_span,
    conflicting_moves,
)
from swarm_node.errors import ConfigError, SwarmError
from swarm_node.model.bundled import model_id_of
from swarm_node.node.config import ServerConfig
from swarm_node.node.server.loading import prepare_span

log = logging.getLogger(__name__)

Fetch = Callable[[], Awaitable[list[ServerRecord]]]


async def choose_start(
    fetch: Fetch,
    *,
    model: str,
    total_blocks: int,
    length: int,
    throughput: float,
    start_delay: float,
    rng: random.Random,
    now: Callable[[], float],
) -> int:
    """Wait a random part of ``start_delay``, look at the swarm, and pick the first block to serve."""
    await trio.sleep(rng.uniform(0, start_delay))
    servers = await fetch()
    coverage = block_coverage(servers, model=model, num_blocks=total_blocks, now=now())
    return choose_span(coverage, length=length, throughput=throughput)


async def rebalance_loop(
    fetch: Fetch,
    *,
    me: Callable[[], ServerRecord],
    claim: Callable[[int | None], Awaitable[None]],
    move: Callable[[int], Awaitable[None]],
    total_blocks: int,
    interval: float,
    min_gain: float,
    rng: random.Random,
    now: Callable[[], float],
) -> None:
    """Forever: sleep ~``interval`` (0.5x to 1.5x, so servers do not re-check in step), look, maybe move.

    A move is claimed before it is made: ``claim(target)`` announces it, a second look checks that
    no other server claims a move touching the same blocks and that the move still pays, and only
    then ``move(target)`` loads and switches (announcing the new span clears the claim); otherwise
    ``claim(None)`` withdraws it. Two servers claiming at once: the later claim is announced after the
    earlier one, so the later server's second look sees the earlier claim (or both see each other's
    and both give up, to retry at their next jittered re-check) -- never two moves off the same blocks.
    """
    while True:
        await trio.sleep(interval * rng.uniform(0.5, 1.5))
        servers = await _look(fetch)
        if servers is None:
            continue
        target = better_start(
            servers, me=me(), num_blocks=total_blocks, now=now(), min_gain=min_gain
        )
        if target is None or _waits_for_others(servers, me(), target, now()):
            continue
        await claim(target)
        fresh = await _look(fetch)
        still = (
            fresh is not None
            and not _waits_for_others(fresh, me(), target, now())
            and better_start(fresh, me=me(), num_blocks=total_blocks, now=now(), min_gain=min_gain)
            == target
        )
        if not still:
            log.info("gave up the move to block %d: the swarm changed while it was claimed", target)
            await claim(None)
            continue
        try:
            await move(target)
        except (SwarmError, OSError, MemoryError) as exc:  # keep serving where it is
            log.warning("could not move to block %d (%s); staying", target, exc)
            await claim(None)


async def _look(fetch: Fetch) -> list[ServerRecord] | None:
    try:
        return await fetch()
    except (SwarmError, trio.TooSlowError) as exc:
        log.warning("could not look up the swarm to re-check the span: %s", exc)
        return None


def _waits_for_others(
    servers: list[ServerRecord], me: ServerRecord, target: int, now: float
) -> bool:
    others = conflicting_moves(servers, me=me, target=target, now=now)
    if others:
        log.info(
            "not moving to block %d yet: %s moving over the same blocks",
            target,
            ", ".join(f"{s.peer_id[-8:]} ({s.start}:{s.end} -> {s.moving_to})" for s in others),
        )
    return bool(others)


async def start_placed(peer: Any, config: ServerConfig, nursery: trio.Nursery) -> None:
    """Choose ``config.num_blocks`` blocks for ``peer`` (a node.peer.Peer), serve them, and keep
    re-checking in ``nursery``."""
    from swarm_node.model import Checkpoint, identity_of, resolve_model

    assert config.num_blocks is not None
    path = await trio.to_thread.run_sync(resolve_model, config.model)
    total = (await trio.to_thread.run_sync(Checkpoint.open, path)).config.num_hidden_layers
    model = model_id_of(config.model)
    digest = (await trio.to_thread.run_sync(identity_of, config.model)).digest
    if config.num_blocks > total:
        raise ConfigError(
            f"'--num-blocks' must be at most the {total} blocks of {model}, got {config.num_blocks}"
        )
    rng = random.Random()

    async def fetch() -> list[ServerRecord]:
        """Servers of the same weights (looked up under their digest): those of other weights
        under the name cover nothing."""
        with trio.fail_after(peer.client_config.lookup_timeout):
            return await peer.dht.find_servers(model, range(total), digest=digest)

    start = await choose_start(
        fetch,
        model=model,
        total_blocks=total,
        length=config.num_blocks,
        throughput=config.throughput or 1.0,
        start_delay=config.start_delay,
        rng=rng,
        now=time.time,
    )
    placed = replace(config, start=start, end=start + config.num_blocks)
    log.info(
        "chose blocks %d:%d of %s (the swarm's weakest coverage)", placed.start, placed.end, model
    )
    await peer.start_serving(placed, await prepare_span(placed), nursery)
    nursery.start_soon(
        functools.partial(
            rebalance_loop,
            fetch,
            me=lambda: peer.make_record("ONLINE", peer.config.dht_ttl),
            claim=functools.partial(claim_move, peer),
            move=functools.partial(move_to, peer),
            total_blocks=total,
            interval=config.rebalance_interval,
            min_gain=config.min_gain,
            rng=rng,
            now=time.time,
        )
    )


async def claim_move(peer: Any, start: int | None) -> None:
    """Announce that ``peer`` is moving to blocks ``start..`` (None: is not moving any more)."""
    peer.moving_to = start
    try:  # the blocks it holds did not change: the record is enough
        await peer.announce(provide_blocks=False)
    except Exception:  # as a failed re-announce: the server goes on, its own copy updated
        log.warning("announcing the move claim (%s) failed", start, exc_info=True)


async def move_to(peer: Any, start: int) -> None:
    """Move ``peer``'s server to blocks ``start..``: load, switch, announce, then hand the old span over."""
    config = peer.server.config
    moved = replace(config, start=start, end=start + config.num_blocks)
    log.info("moving from blocks %d:%d to %d:%d", config.start, config.end, moved.start, moved.end)
    prepared = await prepare_span(moved)
    peer.moving_to = None  # the record announced with the new span claims nothing more
    old = await peer.switch_server(moved, prepared)
    if not await old.hand_over(moved.move_grace):
        log.info(
            "cut %d session(s) still on blocks %d:%d; their clients move them",
            old.active_sessions,
            config.start,
            config.end,
        )
