"""Server records: what a server tells the swarm about itself, and the DHT keys they live under.

Pure data: no sockets, no clocks (callers pass ``now``), no libp2p imports (signatures live in
signing.py). A record is a msgpack map; unknown fields are ignored so that newer servers work with
older clients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from swarm_node.errors import RemoteProtocolError

RECORD_NAMESPACE = "swarmnode"
# bytes; the largest an honest server writes (64 adapters with 64-character names and their ids,
# 16 relayed addresses, 32 round trips) is ~12 KiB (tests/test_model_identity.py)
MAX_RECORD_SIZE = 16 * 1024
MAX_ADDRS = 16
MAX_ADAPTERS = 64
MAX_NEXT_RTTS = 32  # round trips a server publishes to servers of its next blocks
MAX_BIN_LEN = 1024  # bytes; the public key and signature are the only bin fields (Ed25519: 36, 64)
STATES = ("JOINING", "ONLINE", "OFFLINE")
REACHABILITIES = ("public", "private", "unknown")
MAX_RELAY_SLOTS = 1024
MAX_OPERATOR = 64  # characters of a record's operator name
# Bounds a signed record must keep to be believed: a signature says who wrote a record, not that it
# is sane. No model has MAX_BLOCKS blocks (the largest served today have ~130); no span pushes
# MAX_THROUGHPUT tokens/s; no record is valid for longer than MAX_TTL, plus CLOCK_SKEW between the
# writer's clock and the reader's.
MAX_BLOCKS = 4096
DEVICE_KINDS = ("", "cpu", "cuda", "mps")  # a record's device: the kind, never a card's name
MAX_COUNT = 1 << 20  # bound of a record's session and batch counts
MODEL_KEY_SHARDS = 4  # provider keys of a model's servers (records.model_key)
MAX_THROUGHPUT = 1e6
MAX_TTL = 24 * 3600.0
CLOCK_SKEW = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerRecord:
    peer_id: str  # base58 libp2p peer id
    addrs: tuple[str, ...]  # full multiaddrs, with /p2p/<peer_id>
    model: str  # the model's name, e.g. "smollm2-135m": what lookups are keyed by
    start: int  # first block served
    end: int  # one past the last block served
    throughput: float  # tokens/s this server can push through its span
    cache_tokens_left: int  # attention-cache room, in tokens of one sequence
    dtype: str
    version: str
    adapters: tuple[str, ...] = ()  # names of the fine-tuned adapters (LoRA, prompts) it can apply
    adapter_ids: tuple[str, ...] = ()  # their ids (digests of their files), to name one exactly
    next_rtts: tuple[tuple[str, float], ...] = ()  # (peer id, round trip s) to next-block servers
    quant: str = "none"  # how the weights are held: "none" (dtype), "int8" or "nf4"
    bytes_per_block: int = 0  # weight memory of one block as held
    cache_bytes_per_token: int = 0  # attention-cache memory one token takes in one block
    device: str = ""  # what computes the blocks: "cpu", "cuda", "mps" ("": not said)
    state: str = "ONLINE"
    # first block of the span this server is loading to move to (same length), -1 when not moving:
    # placement's claim, so that two servers do not both leave the same blocks (node/placement.py)
    moving_to: int = -1
    # what the weights are (model/identity.py): sha256 hex of the whole model, and of the blocks
    # start..end-1 as served ("" from servers that predate digests)
    model_digest: str = ""
    blocks_digest: str = ""
    reachability: str = "unknown"  # "public", "private" (reached through relays) or "unknown"
    relay_slots: int = 0  # reservations it offers private peers as a relay (0: none)
    sessions: int = 0  # sessions open on it when announced
    batch: int = 0  # most sessions' decode steps computed in one forward lately (0: none)
    # who runs it, as its operator says (`serve --operator`; "": unsaid): spot checks prefer a
    # checker of another operator (node/client/verification.py)
    operator: str = ""
    seq: int = 0  # grows with every announcement; the highest wins
    expires_at: float = 0.0  # seconds on the announcing clock (wall clock, shared)

    def holds_adapter(self, adapter: str) -> bool:
        """Whether this server applies ``adapter``, a name or an id."""
        return adapter in self.adapters or adapter in self.adapter_ids

    def covers(self, block: int) -> bool:
        return self.start <= block < self.end

    @property
    def moving_span(self) -> tuple[int, int] | None:
        """The span this server is moving to, or None."""
        return (
            None if self.moving_to < 0 else (self.moving_to, self.moving_to + self.end - self.start)
        )

    def is_live(self, now: float) -> bool:
        return self.state == "ONLINE" and self.expires_at > now


def record_key(peer_id: str) -> str:
    """The DHT value key of a server's record."""
    return f"/{RECORD_NAMESPACE}/{peer_id}"


