"""Our FIND_NODE / GET_PROVIDERS / GET_VALUE requests: py-libp2p's answers, and no stream left behind.

Real py-libp2p hosts and KadDHTs on 127.0.0.1. A query cut off while the remote works on it must
free the remote's inbound slot (KadDHT has 12 and resets streams beyond them); py-libp2p's own
request functions leave those streams open, so 12 cancelled queries made a live peer answer
nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p import new_host
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.record import make_signed_put_record
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_uvarint, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from swarm_node.dht import kad_requests
from swarm_node.dht.discovery import QUERY_ERRORS, SwarmDHT
from swarm_node.dht.records import (
    ServerRecord,
    block_key,
    decode_record,
    model_key,
    model_shard,
    record_key,
)
from swarm_node.dht.signing import sign_record, verify_record
from swarm_node.errors import RemoteProtocolError
from tests.swarm_helpers import LOOPBACK

log = logging.getLogger(__name__)
CANCELLED = 30  # queries cut off at one peer: well past its 12 inbound slots
MODEL = "m"


@asynccontextmanager
async def dht_peer() -> AsyncIterator[SwarmDHT]:
    host = new_host(
        key_pair=create_new_key_pair(),
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    async with host.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
        dht = SwarmDHT(host)
        async with background_trio_service(dht.kad):
            yield dht


async def link(a: SwarmDHT, b: SwarmDHT) -> None:
    """``a`` dials ``b`` and puts it in its routing table, as with an initial peer."""
    await a.host.connect(PeerInfo(b.host.get_id(), b.host.get_addrs()))
    await a.add_bootstrap_peer(b.host.get_id())


def signed_record(dht: SwarmDHT, seq: int = 1) -> bytes:
    peer_id = dht.host.get_id().to_base58()
    record = ServerRecord(
        peer_id=peer_id,
        addrs=(f"{dht.host.get_addrs()[0]}/p2p/{peer_id}",),
        model=MODEL,
        start=0,
        end=3,
        throughput=1.0,
        cache_tokens_left=128,
        dtype="float32",
        version="0",
        seq=seq,
        expires_at=time.time() + 600,
    )
    return sign_record(record, dht._key_pair)


@asynccontextmanager
async def small_swarm() -> AsyncIterator[tuple[SwarmDHT, SwarmDHT, list[SwarmDHT]]]:
    """An asker, the peer it asks, and three others that peer knows. The asked peer holds a signed
    record under its own key and lists two of the others as providers of block 0."""
    async with AsyncExitStack() as stack:
        asker, asked, *others = [await stack.enter_async_context(dht_peer()) for _ in range(5)]
        for other in others:
            await link(asked, other)
        await link(asker, asked)
        key = record_key(asked.host.get_id().to_base58()).encode()
        asked.kad.value_store.put(key, signed_record(asked))
        for other in others[:2]:
            info = PeerInfo(other.host.get_id(), other.host.get_addrs())
            asked.kad.provider_store.add_provider(bytes.fromhex(block_key(MODEL, 0)), info)
        # one request first: the asked peer adds the asker to its routing table on its first DHT
        # stream, so every answer compared in the tests comes from the same tables
        await kad_requests.get_value(asker.kad, asked.host.get_id(), b"/warm-up")
        yield asker, asked, others


def providers_seen(answer: tuple[list[PeerInfo], list[ID]]) -> tuple[list[Any], list[ID]]:
    return [(p.peer_id, p.addrs) for p in answer[0]], answer[1]


async def test_answers_equal_those_of_py_libp2p() -> None:
    # answers are gathered in the swarm and checked after it is closed: an assertion raised inside
    # would come out nested in the exception groups of five hosts' nurseries
    ours: dict[str, Any] = {}
    theirs: dict[str, Any] = {}
    with trio.fail_after(30):
        async with small_swarm() as (asker, asked, others):
            kad, peer = asker.kad, asked.host.get_id()
            other_ids = {o.host.get_id() for o in others}
            near, block = others[0].host.get_id().to_bytes(), bytes.fromhex(block_key(MODEL, 0))
            for name, key in (("peer", near), ("block", block)):
                ours[f"find_node {name}"] = await kad_requests.find_node(kad, peer, key)
                theirs[f"find_node {name}"] = await kad.peer_routing._query_peer_for_closest(
                    peer, key
                )
            dialable = all(
                kad.host.get_peerstore().addrs(p) for p in other_ids
            )  # for the next round
            for block in (0, 1):  # two providers; none (closer peers only)
                key = bytes.fromhex(block_key(MODEL, block))
                answer = await kad_requests.get_providers(kad, peer, key)
                ours[f"providers {block}"] = providers_seen(answer)
                answer = await kad.provider_store._get_providers_from_peer_with_closers(peer, key)
                theirs[f"providers {block}"] = providers_seen(answer)
            key_str = record_key(peer.to_base58())
            missing = record_key(others[0].host.get_id().to_base58()).encode()
            for name, key in (("record", key_str.encode()), ("missing", missing)):
                ours[f"value {name}"] = await kad_requests.get_value(kad, peer, key)
                theirs[f"value {name}"] = await kad.value_store._get_from_peer(peer, key)
            provider_ids = {o.host.get_id() for o in others[:2]}
    assert ours == theirs
    assert len(ours["find_node peer"]) == 3 and set(ours["find_node peer"]) == other_ids
    assert set(ours["find_node block"]) == other_ids and dialable
    assert {p for p, _ in ours["providers 0"][0]} == provider_ids
    assert ours["providers 1"][0] == []
    for block in (0, 1):  # the closer peers: all the asked peer knows but the asker
        closer = ours[f"providers {block}"][1]
        assert len(closer) == 3 and set(closer) == other_ids
    assert (
        verify_record(ours["value record"], key=key_str, now=time.time()).peer_id
        == peer.to_base58()
    )
    assert ours["value missing"] is None


class SlowAnswers:
    """In front of a peer's real KadDHT handler: while ``holding``, each answer waits until the
    test releases it, so an asker's query is cut off after the remote has read it."""

    def __init__(self, kad: KadDHT) -> None:
        self.kad = kad
        self.holding = True
        self._held, self.held = trio.open_memory_channel[trio.Event](math.inf)

    async def handle(self, stream: INetStream) -> None:
        await self.kad.handle_stream(_HeldStream(stream, self))  # type: ignore[arg-type]

    async def hold(self) -> None:
        release = trio.Event()
        self._held.send_nowait(release)
        await release.wait()


