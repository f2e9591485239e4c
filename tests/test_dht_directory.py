"""The directory (dht/directory.py): a DHT server lists the servers of a model it knows, a chain's
lookup asks the peer it entered through and walks the DHT only for what that answer does not cover.

The wire format's bounds, the sample an answer takes of a big swarm, a chain lookup answered in one
query, records an entry forged or kept past their expiry left out, and what one stranger can make a
server do (streams, request size, lookups, answers kept)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from swarm_node.dht import finding
from swarm_node.dht.directory import (
    COVER_PER_BLOCK,
    DIRECTORY_PROTOCOL,
    MAX_ANSWER_RECORDS,
    MAX_MODELS_KEPT,
    MAX_NAME_CHARS,
    MAX_REQUEST_BYTES,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
    sample,
    verified,
)
from swarm_node.dht.records import ServerRecord, record_fields, record_key
from swarm_node.dht.signing import sign_fields, sign_record
from swarm_node.errors import LocalProtocolError, RemoteProtocolError
from swarm_node.model.bundled import model_id_of
from swarm_node.node.config import PeerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.attacks import AttackTarget
from tests.attacks.dht import DIRECTORY_MODELS_ASKED, attack_directory_flood
from tests.swarm_helpers import LOOPBACK, local_swarm


def record_of(key_pair: KeyPair, start: int, end: int, **fields: object) -> ServerRecord:
    peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
    base = {
        "peer_id": peer_id,
        "addrs": (f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id}",),
        "model": "m",
        "start": start,
        "end": end,
        "throughput": 10.0,
        "cache_tokens_left": 100,
        "dtype": "float32",
        "version": "0",
        "expires_at": time.time() + 60,
    }
    return ServerRecord(**{**base, **fields})  # type: ignore[arg-type]


# -- the wire ----------------------------------------------------------------------------------------
def test_a_request_round_trips_and_its_names_are_bounded() -> None:
    assert decode_request(encode_request("smollm2-135m", "ab" * 32)) == ("smollm2-135m", "ab" * 32)
    with pytest.raises(LocalProtocolError, match="'model'"):
        encode_request("x" * (MAX_NAME_CHARS + 1), "")
    with pytest.raises(LocalProtocolError, match="'model'"):
        encode_request("", "")


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([1, 2]),
        msgpack.packb({"model": 3}),
        msgpack.packb({"model": ""}),
        msgpack.packb({"model": "m", "digest": b"raw"}),
        msgpack.packb({"model": "x" * (MAX_NAME_CHARS + 1)}),
        msgpack.packb({"model": "m", "digest": msgpack.ExtType(1, b"e")}),
        b"\xc1",
    ],
)
def test_a_request_that_breaks_a_rule_is_refused_saying_which(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="directory request"):
        decode_request(data)


def test_an_answer_keeps_to_its_bounds() -> None:
    values = [bytes([i % 256]) * 100 for i in range(MAX_ANSWER_RECORDS + 10)]
    assert decode_answer(encode_answer(values)) == values[:MAX_ANSWER_RECORDS]
    too_many = msgpack.packb({"records": [b"x"] * (MAX_ANSWER_RECORDS + 1)})
    with pytest.raises(RemoteProtocolError, match="directory answer"):
        decode_answer(too_many)
    with pytest.raises(RemoteProtocolError, match="'records'"):
        decode_answer(msgpack.packb({"records": ["text, not bin"]}))


def test_only_valid_unexpired_records_are_believed() -> None:
    key_pair, other = create_new_key_pair(), create_new_key_pair()
    good = record_of(key_pair, 0, 2)
    assert verified(sign_record(good, key_pair)) == good
    # someone else's key over this server's record; an expired one; bytes that are no record
    assert verified(sign_fields(record_fields(good), other)) is None
    assert (
        verified(sign_record(record_of(key_pair, 0, 2, expires_at=time.time() - 1), key_pair))
        is None
    )
    tampered = bytearray(sign_record(good, key_pair))
    tampered[-1] ^= 1
    assert verified(bytes(tampered)) is None
    assert verified(b"garbage") is None


def test_an_answer_samples_a_big_swarm_and_still_covers_every_block() -> None:
    now = time.time()
    entries = []
    for i in range(40):  # 40 servers of blocks 0:4, 10 of block 4:5, one expired of 5:6
        key_pair = create_new_key_pair()
        rec = record_of(key_pair, 0, 4) if i < 30 else record_of(key_pair, 4, 5)
        entries.append((rec, sign_record(rec, key_pair)))
    stale_keys = create_new_key_pair()
    stale = record_of(stale_keys, 5, 6, expires_at=now - 1)
    entries.append((stale, sign_record(stale, stale_keys)))
    chosen = [verified(v) for v in sample(entries, now)]
    spans = [(r.start, r.end) for r in chosen if r is not None]
    assert spans.count((0, 4)) == COVER_PER_BLOCK
    assert spans.count((4, 5)) == COVER_PER_BLOCK
    assert (5, 6) not in spans


# -- on a live swarm ---------------------------------------------------------------------------------
def count_walks(peer: Peer) -> list[str]:
    """The provider keys ``peer``'s lookups walk from now on (each still walked)."""
    walked: list[str] = []
    real = peer.dht.find_providers

    async def find_providers(key_hex: str, *args: object, **kwargs: object) -> object:
        walked.append(key_hex)
        return await real(key_hex, *args, **kwargs)  # type: ignore[arg-type]

    peer.dht.find_providers = find_providers  # type: ignore[method-assign]
    return walked