def push_target_problem(
    record: ServerRecord | None,
    *,
    peer_id: str,
    model: str,
    block: int,
    now: float,
    digest: str = "",
) -> str | None:
    """Why ``peer_id``, holding ``record`` (its valid signed record, or None), is not a server that a
    session may push block ``block`` of ``model`` (model digest ``digest``, when given) to; None
    when it is."""
    if record is None:
        return f"{peer_id} has no valid signed server record"
    if record.peer_id != peer_id:
        return f"the record found for {peer_id} is of {record.peer_id}"
    if record.model != model:
        return f"{peer_id} serves model {record.model!r}, not {model!r}"
    if digest and record.model_digest != digest:
        return (
            f"{peer_id} serves other weights of {model!r}: digest "
            f"{record.model_digest[:12] or 'none'}, not {digest[:12]}"
        )
    if not record.covers(block):
        return f"{peer_id} announces blocks {record.start}:{record.end}, not block {block}"
    if not record.is_live(now):
        return f"{peer_id}'s record is not live (state {record.state}, expires at {record.expires_at:.0f})"
    if not record.addrs:
        return f"{peer_id}'s record lists no address"
    return None


def _provider_key(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return (bytes([0x12, 0x20]) + digest).hex()  # a sha2-256 multihash, as KadDHT expects


def block_key(weights: str, block: int) -> str:
    """The DHT provider key of "block ``block`` of the weights ``weights``": a model digest
    (model/identity.py), or the model's name for servers that predate digests. Keyed by content:
    servers of other weights, whatever name they claim, are never found under it."""
    return _provider_key(f"swarm-node/{weights}/block/{block}")


def model_key(weights: str, shard: int) -> str:
    """The DHT provider key of "servers of ``weights``" (a model digest, or a model's name), one of
    MODEL_KEY_SHARDS: each server provides the one of its ``model_shard``, so MODEL_KEY_SHARDS
    lookups find a model's servers whatever its number of blocks (their spans are in their signed
    records). Shards, because a KadDHT peer keeps 20 providers a key: one key would show a lookup
    20 servers of a model at most. Under the name, a client that knows only the name learns which
    digests are served."""
    return _provider_key(f"swarm-node/{weights}/servers/{shard}")


def model_shard(peer_id: str) -> int:
    """Which of the model keys the server ``peer_id`` provides."""
    return hashlib.sha256(peer_id.encode()).digest()[0] % MODEL_KEY_SHARDS


def weights_of(record: ServerRecord) -> str:
    """What ``record``'s blocks are keyed by: its model digest, or its name when it has none."""
    return record.model_digest or record.model


def provider_keys(record: ServerRecord) -> list[str]:
    """The provider keys the server of ``record`` provides, in the order to send them: its shard
    of the name's model keys, of the digest's, then its blocks' keys (under the digest)."""
    shard = model_shard(record.peer_id)
    keys = [model_key(record.model, shard)]
    if record.model_digest:
        keys.append(model_key(record.model_digest, shard))
    weights = weights_of(record)
    return keys + [block_key(weights, b) for b in range(record.start, record.end)]


def record_fields(record: ServerRecord) -> dict[str, Any]:
    """The msgpack map of a record (lists and maps where the dataclass holds tuples)."""
    data = dataclasses.asdict(record)
    data["addrs"] = list(record.addrs)
    data["adapters"] = list(record.adapters)
    data["adapter_ids"] = list(record.adapter_ids)
    data["next_rtts"] = {peer: float(rtt) for peer, rtt in record.next_rtts}
    return data


def encode_record(record: ServerRecord) -> bytes:
    """An unsigned record (tests, local use); what goes into the DHT is signing.sign_record's."""
    return msgpack.packb(record_fields(record), use_bin_type=True)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "peer_id": (str,),
    "model": (str,),
    "start": (int,),
    "end": (int,),
    "throughput": (int, float),
    "cache_tokens_left": (int,),
    "dtype": (str,),
    "version": (str,),
    "state": (str,),
    "seq": (int,),
    "expires_at": (int, float),
    "quant": (str,),
    "bytes_per_block": (int,),
    "cache_bytes_per_token": (int,),
    "device": (str,),
    "moving_to": (int,),
    "model_digest": (str,),
    "blocks_digest": (str,),
    "reachability": (str,),
    "relay_slots": (int,),
    "sessions": (int,),
    "batch": (int,),
    "operator": (str,),
}
_OPTIONAL = (
    "state",
    "seq",
    "expires_at",
    "quant",
    "bytes_per_block",
    "cache_bytes_per_token",
    "device",
    "moving_to",
    "model_digest",
    "blocks_digest",
    "reachability",
    "relay_slots",
    "sessions",
    "batch",
    "operator",
)
DIGEST_HEX = 64  # a sha256 digest in hex
ADAPTER_ID_HEX = 32  # model.identity.ADAPTER_ID_HEX