class _HeldStream:
    def __init__(self, stream: INetStream, slow: SlowAnswers) -> None:
        self._stream, self._slow, self._answered = stream, slow, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        if self._slow.holding and not self._answered:
            await self._slow.hold()
        self._answered = True
        await self._stream.write(data)


async def cut_off(slow: SlowAnswers, query: Callable[[], Awaitable[object]]) -> bool:
    """Starts ``query`` and cancels it once the remote has read it and holds its answer; False
    when the remote refused it instead (reset it: all its inbound slots taken)."""
    release: trio.Event | None = None
    async with trio.open_nursery() as nursery:

        async def ask() -> None:
            with contextlib.suppress(*QUERY_ERRORS):
                await query()
            nursery.cancel_scope.cancel()  # over before the remote held it: refused

        nursery.start_soon(ask)
        release = await slow.held.receive()
        nursery.cancel_scope.cancel()
    if release is None:
        return False
    release.set()  # the remote answers a stream the asker has given up on
    return True


async def test_cancelled_queries_leave_no_stream_open_at_the_remote() -> None:
    # checked after the swarm is closed, as above
    with trio.fail_after(60):
        async with small_swarm() as (asker, asked, others):
            kad, peer = asker.kad, asked.host.get_id()
            slow = SlowAnswers(asked.kad)
            asked.host.set_stream_handler(KAD_PROTOCOL, slow.handle)
            key_str = record_key(peer.to_base58())
            block = bytes.fromhex(block_key(MODEL, 0))
            near = others[0].host.get_id().to_bytes()
            own_key = record_key(asker.host.get_id().to_base58()).encode()
            seqs = itertools.count(1)

            def own_record() -> Any:  # a newer one each time: the remote refuses a seq it holds
                value = signed_record(asker, seq=next(seqs))
                return make_signed_put_record(own_key, value, asker.host.get_private_key())

            queries = [
                lambda: kad_requests.get_value(kad, peer, key_str.encode()),
                lambda: kad_requests.find_node(kad, peer, near),
                lambda: kad_requests.get_providers(kad, peer, block),
                lambda: kad_requests.put_value(kad, peer, own_key, own_record()),
            ]
            reached = [await cut_off(slow, queries[i % len(queries)]) for i in range(CANCELLED)]

            slow.holding = False
            value = await kad_requests.get_value(kad, peer, key_str.encode())
            closest = set(await kad_requests.find_node(kad, peer, near))
            providers = {p.peer_id for p in (await kad_requests.get_providers(kad, peer, block))[0]}
            # and through the lookups that use them
            record = await asker.get_record(peer)
            found = set(await asker.find_providers(block_key(MODEL, 0)))
            other_ids = [o.host.get_id() for o in others]
    assert value is not None and verify_record(value, key=key_str, now=time.time()).seq == 1
    assert closest == set(other_ids)
    assert providers == set(other_ids[:2])
    assert record is not None and record.peer_id == peer.to_base58()
    assert set(other_ids[:2]) <= found
    assert reached == [True] * CANCELLED, reached  # every cut-off query had a slot at the remote


