"""The servers of a model from one peer that knows them: a chain's lookup in one round trip.

A DHT server answers DIRECTORY_PROTOCOL ("the servers of model M, of digest D") at once with the
signed records it holds (``held``: the copies stored at it, the records it fetched); after
answering, it looks the model up again (``lookup``: SwarmDHT's, one round at the peers closest to
the model's keys, and the records it lacks fetched) when its last lookup of it is older than
DIRECTORY_FRESH (or there was none), so an asker never waits on a lookup and the next asker gets
what it found. A fresh client asks the peer it entered through, already
connected: no dial, no walk. In a 32-server swarm at 25 ms a hop a chain's lookup took 1.4-1.6 s
(providers from the walks, then each record from a copy or, where the entry held none, from the
server itself: a dial each); with the directory, 0.13-0.19 s.

What the asker believes: each record is checked as one from the DHT (signature, key, expiry,
bounds: signing.verify_record) and kept only if it is of the model, so an entry cannot forge or
alter a server. It can leave servers out, or list only its friends: the walk's first answers come
from the same entry and can do the same, a chain's lookup that the answer does not cover walks the
DHT as before, and a complete lookup (``status``, placement) never uses the directory.

What a stranger can make a DHT server do with it: DIRECTORY_STREAMS_AT_ONCE streams at once,
DIRECTORY_STREAMS_PER_PEER from one peer, a request of at most MAX_REQUEST_BYTES read within
READ_TIMEOUT, LOOKUPS_AT_ONCE lookups at once (none more is queued), one per (model, digest) per
DIRECTORY_FRESH seconds, MAX_MODELS_KEPT lookups kept, answers of at most MAX_ANSWER_RECORDS
records and MAX_ANSWER_BYTES.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import MessageTooLarge
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from swarm_node.dht.kad_requests import STREAM_ERRORS, exchange, release_stream
from swarm_node.dht.records import MAX_RECORD_SIZE, ServerRecord, decode_record, record_key
from swarm_node.dht.validators import newest_record
from swarm_node.errors import LocalProtocolError, RemoteProtocolError

log = logging.getLogger(__name__)

DIRECTORY_PROTOCOL = TProtocol("/swarm-node/servers/1.0.0")
MAX_NAME_CHARS = 256  # a model's name or digest in a request
MAX_REQUEST_BYTES = 1024
MAX_ANSWER_RECORDS = 128
MAX_ANSWER_BYTES = 1 << 20
# servers of any one block an answer lists at most (a big swarm's answer is a sample of it, each
# block still covered): a chain needs one, the route chooses among the fastest few
COVER_PER_BLOCK = 8
DIRECTORY_FRESH = 20.0  # seconds after a lookup of a model before an asker starts another
MAX_MODELS_KEPT = 16  # (model, digest) whose last lookup is remembered; the oldest goes first
LOOKUPS_AT_ONCE = 2  # lookups askers' requests may have running at once on this peer
LOOKUP_TIMEOUT = 10.0  # seconds for one (what it found by then is dropped)
READ_TIMEOUT = 3.0  # seconds for a request to arrive whole
DIRECTORY_STREAMS_AT_ONCE = 16
DIRECTORY_STREAMS_PER_PEER = 2

Entries = list[tuple[ServerRecord, bytes]]  # records, each with its signed value
Lookup = Callable[[str, str], Awaitable[None]]  # fills what ``held`` answers


def encode_request(model: str, digest: str) -> bytes:
    for name, value in (("model", model), ("digest", digest)):
        if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
            raise LocalProtocolError(
                f"directory request's '{name}' must be a str of at most {MAX_NAME_CHARS} "
                f"characters, got {value!r:.80}"
            )
    if not model:
        raise LocalProtocolError("directory request's 'model' must not be empty")
    return msgpack.packb({"model": model, "digest": digest}, use_bin_type=True)


def _unpack(data: bytes, what: str, **limits: int) -> dict[Any, Any]:
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=True, ext_hook=_no_ext, max_ext_len=0, **limits
        )
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise RemoteProtocolError(f"{what} must be a msgpack map, got {exc!r:.120}") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} must be a msgpack map, got {type(value).__name__}")
    return value


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError(f"no msgpack extension types (got code {code})")


def decode_request(data: bytes) -> tuple[str, str]:
    """(model, digest) of a request; RemoteProtocolError saying what is wrong."""
    request = _unpack(
        data,
        "a directory request",
        max_str_len=MAX_NAME_CHARS,
        max_bin_len=0,
        max_array_len=0,
        max_map_len=4,
    )
    model, digest = request.get("model"), request.get("digest", "")
    if not isinstance(model, str) or not model:
        raise RemoteProtocolError(
            f"directory request's 'model' must be a non-empty str, got {model!r}"
        )
    if not isinstance(digest, str):
        raise RemoteProtocolError(f"directory request's 'digest' must be a str, got {digest!r}")
    return model, digest


def encode_answer(values: list[bytes]) -> bytes:
    """An answer of ``values`` (signed records), as many as fit MAX_ANSWER_RECORDS and
    MAX_ANSWER_BYTES in the order given."""
    kept, size = [], 64
    for value in values[:MAX_ANSWER_RECORDS]:
        if size + len(value) + 8 > MAX_ANSWER_BYTES:
            break
        kept.append(value)
        size += len(value) + 8
    return msgpack.packb({"records": kept}, use_bin_type=True)


def decode_answer(data: bytes) -> list[bytes]:
    """The signed records of an answer, unchecked (``verified`` checks each)."""
    answer = _unpack(
        data,
        "a directory answer",
        max_str_len=64,
        max_bin_len=MAX_RECORD_SIZE,
        max_array_len=MAX_ANSWER_RECORDS,
        max_map_len=4,
    )
    values = answer.get("records")
    if not isinstance(values, list) or not all(isinstance(v, bytes) for v in values):
        raise RemoteProtocolError("a directory answer's 'records' must be a list of bin values")
    return values


def verified(value: bytes) -> ServerRecord | None:
    """The record in ``value`` if it is a valid, unexpired signed record (as stored in the DHT
    under its server's key), else None."""
    try:
        peer_id = decode_record(value).peer_id
    except RemoteProtocolError as exc:
        log.debug("dropping a directory record: %s", exc)
        return None
    found = newest_record([value], record_key(peer_id), "a directory answer")
    return None if found is None else found[1]


def sample(entries: list[tuple[ServerRecord, bytes]], now: float) -> list[bytes]:
    """The signed values of the live ones of ``entries``, in a random order, leaving out those whose
    every block COVER_PER_BLOCK listed already hold (askers' load spreads over the servers)."""
    live = [(rec, value) for rec, value in entries if rec.is_live(now)]
    random.shuffle(live)
    cover: collections.Counter[int] = collections.Counter()
    out = []
    for rec, value in live:
        blocks = range(rec.start, rec.end)
        if any(cover[b] < COVER_PER_BLOCK for b in blocks):
            cover.update(blocks)
            out.append(value)
    return out


async def ask(
    host: IHost, peer: ID, model: str, digest: str, *, timed: list[float] | None = None
) -> list[bytes]:
    """The signed records ``peer`` lists for ``model`` (``digest``: of those weights; "" any),
    unchecked; raises (a libp2p error, RemoteProtocolError) when it gives no answer. ``timed``
    gets the seconds from sending the request to its answer (a round trip, as a ping's)."""
    request = encode_request(model, digest)
    stream = await host.new_stream(peer, [DIRECTORY_PROTOCOL])
    data = await exchange(stream, peer, request, MAX_ANSWER_BYTES, "directory answer", timed=timed)
    return decode_answer(data)


class Directory:
    """A DHT server's side: answers requests from what ``held`` gives, which ``lookup`` fills
    (module docstring)."""

    def __init__(self, lookup: Lookup, held: Callable[[str, str], Entries]) -> None:
        self._lookup = lookup
        self._held = held
        self._kept: dict[tuple[str, str], float] = {}  # -> trio time of its last lookup
        self._looking: set[tuple[str, str]] = set()
        self._looked = trio.lowlevel.ParkingLot()  # woken as each lookup ends
        self._streams = 0
        self._per_peer: collections.Counter[ID] = collections.Counter()
        self.lookups = 0  # lookups run for askers (tests, logs)

    @property
    def streams_open(self) -> int:
        return self._streams

    @property
    def models_kept(self) -> int:
        return len(self._kept)

    async def lookups_done(self) -> None:
        """Return once no lookup is running."""
        while self._looking:
            await self._looked.park()

    async def handle_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        if (
            self._streams >= DIRECTORY_STREAMS_AT_ONCE
            or self._per_peer[peer] >= DIRECTORY_STREAMS_PER_PEER
        ):
            log.debug("refusing a directory stream of %s: too many at once", peer)
            await release_stream(stream, peer, False)
            return
        self._streams += 1
        self._per_peer[peer] += 1
        try:
            key = await self._answer(stream, peer)
        finally:
            self._streams -= 1
            self._per_peer[peer] -= 1
            if not self._per_peer[peer]:
                del self._per_peer[peer]
        if key is not None:  # reserved while answering: look it up for the next askers
            await self._refresh(key)

    async def _answer(self, stream: INetStream, peer: ID) -> tuple[str, str] | None:
        """Read a request, answer it; the key to look up again afterwards, if any."""
        answered = False
        again = key = None
        try:
            with trio.move_on_after(READ_TIMEOUT):
                try:
                    key = decode_request(
                        await read_varint_prefixed_bytes_limited(stream, MAX_REQUEST_BYTES)
                    )
                except (MessageTooLarge, ParseError, RemoteProtocolError) as exc:
                    log.debug("bad directory request from %s: %s", peer, exc)
            if key is None:
                return None
            if self._reserve(key):
                again = key
            values = sample(self._held(*key), time.time())
            await stream.write(encode_varint_prefixed(encode_answer(values)))
            answered = True
        except STREAM_ERRORS as exc:
            log.debug("directory stream of %s failed: %r", peer, exc)
        except BaseException:  # cancelled, or a bug: the reserved lookup will not run
            if again is not None:
                self._looking.discard(again)
                self._looked.unpark_all()
            raise
        finally:
            await release_stream(stream, peer, answered)
        return again

    def _reserve(self, key: tuple[str, str]) -> bool:
        """Whether to look ``key`` up now (then marked as being looked up, before the answer
        goes out: ``lookups_done`` waits for it): not when it is being looked up, was less than
        DIRECTORY_FRESH ago, or LOOKUPS_AT_ONCE run already."""
        if trio.current_time() - self._kept.get(key, -math.inf) <= DIRECTORY_FRESH:
            return False
        if key in self._looking or len(self._looking) >= LOOKUPS_AT_ONCE:
            return False
        self._looking.add(key)
        return True

    async def _refresh(self, key: tuple[str, str]) -> None:
        """Look ``key`` (reserved) up; remember when, once it completed."""
        try:
            self.lookups += 1
            with trio.move_on_after(LOOKUP_TIMEOUT) as deadline:
                try:
                    await self._lookup(*key)
                except Exception:  # a failed lookup answers nothing new; the next asker tries
                    log.warning("looking up the servers of %s failed", key[0], exc_info=True)
                    return
            if deadline.cancelled_caught:
                log.info("looking up the servers of %s took over %.0f s", key[0], LOOKUP_TIMEOUT)
                return
            self._kept.pop(key, None)
            if len(self._kept) >= MAX_MODELS_KEPT:
                del self._kept[min(self._kept, key=self._kept.__getitem__)]
            self._kept[key] = trio.current_time()
        finally:
            self._looking.discard(key)
            self._looked.unpark_all()
