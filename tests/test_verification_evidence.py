"""Published evidence (dht/evidence_records.py, node/client/evidence_trust.py): a client that
caught a liar publishes signed evidence to the DHT (opt-in); another client that opts in to
trusting it re-runs it on another server of the blocks and then avoids the liar. Forged, altered,
misplaced, oversized and expired evidence is refused."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from swarm_node import compression
from swarm_node.dht.bans import BanList
from swarm_node.dht.evidence_records import (
    MAX_EVIDENCE_SIZE,
    PublishedEvidence,
    PublishedStep,
    evidence_key,
    sign_evidence,
    verify_evidence,
)
from swarm_node.dht.receipts import Receipt, sign_receipt
from swarm_node.dht.routing import Hop
from swarm_node.errors import LocalProtocolError, RemoteProtocolError
from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client import evidence_trust
from swarm_node.node.client.evidence import digest
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig, PeerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.attacks import AttackTarget
from tests.attacks.dht import attack_evidence_flood
from tests.swarm_helpers import LOOPBACK, local_swarm
from tests.test_verification import CHECKED, records_of, skip_last_block


async def until(ask: Callable[[], Awaitable[Any]]) -> Any:
    """``await ask()`` again until it answers something true (the caller bounds the wait)."""
    while True:
        answer = await ask()
        if answer:
            return answer
        await trio.sleep(0.1)


async def banned(peer: Peer, server: str) -> bool:
    return peer.bans.is_banned(server, trio.current_time())


async def receipt_alone(peer: Peer, server: str) -> bool:
    evidence = await peer.dht.find_evidence(server)
    return evidence is not None and not evidence.has_activations


def peer_of(key) -> str:
    return ID.from_pubkey(key.public_key).to_base58()


def one_step(server_key, size: int = 4) -> PublishedStep:
    sent = compression.encode(torch.randn(1, size, 8), "none")
    answer = compression.encode(torch.randn(1, size, 8), "none")
    receipt = Receipt(
        model="ab" * 32,
        start=0,
        end=3,
        session_id="s",
        step_id=1,
        position=0,
        input_digest=digest(sent),
        output_digest=digest(answer),
    )
    signature = sign_receipt(receipt, server_key.private_key)
    return PublishedStep(receipt=receipt, signature=signature, sent=sent, answer=answer)


def test_evidence_verifies_only_as_signed_and_placed() -> None:
    server, reporter, other = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
    step = one_step(server)
    evidence = PublishedEvidence(
        accused=peer_of(server),
        reporter=peer_of(reporter),
        steps=(step,),
        wrong=2,
        error=0.5,
        bound=4e-4,
        expires_at=time.time() + 600,
    )
    key, now = evidence_key(peer_of(server)), time.time()
    value = sign_evidence(evidence, reporter)
    assert verify_evidence(value, key=key, now=now) == evidence
    with pytest.raises(LocalProtocolError, match="signed by"):  # a reporter signs its own only
        sign_evidence(evidence, other)
    with pytest.raises(RemoteProtocolError, match="must be stored under"):
        verify_evidence(value, key=evidence_key(peer_of(other)), now=now)
    with pytest.raises(RemoteProtocolError, match="expires"):
        verify_evidence(value, key=key, now=now + 700)
    framed = replace(evidence, accused=peer_of(other))  # steps another server signed
    with pytest.raises(RemoteProtocolError, match="not signed by"):
        verify_evidence(sign_evidence(framed, reporter), key=evidence_key(peer_of(other)), now=now)
    swapped = replace(step, answer=compression.encode(torch.zeros(1, 4, 8), "none"))
    with pytest.raises(RemoteProtocolError, match="other than those signed"):
        verify_evidence(
            sign_evidence(replace(evidence, steps=(swapped,)), reporter), key=key, now=now
        )
    altered = value.replace(b"\xcb", b"\xca", 1)  # one float's encoding changed after signing
    with pytest.raises(RemoteProtocolError):
        verify_evidence(altered, key=key, now=now)
    big = replace(evidence, steps=(one_step(server, size=MAX_EVIDENCE_SIZE // 32),))
    with pytest.raises(LocalProtocolError, match="must be <="):
        sign_evidence(big, reporter)
    with pytest.raises(RemoteProtocolError, match="bytes of <="):
        verify_evidence(b"\x00" * (MAX_EVIDENCE_SIZE + 1), key=key, now=now)


async def test_published_evidence_is_rerun_by_a_trusting_client_which_avoids_the_liar(
    tiny_llama: Path,
) -> None:
    model = tiny_llama.name
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    spans = [(0, 3), (3, 6), (0, 3), (0, 3), (3, 6)]
    publishing = replace(CHECKED, publish_evidence=True, publish_activations=True)
    with trio.fail_after(240):
        async with local_swarm(tiny_llama, spans, client=publishing) as (servers, client):
            liar, tail = servers[0], servers[1]
            records = await records_of(client, model, servers)
            skip_last_block(liar)
            chain = [Hop(records[liar.peer_id], 0, 3), Hop(records[tail.peer_id], 3, 6)]
            torch.manual_seed(5)
            _, stats = await generate_tokens(
                client,
                head,
                torch.randint(0, 256, (1, 6)),
                SessionSettings(model=model, num_blocks=6),
                SamplingConfig(max_new_tokens=8),
                chain=chain,
            )
            assert [f.liar for f in stats.findings][:1] == [liar.peer_id]
            trusting = ClientConfig(step_timeout=10.0, trust_evidence=True)
            joined = PeerConfig(listen=LOOPBACK, initial_peers=tuple(servers[1].addrs[:1]))
            async with open_peer(joined, client=trusting) as other:
                # the publication runs in the reporter's background: wait until the DHT holds it
                evidence = await until(lambda: other.dht.find_evidence(liar.peer_id))
                assert evidence.reporter == client.peer_id and evidence.has_activations
                assert not other.bans.is_banned(liar.peer_id, trio.current_time())
                await other.find_servers(model, 6)  # looks the evidence up and re-runs it
                await until(lambda: banned(other, liar.peer_id))
                assert other.bans.banned(trio.current_time()) == {liar.peer_id}
                # nothing published against an honest server: nothing done
                assert not await evidence_trust.check(other, model, records[tail.peer_id])
                # evidence without activations (a receipt alone) is not acted on
                other.bans = BanList(base=trusting.ban_time)
                receipt_only = replace(evidence, steps=evidence.steps[-1:])
                receipt_only = replace(
                    receipt_only,
                    steps=tuple(replace(s, sent=None, answer=None) for s in receipt_only.steps),
                    reporter=client.peer_id,
                    expires_at=evidence.expires_at + 1,  # the newer wins the key
                )
                await client.dht.publish_evidence(receipt_only)
                await until(lambda: receipt_alone(other, liar.peer_id))
                assert not await evidence_trust.check(other, model, records[liar.peer_id])
                assert not other.bans.is_banned(liar.peer_id, trio.current_time())


async def test_a_stranger_cannot_fill_a_peer_with_evidence(tiny_llama: Path) -> None:
    # tests/attacks/dht.py: evidence as its own reporter against many identities (a few taken),
    # evidence of another reporter and an oversized value (none taken)
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, _):
            target = AttackTarget(
                model=tiny_llama.name, model_path=tiny_llama, servers=(servers[0].addrs[0],)
            )
            assert await attack_evidence_flood(target)
