"""Server records: what a server tells the swarm about itself, and the DHT keys they live under.

Pure data: no sockets, no clocks (callers pass ``now``), no libp2p imports. A record is a msgpack
map; unknown fields are ignored so that newer servers work with older clients.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from swarm_node.errors import RemoteProtocolError

RECORD_NAMESPACE = "swarmnode"
MAX_RECORD_SIZE = 8 * 1024  # bytes; a record lists a few addresses and numbers
MAX_ADDRS = 16
STATES = ("JOINING", "ONLINE", "OFFLINE")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerRecord:
    peer_id: str  # base58 libp2p peer id
    addrs: tuple[str, ...]  # full multiaddrs, with /p2p/<peer_id>
    model: str  # model id, e.g. "smollm2-135m"
    start: int  # first block served
    end: int  # one past the last block served
    throughput: float  # tokens/s this server can push through its span
    cache_tokens_left: int  # attention-cache room, in tokens of one sequence
    dtype: str
    version: str
    state: str = "ONLINE"
    seq: int = 0  # grows with every announcement; the highest wins
    expires_at: float = 0.0  # seconds on the announcing clock (wall clock, shared)

    def covers(self, block: int) -> bool:
        return self.start <= block < self.end

    def is_live(self, now: float) -> bool:
        return self.state == "ONLINE" and self.expires_at > now


def record_key(peer_id: str) -> str:
    """The DHT value key of a server's record."""
    return f"/{RECORD_NAMESPACE}/{peer_id}"


def block_key(model: str, block: int) -> str:
    """The DHT provider key of "block ``block`` of ``model``" (a multihash hex string for KadDHT)."""
    digest = hashlib.sha256(f"swarm-node/{model}/block/{block}".encode()).digest()
    return (bytes([0x12, 0x20]) + digest).hex()  # sha2-256 multihash


def encode_record(record: ServerRecord) -> bytes:
    data = dataclasses.asdict(record)
    data["addrs"] = list(record.addrs)
    return msgpack.packb(data, use_bin_type=True)


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
}


def decode_record(value: bytes) -> ServerRecord:
    """Parse a record from the DHT; raise RemoteProtocolError on anything malformed."""
    if len(value) > MAX_RECORD_SIZE:
        raise RemoteProtocolError(f"server record must be <= {MAX_RECORD_SIZE} bytes, got {len(value)}")
    try:
        data: Any = msgpack.unpackb(value, raw=False, strict_map_key=True, max_bin_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RemoteProtocolError(f"server record is not valid msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise RemoteProtocolError(f"server record must be a map, got {type(data).__name__}")
    fields: dict[str, Any] = {}
    for name, types in _FIELD_TYPES.items():
        if name not in data:
            if name in ("state", "seq", "expires_at"):
                continue
            raise RemoteProtocolError(f"server record lacks {name!r}")
        item = data[name]
        if isinstance(item, bool) or not isinstance(item, types):
            raise RemoteProtocolError(
                f"server record {name!r} must be {types[0].__name__}, got {type(item).__name__}"
            )
        fields[name] = item
    addrs = data.get("addrs")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS or not all(isinstance(a, str) for a in addrs):
        raise RemoteProtocolError(f"server record 'addrs' must be a list of <= {MAX_ADDRS} strings")
    fields["addrs"] = tuple(addrs)
    if not 0 <= fields["start"] < fields["end"]:
        raise RemoteProtocolError(
            f"server record span must satisfy 0 <= start < end, got {fields['start']}:{fields['end']}"
        )
    if fields.get("state", "ONLINE") not in STATES:
        raise RemoteProtocolError(f"server record 'state' must be one of {STATES}, got {fields['state']!r}")
    return ServerRecord(**fields)


def select_newest(records: list[ServerRecord]) -> int:
    """Index of the record to keep among versions of one key: the highest ``seq`` (first on ties)."""
    best = 0
    for i, rec in enumerate(records):
        if rec.seq > records[best].seq:
            best = i
    return best
