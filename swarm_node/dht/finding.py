"""Finding the servers of a model: a chain's or a complete lookup, over SwarmDHT's queries.

The model's provider keys (MODEL_KEY_SHARDS of them) are walked in parallel and each provider's
signed record fetched as its entry arrives (it says which blocks the server holds); blocks are
looked up one by one only where the model's keys may miss servers. A chain's lookup (``enough``)
first asks the peer it entered through for the servers it knows (dht/directory.py), reads the
records of servers it is not connected to from their copies at a connected peer, and stops once
the records cover the chain. How each query goes to the network is discovery.SwarmDHT's.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from swarm_node.dht.records import MODEL_KEY_SHARDS, ServerRecord, block_key, model_key

if TYPE_CHECKING:
    from swarm_node.dht.discovery import SwarmDHT

log = logging.getLogger(__name__)

# servers whose records one lookup fetches at once (each a dial when not connected): a chain's
# lookup starts no more once the records found cover the chain
# (its own slots: each asks a different server; with the walks' 8 it waited behind them) 16: in a
# 32-server swarm of 8 spans a chain was covered after ~24 records, 3 rounds of 8 (the first 8 of
# 32 cover all 8 spans 1 time in 20, the first 16 2 times in 3)
RECORD_FETCHES_AT_ONCE = 16
# seconds a chain's walk waits for the copies of the records of the providers found so far before
# asking farther peers (each a dial): in a 32-server swarm the entry's answers and copies cover a
# chain most times
WALK_WAITS_FOR_RECORDS = 0.5
# seconds a chain's walks wait for the directory answer of the peer entered through (connected: a
# round trip; the walks' first round would ask that same peer) before walking themselves: one that
# covers the chain ends the lookup there; a peer without a directory refuses it at once
DIRECTORY_HEAD_START = 1.0
PROVIDERS_PER_KEY = BUCKET_SIZE  # providers a py-libp2p peer keeps under one key
PEER_ADDR_TTL = 3600  # seconds the peerstore keeps addresses learned from records
MAX_DIGESTS_PER_NAME = 4  # digests a lookup by name follows to their block keys


async def find_servers(
    dht: SwarmDHT,
    model: str,
    blocks: Iterable[int] | None,
    *,
    now: float | None = None,
    digest: str = "",
    enough: Callable[[list[ServerRecord]], bool] | None = None,
) -> list[ServerRecord]:
    """Live servers of any of ``blocks`` of ``model`` (None: of any block, the model's keys
    alone: for a client that does not know the model's size yet) holding the weights of
    ``digest`` (model/identity.py), looked up under the digest's keys: servers of other weights
    are never found, whatever name they claim. Without a digest, under the name's model keys:
    the servers of every digest announced under it (a caller refuses a mixture).

    The model's keys (MODEL_KEY_SHARDS of them, in parallel) give its servers whatever the
    number of blocks; each server's signed record, fetched as soon as its provider entry
    arrives, says which blocks it holds. Blocks are looked up one by one (in parallel) only
    where that may miss servers: blocks that none of them holds (a server whose model-key
    announcement has not reached the peers asked yet), or every block when a model key may be
    full (PROVIDERS_PER_KEY providers or more: a peer keeps no more, first come first kept,
    the departed for 48 h). Blocks are keyed by digest: without one, under each digest the
    model's keys gave (MAX_DIGESTS_PER_NAME at most) and under the name (servers that predate
    digests).

    ``enough(records)``: a caller that needs some servers soon rather than all of them (a
    chain for a first token) first asks the peer it entered through for the servers it knows
    (``SwarmDHT.ask_directory``, dht/directory.py; the walks wait up to DIRECTORY_HEAD_START for
    its answer and run only if it leaves the chain uncovered), ends the walks once the records
    found are enough (the queries
    under way are cancelled: they waited up to a round trip more, 0.3 s of a first token at
    25 ms a hop), and dials no more servers for their records (RECORD_FETCHES_AT_ONCE at a
    time, those already connected first; those being fetched still arrive): a server not
    connected is read from its copy at a connected peer (``record_copy``: no dial) and asked
    itself only when that peer holds no valid copy, and a walk asks farther peers only once
    the records of the providers found so far are in. A fresh client of a 32-server swarm then
    dials about the servers of its chain (the route pings them and the session reuses the
    connections), not every server; the per-block lookups are then skipped."""
    now = time.time() if now is None else now
    found: dict[str, ServerRecord] = {}
    counts = [0] * MODEL_KEY_SHARDS  # providers each model key gave
    fetched: set[ID] = set()
    # providers whose records are to be fetched, in the order found (bounded by the walks)
    send, receive = trio.open_memory_channel[ID](math.inf)

    def satisfied() -> bool:
        full = max(counts) >= PROVIDERS_PER_KEY
        return enough is not None and not full and enough(list(found.values()))

    walks = trio.CancelScope()  # cancelled once the records found are enough
    pending = [0]  # providers queued, or being read from a copy
    fetched_lot = trio.lowlevel.ParkingLot()  # woken as each of those ends

    copies = enough is not None  # a chain's lookup: a copy first, the server if none

    async def fetch_records() -> None:
        async for peer in receive:
            rec = None
            try:
                if copies and not satisfied() and peer not in dht.host.get_connected_peers():
                    rec = await dht.record_copy(peer)
            finally:
                pending[0] -= 1
                fetched_lot.unpark_all()
            if rec is not None:
                keep_live(rec, model, digest, now, found)
            elif not satisfied():  # its own record (a copy may be missing or expired)
                await fetch_live(dht, peer, model, digest, now, found)
            if satisfied():
                walks.cancel()

    walked: set[int] = set()  # the model keys whose walks have done a round (or ended)

    def round_done(shard: int) -> None:
        walked.add(shard)
        fetched_lot.unpark_all()

    async def go_on(shard: int) -> bool:
        # a chain's walk asks farther peers (each a dial) once every model key's walk has done
        # a round and the copies of the records of the providers found so far are read (at the
        # connected entry: no dial, a round trip) and do not cover the chain, or
        # WALK_WAITS_FOR_RECORDS passed; not waiting on servers asked themselves (a dial each:
        # 0.5-0.8 s at 25 ms a hop)
        round_done(shard)
        with trio.move_on_after(WALK_WAITS_FOR_RECORDS if enough is not None else 0):
            while (pending[0] or len(walked) < MODEL_KEY_SHARDS) and not satisfied():
                await fetched_lot.park()
        return not satisfied()

    asked_directory = trio.Event()

    async def from_directory() -> None:
        # the servers the peer entered through knows of: a chain they cover needs no walk
        try:
            for rec in await dht.ask_directory(model, digest):
                if rec.peer_id not in found:
                    keep_live(rec, model, digest, now, found)
                    fetched.add(ID.from_base58(rec.peer_id))
        finally:
            asked_directory.set()
        if satisfied():
            walks.cancel()

    async def walk(shard: int) -> None:
        try:
            if copies:
                with trio.move_on_after(DIRECTORY_HEAD_START):
                    await asked_directory.wait()
                if satisfied():
                    return
            await dht.find_providers(
                model_key(digest or model, shard),
                functools.partial(found_some, shard),
                go_on=functools.partial(go_on, shard),
            )
        finally:
            round_done(shard)

    def found_some(shard: int, providers: list[PeerInfo]) -> None:
        counts[shard] += len(providers)
        connected = set(dht.host.get_connected_peers())
        for info in sorted(providers, key=lambda i: i.peer_id not in connected):
            if info.peer_id not in fetched:
                fetched.add(info.peer_id)
                pending[0] += 1
                send.send_nowait(info.peer_id)

    async with trio.open_nursery() as fetching:
        for _ in range(RECORD_FETCHES_AT_ONCE):
            fetching.start_soon(fetch_records)
        with send, walks:  # closed once the walks end: the fetchers finish what is queued
            async with trio.open_nursery() as walking:
                if copies:
                    walking.start_soon(from_directory)
                for shard in range(MODEL_KEY_SHARDS):
                    walking.start_soon(walk, shard)
    if satisfied():
        return learned(dht.host, found.values(), blocks)
    full = max(counts) >= PROVIDERS_PER_KEY
    covered = {b for r in found.values() for b in range(r.start, r.end)}
    wanted = covered if blocks is None else set(blocks)
    missing = sorted(wanted if full else wanted - covered)
    if missing:
        announced = sorted({r.model_digest for r in found.values()} - {""})
        under = [digest] if digest else [model, *announced[:MAX_DIGESTS_PER_NAME]]
        log.debug("looking up %d block(s) of %s one by one", len(missing), model)
        providers: dict[ID, PeerInfo] = {}

        async def lookup_block(weights: str, block: int) -> None:
            providers.update(await dht.find_providers(block_key(weights, block)))

        async with trio.open_nursery() as nursery:
            for weights in under:
                for block in missing:
                    nursery.start_soon(lookup_block, weights, block)
        new = {p: i for p, i in providers.items() if p.to_base58() not in found}
        found.update(await live_records(dht, new, model, digest, now))
    return learned(dht.host, found.values(), blocks)


def learned(
    host: IHost, records: Iterable[ServerRecord], blocks: Iterable[int] | None
) -> list[ServerRecord]:
    """Those of ``records`` holding any of ``blocks`` (None: all), their signed addresses noted in
    ``host``'s peerstore, by first block."""
    wanted = None if blocks is None else set(blocks)
    live = [r for r in records if wanted is None or any(r.covers(b) for b in wanted)]
    for rec in live:
        addrs = [Multiaddr(a) for a in rec.addrs]
        host.get_peerstore().add_addrs(ID.from_base58(rec.peer_id), addrs, PEER_ADDR_TTL)
    return sorted(live, key=lambda r: (r.start, r.peer_id))