def unpack_map(value: bytes) -> dict[Any, Any]:
    """The msgpack map in ``value``, size-checked; raise RemoteProtocolError on anything else."""
    if not isinstance(value, bytes | bytearray):
        raise RemoteProtocolError(f"server record must be bytes, got {type(value).__name__}")
    if len(value) > MAX_RECORD_SIZE:
        raise RemoteProtocolError(
            f"server record must be <= {MAX_RECORD_SIZE} bytes, got {len(value)}"
        )
    try:
        data: Any = msgpack.unpackb(
            value, raw=False, strict_map_key=True, max_bin_len=MAX_BIN_LEN, max_ext_len=0
        )
    except Exception as exc:  # noqa: BLE001 (msgpack raises several unrelated types on garbage)
        raise RemoteProtocolError(f"server record is not valid msgpack: {exc!r}") from None
    if not isinstance(data, dict):
        raise RemoteProtocolError(f"server record must be a map, got {type(data).__name__}")
    return data


def _str_list(data: dict[Any, Any], name: str, limit: int) -> tuple[str, ...]:
    items = data.get(name, [])
    ok = isinstance(items, list) and len(items) <= limit
    if not (ok and all(isinstance(a, str) for a in items)):
        raise RemoteProtocolError(f"server record {name!r} must be a list of <= {limit} strings")
    return tuple(items)


def _next_rtts(data: dict[Any, Any]) -> tuple[tuple[str, float], ...]:
    items = data.get("next_rtts", {})
    if not isinstance(items, dict) or len(items) > MAX_NEXT_RTTS:
        raise RemoteProtocolError(
            f"server record 'next_rtts' must be a map of <= {MAX_NEXT_RTTS} entries"
        )
    out = []
    for peer, rtt in items.items():
        number = isinstance(rtt, int | float) and not isinstance(rtt, bool)
        if not (isinstance(peer, str) and number and math.isfinite(rtt) and rtt >= 0):
            raise RemoteProtocolError(
                "server record 'next_rtts' must map peer ids to seconds >= 0, "
                f"got {peer!r}: {rtt!r}"
            )
        out.append((peer, float(rtt)))
    return tuple(sorted(out))


