"""Building a peer's libp2p host, and quieting py-libp2p's loggers for the command line.

The only place in the node layer where host options are chosen: a key pair (identity.py), the
addresses to announce, an optional private-swarm key (swarm_key.py), one connection per peer, Noise
as the only security protocol and yamux as the only stream muxer (TCP only: QUIC stays off), and a
bound on what multistream negotiation reads before authentication (negotiation.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio
from libp2p import YAMUX_PROTOCOL_ID, Yamux, create_new_x25519_key_pair, new_host
from libp2p.crypto.keys import KeyPair
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from multiaddr import Multiaddr

from swarm_node.node.net.negotiation import install_negotiation_bound

# What a connection may negotiate, and nothing else. py-libp2p's defaults also accept
# /plaintext/2.0.0 (its handshake checks only that a claimed id matches a claimed public key, with no
# proof of the private key: anyone could pose as any server), secio and TLS, and mplex.
SECURITY_PROTOCOLS = (NOISE_PROTOCOL_ID,)
MUXER_PROTOCOLS = (YAMUX_PROTOCOL_ID,)


def build_host(*, key_pair: KeyPair, announce: Sequence[Multiaddr] | None, psk: str | None) -> Any:
    """A host that is not listening yet (``async with host.run(listen_addrs=...)`` starts it).

    Its multistream negotiation reads at most negotiation.MAX_NEGOTIATION_MESSAGE bytes a message."""
    install_negotiation_bound()
    return new_host(
        key_pair=key_pair,
        sec_opt={
            NOISE_PROTOCOL_ID: NoiseTransport(
                key_pair, noise_privkey=create_new_x25519_key_pair().private_key
            )
        },
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        # one connection per peer: with more, every dial waits 250 ms for a second connection
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        announce_addrs=list(announce) if announce else None,
        psk=psk,
    )


async def close_connections(host: Any, *, timeout: float = 2.0) -> None:
    """Close every connection of ``host`` now, so that its peers see it leave at once.

    Left to py-libp2p's shutdown, a departed peer's connections stayed open at the other end (nobody
    reading them): a server's next DHT request on one waited out its whole deadline (3 s at every
    withdrawal in a test swarm, measured)."""
    with trio.move_on_after(timeout):
        await host.get_network().close()


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