async def test_a_chain_lookup_takes_the_entrys_directory_and_walks_nothing(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(finding, "DIRECTORY_HEAD_START", 60.0)  # its answer, however slow
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, _):
            entry = servers[0]
            model = model_id_of(str(tiny_llama))
            config = PeerConfig(listen=LOOPBACK, initial_peers=tuple(entry.addrs[:1]))
            for round_ in range(2):
                async with open_peer(config) as client:
                    walked = count_walks(client)
                    before = client.dht.queries_sent
                    chain = await client.find_chain(model, 6)
                    assert [(h.start, h.end) for h in chain] == [(0, 3), (3, 6)]
                    assert walked == []
                    assert client.dht.queries_sent - before == 1  # the directory's, nothing else
                # the entry looked its model up for the first client; the second got what it kept
                assert entry.dht.directory.lookups == 1, round_
            # a complete lookup (status, placement) walks the DHT whatever an entry says
            async with open_peer(config) as client:
                walked = count_walks(client)
                found = await client.find_servers(model, 6)
                assert {r.peer_id for r in found} == {s.peer_id for s in servers}
                assert walked
            assert entry.dht.directory.lookups == 1


async def test_an_entry_looks_up_the_servers_it_did_not_hold_for_its_next_asker(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the entry holds no record of the second server (its copy gone, none fetched): the first
    # client's answer leaves blocks 3:6 uncovered and it walks; the entry then looks the model up
    # (providers, and the records it lacks from their servers) and the next client walks nothing
    monkeypatch.setattr(finding, "DIRECTORY_HEAD_START", 60.0)
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, _):
            entry, other = servers
            model = model_id_of(str(tiny_llama))
            entry.dht.kad.value_store.store.pop(record_key(other.peer_id).encode(), None)
            entry.dht._signed.pop(other.peer_id, None)  # noqa: SLF001 (what it fetched itself)
            config = PeerConfig(listen=LOOPBACK, initial_peers=tuple(entry.addrs[:1]))
            walks = []
            for _ in range(2):
                async with open_peer(config) as client:
                    walked = count_walks(client)
                    chain = await client.find_chain(model, 6)
                    assert [h.server.peer_id for h in chain] == [entry.peer_id, other.peer_id]
                    walks.append(len(walked))
                await entry.dht.directory.lookups_done()  # the one it started after answering
            assert walks[0] > 0 and walks[1] == 0, walks
            assert entry.dht.directory.lookups == 1


async def test_records_an_entry_forges_are_left_out_and_the_chain_is_walked(
    tiny_llama: Path,
) -> None:
    # a lying entry lists a server's record re-signed by its own key (claiming the whole model at
    # the liar's address), one past its expiry, and bytes that are no record: the client believes
    # none, and finds the real chain through the DHT
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, _):
            entry, honest = servers
            model = model_id_of(str(tiny_llama))
            liar_keys = KeyPair(entry.host.get_private_key(), entry.host.get_public_key())
            real = entry.make_record("ONLINE", 60)
            forged = [
                sign_fields(
                    record_fields(replace(real, peer_id=honest.peer_id, start=0)), liar_keys
                ),
                sign_record(replace(real, expires_at=time.time() - 5), liar_keys),
                b"\x81\xa1x\x01",
            ]
            asked = trio.Event()

            async def lie(stream: object) -> None:
                await read_varint_prefixed_bytes_limited(stream, MAX_REQUEST_BYTES)
                asked.set()
                await stream.write(encode_varint_prefixed(encode_answer(forged)))  # type: ignore[attr-defined]
                await stream.close()  # type: ignore[attr-defined]

            entry.host.set_stream_handler(DIRECTORY_PROTOCOL, lie)
            config = PeerConfig(listen=LOOPBACK, initial_peers=tuple(entry.addrs[:1]))
            async with open_peer(config) as client:
                walked = count_walks(client)
                chain = await client.find_chain(model, 6)
                assert asked.is_set()
                assert [(h.start, h.end, h.server.peer_id) for h in chain] == [
                    (0, 3, entry.peer_id),
                    (3, 6, honest.peer_id),
                ]
                assert walked  # the answer covered nothing: the DHT was walked


@pytest.mark.slow
async def test_a_stranger_flooding_the_directory_is_bounded(tiny_llama: Path) -> None:
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, _):
            target = AttackTarget(
                model=tiny_llama.name,
                model_path=tiny_llama,
                servers=tuple(s.addrs[0] for s in servers),
            )
            assert await attack_directory_flood(target)
            served = servers[0].dht.directory
            assert served.models_kept <= MAX_MODELS_KEPT
            assert served.lookups <= DIRECTORY_MODELS_ASKED
            assert served.streams_open == 0
