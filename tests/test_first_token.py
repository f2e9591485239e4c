"""A first token without waiting on the swarm's size: a lookup costs the same number of DHT queries
for 2 blocks as for 30, a client's host keeps few connections open, and a warm client's next chain
costs no lookup."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from swarm_node.dht import finding
from swarm_node.dht.directory import DIRECTORY_PROTOCOL
from swarm_node.dht.finding import PROVIDERS_PER_KEY, RECORD_FETCHES_AT_ONCE
from swarm_node.dht.records import MODEL_KEY_SHARDS, model_key, model_shard
from swarm_node.model.bundled import model_id_of
from swarm_node.node import peer as peer_module
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.net.host import CLIENT_LIMITS, SERVER_LIMITS
from swarm_node.node.peer import Peer, open_peer
from tests.model_fixtures import TINY_HIDDEN, make_tiny_model_dir
from tests.swarm_helpers import LOOPBACK, local_swarm


async def lookup_cost(client: Peer, model: str, num_blocks: int) -> int:
    """DHT queries of one lookup of every block of ``model`` (all of its servers found)."""
    before = client.dht.queries_sent
    found = await client.find_servers(model, num_blocks)
    assert sorted((r.start, r.end) for r in found) == [
        (0, num_blocks // 2),
        (num_blocks // 2, num_blocks),
    ]
    return client.dht.queries_sent - before


async def test_a_lookup_costs_as_many_queries_for_30_blocks_as_for_2(
    tmp_path: Path,
) -> None:
    # one lookup per block asked each block's closest peers: ~15x the queries for 30 blocks
    costs = {}
    with trio.fail_after(120):
        for blocks in (2, 30):
            path = make_tiny_model_dir(tmp_path / f"tiny-{blocks}", num_layers=blocks)
            spans = [(0, blocks // 2), (blocks // 2, blocks)]
            async with local_swarm(path, spans) as (_, client):
                model = model_id_of(str(path))
                costs[blocks] = min([await lookup_cost(client, model, blocks) for _ in range(2)])
    assert costs[30] <= costs[2] + 1, costs
    assert costs[30] < 30, costs


async def test_a_warm_client_routes_again_without_a_dht_query(tiny_llama: Path) -> None:
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (_, client):
            settings = SessionSettings(model=tiny_llama.name)
            found = await client.find_servers(tiny_llama.name)  # the model's key: no block count
            assert sorted((r.start, r.end) for r in found) == [(0, 3), (3, 6)]
            first = await client.route(settings, 0, 6)
            before = client.dht.queries_sent
            again = await client.route(settings, 0, 6)  # pings its servers, asks the DHT nothing
            assert client.dht.queries_sent == before
            assert [(h.start, h.end) for h in again] == [(h.start, h.end) for h in first]
            fresh = await client.route(settings, 0, 6, max_age=0.0)  # asked for: a new lookup
            assert client.dht.queries_sent > before
            assert [(h.start, h.end) for h in fresh] == [(0, 3), (3, 6)]


def count_pings(peer: Peer) -> list[str]:
    """The peer ids ``peer`` pings from now on (each ping still goes to its server)."""
    pinged: list[str] = []
    real = peer.ping

    async def ping(peer_id: str) -> tuple[float, Any]:
        pinged.append(peer_id)
        return await real(peer_id)

    peer.ping = ping  # type: ignore[method-assign]
    return pinged


async def test_a_chain_pings_no_server_that_answered_its_lookup(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a ping is a stream and a round trip more per server before the first token: the servers
    # that answered the lookup a moment ago (the entry, its directory) are known to answer, and
    # how fast; those whose records came from the entry (no dial) are pinged: the route takes them
    monkeypatch.setattr(finding, "DIRECTORY_HEAD_START", 60.0)  # its answer, however slow
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, client):
            pinged = count_pings(client)
            answered = count_record_fetches(client)  # asked of the servers themselves
            chain = await client.find_chain(tiny_llama.name, 6)  # a new lookup
            assert [(h.server.peer_id, h.start, h.end) for h in chain] == [
                (servers[0].peer_id, 0, 3),
                (servers[1].peer_id, 3, 6),
            ]
            assert answered == []  # the entry's directory listed both records
            assert pinged == [servers[1].peer_id]
            pinged.clear()
            rtts = client.rtt.as_dict()
            assert set(rtts) == {p.peer_id for p in servers}
            assert all(0 < r < 5 for r in rtts.values())
            settings = SessionSettings(model=tiny_llama.name)
            await client.route(settings, 0, 6)  # no lookup, and they answered just now: no ping
            assert pinged == []
            monkeypatch.setattr(peer_module, "ANSWER_FRESH", 0.0)  # their answers are old now
            await client.route(settings, 0, 6)
            assert sorted(pinged) == sorted(p.peer_id for p in servers)


async def test_a_warm_client_pings_no_server_of_its_last_session(tiny_llama: Path) -> None:
    # a long-lived client's next request (the API's, the Python model's): the servers that
    # answered its last steps a moment ago need no ping (351 ms of its route at 25 ms one way)
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, client):
            settings = SessionSettings(model=tiny_llama.name, max_length=16)
            chain = await client.route(settings, 0, 6)
            await trio.sleep(peer_module.ANSWER_FRESH)  # the lookup's answers are old now
            async with client.inference_session(chain, settings) as session:
                await session.step(torch.zeros(1, 2, TINY_HIDDEN))  # the prompt
                await session.step(torch.zeros(1, 1, TINY_HIDDEN))  # a token: timed per hop
            pinged = count_pings(client)
            again = await client.route(settings, 0, 6)
            assert pinged == []
            assert [h.server.peer_id for h in again] == [h.server.peer_id for h in chain]


async def test_a_route_pings_the_servers_it_takes_not_every_server_found(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a chain of 8 hops among 32 servers pinged all 32 (a dial each) before its first token
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3)] * 3 + [(3, 6)] * 3) as (servers, client):
            found = await client.find_servers(tiny_llama.name, 6)  # a complete lookup
            assert {r.peer_id for r in found} == {p.peer_id for p in servers}
            settings = SessionSettings(model=tiny_llama.name)
            await client.route(settings, 0, 6)  # takes the lookup's answers as round trips
            monkeypatch.setattr(peer_module, "ANSWER_FRESH", 0.0)  # none of them fresh now
            pinged = count_pings(client)
            chain = await client.route(settings, 0, 6)
            assert [(h.start, h.end) for h in chain] == [(0, 3), (3, 6)]
            assert sorted(pinged) == sorted(h.server.peer_id for h in chain)


async def test_a_chain_pinged_while_torch_loads_is_routed_without_a_ping(tiny_llama: Path) -> None:
    # a cold `generate` pings its chain's servers (a dial each) while its side of the model loads;
    # its route after finds them answered (8 dials after the load at 25 ms a hop: ~0.2 s)
    model = model_id_of(str(tiny_llama))
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3)] * 2 + [(3, 6)] * 2) as (servers, _):
            config = PeerConfig(listen=LOOPBACK, initial_peers=tuple(servers[0].addrs[:1]))
            async with open_peer(config) as client:
                await client.find_servers(model, 6, leaving_out=frozenset())
                await client.ping_a_chain(model, 0, 6)
                pinged = count_pings(client)
                chain = await client.route(SessionSettings(model=model, max_length=16), 0, 6)
                assert [(h.start, h.end) for h in chain] == [(0, 3), (3, 6)]
                assert pinged == []


@pytest.mark.slow
async def test_a_chain_lookup_connects_to_its_entry_and_its_chain_only(tiny_llama: Path) -> None:
    # records of servers it is not connected to are read from their copies at the entry (a swarm
    # under BUCKET_SIZE peers: the entry holds every record), and the route dials the two it takes
    with trio.fail_after(180):
        async with local_swarm(tiny_llama, [(0, 3)] * 4 + [(3, 6)] * 4) as (servers, _):
            entry = servers[0]
            config = PeerConfig(listen=LOOPBACK, initial_peers=tuple(entry.addrs[:1]))
            async with open_peer(config) as client:
                chain = await client.find_chain(tiny_llama.name, 6)
                assert [(h.start, h.end) for h in chain] == [(0, 3), (3, 6)]
                connected = {p.to_base58() for p in client.host.get_connected_peers()}
                assert connected == {entry.peer_id} | {h.server.peer_id for h in chain}


def count_record_fetches(peer: Peer) -> list[str]:
    """The servers whose records ``peer``'s lookups fetch from now on (each still fetched)."""
    fetched: list[str] = []
    real = peer.dht.get_record

    async def get_record(peer_id: Any) -> Any:
        fetched.append(peer_id.to_base58())
        return await real(peer_id)

    peer.dht.get_record = get_record  # type: ignore[method-assign]
    return fetched


