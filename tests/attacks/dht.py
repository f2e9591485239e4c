"""Attacks on the DHT: a stranger filling a server's store, and a peer lying in its answers.

- foreign_key_flood: a real libp2p host joins and PUTs values under keys outside the swarm's
  namespace (none, /pk/, /ipns/, /evil/), an oversized value and a record of another identity
  under /swarmnode/. Stopped: no PUT is confirmed, none of the keys is served back, and the server
  still serves its own record.
- provider_flood: a peer joins the DHT and answers every GET_PROVIDERS with thousands of providers
  (and FIND_NODE with the servers' ids), listing the honest servers' ids first with a forged
  address: a "victim" listener of its own. Stopped: no peer that asked connects to the victim (the
  forged addresses never reached a peerstore). The peers that ask are whoever looks servers up
  meanwhile (an honest client starting a session, a server finding its next servers); the test
  makes its client look up and checks the client's peerstore and providers too.
- evidence_flood: a stranger publishes evidence (dht/evidence_records.py) as its own reporter
  against many fresh identities, evidence signed by another reporter, and an oversized value under
  /swarmevidence/. Stopped: at most MAX_EVIDENCE_PER_REPORTER of the first are stored, none of
  the others.
- directory_flood: a stranger connects to a server and, on its directory protocol
  (dht/directory.py), sends a request longer than MAX_REQUEST_BYTES, holds
  DIRECTORY_STREAMS_PER_PEER streams open without a request and opens one more, then asks for
  DIRECTORY_MODELS_ASKED models that do not exist, one after another. Stopped: the long request
  and the extra stream get no answer, each made-up model an empty one in time; the test checks
  the server keeps at most MAX_MODELS_KEPT answers and holds no stream afterwards.
- push_redirect: a client opens a session on the first server naming a "victim" host (a real
  libp2p peer that serves nothing) as the next server to push to. Stopped: the session answers
  push=False and the victim gets no stream and no connection from the server.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE, PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.records.record import make_signed_put_record
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from swarm_node.dht import directory, kad_requests
from swarm_node.dht.discovery import QUERY_ERRORS
from swarm_node.dht.evidence_records import (
    PublishedEvidence,
    PublishedStep,
    evidence_key,
    sign_evidence,
)
from swarm_node.dht.receipts import Receipt, sign_receipt
from swarm_node.dht.records import ServerRecord, record_key
from swarm_node.dht.signing import sign_record, verify_record
from swarm_node.dht.validators import MAX_EVIDENCE_PER_REPORTER
from swarm_node.node.net.dialing import open_stream, remember_addrs
from swarm_node.node.net.host import build_host
from swarm_node.node.net.message_stream import request
from swarm_node.protocol import PROTOCOL_ID as SWARM_PROTOCOL
from swarm_node.protocol import messages as m
from tests.attacks import AttackTarget

LISTEN = "/ip4/127.0.0.1/tcp/0"
ATTACK_TIMEOUT = 20.0  # seconds, each attack in all
FOREIGN_KEYS = 200  # keys outside the namespace PUT by the flood
FOREIGN_VALUE = 16 * 1024  # bytes of each
OVERSIZED_VALUE = 900 * 1024  # bytes of the oversized value under our namespace
FORGED_PROVIDERS = 5000  # providers in each lying GET_PROVIDERS answer
ASK_WINDOW = 15.0  # seconds the lying peer waits to be asked
REFLECTION_GRACE = 2.0  # seconds it waits after an answer for an asker to dial the victim
DIRECTORY_MODELS_ASKED = directory.MAX_MODELS_KEPT + 4
REFUSAL_WAIT = 2.0  # seconds a refused directory stream may take to be closed or reset


def foreign_puts(key_pair: KeyPair) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs no swarm-node peer may store."""
    puts = []
    for i in range(FOREIGN_KEYS):
        prefix = ("", "/pk/", "/ipns/", "/evil/")[i % 4]
        puts.append((f"{prefix}flood-{i}".encode(), bytes([i % 256]) * FOREIGN_VALUE))
    own = record_key(ID.from_pubkey(key_pair.public_key).to_base58()).encode()
    puts.append((own, b"\x00" * OVERSIZED_VALUE))
    # a valid record of another identity, signed by it: only that peer may store it
    other = create_new_key_pair()
    other_id = ID.from_pubkey(other.public_key).to_base58()
    record = ServerRecord(
        peer_id=other_id,
        addrs=(f"/ip4/127.0.0.1/tcp/9/p2p/{other_id}",),
        model="any",
        start=0,
        end=1,
        throughput=1.0,
        cache_tokens_left=1,
        dtype="float32",
        version="attack",
        seq=1,
        expires_at=time.time() + 600,
    )
    puts.append((record_key(other_id).encode(), sign_record(record, other)))
    return puts


