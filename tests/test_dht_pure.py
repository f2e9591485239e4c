"""Records and chain choice: pure code, no network."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarm_node.dht.records import (
    MAX_RECORD_SIZE,
    ServerRecord,
    decode_record,
    encode_record,
    record_fields,
    record_key,
    select_newest,
)
from swarm_node.dht.routing import choose_chain, format_blocks
from swarm_node.errors import MissingBlocksError, RemoteProtocolError


def rec(peer: str, start: int, end: int, **kw: object) -> ServerRecord:
    fields: dict[str, object] = dict(
        peer_id=peer,
        addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{peer}",),
        model="m",
        start=start,
        end=end,
        throughput=10.0,
        cache_tokens_left=100,
        dtype="float32",
        version="0.1.0",
        seq=1,
        expires_at=100.0,
    )
    fields.update(kw)
    return ServerRecord(**fields)  # type: ignore[arg-type]


def test_record_round_trip_and_unknown_fields_ignored() -> None:
    r = rec("A", 0, 5)
    assert decode_record(encode_record(r)) == r
    data = msgpack.unpackb(encode_record(r))
    data["from_the_future"] = [1, 2, 3]
    assert decode_record(msgpack.packb(data)) == r


def test_move_claims_round_trip_and_older_records_claim_nothing() -> None:
    moving = rec("A", 0, 4, moving_to=2)
    assert decode_record(encode_record(moving)) == moving
    assert moving.moving_span == (2, 6)
    older = record_fields(moving)
    del older["moving_to"]  # a record from a server that predates claims
    assert decode_record(msgpack.packb(older)).moving_span is None


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"start": 5, "end": 5}, "start < end"),
        ({"start": "0"}, "'start' must be int"),
        ({"state": "DANCING"}, "'state' must be one of"),
        ({"addrs": "nope"}, "'addrs' must be a list"),
        ({"throughput": True}, "'throughput' must be int"),
        ({"moving_to": -2}, "'moving_to' must be a block number or -1, got -2"),
        ({"moving_to": 1.5}, "'moving_to' must be int"),
    ],
)
def test_bad_records_rejected(patch: dict, message: str) -> None:
    data = record_fields(rec("A", 0, 5))
    data.update(patch)
    with pytest.raises(RemoteProtocolError, match=message):
        decode_record(msgpack.packb(data))


@given(st.binary(max_size=300))
def test_garbage_record_raises_only_protocol_error(blob: bytes) -> None:
    try:
        decode_record(blob)
    except RemoteProtocolError:
        pass


def test_oversize_record_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match=f"<= {MAX_RECORD_SIZE} bytes"):
        decode_record(b"\x00" * (MAX_RECORD_SIZE + 1))


def test_select_newest_and_liveness() -> None:
    assert select_newest([rec("A", 0, 1, seq=3), rec("A", 0, 1, seq=7), rec("A", 0, 1, seq=5)]) == 1
    assert rec("A", 0, 1, expires_at=10.0).is_live(now=9.0)
    assert not rec("A", 0, 1, expires_at=10.0).is_live(now=10.0)
    assert not rec("A", 0, 1, state="OFFLINE").is_live(now=0.0)
    assert record_key("Qm") == "/swarmnode/Qm"


def test_chain_fewest_hops_then_latency() -> None:
    servers = [rec("A", 0, 4), rec("B", 4, 8), rec("C", 0, 8), rec("D", 0, 8)]
    chain = choose_chain(servers, model="m", start=0, end=8, latency={"C": 0.2, "D": 0.1})
    assert [(h.server.peer_id, h.start, h.end) for h in chain] == [("D", 0, 8)]


def test_chain_uses_sub_spans_and_excludes() -> None:
    servers = [rec("A", 0, 6), rec("B", 3, 10)]
    chain = choose_chain(servers, model="m", start=0, end=10)
    assert [(h.server.peer_id, h.start, h.end) for h in chain] == [("A", 0, 6), ("B", 6, 10)]
    with pytest.raises(MissingBlocksError, match=r"no server for blocks 0-2 of m"):
        choose_chain(servers, model="m", start=0, end=10, exclude=frozenset({"A"}))


def test_missing_blocks_named() -> None:
    with pytest.raises(MissingBlocksError, match=r"blocks 4-5, 9 of m"):
        choose_chain([rec("A", 0, 4), rec("B", 6, 9)], model="m", start=0, end=10)
    assert format_blocks([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
