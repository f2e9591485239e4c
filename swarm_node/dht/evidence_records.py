"""Evidence of a lie, as published in the DHT (opt-in: a client's ``--publish-evidence``).

One value per accused server, under ``/swarmevidence/<accused peer id>``: the accused's signed
receipts (dht/receipts.py) of its steps and, when the reporter opted in (``--publish-activations``:
activations reveal something of the prompt), the inputs and answers as they travelled, from
position 0 to the end of the wrong step, so that anyone can re-run them on another server of the
blocks. Without activations the value holds the wrong step's receipt alone: proof that the accused
served that input, not that it lied (a trusting client does not act on it alone). The reporter
signs the whole value (its peer key; the public key travels with it) and must store it itself.

Bounded: MAX_EVIDENCE_SIZE bytes, MAX_EVIDENCE_STEPS steps, expiry within MAX_TTL. Pure: msgpack,
libp2p's crypto and peer ids; no sockets, no torch, no clocks (callers pass ``now``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from swarm_node.dht.receipts import Receipt, verify_receipt, wire_digest
from swarm_node.dht.records import CLOCK_SKEW, MAX_BLOCKS, MAX_TTL
from swarm_node.dht.signing import canonical_bytes
from swarm_node.errors import LocalProtocolError, RemoteProtocolError
from swarm_node.protocol.tensors import WireTensor

EVIDENCE_NAMESPACE = "swarmevidence"
EVIDENCE_CONTEXT = b"swarm-node/evidence/v1\x00"  # a signature over evidence is never anything else
# bytes of one signed value: the inputs and answers of ~55 positions of SmolLM2 (hidden 576, float32)
MAX_EVIDENCE_SIZE = 256 * 1024
MAX_EVIDENCE_STEPS = 256
MAX_DIMS = 4
_RECEIPT_TYPES = {f.name: (str if f.type == "str" else int) for f in fields(Receipt)}


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedStep:
    receipt: Receipt
    signature: str  # the accused's, hex
    sent: WireTensor | None = None  # the input as it travelled (None: not published)
    answer: WireTensor | None = None  # the answer as it travelled


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedEvidence:
    accused: str  # peer id of the server that signed the steps
    reporter: str  # peer id of the client that found the lie (and signs this)
    steps: tuple[PublishedStep, ...]
    wrong: int  # the first position whose answer was wrong
    error: float  # the reporter's measured relative error there
    bound: float  # the bound it exceeded
    expires_at: float  # wall-clock seconds

    @property
    def has_activations(self) -> bool:
        return all(s.sent is not None and s.answer is not None for s in self.steps)


def evidence_key(peer_id: str) -> str:
    return f"/{EVIDENCE_NAMESPACE}/{peer_id}"


def _wire_map(wire: WireTensor | None) -> dict[str, Any] | None:
    if wire is None:
        return None
    return {
        "codec": wire.codec,
        "dtype": wire.dtype,
        "shape": list(wire.shape),
        "data": bytes(wire.data),
    }


def sign_evidence(evidence: PublishedEvidence, key_pair: KeyPair) -> bytes:
    """The DHT value of ``evidence``, signed by the reporter (whose key ``key_pair`` must be);
    LocalProtocolError when it outgrows MAX_EVIDENCE_SIZE or MAX_EVIDENCE_STEPS."""
    own = ID.from_pubkey(key_pair.public_key).to_base58()
    if own != evidence.reporter:
        raise LocalProtocolError(f"evidence of reporter {evidence.reporter} signed by {own}")
    if not 0 < len(evidence.steps) <= MAX_EVIDENCE_STEPS:
        raise LocalProtocolError(
            f"evidence must hold 1 to {MAX_EVIDENCE_STEPS} steps, got {len(evidence.steps)}"
        )
    data: dict[str, Any] = {
        "accused": evidence.accused,
        "reporter": evidence.reporter,
        "wrong": evidence.wrong,
        "error": float(evidence.error),
        "bound": float(evidence.bound),
        "expires_at": float(evidence.expires_at),
        "steps": [
            {
                "receipt": asdict(s.receipt),
                "signature": s.signature,
                "sent": _wire_map(s.sent),
                "answer": _wire_map(s.answer),
            }
            for s in evidence.steps
        ],
        "public_key": key_pair.public_key.serialize(),
    }
    data["signature"] = key_pair.private_key.sign(EVIDENCE_CONTEXT + canonical_bytes(data))
    value = msgpack.packb(data, use_bin_type=True)
    if len(value) > MAX_EVIDENCE_SIZE:
        raise LocalProtocolError(f"evidence must be <= {MAX_EVIDENCE_SIZE} bytes, got {len(value)}")
    return value


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"evidence {what}")


def _typed(data: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    item = data.get(name) if isinstance(data, dict) else None
    if isinstance(item, bool) or not isinstance(item, kind):
        raise _bad(f"{name!r} must be {getattr(kind, '__name__', kind)}, got {type(item).__name__}")
    return item


def _wire(data: Any) -> WireTensor | None:
    if data is None:
        return None
    shape = _typed(data, "shape", list)
    if len(shape) > MAX_DIMS or not all(isinstance(d, int) and 0 <= d <= 1 << 24 for d in shape):
        raise _bad(f"tensor shape must be <= {MAX_DIMS} sizes in [0, 2^24], got {shape[:8]!r}")
    return WireTensor(
        codec=_typed(data, "codec", str),
        dtype=_typed(data, "dtype", str),
        shape=tuple(shape),
        data=_typed(data, "data", bytes),
    )


def _step(data: Any) -> PublishedStep:
    receipt = _typed(data, "receipt", dict)
    values = {name: _typed(receipt, name, kind) for name, kind in _RECEIPT_TYPES.items()}
    return PublishedStep(
        receipt=Receipt(**values),
        signature=_typed(data, "signature", str),
        sent=_wire(data.get("sent")),
        answer=_wire(data.get("answer")),
    )


def _digest(wire: WireTensor) -> str:
    return wire_digest(wire.codec, wire.dtype, tuple(wire.shape), wire.data)


def verify_evidence(value: bytes, *, key: str, now: float) -> PublishedEvidence:
    """Check and decode a DHT value of evidence: size, shape, the reporter's signature, the key
    (the accused's), expiry, and that the accused signed every step's receipt (and that the
    published inputs and answers are those it signed). RemoteProtocolError on anything else."""
    if not isinstance(value, bytes | bytearray) or len(value) > MAX_EVIDENCE_SIZE:
        raise _bad(f"must be bytes of <= {MAX_EVIDENCE_SIZE}")
    try:
        data: Any = msgpack.unpackb(
            value, raw=False, strict_map_key=True, max_bin_len=MAX_EVIDENCE_SIZE, max_ext_len=0
        )
    except Exception as exc:  # noqa: BLE001 (msgpack raises several unrelated types on garbage)
        raise _bad(f"is not valid msgpack: {exc!r}") from None
    signature = _typed(data, "signature", bytes)
    try:
        public = deserialize_public_key(_typed(data, "public_key", bytes))
    except Exception as exc:  # noqa: BLE001 (protobuf and key parsing raise several types)
        raise _bad(f"public key is unreadable: {exc!r}") from None
    reporter = _typed(data, "reporter", str)
    if ID.from_pubkey(public).to_base58() != reporter:
        raise _bad(f"must be signed by its reporter {reporter}")
    if not public.verify(EVIDENCE_CONTEXT + canonical_bytes(data), signature):
        raise _bad("signature does not verify")
    accused = _typed(data, "accused", str)
    if key != evidence_key(accused):
        raise _bad(f"of {accused} must be stored under {evidence_key(accused)!r}, got {key!r}")
    steps = _typed(data, "steps", list)
    if not 0 < len(steps) <= MAX_EVIDENCE_STEPS:
        raise _bad(f"must hold 1 to {MAX_EVIDENCE_STEPS} steps, got {len(steps)}")
    evidence = PublishedEvidence(
        accused=accused,
        reporter=reporter,
        steps=tuple(_step(s) for s in steps),
        wrong=_typed(data, "wrong", int),
        error=float(_typed(data, "error", (int, float))),
        bound=float(_typed(data, "bound", (int, float))),
        expires_at=float(_typed(data, "expires_at", (int, float))),
    )
    if not now < evidence.expires_at <= now + MAX_TTL + CLOCK_SKEW:
        raise _bad(f"expires at {evidence.expires_at}: expired or beyond {MAX_TTL:.0f} s")
    if not (math.isfinite(evidence.error) and math.isfinite(evidence.bound)):
        raise _bad("error and bound must be finite")
    for step in evidence.steps:
        receipt = step.receipt
        if not 0 <= receipt.start < receipt.end <= MAX_BLOCKS:
            raise _bad(f"blocks {receipt.start}:{receipt.end} are out of range")
        if not verify_receipt(receipt, step.signature, accused):
            raise _bad(f"step {receipt.step_id} was not signed by {accused}")
        for wire, signed in (
            (step.sent, receipt.input_digest),
            (step.answer, receipt.output_digest),
        ):
            if wire is not None and _digest(wire) != signed:
                raise _bad(f"step {receipt.step_id} publishes tensors other than those signed")
    return evidence
