"""Reaching peers: parsing their addresses, dialing them, and opening protocol streams to them.

One way to open a stream for every caller (a client's session, a ping, a training hop, a server's
push to the next server). Knows nothing of sessions or blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from swarm_node.errors import ConfigError, SwarmError
from swarm_node.node.net.direct import try_direct
from swarm_node.node.net.message_stream import MessageStream
from swarm_node.node.net.relay import dial_through_relays, is_circuit
from swarm_node.protocol import PROTOCOL_ID

log = logging.getLogger(__name__)

ADDR_TTL = 3600  # seconds the peerstore keeps addresses learned from a request (a next server)


def parse_multiaddr(text: str, field: str) -> Multiaddr:
    try:
        return Multiaddr(text)
    except Exception as exc:  # noqa: BLE001 (multiaddr raises several types for bad text)
        raise ConfigError(
            f"{field!r} must be a multiaddr like /ip4/127.0.0.1/tcp/31337/p2p/12D3..., got {text!r}: {exc}"
        ) from None


def remember_addrs(host: Any, peer_id: str, addrs: Sequence[str]) -> None:
    """Tell the peerstore where ``peer_id`` listens (peer input: raises ValueError on bad text)."""
    try:
        peer = ID.from_base58(peer_id)
        multiaddrs = [Multiaddr(a) for a in addrs]
    except Exception as exc:  # noqa: BLE001 (libp2p and multiaddr raise several types for bad text)
        raise ValueError(f"bad peer {peer_id!r} / addresses {list(addrs)!r}: {exc!r}") from None
    if multiaddrs:
        host.get_peerstore().add_addrs(peer, multiaddrs, ADDR_TTL)


async def open_stream(
    host: Any, peer_id: str, *, max_frame_size: int, timeout: float
) -> MessageStream:
    """A protocol stream to ``peer_id`` (dialing it if needed) within ``timeout`` seconds."""
    peer = ID.from_base58(peer_id)
    forget_closed_connections(host, peer)  # else py-libp2p may refuse to dial (see there)
    with trio.fail_after(timeout):
        await connect(host, peer)
        stream = await host.new_stream(peer, [PROTOCOL_ID])
    return MessageStream(stream, max_frame_size=max_frame_size)


async def connect(host: Any, peer: ID) -> None:
    """Make sure a connection to ``peer`` is open. A peer known at ``/p2p-circuit`` addresses is
    private (it announces only those): it is dialed through its relays alone, py-libp2p's swarm
    never dials those itself, and the other addresses it was seen at (by identify, from behind its
    NAT) would cost a failed dial first. Reached through a relay, it is then tried directly
    (direct.py: a dial of its direct addresses, or a hole punch), for a moment."""
    if host.get_network().get_connections(peer):
        return
    try:
        addrs = list(host.get_peerstore().addrs(peer))
    except Exception:  # noqa: BLE001 (an unknown peer: new_stream says so)
        return
    relayed = [a for a in addrs if is_circuit(a)]
    if relayed:
        await dial_through_relays(host, peer, relayed)
        await try_direct(host, peer)


def forget_closed_connections(host: Any, peer: ID) -> None:
    """Drop the swarm's closed connections to ``peer`` so that new_stream dials a fresh one.

    py-libp2p 0.8.1 can keep a closed connection listed (seen after a session was cancelled
    mid-stream); new_stream then finds "connections", filters them all out as closed and raises
    "No valid connections available" instead of dialling, and the server gets banned as failed.
    """
    network = host.get_network()
    for conn in list(network.get_connections(peer)):
        if conn.is_closed:
            network.remove_conn(conn)


async def connect_initial_peers(
    host: Any, dht: Any, addrs: Sequence[str], timeout: float, private: bool
) -> None:
    """Connect to the swarm's initial peers and seed the DHT's routing table with them; raises
    SwarmError when none can be reached (with a hint about swarm keys)."""
    if not addrs:
        return
    reached = 0
    errors = []
    for text in addrs:
        addr = parse_multiaddr(text, "initial_peers")
        try:
            info = info_from_p2p_addr(addr)
        except Exception as exc:  # noqa: BLE001 (libp2p raises several types for a multiaddr without /p2p/)
            raise ConfigError(
                f"'initial_peers' entry {text!r} must end with /p2p/<peer id>: {exc}"
            ) from None
        try:
            with trio.fail_after(timeout):
                await host.connect(info)
            await dht.add_bootstrap_peer(info.peer_id)
            reached += 1
        except Exception as exc:  # noqa: BLE001 (unreachable peer: try the others)
            why = (
                f"no handshake within {timeout} s"
                if isinstance(exc, trio.TooSlowError)
                else repr(exc)
            )
            errors.append(f"{text}: {why}")
            log.warning("could not reach initial peer %s: %r", text, exc)
    if not reached:
        hint = (
            "this peer uses a swarm key: the initial peers must use the same --swarm-key"
            if private
            else "if the swarm is private, start this peer with its --swarm-key FILE"
        )
        raise SwarmError(f"could not reach any initial peer ({hint}):\n  " + "\n  ".join(errors))
