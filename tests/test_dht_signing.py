"""Signed server records: one test per rejection rule, with real libp2p Ed25519 keys."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p import generate_new_ed25519_identity
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from swarm_node.dht import signing
from swarm_node.dht.records import MAX_RECORD_SIZE, ServerRecord, record_fields, record_key
from swarm_node.dht.signing import canonical_bytes, sign_fields, sign_record, verify_record
from swarm_node.errors import LocalProtocolError, RemoteProtocolError

KEY_A = generate_new_ed25519_identity()
KEY_B = generate_new_ed25519_identity()


def pid(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


def rec(key_pair: KeyPair = KEY_A, **kw: object) -> ServerRecord:
    peer = pid(key_pair)
    fields: dict[str, object] = dict(
        peer_id=peer,
        addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{peer}",),
        model="m",
        start=0,
        end=4,
        throughput=12.5,
        cache_tokens_left=4096,
        dtype="float32",
        version="0.1.0",
        adapters=("lora-chat",),
        next_rtts=((pid(KEY_B), 0.012),),
        seq=7,
        expires_at=100.0,
    )
    fields.update(kw)
    return ServerRecord(**fields)  # type: ignore[arg-type]


def verify(value: bytes, key_pair: KeyPair = KEY_A, **kw: object) -> ServerRecord:
    args: dict[str, object] = dict(key=record_key(pid(key_pair)), now=50.0)
    args.update(kw)
    return verify_record(value, **args)  # type: ignore[arg-type]


def tamper(value: bytes, **patch: object) -> bytes:
    data = msgpack.unpackb(value)
    data.update(patch)
    return msgpack.packb(data, use_bin_type=True)


def test_signed_round_trip() -> None:
    r = rec()
    assert verify(sign_record(r, KEY_A)) == r
    assert verify(sign_record(r, KEY_A), previous_seq=7) == r  # same seq again is fine


def test_unknown_fields_ignored_but_signed() -> None:
    fields = record_fields(rec())
    fields["from_the_future"] = {"b": [1, 2.5], "a": "x"}
    value = sign_fields(fields, KEY_A)
    assert verify(value) == rec()
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        verify(tamper(value, from_the_future={"b": [1, 2.5], "a": "y"}))
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        verify(tamper(value, another_new_field=1))


def test_canonical_encoding_ignores_key_order() -> None:
    assert canonical_bytes({"b": 1, "a": {"y": 1.0, "x": 2}}) == canonical_bytes(
        {"a": {"x": 2, "y": 1.0}, "b": 1}
    )
    assert canonical_bytes({"a": 1, "signature": b"s"}) == canonical_bytes({"a": 1})


@pytest.mark.parametrize(
    "field, value", [("throughput", 1e5), ("seq", 8), ("state", "OFFLINE"), ("end", 30)]
)
def test_changed_field_breaks_signature(field: str, value: object) -> None:
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        verify(tamper(sign_record(rec(), KEY_A), **{field: value}))


def test_missing_or_garbage_signature() -> None:
    value = sign_record(rec(), KEY_A)
    data = msgpack.unpackb(value)
    del data["signature"]
    with pytest.raises(RemoteProtocolError, match="'signature' must be bytes"):
        verify(msgpack.packb(data))
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        verify(tamper(value, signature=b"\x00" * 64))
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        verify(tamper(value, signature=b"short"))


def test_missing_or_garbage_public_key() -> None:
    data = msgpack.unpackb(sign_record(rec(), KEY_A))
    del data["public_key"]
    with pytest.raises(RemoteProtocolError, match="'public_key' must be bytes"):
        verify(msgpack.packb(data))
    with pytest.raises(RemoteProtocolError, match="not a libp2p public key"):
        verify(tamper(sign_record(rec(), KEY_A), public_key=b"\x08\x01\x12\x03abc"))


def test_record_signed_by_another_peer() -> None:
    """B signs a record that claims to be A's: its key's peer id is not A."""
    forged = sign_fields(record_fields(rec(KEY_A)), KEY_B)
    with pytest.raises(RemoteProtocolError, match="carries the public key of"):
        verify(forged)
    # ... and B's key with A's signature: the signature fails or the peer id does not match
    with pytest.raises(RemoteProtocolError):
        verify(tamper(sign_record(rec(), KEY_A), public_key=KEY_B.public_key.serialize()))
    with pytest.raises(LocalProtocolError, match="cannot be signed with the key of"):
        sign_record(rec(KEY_A), KEY_B)


def test_record_stored_under_another_peers_key() -> None:
    """A valid record of A written under B's key (a peer writing for another peer)."""
    with pytest.raises(RemoteProtocolError, match="stored under another key"):
        verify(sign_record(rec(KEY_A), KEY_A), key=record_key(pid(KEY_B)))


def test_expired_record() -> None:
    value = sign_record(rec(expires_at=100.0), KEY_A)
    assert verify(value, now=99.9).expires_at == 100.0
    with pytest.raises(RemoteProtocolError, match="expired at 100.000, now is 100.000"):
        verify(value, now=100.0)


