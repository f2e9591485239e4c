"""Signed peer records in DHT messages: each envelope's signature is checked once per host, and what
is refused is what py-libp2p refuses. Real hosts on 127.0.0.1, real envelopes signed by real keys."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import maybe_consume_signed_record
from libp2p.peer.envelope import Envelope, seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from multiaddr import Multiaddr

from swarm_node.dht import kad_requests, peer_records
from swarm_node.dht.peer_records import consume_signed_record
from swarm_node.dht.records import block_key
from tests.test_dht_requests import MODEL, small_swarm


@contextmanager
def counting_checks() -> Iterator[list[bytes]]:
    """The envelopes ``consume_signed_record`` checks in full from now on (each still checked)."""
    checked: list[bytes] = []
    real = peer_records.consume_envelope

    def consume(data: bytes, domain: str) -> tuple[Envelope, PeerRecord]:
        checked.append(data)
        return real(data, domain)

    peer_records.consume_envelope = consume
    try:
        yield checked
    finally:
        peer_records.consume_envelope = real


async def test_a_lookup_checks_each_peer_record_once() -> None:
    # a fresh `generate` against 32 servers checked ~2,700 signatures for ~35 peers
    with trio.fail_after(30):
        async with small_swarm() as (asker, asked, others):
            key = bytes.fromhex(block_key(MODEL, 0))
            peer = asked.host.get_id()
            with counting_checks() as checked:
                first = await kad_requests.get_providers(asker.kad, peer, key)
                firsts = len(checked)
                again = await kad_requests.get_providers(asker.kad, peer, key)
                agains = len(checked) - firsts
    assert [p.peer_id for p in again[0]] == [p.peer_id for p in first[0]]
    assert again[1] == first[1]
    # the answer carries 6 records (the sender's, 2 providers', 3 closer peers') of 4 peers
    assert len(first[0]) == 2 and len(first[1]) == 3
    assert 1 <= firsts <= 4
    assert agains == 0


def envelope(seq: int) -> tuple[ID, bytes, KeyPair]:
    """A fresh peer, its signed peer record with ``seq`` (as sent in a DHT message), its keys."""
    keys = create_new_key_pair()
    peer = ID.from_pubkey(keys.public_key)
    record = PeerRecord(peer, [Multiaddr("/ip4/127.0.0.1/tcp/4001")], seq)
    return peer, seal_record(record, keys.private_key).marshal_envelope(), keys


def entry(peer: ID, data: bytes) -> Message.Peer:
    out = Message.Peer()
    out.id = peer.to_bytes()
    out.signedRecord = data
    return out


def sender(data: bytes) -> Message:
    out = Message()
    out.senderRecord = data
    return out


@pytest.mark.parametrize("twice", [False, True])
def test_what_py_libp2p_refuses_is_refused_checked_or_remembered(twice: bool) -> None:
    """Each case as py-libp2p's ``maybe_consume_signed_record`` decides it, on a fresh host; with
    ``twice``, after the same bytes were accepted once for their own peer (the remembered path)."""
    peer, data, keys = envelope(seq=5)
    other, _, _ = envelope(seq=5)
    newer = seal_record(
        PeerRecord(peer, [Multiaddr("/ip4/127.0.0.1/tcp/4002")], 6), keys.private_key
    ).marshal_envelope()
    cases = {
        "garbage": (entry(peer, b"\x0a\x03abc"), None),
        "its own entry": (entry(peer, data), None),
        "another peer's entry": (entry(other, data), None),
        "its own answer": (sender(data), peer),
        "another peer's answer": (sender(data), other),
        "an answer of no one in particular": (sender(data), None),
        "no record at all": (Message.Peer(), None),
    }
    outcomes: dict[str, tuple[bool, bool]] = {}
    for name, (msg, expected) in cases.items():
        hosts = [new_host(key_pair=create_new_key_pair()) for _ in range(2)]
        ours, theirs = hosts
        if twice:
            assert consume_signed_record(entry(peer, data), ours)
            assert maybe_consume_signed_record(entry(peer, data), theirs)
        outcomes[name] = (
            consume_signed_record(msg, ours, expected),
            maybe_consume_signed_record(msg, theirs, expected),
        )
    # a newer record of the peer stored since: the older bytes are refused, as py-libp2p does
    ours, theirs = (new_host(key_pair=create_new_key_pair()) for _ in range(2))
    for host, consume in ((ours, consume_signed_record), (theirs, maybe_consume_signed_record)):
        assert consume(entry(peer, data), host)
        assert consume(entry(peer, newer), host)
    outcomes["older than the one held"] = (
        consume_signed_record(entry(peer, data), ours),
        maybe_consume_signed_record(entry(peer, data), theirs),
    )
    assert [str(a) for a in ours.get_peerstore().addrs(peer)] == ["/ip4/127.0.0.1/tcp/4002"]
    assert outcomes == {
        "garbage": (False, False),
        "its own entry": (True, True),
        "another peer's entry": (False, False),
        "its own answer": (True, True),
        "another peer's answer": (False, False),
        "an answer of no one in particular": (True, True),
        "no record at all": (True, True),
        "older than the one held": (False, False),
    }


def test_a_record_the_peerstore_dropped_is_checked_and_stored_again() -> None:
    peer, data, _ = envelope(seq=1)
    host = new_host(key_pair=create_new_key_pair())
    with counting_checks() as checked:
        assert consume_signed_record(entry(peer, data), host)
        assert consume_signed_record(entry(peer, data), host)
        assert len(checked) == 1
        host.get_peerstore().clear_addrs(peer)  # its addresses expired, say
        assert consume_signed_record(entry(peer, data), host)
        assert len(checked) == 2
        assert host.get_peerstore().addrs(peer)
