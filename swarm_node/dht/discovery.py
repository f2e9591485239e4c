"""The one file of dht/ that talks to the network: announcing and finding servers on py-libp2p's KadDHT.

KadDHT shortcuts we do not rely on (see DESIGN.md): ``find_providers`` answers from the local store
alone when it has anything, and ``get_value`` returns a local (possibly stale) value. Lookups here
ask the closest peers on the network, merge with the local store, deduplicate and check expiry.
Each query to one peer goes through kad_requests, whose streams are released when a query is
cancelled (py-libp2p's own request functions leave the remote waiting on them).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.common import ALPHA, BUCKET_SIZE, PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.record import make_signed_put_record
from libp2p.records.validator import NamespacedValidator
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from swarm_node.dht import directory, finding, kad_requests
from swarm_node.dht.evidence_records import (
    EVIDENCE_NAMESPACE,
    PublishedEvidence,
    evidence_key,
    sign_evidence,
)
from swarm_node.dht.finding import RECORD_FETCHES_AT_ONCE
from swarm_node.dht.peer_records import install_in_kad
from swarm_node.dht.records import (
    MODEL_KEY_SHARDS,
    RECORD_NAMESPACE,
    ServerRecord,
    decode_record,
    model_key,
    provider_keys,
    record_key,
)
from swarm_node.dht.servers_only import ServersOnlyKad, learn_protocols, serves_kad
from swarm_node.dht.signing import sign_record
from swarm_node.dht.validators import (
    SENDER,
    EvidenceValidator,
    RecordValidator,
    newest_record,
    valid_evidence,
)
from swarm_node.errors import RemoteProtocolError

log = logging.getLogger(__name__)
T = TypeVar("T")
V = TypeVar("V")

QUERY_TIMEOUT = 3.0  # seconds for one peer's answer during a lookup
UNREACHABLE_FOR = 60.0  # seconds a peer that failed to answer is skipped by lookups
LOOKUP_ROUNDS = 4  # iterative FIND_NODE rounds at most
MAX_CONCURRENT_QUERIES = 8  # DHT queries this peer has in flight at once
# record copies asked of connected peers at once (a KadDHT peer answers 12 streams at once, all
# askers together; a chain's walks ask the entry 4, one a model key, then wait for the records)
COPY_ASKS_AT_ONCE = 8
MAX_FIND_NODE_KEY = 50  # bytes: py-libp2p peers reset a FIND_NODE stream for longer keys
# py-libp2p's KadDHT takes at most 10 ADD_PROVIDER from one peer in a 10 s window and drops the rest
PROVIDES_PER_WINDOW = 10
PROVIDE_WINDOW = 10.5  # seconds between batches: the window, and a margin for clocks and delivery
ANSWER_FRESH = 5.0  # seconds a server's answer to a record request stands in for a ping
# seconds an announcement leaves a provider key unsent when it went out with the same addresses
# to the same closest peers known (py-libp2p keeps an entry 48 h): every 30-40 s was ~200 of a
# server's ~350 DHT queries a minute in a settled 32-server swarm, most of its idle CPU
REPROVIDE_EVERY = 600.0
MAX_ANSWERS_KEPT = 1024  # such answers remembered at once
# seconds before expiring that a record held is fetched again from its server for directory
# answers (records are re-announced every third of their TTL: 40 s of the default 120)
DIRECTORY_RECORD_MARGIN = 60.0
# seconds a server's record stands for its next check as a push target: a session opened with
# push then costs the server no round trip to the next server for it (its record was signed and
# valid when fetched; a target that moved since turns the push off when a push fails)
PUSH_RECORD_REUSE = 60.0
SIGNED_KEPT = 4096  # signed record values kept, the newest of each server (for directory answers)
# a peer that refused, reset or garbled one query: it answered, so it is not skipped as unreachable
QUERY_ERRORS = (
    BaseLibp2pError,
    RemoteProtocolError,
    OSError,
    RuntimeError,
    ValueError,
    trio.BrokenResourceError,
)


class RecentAnswers(Generic[V]):
    """What peers answered lately: a value each (a round trip, a record) with the trio time it
    came, at most MAX_ANSWERS_KEPT kept (those older than ``keep_for`` are dropped to make room)."""

    def __init__(self, keep_for: float = ANSWER_FRESH) -> None:
        self._answers: dict[str, tuple[V, float]] = {}
        self._keep_for = keep_for

    def note(self, peer_id: str, value: V) -> None:
        now = trio.current_time()
        if len(self._answers) >= MAX_ANSWERS_KEPT:
            self._answers = {p: a for p, a in self._answers.items() if now - a[1] <= self._keep_for}
        if len(self._answers) < MAX_ANSWERS_KEPT:
            self._answers[peer_id] = (value, now)

    def fresh(self, peer_id: str, *, within: float, take: bool = False) -> V | None:
        """The value ``peer_id`` answered in the last ``within`` seconds, or None (``take``:
        forgotten once read)."""
        answer = self._answers.pop(peer_id, None) if take else self._answers.get(peer_id)
        if answer is None or trio.current_time() - answer[1] > within:
            return None
        return answer[0]


class SwarmDHT:
    """Announces this peer's server record and finds the servers of a model's blocks.

    A server (``serving``) answers others' DHT queries and keeps records and provider entries for
    them; a client (``serving=False``: `generate`, `status`, the API, a Python client) runs the DHT
    in client mode, as Kademlia's clients do: it asks but answers nothing, so no server's routing
    table hands it out to others once it has gone."""

    def __init__(
        self,
        host: IHost,
        addrs: Callable[[], list[Multiaddr]] | None = None,
        *,
        serving: bool = True,
    ) -> None:
        self.host = host
        self.addrs = addrs or host.get_addrs  # where others reach this peer (relayed ones too)
        # strict: a value under any other namespace (py-libp2p's /pk/ and /ipns/ included, and keys
        # with none) is refused, so strangers cannot fill this peer's store and push records out
        only_ours = NamespacedValidator(
            {
                RECORD_NAMESPACE: RecordValidator(self._held_seq, self._note_signed),
                EVIDENCE_NAMESPACE: EvidenceValidator(),
            },
            strict_validation=True,
        )
        self.serving = serving
        # server -> (its newest valid record seen, that record's signed value): those stored here
        # (RecordValidator passed them) and those fetched, for directory answers
        self._signed: dict[str, tuple[ServerRecord, bytes]] = {}
        install_in_kad()  # py-libp2p's DHT code checks each peer record's signature once too
        self.kad = ServersOnlyKad(
            host,
            DHTMode.SERVER if serving else DHTMode.CLIENT,
            validator=only_ours,
            validator_changed=True,
            strict_validation=True,
        )
        self.directory = directory.Directory(self._directory_lookup, self._held_records)
        if serving:
            host.set_stream_handler(PROTOCOL_ID, self._handle_stream)
            host.set_stream_handler(directory.DIRECTORY_PROTOCOL, self.directory.handle_stream)
        self._key_pair = KeyPair(host.get_private_key(), host.get_public_key())
        self._unreachable: dict[ID, float] = {}  # peer -> trio time until which lookups skip it
        # KadDHT resets inbound streams beyond 12 at once: stay under that towards any one peer.
        self._query_limiter = trio.CapacityLimiter(MAX_CONCURRENT_QUERIES)
        # a server asked for its own record: one query to each of several peers at once
        self._record_limiter = trio.CapacityLimiter(RECORD_FETCHES_AT_ONCE)
        # copies of records asked of connected peers (record_copy)
        self._copy_limiter = trio.CapacityLimiter(COPY_ASKS_AT_ONCE)
        self._paced = trio.CancelScope()  # the batches of provider records still to send
        self.queries_sent = 0  # DHT queries this peer has sent (a lookup's cost is a difference)
        # server -> round trip of its answer to a record request: recent_answers
        self._answered: RecentAnswers[float] = RecentAnswers()
        # server -> its record, when it was a push target: server_record
        self._push_records: RecentAnswers[ServerRecord] = RecentAnswers(PUSH_RECORD_REUSE)
        # provider key -> (trio time, addresses, closest peers known) of its last provide
        self._provided: dict[bytes, tuple[float, tuple[Multiaddr, ...], frozenset[ID]]] = {}
        self.provides_sent = 0  # provider keys sent to their closest peers

    async def _handle_stream(self, stream: INetStream) -> None:
        """KadDHT's handler, with the sending peer known to RecordValidator."""
        token = SENDER.set(stream.muxed_conn.peer_id)
        try:
            await self.kad.handle_stream(stream)
        finally:
            SENDER.reset(token)

    def _held_seq(self, key: str) -> int | None:
        """The seq of the record this peer holds under ``key``, so older ones are refused."""
        held = self.kad.value_store.get(key.encode())
        if held is None:
            return None
        try:
            return decode_record(held.value).seq
        except RemoteProtocolError:
            return None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SwarmDHT]:
        """Run KadDHT's own service (routing table refresh, inbound queries) inside the block."""
        async with background_trio_service(self.kad), self.kad.checking():
            yield self

    async def add_bootstrap_peer(self, peer_id: ID) -> None:
        await self.kad.routing_table.add_peer(peer_id)

    # -- announcing ----------------------------------------------------------------------------
    async def announce(
        self,
        record: ServerRecord,
        *,
        provide_blocks: bool = True,
        later: trio.Nursery | None = None,
    ) -> None:
        """Store the record under its key and, if asked, register as provider of the model's keys
        of this peer's shard (first: lookups go there; under the name and under the digest) and of
        each block's, under the digest (where lookups go for blocks the model's keys did not give):
        records.provider_keys.

        Locally first (a peer asking this one sees the new record at once), then at the closest
        peers, through the same bounded queries as lookups: KadDHT's ``put_value`` and ``provide``
        run their own lookups, which wait up to 30 s on a wedged connection and leave remote slots
        taken when cancelled. A peer that does not take the record is skipped; it still has the
        older one, which expires.

        py-libp2p peers drop ADD_PROVIDER beyond PROVIDES_PER_WINDOW from one peer in
        PROVIDE_WINDOW: the model and the first blocks are provided before this returns, the others
        in batches one window apart in ``later`` (a nursery; without one, all at once). A newer
        announcement that provides blocks, or is not ONLINE, stops what is left of an older one's
        batches.
        """
        key = record_key(record.peer_id)
        value = sign_record(record, self._key_pair)
        self.kad.validator.validate(key, value)  # our own record: a failure here is a bug, loudly
        key_bytes = key.encode()
        self.kad.value_store.put(key_bytes, value)
        put_record = make_signed_put_record(key_bytes, value, self.host.get_private_key())
        if provide_blocks or record.state != "ONLINE":  # the span's batches restart, or end here
            self._paced.cancel()
        keys = [bytes.fromhex(k) for k in (provider_keys(record) if provide_blocks else [])]
        self._provided = {k: v for k, v in self._provided.items() if k in keys}
        blocks = [k for k in keys if not self._provided_lately(k)]
        cut = PROVIDES_PER_WINDOW if later is not None else len(blocks)
        now, rest = blocks[:cut], blocks[cut:]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ask_closest, key_bytes, kad_requests.put_value, put_record)
            for block in now:
                nursery.start_soon(self._provide, block)
        if rest and later is not None:
            self._paced = trio.CancelScope()
            later.start_soon(self._provide_paced, rest, self._paced)

    async def _provide_paced(self, keys: list[bytes], scope: trio.CancelScope) -> None:
        with scope:
            for i in range(0, len(keys), PROVIDES_PER_WINDOW):
                await trio.sleep(PROVIDE_WINDOW)
                try:
                    async with trio.open_nursery() as nursery:
                        for key in keys[i : i + PROVIDES_PER_WINDOW]:
                            nursery.start_soon(self._provide, key)
                except Exception:  # in a running peer's background: the next announcement retries
                    log.warning(
                        "providing blocks failed; the next announcement tries again", exc_info=True
                    )

    async def _ask_closest(
        self, key: bytes, query: Callable[..., Awaitable[Any]], *args: Any
    ) -> None:
        """``query(kad, peer, key, *args)`` to each of the peers closest to ``key``."""
        async with trio.open_nursery() as nursery:
            for peer in await self._closest_peers(key):
                ask = functools.partial(query, self.kad, peer, key, *args)
                nursery.start_soon(self._ask, peer, ask)

    async def _provide(self, key: bytes) -> None:
        addrs = self.addrs()
        closest = self._closest_known(key)
        self.kad.provider_store.add_provider(key, PeerInfo(self.host.get_id(), addrs))
        await self._ask_closest(key, kad_requests.add_provider, addrs)
        self.provides_sent += 1
        self._provided[key] = (trio.current_time(), tuple(addrs), closest)

    def _closest_known(self, key: bytes) -> frozenset[ID]:
        return frozenset(self.kad.routing_table.find_local_closest_peers(key, BUCKET_SIZE))

    def _provided_lately(self, key: bytes) -> bool:
        """Whether ``key`` went to its closest peers less than REPROVIDE_EVERY ago, with this
        peer's addresses of now, and the closest peers known are the same: then those holding the
        entry are those a lookup asks, and sending it again changes nothing."""
        held = self._provided.get(key)
        if held is None:
            return False
        at, addrs, closest = held
        return (
            trio.current_time() - at < REPROVIDE_EVERY
            and addrs == tuple(self.addrs())
            and closest == self._closest_known(key)
        )

    async def publish_evidence(self, evidence: PublishedEvidence) -> None:
        """Sign ``evidence`` (this peer is its reporter) and store it here and at the peers
        closest to its key; LocalProtocolError when it does not fit (evidence_records.py)."""
        value = sign_evidence(evidence, self._key_pair)
        key = evidence_key(evidence.accused).encode()
        self.kad.validator.validate(key.decode(), value)
        self.kad.value_store.put(key, value)
        put_record = make_signed_put_record(key, value, self.host.get_private_key())
        await self._ask_closest(key, kad_requests.put_value, put_record)

    async def find_evidence(self, accused: str) -> PublishedEvidence | None:
        """The valid evidence against ``accused`` held here or at the peers closest to its key
        (the latest to expire), or None."""
        key_str = evidence_key(accused)
        key = key_str.encode()
        local = self.kad.value_store.get(key)
        values = [] if local is None else [local.value]

        async def ask(peer: ID) -> None:
            value = await self._ask(peer, lambda: kad_requests.get_value(self.kad, peer, key))
            if isinstance(value, bytes):
                values.append(value)

        async with trio.open_nursery() as nursery:
            for peer in await self._closest_peers(key):
                nursery.start_soon(ask, peer)
        found = valid_evidence(values, key_str)
        return max(found, key=lambda f: f[1].expires_at)[1] if found else None

    async def knows_dht_servers(self) -> bool:
        """Whether a peer this one knows (its routing table, its connections) serves the DHT and
        answered of late; peers whose protocols are not known yet are asked over identify (an
        error path's round trip: a lookup that found nothing)."""
        peers = set(self.kad.routing_table.get_peer_ids()) | set(self.host.get_connected_peers())
        peers.discard(self.host.get_id())

        async def identify(peer: ID) -> None:
            try:
                await learn_protocols(self.host, peer)
            except Exception as exc:  # noqa: BLE001 (gone or garbled: it serves nothing)
                log.debug("could not identify %s: %r", peer, exc)

        with trio.move_on_after(QUERY_TIMEOUT):  # all of them at once, under one deadline
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    if serves_kad(self.host, peer) is None:
                        nursery.start_soon(identify, peer)
        return any(not self._skip(p) and serves_kad(self.host, p) is not False for p in peers)

    # -- finding -------------------------------------------------------------------------------
    def _skip(self, peer: ID) -> bool:
        until = self._unreachable.get(peer)
        if until is None:  # a connected client (identify: no DHT served) is not asked either
            return peer == self.host.get_id() or serves_kad(self.host, peer) is False
        if until <= trio.current_time():
            del self._unreachable[peer]
            return False
        return True

    def _mark_unreachable(self, peer: ID, why: object) -> None:
        log.debug(
            "peer %s did not answer a lookup (%r); skipping it for %.0f s",
            peer,
            why,
            UNREACHABLE_FOR,
        )
        self._unreachable[peer] = trio.current_time() + UNREACHABLE_FOR
        self.kad.routing_table.remove_peer(peer)

    async def _ask(
        self,
        peer: ID,
        query: Callable[[], Awaitable[T]],
        limiter: trio.CapacityLimiter | None = None,
    ) -> T | None:
        """One query to one peer under QUERY_TIMEOUT, at most MAX_CONCURRENT_QUERIES at a time
        (or as ``limiter`` allows: servers asked for their own records have theirs).

        A peer that does not answer in time is skipped by lookups for a while; a peer that answers
        with an error (say, it reset a stream because it was busy) is not. The deadline starts once
        the query has a slot, and a query still waiting for one when its peer is marked unreachable
        is dropped: queries queued behind a silent peer do not each wait QUERY_TIMEOUT for it.
        """
        async with limiter or self._query_limiter:
            if self._skip(peer):  # marked unreachable while this query waited for a slot
                return None
            self.queries_sent += 1
            with trio.move_on_after(QUERY_TIMEOUT):
                try:
                    return await query()
                except QUERY_ERRORS as exc:
                    log.debug("query to %s failed: %r", peer, exc)
                    return None
        self._mark_unreachable(peer, "timeout")
        return None

    async def _closest_peers(self, key: bytes, count: int = 20) -> list[ID]:
        """The peers closest to ``key``: an iterative FIND_NODE with short per-peer deadlines.

        KadDHT's own lookup waits 10 s for each dead peer still in a routing table; this one gives a
        peer QUERY_TIMEOUT and then leaves it out of lookups for UNREACHABLE_FOR seconds.
        """
        known = set(self.kad.routing_table.find_local_closest_peers(key, count))
        known.update(self.host.get_connected_peers())
        known = {p for p in known if not self._skip(p)}
        queried: set[ID] = set()
        # KadDHT answers FIND_NODE only for keys of at most MAX_FIND_NODE_KEY bytes (peer ids, block
        # keys); a record key ("/swarmnode/<peer id>", 63 bytes) gets a reset stream from every
        # peer, so asking costs a stream each and teaches nothing: such keys use what we know.
        rounds = LOOKUP_ROUNDS if len(key) <= MAX_FIND_NODE_KEY else 0
        for _ in range(rounds):
            nearest = sort_peer_ids_by_distance(key, list(known))
            batch = [p for p in nearest if p not in queried][:ALPHA]
            if not batch:
                break
            found: set[ID] = set()

            async def query(peer: ID, into: set[ID]) -> None:
                peers = await self._ask(peer, lambda: kad_requests.find_node(self.kad, peer, key))
                into.update(peers or ())

            async with trio.open_nursery() as nursery:
                for peer in batch:
                    queried.add(peer)
                    nursery.start_soon(query, peer, found)
            new = {p for p in found if p not in known and not self._skip(p)}
            known = {p for p in known if not self._skip(p)} | new
            if not new:
                break
        return sort_peer_ids_by_distance(key, list(known))[:count]

    async def find_providers(
        self,
        key_hex: str,
        found_some: Callable[[list[PeerInfo]], None] | None = None,
        count: int = BUCKET_SIZE,
        go_on: Callable[[], Awaitable[bool]] | None = None,
    ) -> dict[ID, PeerInfo]:
        """Providers of a key: the local store merged with the answers of the peers closest to it.

        One iterative walk: GET_PROVIDERS answers name closer peers too, so the closest peers known
        (those connected included) are asked, then the closer ones their answers named, until the
        ``count`` closest known have all been asked (LOOKUP_ROUNDS at most). All of the closest:
        a provider stores itself at the peers *it* finds closest, and routing tables differ;
        asking only the 8 closest missed 2 of 12 servers in a 20-peer swarm. ``found_some`` hears
        each batch of new providers as it comes (the local ones first); ``await go_on()`` False ends
        the walk before its next round (one round always runs)."""
        key = bytes.fromhex(key_hex)
        found = {p.peer_id: p for p in self.kad.provider_store.get_providers(key)}
        if found and found_some is not None:
            found_some(list(found.values()))
        known = set(self.kad.routing_table.find_local_closest_peers(key, count))
        known.update(self.host.get_connected_peers())
        asked: set[ID] = set()

        async def ask(peer: ID) -> None:
            answer = await self._ask(peer, lambda: kad_requests.get_providers(self.kad, peer, key))
            if answer is None:
                return
            providers, closer = answer
            new = [info for info in providers if info.peer_id not in found]
            found.update((info.peer_id, info) for info in new)
            if new and found_some is not None:
                found_some(new)
            known.update(closer)

        for _ in range(LOOKUP_ROUNDS):
            if asked and go_on is not None and not await go_on():
                break
            known = {p for p in known if not self._skip(p)}
            nearest = sort_peer_ids_by_distance(key, list(known))[:count]
            batch = [p for p in nearest if p not in asked]
            if not batch:
                break
            async with trio.open_nursery() as nursery:
                for peer in batch:
                    asked.add(peer)
                    nursery.start_soon(ask, peer)
        return found

    async def get_record(self, peer_id: ID) -> ServerRecord | None:
        """The newest valid record of a server.

        The server itself signs and re-announces its record, so its own copy is the newest one there
        is: it is asked first, together with our local copy. Only when it gives no valid record (it
        is down, unreachable or answers garbage) are the peers closest to the key asked too, so a
        lookup of N servers costs N queries instead of N x k on a healthy swarm.
        """
        key_str = record_key(peer_id.to_base58())
        key = key_str.encode()
        values: list[bytes] = []
        local = self.kad.value_store.get(key)
        if local is not None:
            values.append(local.value)

        async def ask(peer: ID, timed: list[float] | None = None) -> None:
            value = await self._ask(
                peer,
                lambda: kad_requests.get_value(self.kad, peer, key, timed=timed),
                self._record_limiter if peer == peer_id else None,
            )
            if isinstance(value, bytes):
                values.append(value)

        def newest() -> ServerRecord | None:
            found = newest_record(values, key_str, peer_id)
            return None if found is None else self._note_signed(found[1], values[found[0]])

        if not self._skip(peer_id):
            answered = len(values)
            timed: list[float] = []
            await ask(peer_id, timed)
            if len(values) > answered and (found := newest()) is not None:
                self._note_answer(peer_id.to_base58(), timed)
                return found
        async with trio.open_nursery() as nursery:
            for peer in await self._closest_peers(key):
                if peer != peer_id:  # asked above, or skipped as unreachable
                    nursery.start_soon(ask, peer)
        return newest()

    async def record_copy(self, peer_id: ID) -> ServerRecord | None:
        """A valid record of a server from its copy at the connected DHT server closest to its key
        (copies sit at the BUCKET_SIZE peers closest to it: in a 32-server swarm, 20 of 32), None
        when that peer holds none: no dial. A copy may be a re-announcement older than the
        server's own, and says nothing of how fast the server answers (the route pings the servers
        it takes)."""
        key_str = record_key(peer_id.to_base58())
        holders = [p for p in self.host.get_connected_peers() if not self._skip(p)]
        if not holders:
            return None
        holder = sort_peer_ids_by_distance(key_str.encode(), holders)[0]
        value = await self._ask(
            holder,
            lambda: kad_requests.get_value(self.kad, holder, key_str.encode()),
            self._copy_limiter,
        )
        # an expired or missing copy is no news (a peer keeps what it was sent until it expires)
        found = None if not isinstance(value, bytes) else newest_record([value], key_str)
        return None if found is None else self._note_signed(found[1], value)

    def _note_signed(self, record: ServerRecord, value: bytes) -> ServerRecord:
        """Keep ``value``, ``record`` signed, for directory answers (the newest seq of a server);
        returns ``record``."""
        held = self._signed.get(record.peer_id)
        if held is not None and held[0].seq > record.seq:
            return record
        if record.peer_id not in self._signed and len(self._signed) >= SIGNED_KEPT:
            now = time.time()
            self._signed = {p: h for p, h in self._signed.items() if h[0].expires_at > now}
            if len(self._signed) >= SIGNED_KEPT:
                del self._signed[next(iter(self._signed))]
        self._signed[record.peer_id] = (record, value)
        return record

    def _held_records(self, model: str, digest: str) -> directory.Entries:
        """The live records of ``model`` (``digest``: of those weights) this peer holds (stored
        here or fetched: ``_signed``), each with its signed value."""
        now = time.time()
        return [
            (rec, value)
            for rec, value in self._signed.values()
            if rec.model == model
            and rec.is_live(now)
            and (not digest or rec.model_digest == digest)
        ]

    async def _directory_lookup(self, model: str, digest: str) -> None:
        """Fetch, for directory answers, the records of the servers of ``model`` (``digest``: of
        those weights) that this peer lacks or that expire within DIRECTORY_RECORD_MARGIN, from
        the servers themselves: those among the providers of the model's keys that this peer
        holds and that the ALPHA peers closest to each key name (one round, not a complete walk:
        an answer is a shortcut, the asker walks for what it misses)."""
        providers: dict[ID, PeerInfo] = {}

        async def one_round() -> bool:
            return False

        async def walk(shard: int) -> None:
            key = model_key(digest or model, shard)
            providers.update(await self.find_providers(key, count=ALPHA, go_on=one_round))

        async with trio.open_nursery() as nursery:
            for shard in range(MODEL_KEY_SHARDS):
                nursery.start_soon(walk, shard)
        soon = time.time() + DIRECTORY_RECORD_MARGIN
        held = {rec.peer_id: rec for rec, _ in self._held_records(model, digest)}
        async with trio.open_nursery() as nursery:
            for peer in providers:
                rec = held.get(peer.to_base58())
                if rec is None or rec.expires_at < soon:
                    nursery.start_soon(self.get_record, peer)  # kept by _note_signed

    async def ask_directory(self, model: str, digest: str) -> list[ServerRecord]:
        """The valid records of servers of ``model`` that a connected DHT server (the peer entered
        through) lists (dht/directory.py; ``digest``: of those weights), unfiltered by liveness
        or model: the caller keeps what it wants. Its answer's round trip stands in for a ping
        of it (``recent_answers``). Empty when no connected peer answers."""
        connected = [p for p in self.host.get_connected_peers() if not self._skip(p)]
        # a peer known to serve the DHT first (one not identified yet may be a client)
        connected.sort(key=lambda p: serves_kad(self.host, p) is not True)
        if not connected:
            return []
        entry, timed = connected[0], []
        values = await self._ask(
            entry,
            lambda: directory.ask(self.host, entry, model, digest, timed=timed),
            self._copy_limiter,
        )
        self._note_answer(entry.to_base58(), timed)
        records = (directory.verified(value) for value in values or ())
        return [rec for rec in records if rec is not None]

    def _note_answer(self, peer_id: str, timed: list[float]) -> None:
        if timed:
            self._answered.note(peer_id, timed[0])

    def recent_answers(self, peer_ids: Iterable[str]) -> dict[str, float]:
        """Round trips (seconds, the stream's opening not counted) of the record requests that
        servers among ``peer_ids`` answered themselves in the last ANSWER_FRESH seconds (a
        lookup's): as good as a ping's, without the ping. Each is handed out once."""
        out = {}
        for peer_id in peer_ids:
            seconds = self._answered.fresh(peer_id, within=ANSWER_FRESH, take=True)
            if seconds is not None:
                out[peer_id] = seconds
        return out

    async def server_record(self, peer_id: str) -> ServerRecord | None:
        """``get_record`` for a peer id as text (None for text that is not a peer id), or the
        record it gave in the last PUSH_RECORD_REUSE seconds (the caller checks its expiry)."""
        known = self._push_records.fresh(peer_id, within=PUSH_RECORD_REUSE)
        if known is not None:
            return known
        try:
            peer = ID.from_base58(peer_id)
        except Exception:  # noqa: BLE001 (base58 and multihash raise several types on garbage)
            return None
        record = await self.get_record(peer)
        if record is not None:
            self._push_records.note(peer_id, record)
        return record

    # finding.find_servers as a method (its first parameter is this SwarmDHT): live servers of
    # a model's blocks, a chain's or all of them
    find_servers = finding.find_servers
