"""The DHT among strangers: the attacks of tests/attacks/dht.py against a real swarm on loopback.

A stranger's PUTs outside the swarm's namespace (or of a record not its own, or oversized) are not
stored; a peer answering GET_PROVIDERS with thousands of providers, and forged addresses for the
honest servers' ids, gets at most MAX_PROVIDERS_PER_ANSWER of them read and none of its addresses
into a peerstore. An honest client generating meanwhile keeps transformers' tokens exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from swarm_node.dht.kad_requests import MAX_PROVIDERS_PER_ANSWER
from swarm_node.dht.records import block_key, record_key
from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.peer import Peer
from tests.attacks import AttackTarget
from tests.attacks.dht import attack_foreign_key_flood, lying_peer
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm

BLOCKS = 6
SPANS = [(0, 3), (3, BLOCKS)]


def swarm_target(model: Path, servers: list[Peer]) -> AttackTarget:
    return AttackTarget(
        model=model.name, model_path=model, servers=tuple(s.addrs[0] for s in servers)
    )


def expected_tokens(model: Path) -> tuple[torch.Tensor, list]:
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    expected = reference_model(model).generate(
        input_ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return input_ids, expected.tolist()


async def generate(model: Path, client: Peer, input_ids: torch.Tensor) -> list:
    head = ClientHead.load(Checkpoint.open(model))
    ids, _ = await generate_tokens(
        client,
        head,
        input_ids,
        SessionSettings(model=model.name, num_blocks=BLOCKS),
        SamplingConfig(max_new_tokens=10),
    )
    return ids.tolist()


async def test_a_flood_of_foreign_keys_is_not_stored(tiny_llama: Path) -> None:
    input_ids, expected = expected_tokens(tiny_llama)
    results: dict[str, object] = {}
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, SPANS) as (servers, client):
            swarm = {p.peer_id for p in [*servers, client]}

            async def attack() -> None:
                results["stopped"] = await attack_foreign_key_flood(
                    swarm_target(tiny_llama, servers)
                )

            async def honest() -> None:
                results["ids"] = await generate(tiny_llama, client, input_ids)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                nursery.start_soon(honest)
            stored = set(servers[0].dht.kad.value_store.store)
            # every value held is a swarm peer's own record
            assert stored <= {record_key(p).encode() for p in swarm}
            assert record_key(servers[0].peer_id).encode() in stored
    assert results["stopped"] is True
    assert results["ids"] == expected


async def test_a_peer_flooding_providers_and_forging_addresses_is_contained(
    tiny_llama: Path,
) -> None:
    input_ids, expected = expected_tokens(tiny_llama)
    results: dict[str, object] = {}
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, SPANS) as (servers, client):
            honest_ids = {ID.from_base58(s.peer_id) for s in servers}
            async with lying_peer(swarm_target(tiny_llama, servers)) as liar:
                key = block_key(tiny_llama.name, 0)
                providers = await client.dht.find_providers(key)
                found = await client.dht.find_servers(tiny_llama.name, range(BLOCKS))
                results["ids"] = await generate(tiny_llama, client, input_ids)
                assert liar.provider_asks > 0  # the client did ask the liar
                assert honest_ids <= set(providers)
                assert len(set(providers) - honest_ids) <= MAX_PROVIDERS_PER_ANSWER
                assert {r.peer_id for r in found} == {s.peer_id for s in servers}
                victim = Multiaddr(liar.victim_addr)
                for peer in (client, *servers):
                    store = peer.host.get_peerstore()
                    for server in honest_ids - {peer.host.get_id()}:
                        assert victim not in store.addrs(server)
                    assert victim not in store.addrs(liar.peer_id)
                assert liar.victim_dials == 0
    assert results["ids"] == expected
