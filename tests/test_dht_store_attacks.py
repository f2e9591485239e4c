"""The DHT among strangers: the attacks of tests/attacks/dht.py against a real swarm on loopback.

A stranger's PUTs outside the swarm's namespace (or of a record not its own, or oversized) are not
stored; a peer answering GET_PROVIDERS with thousands of providers, and forged addresses for the
honest servers' ids, gets at most MAX_PROVIDERS_PER_ANSWER of them read and none of its addresses
into a peerstore; a client naming a host that is not the next server as push target gets no push
sent there. An honest client generating meanwhile keeps transformers' tokens exactly.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from swarm_node.dht.kad_requests import MAX_PROVIDERS_PER_ANSWER
from swarm_node.dht.records import ServerRecord, block_key, push_target_problem, record_key
from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from swarm_node.node.peer import Peer
from tests.attacks import AttackTarget
from tests.attacks.dht import attack_foreign_key_flood, attack_push_redirect, lying_peer
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
    """Greedy tokens from the swarm (the client pushes when its config says so)."""
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


async def test_a_push_target_is_checked_against_the_next_servers_record(tiny_llama: Path) -> None:
    input_ids, expected = expected_tokens(tiny_llama)
    results: dict[str, object] = {}
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, SPANS, client=ClientConfig(push=True)) as (
            servers,
            client,
        ):

            async def attack() -> None:
                results["stopped"] = await attack_push_redirect(swarm_target(tiny_llama, servers))

            async def honest() -> None:
                results["ids"] = await generate(tiny_llama, client, input_ids)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                nursery.start_soon(honest)
            # the honest client's steps still went by push to the real next server
            assert servers[1].server.pushed_steps == 10
            assert servers[0].server.sessions == {}
    assert results["stopped"] is True
    assert results["ids"] == expected


def test_push_target_problem_names_what_the_record_lacks() -> None:
    now = 1000.0
    peer = "12D3KooWPeer"
    good = ServerRecord(
        peer_id=peer,
        addrs=(f"/ip4/127.0.0.1/tcp/9/p2p/{peer}",),
        model="m",
        start=3,
        end=6,
        throughput=1.0,
        cache_tokens_left=1,
        dtype="float32",
        version="0",
        expires_at=now + 60,
    )

    def problem(record: ServerRecord | None, block: int = 3) -> str | None:
        return push_target_problem(record, peer_id=peer, model="m", block=block, now=now)

    assert problem(good) is None
    assert "no valid signed server record" in problem(None)
    assert "is of other" in problem(replace(good, peer_id="other"))
    assert "serves model 'x'" in problem(replace(good, model="x"))
    assert "announces blocks 3:6, not block 6" in problem(good, block=6)
    assert "not live" in problem(replace(good, state="OFFLINE"))
    assert "not live" in problem(replace(good, expires_at=now))
    assert "lists no address" in problem(replace(good, addrs=()))
