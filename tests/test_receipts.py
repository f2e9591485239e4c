"""Step receipts (dht/receipts.py): a server's signature covers every field; nobody else's key,
no changed field and no malformed signature passes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from swarm_node import compression
from swarm_node.dht.receipts import Receipt, sign_receipt, verify_receipt
from swarm_node.node.client.evidence import digest
from swarm_node.node.client.generation import TokenSession, rewind

RECEIPT = Receipt(
    model="ab" * 32,
    start=0,
    end=3,
    session_id="0123456789abcdef",
    step_id=4,
    position=9,
    input_digest="cd" * 32,
    output_digest="ef" * 32,
)


def test_a_receipt_verifies_only_as_signed_by_its_server() -> None:
    key, other = create_new_key_pair(), create_new_key_pair()
    peer = ID.from_pubkey(key.public_key).to_base58()
    signature = sign_receipt(RECEIPT, key.private_key)
    assert verify_receipt(RECEIPT, signature, peer)
    assert not verify_receipt(RECEIPT, signature, ID.from_pubkey(other.public_key).to_base58())
    for change in (
        {"step_id": 5},
        {"position": 8},
        {"end": 4},
        {"output_digest": "ee" * 32},
        {"session_id": "x"},
    ):
        assert not verify_receipt(replace(RECEIPT, **change), signature, peer)
    for bad in ("", signature[:-2], "zz" * 64, signature + "00"):
        assert not verify_receipt(RECEIPT, bad, peer)
    assert not verify_receipt(RECEIPT, signature, "not-a-peer-id")


def test_a_digest_covers_codec_dtype_shape_and_bytes() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    digests = {
        digest(compression.encode(x, "none")),
        digest(compression.encode(x, "float16")),
        digest(compression.encode(x.reshape(1, 4, 3), "none")),
        digest(compression.encode(x + 1, "none")),
    }
    assert len(digests) == 4
    assert digest(compression.encode(x, "none")) == digest(compression.encode(x.clone(), "none"))


@pytest.mark.parametrize(
    ("position", "given", "kept", "fed", "taken"),
    [
        (9, 5, 10, 9, 2),  # a decode position: the tokens it holds and the next one stay
        (2, 5, 5, 2, 7),  # inside the caller's prompt: the prompt stays whole, to be sent again
    ],
)
def test_a_rewind_keeps_what_the_caches_hold_and_what_the_caller_gave(
    position: int, given: int, kept: int, fed: int, taken: int
) -> None:
    ts = TokenSession(None, [], max_length=32, batch_size=1)
    ts.ids, ts.fed = torch.arange(12)[None], 11
    assert rewind(ts, position, given) == taken
    assert ts.ids.shape[1] == kept and ts.fed == fed
    assert ts.pending.tolist() == [list(range(fed, kept))]
