"""Direct connections after a relay (node/net/direct.py), on loopback.

The private server listens nowhere (nobody can dial it: the relay is the only way in) and the
client listens on 127.0.0.1, as a client on a public address would. DCUtR's exchange through the
relay then has the server dial the client: a direct connection that exists only because of the
upgrade. Hole punching between two NATs is tested in tests/test_nat_lab.py (network namespaces
with a masquerading router each, where the environment allows them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import trio

from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import (
    SamplingConfig,
    continue_tokens,
    generate_tokens,
    open_token_session,
)
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.test_relay import LOOPBACK, expected_tokens


def connections(peer: Peer, other: Peer) -> tuple[list[Any], list[Any]]:
    """``peer``'s open connections to ``other``: (direct, relayed)."""
    from libp2p.peer.id import ID

    from swarm_node.node.net.direct import open_connections

    return open_connections(peer.host, ID.from_base58(other.peer_id))


async def wait_for(peer: Peer, done: Any) -> None:
    """Until ``done()``, woken by each upgrade or retirement of ``peer``'s connections."""
    assert peer.relays is not None
    while not done():
        await peer.relays.direct.changed.wait()


async def test_dcutr_turns_a_relayed_connection_direct_and_the_tokens_stay_exact(
    tiny_llama: Path,
) -> None:
    """Nobody listens but the relay: the client's generation goes through it. Then the client
    opens a listener (as a client on a public address has: opened only now, so that no DHT dial
    beats the hole punch to it) and asks for a direct connection: DCUtR through the relay has the
    listen-nowhere server dial it back. The relayed connection is closed once nothing uses it, and
    a second generation goes direct; the tokens are transformers' both times."""
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    torch.manual_seed(11)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = expected_tokens(tiny_llama, input_ids, 8)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    settings = SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32")
    private = {"listen": (), "reachability": "private"}
    with trio.fail_after(90):
        async with open_peer(PeerConfig(listen=LOOPBACK, reachability="public")) as relay:
            initial = (relay.addrs[0],)
            async with (
                open_peer(
                    PeerConfig(initial_peers=initial, **private),
                    server=ServerConfig(model=str(tiny_llama), start=0, end=6, throughput=100.0),
                ) as server,
                open_peer(PeerConfig(initial_peers=initial, **private)) as client,
            ):
                first, _ = await generate_tokens(
                    client, head, input_ids, settings, SamplingConfig(max_new_tokens=8)
                )
                assert connections(client, server)[0] == []  # nobody to dial
                await client.host.get_network().listen(Multiaddr(LOOPBACK[0]))
                assert client.relays is not None
                # the server has no address to give: the client's own punch ends at once, the
                # server's dial back to the address it was given follows
                await client.relays.direct.upgrade(ID.from_base58(server.peer_id))
                await wait_for(client, lambda: not connections(client, server)[1])
                direct = connections(client, server)[0]  # one, or two when both peers punched
                assert direct and client.relays.direct.upgraded == 1
                again, _ = await generate_tokens(
                    client, head, input_ids, settings, SamplingConfig(max_new_tokens=8)
                )
                assert connections(client, server) == (direct, [])
    assert first.tolist() == expected == again.tolist()