async def attack_foreign_key_flood(target: AttackTarget) -> bool:
    key_pair = create_new_key_pair()
    host = build_host(key_pair=key_pair, announce=None, psk=None)
    server = info_from_p2p_addr(Multiaddr(target.servers[0]))
    puts = foreign_puts(key_pair)
    async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
        kad = KadDHT(host, DHTMode.CLIENT)  # request building only: it serves nothing
        with trio.move_on_after(ATTACK_TIMEOUT):
            await host.connect(server)
            stored = 0
            for key, value in puts:
                signed = make_signed_put_record(key, value, key_pair.private_key)
                try:
                    await kad_requests.put_value(kad, server.peer_id, key, signed)
                    stored += 1
                except QUERY_ERRORS:
                    pass
            for key, _ in puts[::10] + puts[-2:]:
                if await kad_requests.get_value(kad, server.peer_id, key) is not None:
                    stored += 1
            # honest records are still served
            own_key = record_key(server.peer_id.to_base58())
            own = await kad_requests.get_value(kad, server.peer_id, own_key.encode())
            if own is None:
                return False
            verify_record(own, key=own_key, now=time.time())
            return stored == 0
    return False


def forged_id(i: int) -> bytes:
    """A well-formed peer id (a SHA2-256 multihash) of nobody."""
    return b"\x12\x20" + hashlib.sha256(b"forged provider %d" % i).digest()


@dataclass
class LyingPeer:
    """What the lying peer saw: the asks it answered and the dials its victim received."""

    peer_id: ID
    honest: tuple[ID, ...]
    victim_addr: str = ""  # set once the victim listens
    provider_asks: int = 0
    node_asks: int = 0
    victim_dials: int = 0
    asked: trio.Event = field(default_factory=trio.Event)

    def answer(self, request: Message, host: object) -> Message:
        response = Message()
        response.type = request.type
        response.key = request.key
        response.senderRecord = env_to_send_in_RPC(host)[0]
        victim = Multiaddr(self.victim_addr).to_bytes()
        if request.type in (Message.MessageType.GET_PROVIDERS, Message.MessageType.FIND_NODE):
            for peer in self.honest:  # first, so that any cap keeps them
                entry = response.closerPeers.add()
                entry.id = peer.to_bytes()
                entry.addrs.append(victim)
        if request.type == Message.MessageType.GET_PROVIDERS:
            self.provider_asks += 1
            self.asked.set()
            ids = [p.to_bytes() for p in self.honest]
            ids += [forged_id(i) for i in range(FORGED_PROVIDERS)]
            for raw in ids:
                entry = response.providerPeers.add()
                entry.id = raw
                entry.addrs.append(victim)
        elif request.type == Message.MessageType.FIND_NODE:
            self.node_asks += 1
        return response


