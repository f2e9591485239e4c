"""Signed server records: the signature lives inside the DHT value, so every reader can check it.

A signed value is one msgpack map: the record's fields, ``public_key`` (the server's libp2p public
key, protobuf-serialized) and ``signature`` over the canonical encoding of every other entry of the
map, unknown fields included (a newer server's extra fields are covered, an older client ignores
them). Canonical: msgpack of the map with keys sorted at every level, floats as float64, ints in
their shortest form: what ``canonical_bytes`` returns.

Pure: libp2p's crypto and peer-id code, no sockets, no clocks (callers pass ``now``); a record's
time-independent checks are done once per distinct value. Knows nothing of KadDHT; validators.py
plugs ``verify_record`` into its validator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import msgpack
from libp2p.crypto.keys import KeyPair, PublicKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from swarm_node.dht.records import (
    CLOCK_SKEW,
    MAX_RECORD_SIZE,
    MAX_TTL,
    ServerRecord,
    record_fields,
    record_from_map,
    record_key,
    unpack_map,
)
from swarm_node.errors import LocalProtocolError, RemoteProtocolError

PUBLIC_KEY = "public_key"
SIGNATURE = "signature"
SIGNING_CONTEXT = b"swarm-node/server-record/v1\x00"  # so a record signature is never anything else
MAX_DEPTH = 16  # nesting of maps/lists in a record (ours use 2)
VERIFIED_KEPT = 2048  # records remembered as passing the checks that do not depend on the time

# sha256(key, value) -> its record (frozen): what _signed_record found valid
_verified: dict[bytes, ServerRecord] = {}


def _canonical(item: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise RemoteProtocolError(f"server record nests deeper than {MAX_DEPTH} levels")
    if isinstance(item, dict):
        # strict_map_key keeps keys to str and bytes; order str before bytes, then by value
        keys = sorted(item, key=lambda k: (isinstance(k, bytes), k))
        return {k: _canonical(item[k], depth + 1) for k in keys}
    if isinstance(item, list | tuple):
        return [_canonical(x, depth + 1) for x in item]
    return item


def canonical_bytes(fields: Mapping[Any, Any]) -> bytes:
    """What a signature covers: the map less ``signature``, keys sorted, floats as float64."""
    unsigned = {k: v for k, v in fields.items() if k != SIGNATURE}
    return msgpack.packb(_canonical(unsigned, 0), use_bin_type=True, use_single_float=False)


def sign_fields(fields: Mapping[str, Any], key_pair: KeyPair) -> bytes:
    """Sign any record map (``sign_record`` for ServerRecords; tests add unknown fields)."""
    data = {k: v for k, v in fields.items() if k not in (PUBLIC_KEY, SIGNATURE)}
    data[PUBLIC_KEY] = key_pair.public_key.serialize()
    data[SIGNATURE] = key_pair.private_key.sign(SIGNING_CONTEXT + canonical_bytes(data))
    value = msgpack.packb(data, use_bin_type=True)
    if len(value) > MAX_RECORD_SIZE:
        raise LocalProtocolError(
            f"signed server record must be <= {MAX_RECORD_SIZE} bytes, got {len(value)}"
        )
    return value


def sign_record(record: ServerRecord, key_pair: KeyPair) -> bytes:
    """The DHT value of ``record``, signed with the server's key (its peer id: the record's)."""
    own_id = ID.from_pubkey(key_pair.public_key).to_base58()
    if own_id != record.peer_id:
        raise LocalProtocolError(
            f"record of peer {record.peer_id} cannot be signed with the key of {own_id}"
        )
    return sign_fields(record_fields(record), key_pair)


def _bytes_field(data: Mapping[Any, Any], name: str) -> bytes:
    raw = data.get(name)
    if not isinstance(raw, bytes):
        raise RemoteProtocolError(f"server record {name!r} must be bytes, got {type(raw).__name__}")
    return raw


def _public_key(data: Mapping[Any, Any]) -> PublicKey:
    raw = _bytes_field(data, PUBLIC_KEY)
    try:
        return deserialize_public_key(raw)
    except Exception as exc:  # noqa: BLE001 - protobuf and key backends raise many types on garbage
        raise RemoteProtocolError(
            f"server record {PUBLIC_KEY!r} is not a libp2p public key: {exc!r}"
        ) from None


def _check_signature(data: Mapping[Any, Any], public_key: PublicKey, peer_id: str) -> None:
    signature = _bytes_field(data, SIGNATURE)
    try:
        ok = public_key.verify(SIGNING_CONTEXT + canonical_bytes(data), signature)
    except RemoteProtocolError:
        raise
    except Exception:  # noqa: BLE001 - nacl: ValueError on a short signature; others differ
        ok = False
    if not ok:
        raise RemoteProtocolError(f"server record of {peer_id} has a bad signature")


def verify_record(
    value: bytes, *, key: str, now: float, previous_seq: int | None = None
) -> ServerRecord:
    """The record in a signed DHT value, or RemoteProtocolError saying which rule it breaks.

    Rules: at most MAX_RECORD_SIZE bytes; well-formed and within records.py's bounds; stored under
    its own peer's key; a public key whose peer id is the record's; a valid signature;
    ``now < expires_at <= now + MAX_TTL + CLOCK_SKEW``; addresses that parse, each of this peer (no
    /p2p/ of another); ``seq >= previous_seq``.
    """
    record = _signed_record(value, key)
    if record.expires_at <= now:
        raise RemoteProtocolError(
            f"record of peer {record.peer_id} expired at {record.expires_at:.3f}, now is {now:.3f}"
        )
    if record.expires_at > now + MAX_TTL + CLOCK_SKEW:
        raise RemoteProtocolError(
            f"record of peer {record.peer_id} must expire within {MAX_TTL + CLOCK_SKEW:.0f} s, "
            f"got {record.expires_at - now:.0f} s from now"
        )
    if previous_seq is not None and record.seq < previous_seq:
        raise RemoteProtocolError(
            f"record of peer {record.peer_id} has seq {record.seq}, "
            f"older than the {previous_seq} already held"
        )
    return record


def _signed_record(value: bytes, key: str) -> ServerRecord:
    """The record in ``value`` if it passes every rule that does not depend on the time: remembered
    (by a hash of key and value, VERIFIED_KEPT of them): a server re-checked the signatures of the
    record it held and of the one it was sent on every PUT_VALUE (validate, then select), and
    lookups meet the same records again and again."""
    digest = None
    if isinstance(value, bytes) and len(value) <= MAX_RECORD_SIZE:  # else unpack_map says why
        named = key.encode()  # its length first: no other key and value hash the same way
        digest = hashlib.sha256(len(named).to_bytes(8, "big") + named + value).digest()
        known = _verified.get(digest)
        if known is not None:
            return known
    data = unpack_map(value)
    record = record_from_map(data)
    if key != record_key(record.peer_id):
        raise RemoteProtocolError(
            f"record of peer {record.peer_id} stored under another key {key!r}"
        )
    public_key = _public_key(data)
    signer = ID.from_pubkey(public_key).to_base58()
    if signer != record.peer_id:
        raise RemoteProtocolError(
            f"record of peer {record.peer_id} carries the public key of {signer}"
        )
    _check_signature(data, public_key, record.peer_id)
    _check_addrs(record)
    if digest is not None:
        if len(_verified) >= VERIFIED_KEPT:
            del _verified[next(iter(_verified))]
        _verified[digest] = record
    return record


def _check_addrs(record: ServerRecord) -> None:
    """Every address parses as a multiaddr and names no other peer: a record must not make readers
    store addresses for a third party's id, nor stop their lookups on one that does not parse."""
    for text in record.addrs:
        try:
            addr = Multiaddr(text)
            named = addr.get_peer_id()
        except Exception as exc:  # noqa: BLE001 (multiaddr raises several types for bad text)
            raise RemoteProtocolError(
                f"record of peer {record.peer_id}: {text[:100]!r} is not a multiaddr: {exc}"
            ) from None
        if named is not None and named != record.peer_id:
            raise RemoteProtocolError(
                f"record of peer {record.peer_id} lists an address of another peer: {text[:100]!r}"
            )
        if "/p2p-circuit" in text:
            _check_circuit(record.peer_id, text)


def _check_circuit(peer_id: str, text: str) -> None:
    """A relayed address ``<relay>/p2p/<relay id>/p2p-circuit/p2p/<peer_id>``: one circuit, a relay
    part that is a direct ip4/ip6/dns address with its own peer id (not the writer's)."""
    relay, _, rest = text.partition("/p2p-circuit")
    problem = ""
    if rest != f"/p2p/{peer_id}":
        problem = f"must end with /p2p-circuit/p2p/{peer_id}"
    else:
        try:
            relay_id = Multiaddr(relay).get_peer_id()
            first = Multiaddr(relay).protocols()[0].name
        except Exception:  # noqa: BLE001 (multiaddr raises several types for bad text)
            relay_id, first = None, ""
        if relay_id is None or relay_id == peer_id:
            problem = "must name its relay's peer id (another peer's) before /p2p-circuit"
        elif first not in ("ip4", "ip6", "dns", "dns4", "dns6"):
            problem = "must reach its relay at an ip4, ip6 or dns address"
    if problem:
        raise RemoteProtocolError(
            f"record of peer {peer_id}: relayed address {text[:160]!r} {problem}"
        )