def keep_live(
    rec: ServerRecord, model: str, digest: str, now: float, into: dict[str, ServerRecord]
) -> None:
    """``rec`` into ``into`` if it is live and of ``model`` (of ``digest``'s weights, when given)."""
    if rec.model != model or not rec.is_live(now):
        return
    if not digest or rec.model_digest == digest:
        into[rec.peer_id] = rec


async def fetch_live(
    dht: SwarmDHT, peer: ID, model: str, digest: str, now: float, into: dict[str, ServerRecord]
) -> None:
    """``peer``'s own record into ``into`` if it is live and of ``model`` (``keep_live``)."""
    rec = await dht.get_record(peer)
    if rec is not None:
        keep_live(rec, model, digest, now, into)


async def live_records(
    dht: SwarmDHT, providers: dict[ID, PeerInfo], model: str, digest: str, now: float
) -> dict[str, ServerRecord]:
    """The live records of ``model`` (of ``digest``'s weights, when given) among ``providers``'
    own, fetched in parallel (addresses come from the signed records: kad_requests put only
    vouched ones in the peerstore)."""
    records: dict[str, ServerRecord] = {}
    async with trio.open_nursery() as nursery:
        for peer in providers:
            nursery.start_soon(fetch_live, dht, peer, model, digest, now, records)
    return records