@asynccontextmanager
async def lying_peer(target: AttackTarget) -> AsyncIterator[LyingPeer]:
    """A peer in the target's DHT that lies in every answer, and a victim listener it names."""
    host = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    servers = [info_from_p2p_addr(Multiaddr(a)) for a in target.servers]
    liar = LyingPeer(peer_id=host.get_id(), honest=tuple(s.peer_id for s in servers))

    async def count_victim_dial(stream: trio.SocketStream) -> None:
        liar.victim_dials += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, count_victim_dial, 0, host="127.0.0.1")
        )
        liar.victim_addr = f"/ip4/127.0.0.1/tcp/{listeners[0].socket.getsockname()[1]}"

        async def handle(stream: object) -> None:
            with trio.move_on_after(ATTACK_TIMEOUT):
                try:
                    while True:
                        data = await read_varint_prefixed_bytes_limited(
                            stream, MAX_DHT_MESSAGE_SIZE
                        )
                        request = Message()
                        request.ParseFromString(data)
                        answer = liar.answer(request, host).SerializeToString()
                        await stream.write(encode_varint_prefixed(answer))
                except Exception:  # noqa: BLE001 (the asker closed or reset: done)
                    pass
            with trio.move_on_after(1.0):
                try:
                    await stream.close()
                except Exception:  # noqa: BLE001 (reset already)
                    pass

        host.set_stream_handler(PROTOCOL_ID, handle)
        async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
            kad = KadDHT(host, DHTMode.CLIENT)
            # KadDHT adds the sender of a request to its routing table before reading it, so
            # only once its first request taught the server this peer's addresses: ask twice
            for server in [*servers, *servers]:
                with trio.move_on_after(5.0):
                    await host.connect(server)
                    try:
                        await kad_requests.find_node(kad, server.peer_id, host.get_id().to_bytes())
                    except QUERY_ERRORS:
                        pass
            yield liar
        nursery.cancel_scope.cancel()


async def attack_provider_flood(target: AttackTarget) -> bool:
    async with lying_peer(target) as liar:
        with trio.move_on_after(ASK_WINDOW):
            await liar.asked.wait()
        await trio.sleep(REFLECTION_GRACE)  # time for an asker to dial what it was told
        return liar.victim_dials == 0


async def attack_push_redirect(target: AttackTarget) -> bool:
    victim = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    attacker = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    server = info_from_p2p_addr(Multiaddr(target.servers[0]))
    streams: list[object] = []

    async def handle(stream: object) -> None:
        streams.append(stream)
        await stream.reset()

    victim.set_stream_handler(SWARM_PROTOCOL, handle)
    async with (
        victim.run(listen_addrs=[Multiaddr(LISTEN)]),
        attacker.run(listen_addrs=[Multiaddr(LISTEN)]),
    ):
        with trio.move_on_after(ATTACK_TIMEOUT):
            server_id = server.peer_id.to_base58()
            remember_addrs(attacker, server_id, [str(a) for a in server.addrs])
            conn = await open_stream(attacker, server_id, max_frame_size=1 << 20, timeout=10.0)
            info = await request(conn, m.InfoRequest(), m.InfoResponse, timeout=10.0)
            victim_id = victim.get_id().to_base58()
            opened = await request(
                conn,
                m.OpenSessionRequest(
                    model=info.model,
                    start=info.start,
                    end=info.end,
                    max_length=8,
                    dtype=info.dtype,
                    compression="none",
                    next_peer=victim_id,
                    next_addrs=tuple(f"{a}/p2p/{victim_id}" for a in victim.get_addrs()),
                    next_session="victim",
                ),
                m.OpenSessionResponse,
                timeout=10.0,
            )
            close = m.CloseSessionRequest(session_id=opened.session_id)
            await request(conn, close, m.CloseSessionResponse, timeout=10.0)
            await conn.close()
            reached = bool(victim.get_network().get_connections(server.peer_id))
            return not opened.push and not streams and not reached
    return False


EVIDENCE_FLOOD = 12  # evidence values the stranger PUTs as its own reporter


def evidence_against(accused: KeyPair, reporter: KeyPair) -> tuple[bytes, bytes]:
    """(key, value): signed evidence of one step ``accused`` signed, reported by ``reporter``."""
    digest = "ab" * 32
    receipt = Receipt(
        model=digest,
        start=0,
        end=1,
        session_id="s",
        step_id=1,
        position=0,
        input_digest=digest,
        output_digest=digest,
    )
    step = PublishedStep(receipt=receipt, signature=sign_receipt(receipt, accused.private_key))
    accused_id = ID.from_pubkey(accused.public_key).to_base58()
    evidence = PublishedEvidence(
        accused=accused_id,
        reporter=ID.from_pubkey(reporter.public_key).to_base58(),
        steps=(step,),
        wrong=0,
        error=1.0,
        bound=1e-3,
        expires_at=time.time() + 600,
    )
    return evidence_key(accused_id).encode(), sign_evidence(evidence, reporter)


