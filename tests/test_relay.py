"""Servers behind a NAT, simulated honestly: the private server listens on no address at all (its
host has no listener, so no peer can open a connection to it: the only way in is a connection it
opened itself, i.e. the relay's), and clients reach it through py-libp2p's circuit relay v2.

Network namespaces would model a NAT more closely but need privileges this machine's tests do not
have; a peer with no listener is strictly harder to reach than one behind a NAT.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.model_fixtures import make_tiny_model_dir, reference_model
from tests.process_swarm import server_processes

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def relayed(peer: Peer, other: Peer) -> bool:
    """Whether ``peer``'s open connections to ``other`` all go through a relay."""
    from libp2p.peer.id import ID

    conns = [
        c
        for c in peer.host.get_network().get_connections(ID.from_base58(other.peer_id))
        if not c.is_closed
    ]
    addrs = [str(a) for c in conns for a in c.get_transport_addresses()]
    return bool(addrs) and all("/p2p-circuit" in a for a in addrs)


@asynccontextmanager
async def relayed_swarm(
    model: Path,
    *,
    relays: int = 2,
    client: ClientConfig | None = None,
    spans: tuple[tuple[int, int], ...] = ((0, 6),),
    **peer_fields: Any,
) -> AsyncIterator[tuple[list[Any], Any, Peer]]:
    """Public relay peers (no blocks), private servers of ``spans`` that listen nowhere, and a
    client that listens nowhere: (relay contexts and peers, the server (a list with several spans),
    client). The relays' contexts are returned so that a test can take one down."""
    async with AsyncExitStack() as stack:
        relay_peers: list[Peer] = []
        exits: list[AsyncExitStack] = []
        for _ in range(relays):
            own = AsyncExitStack()
            initial = tuple(relay_peers[0].addrs[:1]) if relay_peers else ()
            relay = await own.enter_async_context(
                open_peer(
                    PeerConfig(
                        listen=LOOPBACK, initial_peers=initial, reachability="public", **peer_fields
                    )
                )
            )
            stack.push_async_callback(own.aclose)
            relay_peers.append(relay)
            exits.append(own)
        initial = tuple(r.addrs[0] for r in relay_peers)
        servers = [
            await stack.enter_async_context(
                open_peer(
                    PeerConfig(listen=(), initial_peers=initial, reachability="private"),
                    server=ServerConfig(model=str(model), start=start, end=end, throughput=100.0),
                )
            )
            for start, end in spans
        ]
        client_peer = await stack.enter_async_context(  # no listener: no way in from the server
            open_peer(
                PeerConfig(listen=(), initial_peers=initial, reachability="private"), client=client
            )
        )
        server = servers[0] if len(servers) == 1 else servers
        yield list(zip(exits, relay_peers, strict=True)), server, client_peer


def expected_tokens(model: Path, input_ids: torch.Tensor, n: int) -> list[list[int]]:
    reference = reference_model(model)
    return reference.generate(
        input_ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    ).tolist()


async def test_generation_through_a_relay_equals_transformers(tiny_llama: Path) -> None:
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    expected = expected_tokens(tiny_llama, input_ids, 10)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    with trio.fail_after(90):
        async with relayed_swarm(tiny_llama) as (relays, server, client):
            assert server.host.get_addrs() == []  # no listener: nobody can dial it directly
            assert server.reachability == "private"
            assert len(server.addrs) == 2 and all("/p2p-circuit/" in a for a in server.addrs)
            assert {a.split("/p2p/")[1].split("/")[0] for a in server.addrs} == {
                p.peer_id for _, p in relays
            }
            record = server.announced
            assert record is not None and record.reachability == "private"
            assert all(r.relays is not None and r.relays.relay_slots > 0 for _, r in relays)
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                SamplingConfig(max_new_tokens=10),
            )
            assert relayed(client, server)
    assert ids.tolist() == expected
    assert [h.server.peer_id for h in stats.chain] == [server.peer_id]


async def test_auto_reachability_asks_peers_with_autonat(caplog: Any) -> None:
    """A peer dialable where it says it is (or at a wildcard address, which stands for its
    interfaces' addresses) learns "public"; one whose announced address is not
    where its connections come from (a LAN address behind a NAT: 10.x while peers see 127.0.0.1)
    learns "private" and reserves a relay slot at the public peer."""
    caplog.set_level("INFO", logger="swarm_node")
    with trio.fail_after(60):
        async with open_peer(PeerConfig(listen=LOOPBACK, reachability="public")) as public:
            initial = (public.addrs[0],)
            async with (
                open_peer(PeerConfig(listen=LOOPBACK, initial_peers=initial)) as direct,
                open_peer(  # the CLI's default: every interface
                    PeerConfig(listen=("/ip4/0.0.0.0/tcp/0",), initial_peers=initial)
                ) as wildcard,
                open_peer(
                    PeerConfig(
                        listen=LOOPBACK,
                        initial_peers=initial,
                        announce_addrs=("/ip4/10.254.0.1/tcp/4001",),
                    )
                ) as natted,
            ):
                assert direct.reachability == "public" and wildcard.reachability == "public"
                assert natted.reachability == "private"
                assert natted.addrs[-1] == (f"{public.addrs[0]}/p2p-circuit/p2p/{natted.peer_id}")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("reachability: public (relay service on") for m in messages)
    assert any("reachability: private (AutoNAT: 0 of 1 peers" in m for m in messages)
    assert any(m.startswith("reserved a relay slot at " + public.peer_id) for m in messages)