async def test_a_session_relayed_when_the_direct_connection_comes_ends_relayed_with_every_step(
    tiny_llama: Path,
) -> None:
    """Hole punching off on both peers: a session opens through the relay and makes 4 tokens;
    then a direct connection appears (the server dials the client, as DCUtR would); 6 more tokens
    in the same session go through the relayed connection, kept open while it carries the
    session (no recovery, no replay); a new session goes direct; and once the first session is
    closed, so is the relayed connection. All tokens are transformers'."""
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    torch.manual_seed(12)
    input_ids = torch.randint(0, 256, (1, 5))
    expected = expected_tokens(tiny_llama, input_ids, 10)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    settings = SessionSettings(
        model=tiny_llama.name, num_blocks=6, dtype="float32", max_length=5 + 10
    )
    off = {"reachability": "private", "no_hole_punch": True}
    with trio.fail_after(90):
        async with open_peer(PeerConfig(listen=LOOPBACK, reachability="public")) as relay:
            initial = (relay.addrs[0],)
            async with (
                open_peer(
                    PeerConfig(listen=(), initial_peers=initial, **off),
                    server=ServerConfig(model=str(tiny_llama), start=0, end=6, throughput=100.0),
                ) as server,
                open_peer(
                    PeerConfig(
                        listen=LOOPBACK, initial_peers=initial, **off | {"reachability": "public"}
                    )
                ) as client,
            ):
                async with open_token_session(client, settings) as ts:
                    ids, _ = await continue_tokens(
                        head, ts, input_ids, SamplingConfig(max_new_tokens=4)
                    )
                    ([], [relayed]) = connections(client, server)
                    assert relayed.get_streams()  # the session's
                    await server.host.get_network().dial_addr(
                        Multiaddr(client.addrs[0].split("/p2p/")[0]), ID.from_base58(client.peer_id)
                    )
                    await wait_for(client, lambda: client.relays.direct.upgraded == 1)
                    await continue_tokens(head, ts, ids[:, :0], SamplingConfig(max_new_tokens=6))
                    assert not ts.session.recovery.events
                    whole = ts.ids.tolist()
                    assert connections(client, server)[1] == [relayed]  # still carrying it
                    opened = relayed.muxed_conn.next_stream_id  # yamux: the streams we opened
                    other, _ = await generate_tokens(
                        client, head, input_ids, settings, SamplingConfig(max_new_tokens=10)
                    )
                    assert relayed.muxed_conn.next_stream_id == opened  # the new session: direct
                    assert connections(client, server)[1] == [relayed]
                await wait_for(client, lambda: not connections(client, server)[1])
                assert relayed.is_closed  # by either end, once idle
    assert whole == expected == other.tolist()


async def test_a_peer_cannot_make_a_server_dial_hundreds_of_addresses(tiny_llama: Path) -> None:
    """An attacker reaching the private server through the relay sends a DCUtR CONNECT listing 300
    addresses (all 127.0.0.1 ports it chose): the server keeps at most MAX_PEER_ADDRS of them,
    the ones its hole punch would dial."""
    from libp2p.peer.id import ID
    from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID, read_dcutr_msg
    from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
    from libp2p.relay.circuit_v2.utils import write_delimited_msg
    from multiaddr import Multiaddr

    from swarm_node.node.net.dialing import connect
    from swarm_node.node.net.direct import MAX_PEER_ADDRS

    ports = range(20000, 20300)
    with trio.fail_after(60):
        async with open_peer(PeerConfig(listen=LOOPBACK, reachability="public")) as relay:
            initial = (relay.addrs[0],)
            async with (
                open_peer(
                    PeerConfig(listen=(), initial_peers=initial, reachability="private"),
                    server=ServerConfig(model=str(tiny_llama), start=0, end=6, throughput=100.0),
                ) as server,
                open_peer(
                    PeerConfig(
                        listen=(), initial_peers=initial, reachability="private", no_hole_punch=True
                    )
                ) as attacker,
            ):
                target = ID.from_base58(server.peer_id)
                await attacker.find_servers(tiny_llama.name, 6)  # the relayed addresses
                await connect(attacker.host, target)
                stream = await attacker.host.new_stream(target, [PROTOCOL_ID])
                message = HolePunch(type=HolePunch.CONNECT)
                message.ObsAddrs.extend(
                    Multiaddr(f"/ip4/127.0.0.1/tcp/{port}").to_bytes() for port in ports
                )
                await write_delimited_msg(stream, message)
                await read_dcutr_msg(stream, HolePunch)  # its answer: it kept what it will dial
                await stream.close()
                known = server.host.get_peerstore().addrs(ID.from_base58(attacker.peer_id))
                listed = {str(port) for port in ports}
                chosen = [a for a in known if a.value_for_protocol("tcp") in listed]
                assert 0 < len(chosen) <= MAX_PEER_ADDRS