async def attack_evidence_flood(target: AttackTarget) -> bool:
    key_pair = create_new_key_pair()
    host = build_host(key_pair=key_pair, announce=None, psk=None)
    server = info_from_p2p_addr(Multiaddr(target.servers[0]))
    own = [evidence_against(create_new_key_pair(), key_pair) for _ in range(EVIDENCE_FLOOD)]
    foreign = [evidence_against(create_new_key_pair(), create_new_key_pair())]
    oversized = [(own[0][0], b"\x00" * OVERSIZED_VALUE)]
    async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
        kad = KadDHT(host, DHTMode.CLIENT)
        with trio.move_on_after(ATTACK_TIMEOUT):
            await host.connect(server)
            stored: dict[str, int] = {"own": 0, "other": 0}
            for kind, puts in (("own", own), ("other", foreign + oversized)):
                for key, value in puts:
                    signed = make_signed_put_record(key, value, key_pair.private_key)
                    try:
                        await kad_requests.put_value(kad, server.peer_id, key, signed)
                        stored[kind] += 1
                    except QUERY_ERRORS:
                        pass
            held = foreign[0][0]
            leaked = await kad_requests.get_value(kad, server.peer_id, held) is not None
            # a reporter's first few are taken (anyone may report), the rest and the others not
            return stored["own"] == MAX_EVIDENCE_PER_REPORTER and not stored["other"] and not leaked
    return False


async def _no_answer(stream: object, within: float) -> bool:
    """Whether ``stream`` ends (closed, reset) without an answer within ``within`` seconds."""
    with trio.move_on_after(within):
        try:
            data = await read_varint_prefixed_bytes_limited(stream, directory.MAX_ANSWER_BYTES)
        except Exception:  # noqa: BLE001 (reset or closed: refused)
            return True
        return not data
    return False


async def attack_directory_flood(target: AttackTarget) -> bool:
    host = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    server = info_from_p2p_addr(Multiaddr(target.servers[0]))
    protocol = [directory.DIRECTORY_PROTOCOL]
    async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
        with trio.move_on_after(ATTACK_TIMEOUT):
            await host.connect(server)
            long = await host.new_stream(server.peer_id, protocol)
            await long.write(encode_varint_prefixed(b"\x80" * (directory.MAX_REQUEST_BYTES + 1)))
            long_refused = await _no_answer(long, directory.READ_TIMEOUT + REFUSAL_WAIT)
            await kad_requests.release_stream(long, server.peer_id, False)
            held = [
                await host.new_stream(server.peer_id, protocol)
                for _ in range(directory.DIRECTORY_STREAMS_PER_PEER)
            ]
            try:
                extra = await host.new_stream(server.peer_id, protocol)
            except QUERY_ERRORS:  # reset before its negotiation was answered: refused as well
                extra_refused = True
            else:
                extra_refused = await _no_answer(extra, REFUSAL_WAIT)
                held.append(extra)
            for stream in held:
                await kad_requests.release_stream(stream, server.peer_id, False)
            empty = 0
            for i in range(DIRECTORY_MODELS_ASKED):
                with trio.move_on_after(directory.LOOKUP_TIMEOUT + REFUSAL_WAIT):
                    made_up = f"no-such-model-{i}-{time.time_ns()}"
                    empty += not await directory.ask(host, server.peer_id, made_up, "")
            return long_refused and extra_refused and empty == DIRECTORY_MODELS_ASKED
    return False


ATTACKS = (
    ("directory_flood", attack_directory_flood),
    ("foreign_key_flood", attack_foreign_key_flood),
    ("evidence_flood", attack_evidence_flood),
    ("provider_flood", attack_provider_flood),
    ("push_redirect", attack_push_redirect),
)
