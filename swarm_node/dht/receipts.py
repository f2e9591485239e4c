"""Signed receipts of a server's step answers: its word, under its peer key, for what it computed.

A receipt names the model (its digest), the blocks, the session, the step and its first position,
and the sha256 of the step's input and of its output as they travelled (codec, dtype, shape and the
encoded bytes). The server signs it with its libp2p key and sends the signature with the answer;
the client, who knows every other field, keeps it. With the inputs and outputs of the session's
steps, anyone holding the same blocks can recompute the answer and see that the server signed
something wrong (node/client/evidence.py).

Pure: libp2p's crypto and peer ids, hashlib and msgpack; no sockets, no torch.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import asdict, dataclass

import msgpack
from libp2p.crypto.keys import PrivateKey, PublicKey
from libp2p.peer.id import ID

RECEIPT_CONTEXT = b"swarm-node/step-receipt/v1\x00"  # a receipt's signature is never anything else
SIGNATURE_HEX = 128  # an Ed25519 signature in hex; longer text is not a signature of ours


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    model: str  # the model's digest (model/identity.py), as the server announces it
    start: int
    end: int  # blocks start..end-1
    session_id: str
    step_id: int
    position: int  # the step's first position
    input_digest: str  # wire_digest of what the server computed from
    output_digest: str  # wire_digest of what it answered


def wire_digest(codec: str, dtype: str, shape: tuple[int, ...], data: bytes | memoryview) -> str:
    """sha256 hex of a tensor as it travels: its codec, dtype, shape and encoded bytes."""
    hasher = hashlib.sha256(f"{codec}/{dtype}/".encode())
    hasher.update(struct.pack(f"<{len(shape)}Q", *shape))
    hasher.update(data)
    return hasher.hexdigest()


def _signed_bytes(receipt: Receipt) -> bytes:
    fields = asdict(receipt)
    return RECEIPT_CONTEXT + msgpack.packb([fields[k] for k in sorted(fields)], use_bin_type=True)


def sign_receipt(receipt: Receipt, key: PrivateKey) -> str:
    """The signature (hex) of ``receipt`` under the server's private key."""
    return key.sign(_signed_bytes(receipt)).hex()


@functools.lru_cache(maxsize=1024)  # a session checks the same few servers' receipts every step
def _public_key(peer_id: str) -> PublicKey | None:
    return ID.from_base58(peer_id).extract_public_key()


def verify_receipt(receipt: Receipt, signature: str, peer_id: str) -> bool:
    """Whether ``peer_id`` (an Ed25519 peer id carries its public key) signed ``receipt``."""
    if not isinstance(signature, str) or len(signature) != SIGNATURE_HEX:
        return False
    try:
        key = _public_key(peer_id)
        return bool(
            key is not None and key.verify(_signed_bytes(receipt), bytes.fromhex(signature))
        )
    except Exception:  # noqa: BLE001 - a bad id, hex or key raises many types; all mean "no"
        return False
