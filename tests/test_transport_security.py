"""The transport is Noise and yamux only: attacks with the other protocols py-libp2p would accept.

A dialer that speaks /plaintext/2.0.0 can claim any peer id whose public key it knows (every
server's key is public): against a host with py-libp2p's default options the claim is believed
(the control below), against a swarm-node peer the connection is refused at negotiation. An honest
client generating at the same time keeps transformers' tokens exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
from libp2p import YAMUX_PROTOCOL_ID, Yamux, new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
from multiaddr import Multiaddr

from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.net.host import MUXER_PROTOCOLS, SECURITY_PROTOCOLS, build_host
from tests.model_fixtures import reference_model
from tests.swarm_helpers import LOOPBACK, local_swarm


class ClaimingKey:
    """A private key that names someone else's public key as its own (all plaintext asks)."""

    def __init__(self, private: object, claimed: object) -> None:
        self._private, self._claimed = private, claimed

    def get_public_key(self) -> object:
        return self._claimed

    def __getattr__(self, name: str) -> object:
        return getattr(self._private, name)


def impostor(victim: str) -> object:
    """A host that speaks plaintext only and, in that handshake, presents ``victim``'s public key as
    its own: no proof of the private key is asked, so it passes as ``victim``."""
    public = ID.from_base58(victim).extract_public_key()
    forged = KeyPair(ClaimingKey(create_new_key_pair().private_key, public), public)
    return new_host(
        key_pair=create_new_key_pair(),
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(forged)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
    )


async def dial(host: object, addr: str, probe: str | None = None) -> bool:
    """Did ``host`` get a connection to ``addr`` (a full multiaddr)? With ``probe``, it also opens
    a stream of that protocol on the connection (the listener's handler sees whom it came from)."""
    info = info_from_p2p_addr(Multiaddr(addr))
    async with host.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
        with trio.move_on_after(10):
            try:
                await host.connect(info)
                if probe is not None:
                    stream = await host.new_stream(info.peer_id, [probe])
                    await stream.write(b"hello")
            except Exception:  # noqa: BLE001 (any refusal is what the attack should meet)
                return False
            return bool(host.get_network().get_connections(info.peer_id))
    return False


def test_only_noise_and_yamux_are_offered() -> None:
    host = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    upgrader = host.get_network().upgrader
    assert tuple(upgrader.security_multistream.transports) == SECURITY_PROTOCOLS == ("/noise",)
    assert tuple(upgrader.muxer_multistream.transports) == MUXER_PROTOCOLS == ("/yamux/1.0.0",)


async def test_a_plaintext_impostor_is_believed_by_defaults_and_refused_by_swarm_node() -> None:
    victim = create_new_key_pair()
    victim_id = ID.from_pubkey(victim.public_key).to_base58()
    with trio.fail_after(60):
        # the control: py-libp2p's default options take the impostor for the victim
        default = new_host(key_pair=create_new_key_pair())
        claimed: list[str] = []
        arrived = trio.Event()

        async def handler(stream) -> None:
            claimed.append(stream.muxed_conn.peer_id.to_base58())
            arrived.set()

        default.set_stream_handler("/probe/1.0.0", handler)
        async with default.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
            addr = f"{default.get_addrs()[0]}/p2p/{default.get_id().to_base58()}"
            assert await dial(impostor(victim_id), addr, probe="/probe/1.0.0")
            await arrived.wait()
        assert claimed == [victim_id]  # believed: the attack is real
        # the same attack against a swarm-node host
        ours = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
        async with ours.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
            addr = f"{ours.get_addrs()[0]}/p2p/{ours.get_id().to_base58()}"
            assert not await dial(impostor(victim_id), addr)
            assert not ours.get_network().get_connections(ID.from_base58(victim_id))


@pytest.mark.parametrize("attack", ["plaintext-impostor", "mplex-only"])
async def test_an_honest_client_stays_exact_while_a_server_is_attacked(
    tiny_llama: Path, attack: str
) -> None:
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    expected = reference_model(tiny_llama).generate(
        input_ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, client):
            if attack == "plaintext-impostor":  # pose as the second server to the first
                attacker = impostor(servers[1].peer_id)
            else:  # a real identity, but a muxer we do not speak
                attacker = new_host(
                    key_pair=create_new_key_pair(), muxer_opt={MPLEX_PROTOCOL_ID: Mplex}
                )
            results: dict[str, object] = {}

            async def attack_it() -> None:
                results["connected"] = await dial(attacker, servers[0].addrs[0])

            async def generate() -> None:
                results["ids"], _ = await generate_tokens(
                    client,
                    head,
                    input_ids,
                    SessionSettings(model=tiny_llama.name, num_blocks=6),
                    SamplingConfig(max_new_tokens=10),
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack_it)
                nursery.start_soon(generate)
    assert results["connected"] is False
    assert results["ids"].tolist() == expected.tolist()
