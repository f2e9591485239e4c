"""Signed peer records in DHT messages, each envelope's signature checked once, not once an answer.

Every py-libp2p DHT message carries signed peer records: the sender's, and one for each provider and
closer peer it names. py-libp2p checks each one's Ed25519 signature and re-stores it in the peerstore
every time it arrives (``kad_dht.utils.maybe_consume_signed_record``), and a lookup meets the same
few dozen records again and again: a fresh `generate` against 32 loopback servers checked ~2,700
signatures, `status` ~3,200 (0.45 s of its CPU, profiled), for ~35 distinct peers.

``consume_signed_record`` does what py-libp2p's does, and remembers each envelope it accepted (by
its exact bytes, per host, RECORDS_KEPT of them, REUSE_FOR seconds): the same bytes again, while
this host's peerstore still holds that very envelope, are accepted without a second check (a
re-consumption would store the same record and addresses again). Anything else (new bytes, a record
the peerstore replaced or dropped, an old entry) takes the full path.
"""

from __future__ import annotations

import logging
import time
import weakref

from libp2p.abc import IHost
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.envelope import Envelope, consume_envelope
from libp2p.peer.id import ID

log = logging.getLogger(__name__)

PEER_RECORD_DOMAIN = "libp2p-peer-record"
PEER_RECORD_TTL = 7200  # seconds the peerstore keeps a record's addresses (py-libp2p's)
RECORDS_KEPT = 4096  # accepted envelopes remembered per host
REUSE_FOR = 300.0  # seconds one is accepted again without a check (well within its addresses' TTL)

# host -> envelope bytes -> (envelope as stored, its peer, monotonic time accepted)
_accepted: weakref.WeakKeyDictionary[IHost, dict[bytes, tuple[Envelope, ID, float]]] = (
    weakref.WeakKeyDictionary()
)


def consume_signed_record(
    msg: Message | Message.Peer, host: IHost, peer_id: ID | None = None
) -> bool:
    """py-libp2p's ``maybe_consume_signed_record``: a message without a signed record passes; one
    with a record passes when its signature holds, its peer is ``peer_id`` (a message's sender) or
    the entry's id (an entry of a message), and the peerstore takes it (not older than its own)."""
    if isinstance(msg, Message):
        if not msg.HasField("senderRecord"):
            return True
        data, expected = msg.senderRecord, None if peer_id is None else peer_id.to_bytes()
    else:
        if not msg.HasField("signedRecord"):
            return True
        data, expected = msg.signedRecord, msg.id
    accepted = _accepted.setdefault(host, {})
    known = accepted.get(data)
    if known is not None:
        envelope, peer, at = known
        state = getattr(host.get_peerstore(), "peer_record_map", {}).get(peer)
        fresh = time.monotonic() - at < REUSE_FOR
        if fresh and state is not None and state.envelope is envelope and _has_addrs(host, peer):
            return expected is None or peer.to_bytes() == expected
        del accepted[data]
    try:
        envelope, record = consume_envelope(data, PEER_RECORD_DOMAIN)
        if expected is not None and record.peer_id.to_bytes() != expected:
            return False
        if not host.get_peerstore().consume_peer_record(envelope, PEER_RECORD_TTL):
            return False
    except Exception as exc:  # noqa: BLE001 (py-libp2p's parsing raises many types on garbage)
        log.debug("refused a signed peer record: %r", exc)
        return False
    if len(accepted) >= RECORDS_KEPT:
        del accepted[next(iter(accepted))]
    accepted[data] = (envelope, record.peer_id, time.monotonic())
    return True


def _has_addrs(host: IHost, peer: ID) -> bool:
    try:
        return bool(host.get_peerstore().addrs(peer))
    except Exception:  # noqa: BLE001 (PeerStoreError: none left)
        return False


def install_in_kad() -> None:
    """Use ``consume_signed_record`` in py-libp2p's own DHT code too (a server's handling of
    inbound queries, its routing-table refresh, provider and value lookups)."""
    from libp2p.kad_dht import kad_dht, peer_routing, provider_store, value_store

    for module in (kad_dht, peer_routing, provider_store, value_store):
        module.maybe_consume_signed_record = consume_signed_record  # type: ignore[attr-defined]