def record_from_map(data: dict[Any, Any]) -> ServerRecord:
    """Check and convert an unpacked record map; unknown fields are ignored."""
    fields: dict[str, Any] = {}
    for name, types in _FIELD_TYPES.items():
        if name not in data:
            if name in _OPTIONAL:
                continue
            raise RemoteProtocolError(f"server record lacks {name!r}")
        item = data[name]
        if isinstance(item, bool) or not isinstance(item, types):
            raise RemoteProtocolError(
                f"server record {name!r} must be {types[0].__name__}, got {type(item).__name__}"
            )
        fields[name] = item
    fields["addrs"] = _str_list(data, "addrs", MAX_ADDRS) if "addrs" in data else None
    if fields["addrs"] is None:
        raise RemoteProtocolError("server record lacks 'addrs'")
    fields["adapters"] = _str_list(data, "adapters", MAX_ADAPTERS)
    fields["adapter_ids"] = _str_list(data, "adapter_ids", MAX_ADAPTERS)
    for adapter in fields["adapter_ids"]:
        if not (len(adapter) == ADAPTER_ID_HEX and is_digest(adapter + "0" * 32)):
            raise RemoteProtocolError(
                f"server record 'adapter_ids' must hold {ADAPTER_ID_HEX} lowercase hex digits each, "
                f"got {adapter[:80]!r}"
            )
    fields["next_rtts"] = _next_rtts(data)
    if not 0 <= fields["start"] < fields["end"] <= MAX_BLOCKS:
        raise RemoteProtocolError(
            f"server record span must satisfy 0 <= start < end <= {MAX_BLOCKS}, "
            f"got {fields['start']}:{fields['end']}"
        )

    def check(name: str, ok: bool, expectation: str) -> None:
        if not ok:
            raise RemoteProtocolError(
                f"server record {name!r} must be {expectation}, got {fields[name]!r}"
            )

    throughput = fields["throughput"]
    check("throughput", 0 <= throughput <= MAX_THROUGHPUT, f"in [0, {MAX_THROUGHPUT:g}]")
    check("cache_tokens_left", fields["cache_tokens_left"] >= 0, ">= 0")
    check("bytes_per_block", fields.get("bytes_per_block", 0) >= 0, ">= 0")
    check("cache_bytes_per_token", fields.get("cache_bytes_per_token", 0) >= 0, ">= 0")
    check("device", fields.get("device", "") in DEVICE_KINDS, f"one of {DEVICE_KINDS}")
    for name in ("sessions", "batch"):
        check(name, 0 <= fields.get(name, 0) <= MAX_COUNT, f"in [0, {MAX_COUNT}]")
    moving_to = fields.get("moving_to", -1)
    span = fields["end"] - fields["start"]
    check(
        "moving_to", moving_to == -1 or 0 <= moving_to <= MAX_BLOCKS - span, "a block number or -1"
    )
    check("expires_at", math.isfinite(fields.get("expires_at", 0.0)), "finite")
    check("state", fields.get("state", "ONLINE") in STATES, f"one of {STATES}")
    for name in ("model_digest", "blocks_digest"):
        check(name, is_digest(fields.get(name, "")), f"{DIGEST_HEX} lowercase hex digits or empty")
    check(
        "reachability",
        fields.get("reachability", "unknown") in REACHABILITIES,
        f"one of {REACHABILITIES}",
    )
    check(
        "relay_slots",
        0 <= fields.get("relay_slots", 0) <= MAX_RELAY_SLOTS,
        f"in [0, {MAX_RELAY_SLOTS}]",
    )
    operator = fields.get("operator", "")
    check(
        "operator",
        len(operator) <= MAX_OPERATOR and operator.isprintable(),
        f"printable, at most {MAX_OPERATOR} characters",
    )
    return ServerRecord(**fields)


def is_digest(text: str) -> bool:
    """A sha256 digest as records carry it (64 lowercase hex digits), or "" for none."""
    return text == "" or (len(text) == DIGEST_HEX and all(c in "0123456789abcdef" for c in text))


def decode_record(value: bytes) -> ServerRecord:
    """Parse a record WITHOUT checking its signature; RemoteProtocolError on anything malformed.

    Anything read from the network goes through ``signing.verify_record`` instead.
    """
    return record_from_map(unpack_map(value))


def select_newest(records: list[ServerRecord]) -> int:
    """Index of the record to keep among versions of one key: the highest ``seq`` (first on ties)."""
    return max(range(len(records)), key=lambda i: records[i].seq, default=0)