@pytest.mark.slow
@pytest.mark.parametrize("directory", [True, False], ids=["directory", "entry-without-directory"])
async def test_a_chain_lookup_fetches_the_records_of_about_a_chain_not_of_every_server(
    tiny_llama: Path, directory: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fresh client of a 32-server swarm dialed every server for its record (32 handshakes on
    # both sides) when a few cover the model; a complete lookup (status) still asks them all.
    # The entry's directory lists the records it holds (dht/directory.py): none is fetched; an
    # entry without one (an older version) leaves it to the walk, which fetches about a chain's
    servers_count = RECORD_FETCHES_AT_ONCE + 4
    with trio.fail_after(180):
        async with local_swarm(tiny_llama, [(0, 6)] * servers_count) as (servers, client):
            if directory:  # the walks wait for its answer however long it takes (a busy host)
                monkeypatch.setattr(finding, "DIRECTORY_HEAD_START", 60.0)
            else:
                servers[0].host.remove_stream_handler(DIRECTORY_PROTOCOL)
            fetched = count_record_fetches(client)
            chain = await client.find_chain(tiny_llama.name, 6)
            assert [(h.start, h.end) for h in chain] == [(0, 6)]
            if directory:
                assert fetched == []
            else:
                assert 1 <= len(set(fetched)) <= RECORD_FETCHES_AT_ONCE < servers_count, fetched
            fetched.clear()
            found = await client.find_servers(tiny_llama.name, 6)  # every server of the blocks
    assert {r.peer_id for r in found} == {p.peer_id for p in servers}
    assert set(fetched) == {p.peer_id for p in servers}


@pytest.mark.slow
async def test_a_client_in_a_20_peer_swarm_stays_within_its_connection_limits(
    tiny_llama: Path,
) -> None:
    rng = random.Random(1)
    spans = [(b % 6, b % 6 + 1) for b in range(19)]
    with trio.fail_after(240):
        async with AsyncExitStack() as stack:
            servers: list[Peer] = []
            for start, end in spans:
                initial = tuple(rng.choice(servers).addrs[:1]) if servers else ()
                server = ServerConfig(model=str(tiny_llama), start=start, end=end, throughput=1.0)
                servers.append(
                    await stack.enter_async_context(
                        open_peer(PeerConfig(listen=LOOPBACK, initial_peers=initial), server=server)
                    )
                )
            client = await stack.enter_async_context(
                open_peer(PeerConfig(listen=LOOPBACK, initial_peers=tuple(servers[0].addrs[:1])))
            )
            network = client.host.get_network()
            info = network.get_conn_mgr_info()
            assert (info.low_watermark, info.high_watermark) == (
                CLIENT_LIMITS.trim_to,
                CLIENT_LIMITS.trim_above,
            )
            assert network.connection_config.max_connections == CLIENT_LIMITS.most
            assert network.connection_config.min_connections == 0
            assert network.retry_config.max_retries == CLIENT_LIMITS.dial_retries == 0
            served = servers[0].host.get_network().connection_config
            assert (served.max_connections, served.min_connections) == (SERVER_LIMITS.most, 0)
            for _ in range(3):
                chain = await client.find_chain(tiny_llama.name, 6)
                assert [(h.start, h.end) for h in chain] == [(b, b + 1) for b in range(6)]
                assert network.get_total_connections() <= CLIENT_LIMITS.trim_above


async def test_servers_a_full_model_key_leaves_out_are_found_by_their_blocks(
    tiny_llama: Path,
) -> None:
    # a peer keeps 20 providers a key (first come, first kept, the departed for 48 h): a model
    # key that full may leave servers out, so every block is then looked up by its own key too
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, client):
            store = servers[0].dht.kad.provider_store
            holders = (store, client.dht.kad.provider_store)
            for shard in range(MODEL_KEY_SHARDS):  # full wherever the newcomer could provide
                key = bytes.fromhex(model_key(tiny_llama.name, shard))
                for _ in range(PROVIDERS_PER_KEY):
                    stranger = ID.from_pubkey(create_new_key_pair().public_key)
                    # an address: py-libp2p takes a PeerInfo without one for false and drops it
                    info = PeerInfo(stranger, [Multiaddr("/ip4/127.0.0.1/tcp/9")])
                    for holder in holders:
                        holder.add_provider(key, info)
                assert all(len(h.get_providers(key)) >= PROVIDERS_PER_KEY for h in holders)
            late = ServerConfig(model=str(tiny_llama), start=0, end=6, throughput=100.0)
            initial = tuple(servers[0].addrs[:1])
            async with open_peer(
                PeerConfig(listen=LOOPBACK, initial_peers=initial), server=late
            ) as newcomer:
                shard_key = bytes.fromhex(model_key(tiny_llama.name, model_shard(newcomer.peer_id)))
                # nor at the newcomer itself, as in a swarm where it is not among the key's closest
                newcomer.dht.kad.provider_store.providers.pop(shard_key, None)
                for holder in holders:
                    listed = {p.peer_id.to_base58() for p in holder.get_providers(shard_key)}
                    assert newcomer.peer_id not in listed
                found = await client.find_servers(tiny_llama.name, 6)
                assert {r.peer_id for r in found} == {servers[0].peer_id, newcomer.peer_id}


COLD_CLIENT_PROBE = """
import argparse, json, sys
from swarm_node.node.apps.commands import _client_side
args = argparse.Namespace(
    model=sys.argv[1], dtype="float32", prompt="hello", chat=False, adapter=None, prompt_file=None
)
_client_side(args, sys.argv[1])
heavy = ("transformers", "torch._dynamo", "torch.distributed.tensor")
print(json.dumps([name for name in heavy if name in sys.modules]))
"""


@pytest.mark.slow
def test_a_cold_generate_client_loads_without_transformers(tiny_chat_llama: Path) -> None:
    """`generate`'s client side (config, tokenizer, head) imports neither transformers (~1.6 s) nor
    torch's compiler (~1.4 s, pulled in by a random init on the meta device)."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", COLD_CLIENT_PROBE, str(tiny_chat_llama)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


async def test_servers_hand_out_no_client_that_has_gone(tiny_llama: Path) -> None:
    """Clients run the DHT in client mode: servers keep none of them in their routing tables, so a
    later client's lookup walks to no peer that has exited (each a dial: refused on loopback, a
    timeout over a network). A peer that serves the DHT without blocks is kept as before."""
    from libp2p.kad_dht.common import PROTOCOL_ID
    from libp2p.kad_dht.kad_dht import DHTMode

    model = model_id_of(str(tiny_llama))
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, client):
            entry = tuple(servers[0].addrs[:1])
            gone = []
            for _ in range(3):  # as `generate` and `status` processes: a lookup, then exit
                async with open_peer(PeerConfig(listen=LOOPBACK, initial_peers=entry)) as once:
                    assert once.dht.kad.mode == DHTMode.CLIENT
                    assert len(await once.find_servers(model, 6)) == 2
                    gone.append(once.host.get_id())
                    assert not await servers[1].dht.kad.check_then_add(once.host.get_id())
                    with pytest.raises(Exception) as refused:
                        await servers[1].host.new_stream(once.host.get_id(), [PROTOCOL_ID])
                    chain = [refused.value, refused.value.__cause__, refused.value.__context__]
                    assert "protocol not supported" in " ".join(map(str, chain)), chain
            # a DHT server without blocks (a bootstrap peer) is added once identify says so
            config = PeerConfig(listen=LOOPBACK, initial_peers=entry, dht_mode="server")
            async with open_peer(config) as bootstrap:
                assert len(await bootstrap.find_servers(model, 6)) == 2
                # what a server does in its background when such a peer opens a DHT stream
                assert await servers[0].dht.kad.check_then_add(bootstrap.host.get_id())
                assert servers[0].dht.kad.routing_table.peer_in_table(bootstrap.host.get_id())
                before = client.dht.queries_sent
                assert len(await client.find_servers(model, 6)) == 2
                assert client.dht.queries_sent > before
            for server in servers:
                table = server.dht.kad.routing_table
                assert not [p for p in gone if table.peer_in_table(p)]
            assert servers[1].dht.kad.clients_not_added >= len(gone)  # its checks above
            assert not client.dht._unreachable  # no lookup of it met a peer that had gone


async def test_a_client_entered_through_a_client_is_told_to_name_a_server(tiny_llama: Path) -> None:
    """A client answers no DHT queries, so a peer whose only initial peer is a client finds no
    server: the error says so, and what to give instead."""
    from swarm_node.errors import MissingBlocksError

    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (_, client):
            config = PeerConfig(listen=LOOPBACK, initial_peers=tuple(client.addrs[:1]))
            async with open_peer(config) as lost:
                with pytest.raises(MissingBlocksError, match="must name a server of the swarm"):
                    await lost.find_chain(model_id_of(str(tiny_llama)), 6)


async def test_a_client_runs_no_routing_table_refresh(tiny_llama: Path) -> None:
    """py-libp2p refreshes a routing table by looking its own id up, at start: a client of a
    32-server swarm dialled ~10 servers for it while `generate` looked its chain up (0.3 s of its
    first token). A client runs none: its table holds its initial peer and fills from its lookups."""
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 6)] * 4) as (servers, _):
            entry = servers[0]
            config = PeerConfig(listen=LOOPBACK, initial_peers=tuple(entry.addrs[:1]))
            async with open_peer(config) as client:
                await client.dht.kad.refresh_routing_table()
                assert set(client.host.get_connected_peers()) == {entry.host.get_id()}
                assert client.dht.kad.routing_table.get_peer_ids() == [entry.host.get_id()]
                chain = await client.find_chain(model_id_of(str(tiny_llama)), 6)
                assert [(h.start, h.end) for h in chain] == [(0, 6)]
