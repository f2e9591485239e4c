"""Building a peer's libp2p host, and quieting py-libp2p's loggers for the command line.

The only place in the node layer where host options are chosen: a key pair (identity.py), the
addresses to announce, an optional private-swarm key (swarm_key.py), one connection per peer, Noise
as the only security protocol and yamux as the only stream muxer (TCP only: QUIC stays off), and a
bound on what multistream negotiation reads before authentication (negotiation.py), negotiations
that send the header and the protocol together (pipelined_select.py), and frames written whole
whatever cancels their writer (whole_writes.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p import YAMUX_PROTOCOL_ID, Yamux, create_new_x25519_key_pair, new_host
from libp2p.crypto.keys import KeyPair
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from multiaddr import Multiaddr

from swarm_node.node.net.negotiation import install_negotiation_bound
from swarm_node.node.net.noise_reads import install_buffered_noise_reads
from swarm_node.node.net.pipelined_select import install_pipelined_select
from swarm_node.node.net.whole_writes import install_whole_writes
from swarm_node.node.net.window_updates import install_half_window_updates

# What a connection may negotiate, and nothing else. py-libp2p's defaults also accept
# /plaintext/2.0.0 (its handshake checks only that a claimed id matches a claimed public key, with no
# proof of the private key: anyone could pose as any server), secio and TLS, and mplex.
SECURITY_PROTOCOLS = (NOISE_PROTOCOL_ID,)
MUXER_PROTOCOLS = (YAMUX_PROTOCOL_ID,)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    """How many connections a host keeps open. Above ``trim_above``, py-libp2p closes idle ones (no
    open stream, older than ``grace`` seconds) down to ``trim_to``; beyond ``most`` it refuses new
    ones, dialed or inbound. Nothing dials to fill them: py-libp2p's auto-connector, which dials the
    peerstore up to a target (200 connections by default), is stopped by ``dial_on_demand``."""

    trim_to: int
    trim_above: int
    most: int
    grace: float = 20.0
    # dials of a peer that refused: py-libp2p tries 3 more times with backoff (~1.4 s), and a
    # lookup's answers name departed clients and servers often (a CLI client's `status` waited
    # 1.45 s for one, measured): a client has spare servers and lookups ask several peers
    dial_retries: int = 0

    def connection_config(self) -> ConnectionConfig:
        return ConnectionConfig(
            # one connection per peer: with more, every dial waits 250 ms for a second connection
            max_connections_per_peer=1,
            max_connections=self.most,
            min_connections=0,
            low_watermark=self.trim_to,
            high_watermark=self.trim_above,
            grace_period=self.grace,
        )


# a client: the servers of its chains and the peers of its latest lookups
CLIENT_LIMITS = ConnectionLimits(trim_to=16, trim_above=32, most=128)
# a server: its DHT neighbours, the next servers it pushes to, and its clients
SERVER_LIMITS = ConnectionLimits(trim_to=64, trim_above=192, most=512, dial_retries=1)


def build_host(
    *,
    key_pair: KeyPair,
    announce: Sequence[Multiaddr] | None,
    psk: str | None,
    limits: ConnectionLimits = SERVER_LIMITS,
) -> Any:
    """A host that is not listening yet (``async with host.run(listen_addrs=...)`` starts it; then
    call ``dial_on_demand``).

    Its multistream negotiation reads at most negotiation.MAX_NEGOTIATION_MESSAGE bytes a message."""
    install_negotiation_bound()
    install_whole_writes()
    install_half_window_updates()
    install_buffered_noise_reads()
    install_pipelined_select()
    host = new_host(
        key_pair=key_pair,
        sec_opt={
            NOISE_PROTOCOL_ID: NoiseTransport(
                key_pair, noise_privkey=create_new_x25519_key_pair().private_key
            )
        },
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        connection_config=limits.connection_config(),
        announce_addrs=list(announce) if announce else None,
        psk=psk,
    )
    host.get_network().retry_config = RetryConfig(max_retries=limits.dial_retries)
    return host


async def dial_on_demand(host: Any) -> None:
    """Stop py-libp2p's auto-connector on a running host: it dials to fill a connection target
    ("initiating 200 new dials"); ours dials the peers its lookups and sessions need, no others."""
    network = host.get_network()
    await network.event_background_nursery_created.wait()  # the auto-connector starts right after
    await network.auto_connector.stop()


async def close_connections(host: Any, *, timeout: float = 2.0) -> None:
    """Close every connection of ``host`` now, so that its peers see it leave at once.

    Left to py-libp2p's shutdown, a departed peer's connections stayed open at the other end (nobody
    reading them): a server's next DHT request on one waited out its whole deadline (3 s at every
    withdrawal in a test swarm, measured)."""
    network = host.get_network()

    async def close(conn: Any) -> None:
        try:
            await conn.close()
        except Exception as exc:  # noqa: BLE001 (leaving anyway; py-libp2p's close catches the same)
            logging.getLogger(__name__).debug("closing a connection failed: %r", exc)

    conns = list(network.get_connections())
    with trio.move_on_after(timeout):
        # at once: each close waits 0.1-0.2 s in yamux, so the swarm's one by one took seconds
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(close, conn)
            # and no longer than until every socket is closed: yamux then sleeps 0.1 s more, while
            # its peer has already seen the end (0.2 s of a one-shot CLI client's 2.5 s, measured)
            for conn in conns:
                closed = getattr(getattr(conn, "muxed_conn", None), "event_closed", None)
                if closed is None:  # another muxer: wait for its close to return
                    break
                await closed.wait()
            else:
                nursery.cancel_scope.cancel()
        await network.close()


def host_peer_id(host: Any) -> str:
    return host.get_id().to_base58()


def quiet_libp2p_logging(verbose: int) -> None:
    """py-libp2p logs routine DHT chatter as warnings (to its own logger, which does not propagate):
    keep it out of the user's way unless asked (``verbose`` >= 2). Call after importing libp2p, which
    resets its loggers on import."""
    libp2p_log = logging.getLogger("libp2p")
    libp2p_log.setLevel({0: logging.CRITICAL, 1: logging.ERROR}.get(verbose, logging.DEBUG))
    libp2p_log.propagate = verbose >= 2
    logging.getLogger("multiaddr").setLevel(logging.ERROR)