async def test_autonat_dials_back_on_a_fresh_connection(free_tcp_port: int, caplog: Any) -> None:
    """A firewalled machine with no NAT: its address is the one peers see (127.0.0.1), but nothing
    answers at the port it announces (a closed port: what a firewall leaves of a listener). The
    AutoNAT peer, though connected to it already, dials that address afresh, fails, and the machine
    learns "private"; the same peer announcing where it listens learns "public"."""
    caplog.set_level("INFO", logger="swarm_node")
    closed = f"/ip4/127.0.0.1/tcp/{free_tcp_port}"
    with trio.fail_after(60):
        async with open_peer(PeerConfig(listen=LOOPBACK, reachability="public")) as public:
            initial = (public.addrs[0],)
            async with (
                open_peer(
                    PeerConfig(listen=LOOPBACK, initial_peers=initial, announce_addrs=(closed,))
                ) as firewalled,
                open_peer(PeerConfig(listen=LOOPBACK, initial_peers=initial)) as open_one,
            ):
                assert firewalled.reachability == "private"
                assert open_one.reachability == "public"
                assert firewalled.relays is not None and firewalled.relays.reserved
                assert await open_one.relays.check_reachability() == "public"  # asked again
    messages = [r.getMessage() for r in caplog.records]
    assert any("reachability: private (AutoNAT: 0 of 1 peers" in m for m in messages)


def relay_of(client: Peer, server: Peer) -> str:
    """The relay the client's connection to ``server`` goes through."""
    from libp2p.peer.id import ID

    (conn,) = [
        c
        for c in client.host.get_network().get_connections(ID.from_base58(server.peer_id))
        if not c.is_closed
    ]
    (addr,) = [str(a) for a in conn.get_transport_addresses()]
    return addr.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]


@pytest.mark.slow
async def test_losing_the_relay_mid_generation_recovers_through_another(tmp_path: Path) -> None:
    """Three relays in their own processes (servers of another model: public, relaying); the private
    server reserves at two. The relay the client's connection goes through is SIGKILLed after 4
    tokens: the client recovers through the other relay (the same server, replayed), the tokens
    equal transformers', and the server moves to the third relay and re-announces."""
    torch.manual_seed(3)
    input_ids = torch.randint(0, 256, (1, 5))
    model = make_tiny_model_dir(tmp_path / "tiny-private", num_layers=6, seed=7)
    relay_model = make_tiny_model_dir(tmp_path / "relay-host", num_layers=2, seed=8)
    expected = expected_tokens(model, input_ids, 12)
    head = ClientHead.load(Checkpoint.open(model))
    extra = ["--throughput", "100", "--reachability", "public"]
    with trio.fail_after(240):
        async with server_processes(relay_model, ["0:2"] * 3, extra=extra) as relays:
            by_id = {r.peer_id: r for r in relays}
            initial = tuple(r.addr for r in relays)
            async with (
                open_peer(
                    PeerConfig(listen=(), initial_peers=initial, reachability="private"),
                    server=ServerConfig(model=str(model), start=0, end=6, throughput=100.0),
                ) as server,
                open_peer(  # listening nowhere either: no connection from the server to it
                    PeerConfig(listen=(), initial_peers=initial, reachability="private"),
                    client=ClientConfig(step_timeout=3.0, retry_delay=0.2, ban_time=0.1),
                ) as client,
            ):
                assert server.relays is not None and len(server.relays.reserved) == 2
                used: list[str] = []

                def kill_at_4(tokens: torch.Tensor) -> None:
                    nonlocal_count.append(tokens)
                    if len(nonlocal_count) == 4:
                        used.append(relay_of(client, server))
                        by_id[used[0]].process.send_signal(signal.SIGKILL)

                nonlocal_count: list[torch.Tensor] = []
                announced = server.announcements
                ids, stats = await generate_tokens(
                    client,
                    head,
                    input_ids,
                    SessionSettings(model=model.name, num_blocks=6, dtype="float32"),
                    SamplingConfig(max_new_tokens=12),
                    on_tokens=kill_at_4,
                )
                (event,) = stats.recoveries
                assert event.replacements == (server.peer_id,)
                assert relay_of(client, server) != used[0]

                def moved() -> bool:  # the announced record names two relays, not the dead one
                    record = server.announced
                    addrs = () if record is None else record.addrs
                    return len(addrs) == 2 and not any(used[0] in a for a in addrs)

                while not moved():
                    await server.wait_announcement(announced)
                    announced = server.announcements
                assert used[0] not in server.relays.reserved
    assert ids.tolist() == expected


