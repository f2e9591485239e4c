"""Server records as they arrive from real peers on loopback: a peer answering lookups with a forged
or expired record, and PUT_VALUEs that would roll a peer's store back to an older record.

The records belong to a server that has no host (its key lives only here), so every copy the client
sees comes from another peer's store over the network, never from the server itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.record import make_signed_put_record

from swarm_node.dht import kad_requests
from swarm_node.dht.discovery import QUERY_ERRORS
from swarm_node.dht.records import (
    MAX_BLOCKS,
    ServerRecord,
    block_key,
    decode_record,
    record_fields,
    record_key,
)
from swarm_node.dht.signing import sign_fields, sign_record
from swarm_node.node.config import PeerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.swarm_helpers import LOOPBACK

MODEL = "phantom-model"
BLOCKS = 2
SERVER_KEY = create_new_key_pair(b"the server that has no host here".ljust(32, b"."))
SERVER = ID.from_pubkey(SERVER_KEY.public_key)
KEY = record_key(SERVER.to_base58()).encode()


def record(**fields: object) -> ServerRecord:
    base = ServerRecord(
        peer_id=SERVER.to_base58(),
        addrs=(f"/ip4/127.0.0.1/tcp/9/p2p/{SERVER}",),
        model=MODEL,
        start=0,
        end=BLOCKS,
        throughput=10.0,
        cache_tokens_left=1000,
        dtype="float32",
        version="test",
        seq=5,
        expires_at=time.time() + 600,
    )
    return replace(base, **fields)


@asynccontextmanager
async def holder_and_client(identity: Path | None = None) -> AsyncIterator[tuple[Peer, Peer]]:
    """Two real peers: one whose stores the test fills directly, and a client joined through it
    (with the key in ``identity``, if given)."""
    async with open_peer(PeerConfig(listen=LOOPBACK)) as holder:
        async with open_peer(
            PeerConfig(listen=LOOPBACK, initial_peers=tuple(holder.addrs[:1]), identity=identity)
        ) as client:
            yield holder, client


def provide_for_server(holder: Peer) -> None:
    """The holder lists the server as provider of every block (as after the server's ADD_PROVIDER)."""
    for block in range(BLOCKS):
        key = bytes.fromhex(block_key(MODEL, block))
        holder.dht.kad.provider_store.add_provider(key, PeerInfo(SERVER, []))


async def served(holder: Peer, client: Peer, value: bytes) -> list[ServerRecord]:
    """Put ``value`` in the holder's store, check the holder answers it over the network as is,
    and return what the client's lookup makes of it."""
    holder.dht.kad.value_store.put(KEY, value)
    assert client.dht.kad.value_store.get(KEY) is None  # no local copy: only the holder has one
    assert await kad_requests.get_value(client.dht.kad, holder.host.get_id(), KEY) == value
    return await client.find_servers(MODEL, BLOCKS)


def altered_after_signing(value: bytes, **fields: object) -> bytes:
    data = msgpack.unpackb(value, raw=False)
    return msgpack.packb({**data, **fields}, use_bin_type=True)


async def test_forged_records_from_a_peer_are_received_and_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="swarm_node.dht")
    with trio.fail_after(60):
        async with holder_and_client() as (holder, client):
            provide_for_server(holder)
            liar = KeyPair(holder.host.get_private_key(), holder.host.get_public_key())
            original = record()
            genuine = sign_record(original, SERVER_KEY)
            forgeries = [
                # traffic for the server redirected to the liar
                (altered_after_signing(genuine, addrs=holder.addrs), "has a bad signature"),
                # the server's record signed with the liar's own key
                (
                    sign_fields(record_fields(record(seq=6)), liar),
                    f"carries the public key of {holder.peer_id}",
                ),
                # the liar's own genuine record stored under the server's key
                (
                    sign_fields(record_fields(record(peer_id=holder.peer_id)), liar),
                    f"record of peer {holder.peer_id} stored under another key",
                ),
            ]
            for forged, why in forgeries:
                caplog.clear()
                assert await served(holder, client, forged) == []
                assert f"dropping a record for {SERVER}" in caplog.text and why in caplog.text
                assert await client.dht.get_record(SERVER) is None
            # the same path takes the genuine record: the forgeries were refused for what they are
            assert await served(holder, client, genuine) == [original]


async def test_an_expired_record_held_by_a_peer_is_not_used(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="swarm_node.dht")
    with trio.fail_after(60):
        async with holder_and_client() as (holder, client):
            provide_for_server(holder)
            # py-libp2p keeps (and serves) a value for a day, whatever the record inside says
            expired = sign_record(record(expires_at=time.time() - 1), SERVER_KEY)
            assert await served(holder, client, expired) == []
            assert "expired at" in caplog.text
            assert await client.dht.get_record(SERVER) is None
            live = record(seq=6)
            assert await served(holder, client, sign_record(live, SERVER_KEY)) == [live]