@asynccontextmanager
async def bad_peer(answer: bytes) -> AsyncIterator[tuple[Any, trio.Event]]:
    """A host that reads one DHT request and sends ``answer``; the event is set once the asker
    has closed or reset the stream."""
    host = new_host(
        key_pair=create_new_key_pair(),
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    released = trio.Event()

    async def handle(stream: INetStream) -> None:
        try:
            await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
            await stream.write(answer)
            while await stream.read(4096):
                pass
        except BaseLibp2pError as exc:  # the asker reset the stream
            log.debug("bad peer's stream ended: %r", exc)
        finally:
            released.set()

    host.set_stream_handler(KAD_PROTOCOL, handle)
    async with host.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
        yield host, released


@pytest.mark.parametrize(
    "answer, match",
    [
        (encode_uvarint(MAX_DHT_MESSAGE_SIZE + 1), "at most 4194304 bytes"),  # no body follows
        # a 4-byte message whose first field claims 9 bytes
        (encode_uvarint(4) + b"\x0a\x09ab", "must be a Kademlia Message"),
    ],
)
async def test_oversize_or_garbled_answers_raise_and_release_the_stream(
    answer: bytes, match: str
) -> None:
    with trio.fail_after(20):
        async with dht_peer() as asker, bad_peer(answer) as (host, released):
            await asker.host.connect(PeerInfo(host.get_id(), host.get_addrs()))
            with pytest.raises(RemoteProtocolError, match=match):
                await kad_requests.get_value(asker.kad, host.get_id(), b"/swarmnode/x")
            await released.wait()


class HandledStreams:
    """In front of a peer's real KadDHT handler: reports each DHT stream it has finished with, so a
    test can wait for a request that gets no answer (ADD_PROVIDER) to have been processed."""

    def __init__(self, kad: KadDHT) -> None:
        self.kad = kad
        self._done, self.done = trio.open_memory_channel[None](math.inf)

    async def handle(self, stream: INetStream) -> None:
        try:
            await self.kad.handle_stream(stream)
        finally:
            self._done.send_nowait(None)


async def test_put_value_and_add_provider_are_taken_as_py_libp2p_s() -> None:
    with trio.fail_after(30):
        async with small_swarm() as (asker, asked, others):
            handled = HandledStreams(asked.kad)
            asked.host.set_stream_handler(KAD_PROTOCOL, handled.handle)
            peer, me = asked.host.get_id(), asker.host.get_id()
            key = record_key(me.to_base58()).encode()
            value = signed_record(asker)
            await kad_requests.put_value(
                asker.kad,
                peer,
                key,
                make_signed_put_record(key, value, asker.host.get_private_key()),
            )
            held = asked.kad.value_store.get(key)
            # the asked peer's validator refuses a record put under another peer's key
            theirs = record_key(others[0].host.get_id().to_base58()).encode()
            refused = False
            try:
                await kad_requests.put_value(
                    asker.kad,
                    peer,
                    theirs,
                    make_signed_put_record(theirs, value, asker.host.get_private_key()),
                )
            except QUERY_ERRORS:
                refused = True
            not_held = asked.kad.value_store.get(theirs)
            block = bytes.fromhex(block_key(MODEL, 5))
            await kad_requests.add_provider(asker.kad, peer, block)
            while not asked.kad.provider_store.get_providers(
                block
            ):  # no answer comes: wait for the handler
                await handled.done.receive()
            providers = asked.kad.provider_store.get_providers(block)
    assert held is not None and held.value == value
    assert verify_record(held.value, key=key.decode(), now=time.time()).peer_id == me.to_base58()
    assert refused and not_held is None, "a record for another peer's key was taken"
    assert [(p.peer_id, p.addrs) for p in providers] == [(me, asker.host.get_addrs())]


async def test_more_blocks_than_one_provide_window_all_reach_a_peer() -> None:
    # py-libp2p takes 10 ADD_PROVIDER from one peer per 10 s and drops the rest: a server of 15
    # blocks that sent them all at once was listed at its peers for 10 of them only, for good
    # (every re-announcement sent the same first 10 again). Paced, all 15 land.
    from swarm_node.dht.discovery import PROVIDE_WINDOW, PROVIDES_PER_WINDOW

    blocks = PROVIDES_PER_WINDOW + 5
    with trio.fail_after(PROVIDE_WINDOW + 20):
        async with AsyncExitStack() as stack:
            server, peer = [await stack.enter_async_context(dht_peer()) for _ in range(2)]
            await link(server, peer)
            handled = HandledStreams(peer.kad)
            peer.host.set_stream_handler(KAD_PROTOCOL, handled.handle)
            me = server.host.get_id()
            record = ServerRecord(
                peer_id=me.to_base58(),
                addrs=(f"{server.host.get_addrs()[0]}/p2p/{me.to_base58()}",),
                model=MODEL,
                start=0,
                end=blocks,
                throughput=1.0,
                cache_tokens_left=128,
                dtype="float32",
                version="0",
                seq=1,
                expires_at=time.time() + 600,
            )
            keys = [bytes.fromhex(block_key(MODEL, b)) for b in range(blocks)]
            model = bytes.fromhex(model_key(MODEL, model_shard(me.to_base58())))

            def listed() -> list[int]:
                return [
                    b
                    for b, k in enumerate(keys)
                    if any(p.peer_id == me for p in peer.kad.provider_store.get_providers(k))
                ]

            async with trio.open_nursery() as later:
                await server.announce(record, later=later)
                # the model's key and the first blocks, one window's worth; no answers come: wait
                # for the handlers
                while len(listed()) < PROVIDES_PER_WINDOW - 1:
                    await handled.done.receive()
                first = listed()  # what the announcement itself sent
                while len(listed()) < blocks:  # the rest, one window later
                    await handled.done.receive()
    assert first == list(range(PROVIDES_PER_WINDOW - 1))
    assert [p.peer_id for p in peer.kad.provider_store.get_providers(model)] == [me]


async def test_an_announcement_sends_no_provider_key_again_that_nothing_changed_for() -> None:
    # a settled swarm's servers re-announced every key to its closest peers every 30-40 s (most
    # of their idle DHT traffic); the record still goes out each time, the keys only when the
    # closest peers known changed (or REPROVIDE_EVERY passed, or the addresses)
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            server, peer, newcomer = [await stack.enter_async_context(dht_peer()) for _ in range(3)]
            await link(server, peer)
            me = server.host.get_id().to_base58()

            def record(seq: int) -> ServerRecord:
                return ServerRecord(
                    peer_id=me,
                    addrs=(f"{server.host.get_addrs()[0]}/p2p/{me}",),
                    model=MODEL,
                    start=0,
                    end=3,
                    throughput=1.0,
                    cache_tokens_left=128,
                    dtype="float32",
                    version="0",
                    seq=seq,
                    expires_at=time.time() + 600,
                )

            await server.announce(record(1))
            keys = server.provides_sent
            assert keys == 4  # the model's key (this peer's shard) and 3 blocks
            record_key_bytes = record_key(me).encode()
            await server.announce(record(2))
            assert server.provides_sent == keys  # nothing changed: no key sent again
            held = peer.kad.value_store.get(record_key_bytes)
            assert held is not None and decode_record(held.value).seq == 2  # the record went
            handled = HandledStreams(newcomer.kad)
            newcomer.host.set_stream_handler(KAD_PROTOCOL, handled.handle)
            await link(server, newcomer)  # a new peer among the closest known: all of them again
            await server.announce(record(3))
            assert server.provides_sent == 2 * keys
            block = bytes.fromhex(block_key(MODEL, 2))
            while server.host.get_id() not in {
                p.peer_id for p in newcomer.kad.provider_store.get_providers(block)
            }:  # an ADD_PROVIDER gets no answer: wait for the newcomer's handlers
                await handled.done.receive()
