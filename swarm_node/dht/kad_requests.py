"""FIND_NODE, GET_PROVIDERS, GET_VALUE, PUT_VALUE and ADD_PROVIDER requests to one KadDHT peer, on
streams we always release.

py-libp2p's own request functions (``PeerRouting._query_peer_for_closest``,
``ProviderStore._get_providers_from_peer_with_closers``, ``ValueStore._get_from_peer``,
``ValueStore._store_at_peer``, ``ProviderStore._send_add_provider``) close their
stream in a ``finally`` that a cancelled query never gets through: the close takes a lock, a
checkpoint, so it raises Cancelled before anything is sent. The remote handler then waits on that
stream for good and holds one of the 12 inbound slots KadDHT has; once they are taken, it resets
every new stream and lookups get empty answers from a live peer. Here the stream is closed after
an answer and reset otherwise, under a shield, so a query cut off by its deadline frees the slot.

Each function reads the answer exactly as py-libp2p's does (the same signed-record checks, each
envelope's signature checked once: peer_records.py; the same peers, providers and value out, the
same peerstore and routing-table updates); it raises instead of returning an empty answer when the
request fails, so the caller can tell "no answer" from "nothing".
Values are returned as sent: checking a record (signature, key, expiry) is the caller's job, as
with ``_get_from_peer``. Knows nothing of swarm records, lookups or deadlines.

Where they differ from py-libp2p's, on purpose: an answer writes addresses into the peerstore only
for the answering peer itself or through a peer's own signed peer record (an unsigned address for a
third party's id is dropped: it could point that peer's traffic at a victim, or crowd out its real
addresses), and an answer's providers beyond MAX_PROVIDERS_PER_ANSWER are not read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError, ParseError
from libp2p.io.exceptions import MessageTooLarge
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE, PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError, env_to_send_in_RPC
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr
from multiaddr.exceptions import Error as MultiaddrError

from swarm_node.dht.peer_records import consume_signed_record
from swarm_node.errors import RemoteProtocolError

log = logging.getLogger(__name__)

RELEASE_TIMEOUT = 1.0  # seconds to send the FIN or RST of a finished or abandoned query
CLOSER_PEER_ADDR_TTL = 3600  # seconds the peerstore keeps addresses from FIND_NODE (as py-libp2p)
# providers read from one GET_PROVIDERS answer: an honest peer lists the servers of one block, a
# lying one thousands, each costing the asker a record lookup
MAX_PROVIDERS_PER_ANSWER = 32
# what writing to, reading from or closing a stream raises when the peer or the connection is gone
STREAM_ERRORS = (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


async def _exchange(
    kad: KadDHT,
    peer: ID,
    kind: Message.MessageType.ValueType,
    key: bytes,
    *,
    forget_unreachable: bool = False,
    timed: list[float] | None = None,
) -> Message:
    """One request, one answer on a new stream; the stream is released however this ends.

    ``forget_unreachable``: a peer no stream can be opened to leaves the routing table (what
    py-libp2p's FIND_NODE does; a peer that opens one and then resets it, say busy, stays).
    ``timed``: gets the seconds from sending the request to its answer (a round trip, opening
    the stream not counted)."""
    request = _request(kad, kind, key)
    return await _send(kad, peer, request, forget_unreachable=forget_unreachable, timed=timed)


def _request(kad: KadDHT, kind: Message.MessageType.ValueType, key: bytes) -> Message:
    request = Message()
    request.type = kind
    request.key = key
    request.senderRecord = env_to_send_in_RPC(kad.host)[0]
    return request


async def _send(
    kad: KadDHT,
    peer: ID,
    request: Message,
    *,
    forget_unreachable: bool = False,
    answer: bool = True,
    timed: list[float] | None = None,
) -> Message:
    """``request`` on a new stream, then its answer (``answer=False``: none is read, the stream is
    closed once the request is written)."""
    try:
        stream = await kad.host.new_stream(peer, [PROTOCOL_ID])  # resets its stream if cancelled
    except (BaseLibp2pError, OSError):
        if forget_unreachable:
            kad.routing_table.remove_peer(peer)
        raise
    sent = request.SerializeToString()
    if not answer:
        written = False
        try:
            await stream.write(encode_varint_prefixed(sent))
            written = True  # sent whole: close, the remote handler reads it and sees EOF
        finally:
            await release_stream(stream, peer, written)
        return Message()
    data = await exchange(stream, peer, sent, MAX_DHT_MESSAGE_SIZE, "DHT answer", timed=timed)
    response = Message()
    try:
        response.ParseFromString(data)
    except DecodeError as exc:
        raise RemoteProtocolError(
            f"DHT answer from {peer} must be a Kademlia Message, got {exc}"
        ) from None
    return response


async def exchange(
    stream: INetStream,
    peer: ID,
    request: bytes,
    max_size: int,
    what: str,
    *,
    timed: list[float] | None = None,
) -> bytes:
    """Write ``request`` varint-prefixed, then read one varint-prefixed answer of at most
    ``max_size`` bytes (the length is checked before the body is read; RemoteProtocolError
    naming ``what`` otherwise); the stream is released however this ends. ``timed`` gets the
    seconds from sending to the answer (a round trip, opening the stream not counted)."""
    answered = False
    try:
        sent_at = trio.current_time()
        await stream.write(encode_varint_prefixed(request))
        try:
            data = await read_varint_prefixed_bytes_limited(stream, max_size)
        except (MessageTooLarge, ParseError) as exc:
            raise RemoteProtocolError(
                f"{what} from {peer} must be a varint-prefixed message of at most {max_size} "
                f"bytes, got {exc}"
            ) from None
        answered = True
        if timed is not None:
            timed.append(trio.current_time() - sent_at)
        return data
    finally:
        await release_stream(stream, peer, answered)


async def release_stream(stream: INetStream, peer: ID, answered: bool) -> None:
    """Close after an answer (the remote handler sees EOF), reset otherwise: the remote slot is
    freed either way. Shielded, so a cancelled query still sends it; bounded, so a stuck
    connection cannot hold the caller."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(RELEASE_TIMEOUT):
            try:
                await (stream.close() if answered else stream.reset())
            except STREAM_ERRORS as exc:
                log.debug("releasing a DHT stream to %s failed: %r", peer, exc)


def _addrs(raw: list[bytes]) -> list[Multiaddr]:
    addrs = []
    for addr in raw:
        try:
            addrs.append(Multiaddr(addr))
        except MultiaddrError:  # py-libp2p skips these too
            log.debug("skipping an unparsable address in a DHT answer")
    return addrs


async def find_node(kad: KadDHT, peer: ID, key: bytes) -> list[ID]:
    """FIND_NODE: the peers ``peer`` knows closest to ``key``, their addresses learned."""
    if peer == kad.host.get_id():
        return []
    try:
        addrs = kad.host.get_peerstore().addrs(peer)
    except PeerStoreError:  # unknown or expired: opening the stream fails below, as in py-libp2p
        addrs = []
    if addrs:  # py-libp2p adds the asked peer to the routing table whatever the answer
        await kad.routing_table.add_peer(PeerInfo(peer, addrs))
    response = await _exchange(
        kad, peer, Message.MessageType.FIND_NODE, key, forget_unreachable=True
    )
    if response.type != Message.MessageType.FIND_NODE:
        return []
    if not consume_signed_record(response, kad.host, peer):
        log.debug("FIND_NODE answer of %s ignored: its signed peer record was refused", peer)
        kad.routing_table.remove_peer(peer)
        return []
    found: list[ID] = []
    for closer in response.closerPeers:
        if not closer.id or not consume_signed_record(closer, kad.host):
            continue
        closer_id = ID(closer.id)
        if closer_id == kad.host.get_id():
            continue
        if closer_id not in found:
            found.append(closer_id)
        if addrs := _vouched_addrs(kad, peer, closer):
            await kad.routing_table.add_peer(PeerInfo(closer_id, addrs))
    return found


def _vouched_addrs(kad: KadDHT, answering: ID, entry: Message.Peer) -> list[Multiaddr]:
    """The addresses of an answer's peer ``entry`` (already passed consume_signed_record) that
    may be used: with a signed peer record, the ones it put in the peerstore; the unsigned ones
    only for the answering peer itself (and added to the peerstore then), none for a third party."""
    entry_id = ID(entry.id)
    if entry.HasField("signedRecord"):
        try:
            return kad.host.get_peerstore().addrs(entry_id)
        except PeerStoreError:
            return []
    if entry_id != answering:
        return []
    addrs = _addrs(list(entry.addrs))
    if addrs:
        kad.host.get_peerstore().add_addrs(entry_id, addrs, CLOSER_PEER_ADDR_TTL)
    return addrs


async def get_providers(kad: KadDHT, peer: ID, key: bytes) -> tuple[list[PeerInfo], list[ID]]:
    """GET_PROVIDERS: the providers of ``key`` that ``peer`` holds, and the closer peers it names."""
    response = await _exchange(kad, peer, Message.MessageType.GET_PROVIDERS, key)
    if response.type != Message.MessageType.GET_PROVIDERS:
        return [], []
    if not consume_signed_record(response, kad.host, peer):
        log.debug("GET_PROVIDERS answer of %s ignored: its signed peer record was refused", peer)
        return [], []
    providers = [
        PeerInfo(ID(p.id), _vouched_addrs(kad, peer, p))
        for p in response.providerPeers[:MAX_PROVIDERS_PER_ANSWER]
        if p.id and consume_signed_record(p, kad.host)
    ]
    if len(response.providerPeers) > MAX_PROVIDERS_PER_ANSWER:
        log.info(
            "GET_PROVIDERS answer of %s lists %d providers; reading the first %d",
            peer,
            len(response.providerPeers),
            MAX_PROVIDERS_PER_ANSWER,
        )
    closer: list[ID] = []
    for entry in response.closerPeers:  # as FIND_NODE's: with the addresses they may be dialed at
        if not entry.id or not consume_signed_record(entry, kad.host):
            continue
        closer_id = ID(entry.id)
        if closer_id == kad.host.get_id() or closer_id in closer:
            continue
        closer.append(closer_id)
        if addrs := _vouched_addrs(kad, peer, entry):
            await kad.routing_table.add_peer(PeerInfo(closer_id, addrs))
    return providers, closer


async def get_value(
    kad: KadDHT, peer: ID, key: bytes, *, timed: list[float] | None = None
) -> bytes | None:
    """GET_VALUE: the value ``peer`` holds under ``key``, unchecked; None when it holds none.
    ``timed``: as ``_exchange``'s."""
    if peer == kad.host.get_id():
        local = kad.value_store.get(key)
        return None if local is None else local.value
    response = await _exchange(kad, peer, Message.MessageType.GET_VALUE, key, timed=timed)
    if response.type != Message.MessageType.GET_VALUE or not response.HasField("record"):
        return None
    if not response.record.value:
        return None
    if not consume_signed_record(response, kad.host, peer):
        log.debug("GET_VALUE answer of %s ignored: its signed peer record was refused", peer)
        return None
    return response.record.value


async def put_value(kad: KadDHT, peer: ID, key: bytes, record: Record) -> None:
    """PUT_VALUE: store ``record`` (a signed put record of ``key``) at ``peer``; raises unless it
    echoes the key back, the answer py-libp2p's ``_store_at_peer`` counts as stored."""
    request = _request(kad, Message.MessageType.PUT_VALUE, key)
    request.record.CopyFrom(record)
    request.record.ClearField("timeReceived")  # the receiver sets it
    response = await _send(kad, peer, request)
    if response.type != Message.MessageType.PUT_VALUE or response.key != key:
        raise RemoteProtocolError(
            f"{peer} did not confirm storing the value (answer type {response.type})"
        )
    if not consume_signed_record(response, kad.host, peer):
        raise RemoteProtocolError(
            f"PUT_VALUE answer of {peer} refused: its signed peer record is invalid"
        )


async def add_provider(
    kad: KadDHT, peer: ID, key: bytes, addrs: Sequence[Multiaddr] | None = None
) -> None:
    """ADD_PROVIDER: tell ``peer`` this host provides ``key`` at ``addrs`` (default: where it
    listens; a private peer gives its relayed addresses). Fire-and-forget, as Kubo and py-libp2p
    send it: no answer comes, so "sent" is all that can be known."""
    request = _request(kad, Message.MessageType.ADD_PROVIDER, key)
    provider = request.providerPeers.add()
    provider.id = kad.host.get_id().to_bytes()
    addrs = kad.host.get_addrs() if addrs is None else addrs
    provider.addrs.extend(addr.to_bytes() for addr in addrs)
    provider.signedRecord = request.senderRecord
    await _send(kad, peer, request, answer=False)