def test_older_seq() -> None:
    value = sign_record(rec(seq=7), KEY_A)
    with pytest.raises(RemoteProtocolError, match="seq 7, older than the 8"):
        verify(value, previous_seq=8)


def test_oversize_record() -> None:
    with pytest.raises(RemoteProtocolError, match=f"<= {MAX_RECORD_SIZE} bytes"):
        verify(tamper(sign_record(rec(), KEY_A), padding="x" * MAX_RECORD_SIZE))
    with pytest.raises(LocalProtocolError, match=f"<= {MAX_RECORD_SIZE} bytes"):
        sign_fields({**record_fields(rec()), "padding": "x" * MAX_RECORD_SIZE}, KEY_A)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"start": 4}, "start < end"),
        ({"addrs": 3}, "'addrs' must be a list"),
        ({"throughput": float("nan")}, r"'throughput' must be in \[0, 1e\+06\], got nan"),
    ],
)
def test_malformed_signed_record(patch: dict, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        verify(sign_fields({**record_fields(rec()), **patch}, KEY_A))


def test_deep_nesting_rejected() -> None:
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    with pytest.raises(RemoteProtocolError, match="nests deeper"):
        verify(tamper(sign_record(rec(), KEY_A), deep=nested))


@given(st.binary(max_size=400))
def test_garbage_raises_only_protocol_error(blob: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        verify(blob)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=70)
)
_values = st.recursive(
    _scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from([*record_fields(rec()), "public_key", "signature", "x"]), _values
    )
)
def test_near_records_raise_only_protocol_error(patch: dict) -> None:
    """A signed record with random fields replaced: RemoteProtocolError, or the same record."""
    value = tamper(sign_record(rec(), KEY_A), **patch)
    try:
        assert verify(value) == rec()  # only when every patched field kept its value
    except RemoteProtocolError:
        pass


def test_relayed_addresses_accepted() -> None:
    a, b = pid(KEY_A), pid(KEY_B)
    circuit = f"/ip4/10.0.0.2/tcp/31337/p2p/{b}/p2p-circuit/p2p/{a}"
    r = rec(addrs=(circuit,), reachability="private")
    assert verify(sign_record(r, KEY_A)) == r
    assert verify(sign_record(rec(relay_slots=16, reachability="public"), KEY_A)).relay_slots == 16


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("/ip4/10.0.0.2/tcp/1/p2p/{b}/p2p-circuit/p2p/{b}", "another peer"),  # for someone else
        ("/ip4/10.0.0.2/tcp/1/p2p/{a}/p2p-circuit/p2p/{a}", "its relay's peer id"),  # self-relay
        ("/ip4/10.0.0.2/tcp/1/p2p-circuit/p2p/{a}", "its relay's peer id"),  # no relay id
        ("/p2p/{b}/p2p-circuit/p2p/{a}", "ip4, ip6 or dns"),  # relay at no address
        ("/ip4/10.0.0.2/tcp/1/p2p/{b}/p2p-circuit/p2p/{b}/p2p-circuit/p2p/{a}", "must end with"),
        ("/ip4/10.0.0.2/tcp/1/p2p/{b}/p2p-circuit", "must end with"),  # nobody at the end
    ],
)
def test_bad_relayed_addresses_refused(template: str, message: str) -> None:
    addr = template.format(a=pid(KEY_A), b=pid(KEY_B))
    with pytest.raises(RemoteProtocolError, match=message):
        verify(sign_record(rec(addrs=(addr,)), KEY_A))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"reachability": "everywhere"}, "'reachability' must be one of"),
        ({"relay_slots": -1}, "'relay_slots' must be in"),
        ({"relay_slots": 10**6}, "'relay_slots' must be in"),
    ],
)
def test_bad_reachability_fields_refused(patch: dict, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        verify(sign_record(rec(**patch), KEY_A))


def test_a_value_s_signature_is_checked_once_and_its_time_rules_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a server re-checked two signatures on every PUT_VALUE it took (validate, then select)
    checked: list[str] = []
    real = signing._check_signature

    def check(data: object, public_key: object, peer_id: str) -> None:
        checked.append(peer_id)
        real(data, public_key, peer_id)  # type: ignore[arg-type]

    monkeypatch.setattr(signing, "_check_signature", check)
    value = sign_record(rec(seq=11, expires_at=99.0), KEY_A)
    assert verify(value).seq == 11
    assert verify(value, now=60.0).seq == 11
    assert len(checked) == 1
    with pytest.raises(RemoteProtocolError, match="expired"):
        verify(value, now=99.5)
    with pytest.raises(RemoteProtocolError, match="older than"):
        verify(value, previous_seq=12)
    with pytest.raises(RemoteProtocolError, match="another key"):
        verify(value, key=record_key(pid(KEY_B)))
    forged = tamper(value, throughput=99.0)
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        verify(forged)
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        verify(forged)
    assert len(checked) == 1 + 2  # a value refused is checked again each time it comes
