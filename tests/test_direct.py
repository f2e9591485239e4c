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
    """The client reaches the listen-nowhere server through the relay, then directly (DCUtR: the
    server dials it back); the session runs, transformers' tokens come, and the relayed connection
    is closed once nothing uses it; a second generation goes direct from the start."""
    torch.manual_seed(11)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = expected_tokens(tiny_llama, input_ids, 8)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    settings = SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32")
    with trio.fail_after(90):
        async with open_peer(PeerConfig(listen=LOOPBACK, reachability="public")) as relay:
            initial = (relay.addrs[0],)
            async with (
                open_peer(
                    PeerConfig(listen=(), initial_peers=initial, reachability="private"),
                    server=ServerConfig(model=str(tiny_llama), start=0, end=6, throughput=100.0),
                ) as server,
                open_peer(
                    PeerConfig(listen=LOOPBACK, initial_peers=initial, reachability="public")
                ) as client,
            ):
                assert server.host.get_addrs() == [] and connections(client, server) == ([], [])
                first, _ = await generate_tokens(
                    client, head, input_ids, settings, SamplingConfig(max_new_tokens=8)
                )
                assert client.relays is not None and client.relays.direct.upgraded == 1
                await wait_for(client, lambda: not connections(client, server)[1])
                direct = connections(client, server)[0]  # one, or two when both peers punched
                assert direct
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
                    other, _ = await generate_tokens(
                        client, head, input_ids, settings, SamplingConfig(max_new_tokens=10)
                    )
                    assert connections(client, server)[1] == [relayed]
                await wait_for(client, lambda: not connections(client, server)[1])
                assert relayed.is_closed  # by either end, once idle
    assert whole == expected == other.tolist()