async def put(client: Peer, holder: Peer, value: bytes) -> None:
    """PUT_VALUE ``value`` at the holder over the network, as an announcing peer sends it."""
    signed = make_signed_put_record(KEY, value, client.host.get_private_key())
    await kad_requests.put_value(client.dht.kad, holder.host.get_id(), KEY, signed)


def held_seq(holder: Peer) -> int:
    held = holder.dht.kad.value_store.get(KEY)
    assert held is not None
    return decode_record(held.value).seq


async def test_a_peer_refuses_a_replayed_older_record_put_over_the_network(tmp_path: Path) -> None:
    # the server itself puts (a peer stores only its own record: tests/test_dht_store_attacks.py)
    key_file = tmp_path / "server.key"
    key_file.write_bytes(SERVER_KEY.private_key.serialize())
    key_file.chmod(0o600)
    with trio.fail_after(60):
        async with holder_and_client(identity=key_file) as (holder, client):
            await put(client, holder, sign_record(record(seq=5), SERVER_KEY))
            assert held_seq(holder) == 5
            await put(client, holder, sign_record(record(seq=6), SERVER_KEY))
            assert held_seq(holder) == 6
            with pytest.raises(QUERY_ERRORS):  # the holder resets the stream instead of echoing
                await put(client, holder, sign_record(record(seq=5), SERVER_KEY))
            assert held_seq(holder) == 6
            newer_but_expired = record(seq=8, expires_at=time.time() - 1)
            with pytest.raises(QUERY_ERRORS):
                await put(client, holder, sign_record(newer_but_expired, SERVER_KEY))
            assert held_seq(holder) == 6
            # the held record has lapsed: comparing records would let the older, unexpired one in,
            # but the seq held (RecordValidator's held_seq) still refuses it
            lapsed = sign_record(record(seq=6, expires_at=time.time() - 1), SERVER_KEY)
            holder.dht.kad.value_store.put(KEY, lapsed)
            with pytest.raises(QUERY_ERRORS):
                await put(client, holder, sign_record(record(seq=5), SERVER_KEY))
            assert holder.dht.kad.value_store.get(KEY).value == lapsed
            await put(client, holder, sign_record(record(seq=7), SERVER_KEY))
            assert held_seq(holder) == 7


GOOD_KEY = create_new_key_pair(b"an honest server, insane beside".ljust(32, b"."))
GOOD = ID.from_pubkey(GOOD_KEY.public_key)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"addrs": ("not a multiaddr",)}, "is not a multiaddr"),
        ({"addrs": (f"/ip4/127.0.0.1/tcp/9/p2p/{GOOD}",)}, "an address of another peer"),
        ({"end": 10**9}, f"start < end <= {MAX_BLOCKS}"),
        ({"throughput": 1e308}, "'throughput' must be in [0, 1e+06]"),
        ({"expires_at": time.time() + 10**9}, "must expire within"),
        ({"moving_to": 10**9}, "'moving_to' must be a block number or -1"),
    ],
)
async def test_a_signed_but_insane_record_is_refused_and_the_lookup_goes_on(
    caplog: pytest.LogCaptureFixture, fields: dict, why: str
) -> None:
    # A signature says who wrote a record, not that it is sane: each of these, signed by its own
    # server, is served by a real peer and dropped by the client, and the honest server of the same
    # blocks is still found (a record whose address did not parse used to stop the whole lookup).
    caplog.set_level(logging.INFO, logger="swarm_node.dht")
    honest = replace(
        record(),
        peer_id=GOOD.to_base58(),
        addrs=(f"/ip4/127.0.0.1/tcp/10/p2p/{GOOD}",),
    )
    with trio.fail_after(60):
        async with holder_and_client() as (holder, client):
            provide_for_server(holder)
            for block in range(BLOCKS):
                key = bytes.fromhex(block_key(MODEL, block))
                holder.dht.kad.provider_store.add_provider(key, PeerInfo(GOOD, []))
            insane = sign_record(record(**fields), SERVER_KEY)
            holder.dht.kad.value_store.put(KEY, insane)
            good_key = record_key(GOOD.to_base58()).encode()
            holder.dht.kad.value_store.put(good_key, sign_record(honest, GOOD_KEY))
            assert await kad_requests.get_value(client.dht.kad, holder.host.get_id(), KEY) == insane
            assert await client.find_servers(MODEL, BLOCKS) == [honest]
    assert f"dropping a record for {SERVER}" in caplog.text and why in caplog.text
