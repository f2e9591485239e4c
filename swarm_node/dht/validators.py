"""What a DHT value must be for this peer to store it or believe it: KadDHT validators for server
records (``/swarmnode/<peer_id>``) and evidence (``/swarmevidence/<peer_id>``), and the newest valid
value among several. discovery.py plugs them into its KadDHT and reads lookups' answers with them.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable

from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from swarm_node.dht.evidence_records import PublishedEvidence, verify_evidence
from swarm_node.dht.records import ServerRecord, select_newest
from swarm_node.dht.signing import verify_record
from swarm_node.errors import RemoteProtocolError

log = logging.getLogger(__name__)

MAX_EVIDENCE_HELD = 64  # evidence values (each <= 256 KiB) a peer stores for others: 16 MiB
MAX_EVIDENCE_PER_REPORTER = 4
# the peer whose inbound DHT stream this task is handling (None outside such a handler)
SENDER: contextvars.ContextVar[ID | None] = contextvars.ContextVar("dht_sender", default=None)


class RecordValidator(Validator):
    """KadDHT validator for ``/swarmnode/<peer_id>`` values: signed by that peer, unexpired, not older,
    and, in a PUT_VALUE, sent by that peer itself: one peer stores one value here, its own record
    (no honest peer stores another's; each re-announces its own), so a peer with many identities
    needs a connection for each.

    Runs on every peer that receives a PUT_VALUE and on every value a lookup returns. Expiry is
    wall-clock time (records cross machines), so this is the one place that reads ``time.time()``.
    """

    def __init__(
        self,
        held_seq: Callable[[str], int | None],
        on_valid: Callable[[ServerRecord, bytes], object] | None = None,
    ) -> None:
        self._held_seq = held_seq
        self._on_valid = on_valid  # hears each record that passes, with its signed value

    def validate(self, key: str, value: bytes) -> None:
        record = verify_record(value, key=key, now=time.time(), previous_seq=self._held_seq(key))
        sender = SENDER.get()
        if sender is not None and sender.to_base58() != record.peer_id:
            raise RemoteProtocolError(
                f"record of peer {record.peer_id} must be stored by that peer, got it from {sender}"
            )
        if self._on_valid is not None:
            self._on_valid(record, value)

    def select(self, key: str, values: list[bytes]) -> int:
        newest = newest_record(values, key)
        return 0 if newest is None else newest[0]


class EvidenceValidator(Validator):
    """KadDHT validator for ``/swarmevidence/<peer_id>`` values (evidence_records.py): signed by
    their reporter, who must store them itself; the latest to expire wins. A peer takes at most
    MAX_EVIDENCE_HELD values from others, MAX_EVIDENCE_PER_REPORTER from any one reporter
    (anyone may report: these bound what strangers can make it hold)."""

    def __init__(self) -> None:
        self._taken: dict[str, tuple[str, float]] = {}  # key -> (reporter, expires at)

    def validate(self, key: str, value: bytes) -> None:
        now = time.time()
        evidence = verify_evidence(value, key=key, now=now)
        sender = SENDER.get()
        if sender is None:  # our own, or an answer to our lookup: not stored for others
            return
        if sender.to_base58() != evidence.reporter:
            raise RemoteProtocolError(
                f"evidence of reporter {evidence.reporter} must be stored by it, got it from {sender}"
            )
        self._taken = {k: v for k, v in self._taken.items() if v[1] > now}
        if key not in self._taken:
            mine = sum(reporter == evidence.reporter for reporter, _ in self._taken.values())
            if len(self._taken) >= MAX_EVIDENCE_HELD or mine >= MAX_EVIDENCE_PER_REPORTER:
                raise RemoteProtocolError(
                    f"evidence: this peer holds {len(self._taken)} from others ({mine} from "
                    f"{evidence.reporter}; at most {MAX_EVIDENCE_HELD}, "
                    f"{MAX_EVIDENCE_PER_REPORTER} per reporter)"
                )
        self._taken[key] = (evidence.reporter, evidence.expires_at)

    def select(self, key: str, values: list[bytes]) -> int:
        found = valid_evidence(values, key)
        return max(found, key=lambda f: f[1].expires_at)[0] if found else 0


def valid_evidence(values: list[bytes], key: str) -> list[tuple[int, PublishedEvidence]]:
    valid = []
    for i, value in enumerate(values):
        try:
            valid.append((i, verify_evidence(value, key=key, now=time.time())))
        except RemoteProtocolError as exc:
            log.info("dropping evidence under %s: %s", key, exc)
    return valid


def newest_record(
    values: list[bytes], key: str, peer: object = None
) -> tuple[int, ServerRecord] | None:
    """(index, record) of the newest of ``values`` that is a valid record under ``key`` now
    (signature, key, expiry: a stale local copy is dropped too); drops are logged for ``peer``."""
    valid: list[tuple[int, ServerRecord]] = []
    for i, value in enumerate(values):
        try:
            valid.append((i, verify_record(value, key=key, now=time.time())))
        except RemoteProtocolError as exc:
            if peer is not None:
                log.info("dropping a record for %s: %s", peer, exc)
    return valid[select_newest([r for _, r in valid])] if valid else None