async def test_relay_limits_cut_an_abusive_circuit_while_others_work(
    tiny_llama: Path, caplog: Any
) -> None:
    """A relay that lets a circuit carry 1 MiB: a peer pushing garbage at the private server
    through it loses its circuit within the limit, while a client's generation through the same
    relay, at the same time, gives transformers' tokens."""
    from libp2p.peer.id import ID

    from swarm_node.node.net.dialing import connect
    from swarm_node.protocol import PROTOCOL_ID

    caplog.set_level("WARNING", logger="libp2p.relay.circuit_v2.protocol")
    torch.manual_seed(4)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = expected_tokens(tiny_llama, input_ids, 10)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    limit = 2**20
    with trio.fail_after(90):
        async with (
            relayed_swarm(tiny_llama, relays=1, relay_max_circuit_mb=1) as (relays, server, client),
            open_peer(
                PeerConfig(
                    listen=(), initial_peers=(relays[0][1].addrs[0],), reachability="private"
                )
            ) as attacker,
        ):
            sent = 0

            async def abuse() -> None:
                nonlocal sent
                target = ID.from_base58(server.peer_id)
                await attacker.find_servers(tiny_llama.name, 6)  # its relayed addresses
                await connect(attacker.host, target)
                stream = await attacker.host.new_stream(target, [PROTOCOL_ID])
                # one frame announcing 8 MiB (under the server's frame limit: it keeps reading)
                await stream.write((8 * limit).to_bytes(4, "big"))
                chunk = b"\xff" * 2**16
                with pytest.raises(Exception):  # noqa: B017 (reset or closed: py-libp2p's types vary)
                    while sent < 8 * limit:
                        await stream.write(chunk)
                        sent += len(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(abuse)
                ids, _ = await generate_tokens(
                    client,
                    head,
                    input_ids,
                    SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                    SamplingConfig(max_new_tokens=10),
                )
            assert relayed(client, server)
    assert limit // 2 <= sent <= 2 * limit, sent  # cut at the limit (plus what the pipes held)
    assert any("data limit exceeded" in r.getMessage() for r in caplog.records)
    assert ids.tolist() == expected


async def test_push_between_private_servers_goes_through_relays(tiny_llama: Path) -> None:
    """Two private servers (0:3, 3:6) and a client, none listening: the first server pushes each step
    to the second through a relay; the tokens equal transformers'."""
    torch.manual_seed(5)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = expected_tokens(tiny_llama, input_ids, 8)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    with trio.fail_after(90):
        async with relayed_swarm(tiny_llama, spans=((0, 3), (3, 6))) as (_, servers, client):
            first, second = servers
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32", push=True),
                SamplingConfig(max_new_tokens=8),
            )
            assert [h.server.peer_id for h in stats.chain] == [first.peer_id, second.peer_id]
            assert second.server is not None and second.server.pushed_steps == 8
            assert relayed(first, second) and relayed(client, first) and relayed(client, second)
    assert ids.tolist() == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"listen": ()}, "'listen' must name at least one multiaddr .or reachability must be"),
        ({"reachability": "maybe"}, "'reachability' must be one of"),
        ({"relays": 0}, "'relays' must be an int in .1, 16., got 0"),
        ({"relay_max_circuit_mb": 0}, "'relay_max_circuit_mb' must be an int in"),
        ({"relay_max_circuits": True}, "'relay_max_circuits' must be an int in"),
        ({"relay_max_reservations": 10**6}, "'relay_max_reservations' must be an int in"),
        ({"relay_max_circuit_seconds": -1}, "'relay_max_circuit_seconds' must be an int in"),
    ],
)
def test_relay_settings_are_checked(fields: dict[str, Any], message: str) -> None:
    from swarm_node.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        PeerConfig(**fields)
    assert PeerConfig(listen=(), reachability="private").listen == ()


async def test_relay_refuses_a_circuit_past_the_concurrent_limit(tiny_llama: Path) -> None:
    """--relay-max-circuits 1: while a client's relayed connection to the private server is open,
    a second peer's circuit to it is refused; the client's generation goes on exactly."""
    from libp2p.peer.id import ID

    from swarm_node.node.net.dialing import connect

    torch.manual_seed(6)
    input_ids = torch.randint(0, 256, (1, 5))
    expected = expected_tokens(tiny_llama, input_ids, 6)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    settings = SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32")
    with trio.fail_after(90):
        async with (
            relayed_swarm(tiny_llama, relays=1, relay_max_circuits=1) as (relays, server, client),
            open_peer(
                PeerConfig(
                    listen=(), initial_peers=(relays[0][1].addrs[0],), reachability="private"
                )
            ) as other,
        ):
            first, _ = await generate_tokens(
                client, head, input_ids, settings, SamplingConfig(max_new_tokens=6)
            )
            assert relayed(client, server)
            await other.find_servers(tiny_llama.name, 6)
            with pytest.raises(
                Exception, match="status"
            ):  # the relay's refusal, as py-libp2p words it
                await connect(other.host, ID.from_base58(server.peer_id))
            again, _ = await generate_tokens(
                client, head, input_ids, settings, SamplingConfig(max_new_tokens=6)
            )
    assert first.tolist() == again.tolist() == expected
