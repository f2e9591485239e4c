"""The transport is Noise and yamux only, and negotiation reads a bounded message: the attacks of
tests/attacks/transport.py against real hosts.

A dialer that speaks /plaintext/2.0.0 can claim any peer id whose public key it knows (every
server's key is public): against a host with py-libp2p's default options the claim is believed
(the control below), against a swarm-node peer the connection is refused at negotiation. A raw
TCP client announcing a 1 GiB negotiation message is cut off at its length prefix. An honest
client generating at the same time keeps transformers' tokens exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.net.host import MUXER_PROTOCOLS, SECURITY_PROTOCOLS, build_host
from swarm_node.node.net.negotiation import MAX_NEGOTIATION_MESSAGE
from tests.attacks import AttackTarget
from tests.attacks.transport import ATTACKS, FLOOD_STOPPED_WITHIN, dial, flood_negotiation, impostor
from tests.model_fixtures import reference_model
from tests.swarm_helpers import LOOPBACK, local_swarm


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


async def test_a_negotiation_flood_is_cut_off_at_its_length_prefix() -> None:
    ours = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    with trio.fail_after(30):
        async with ours.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
            addr = f"{ours.get_addrs()[0]}/p2p/{ours.get_id().to_base58()}"
            sent = await flood_negotiation(addr)
            assert sent is not None and sent <= FLOOD_STOPPED_WITHIN
            # the host still negotiates an honest connection
            other = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
            assert await dial(other, addr)
    assert MAX_NEGOTIATION_MESSAGE <= 4096


def swarm_target(model: Path, servers: list) -> AttackTarget:
    return AttackTarget(
        model=model.name, model_path=model, servers=tuple(s.addrs[0] for s in servers)
    )


@pytest.mark.parametrize("attack", [name for name, _ in ATTACKS])
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
            target = swarm_target(tiny_llama, servers)
            results: dict[str, object] = {}

            async def attack_it() -> None:
                results["stopped"] = await dict(ATTACKS)[attack](target)

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
    assert results["stopped"] is True
    assert results["ids"].tolist() == expected.tolist()
