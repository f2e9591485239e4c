"""Attacks on the transport: what a connection may negotiate, before and after authentication.

- plaintext_impostor: a dialer speaking /plaintext/2.0.0, presenting the second server's public key
  as its own (plaintext asks no proof of the private key), dials the first server. Stopped: no
  connection (Noise only).
- mplex_only: a dialer with a real identity that speaks mplex only. Stopped: no connection (yamux
  only).
- negotiation_flood: a raw TCP client sends a multistream varint announcing 1 GiB, then streams
  bytes, 1 KiB every 10 ms. Stopped: the server closes the connection before FLOOD_STOPPED_WITHIN
  bytes have been sent (it refuses the length prefix). py-libp2p 0.8.1's own reader asks the
  socket for the whole announced length at each of its 101 reads (a 1 GiB receive buffer each)
  and closes only after ~101 chunks, or at its 30 s negotiation timeout.
"""

from __future__ import annotations

import trio
from libp2p import YAMUX_PROTOCOL_ID, Yamux, new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.mplex.mplex import MPLEX_PROTOCOL_ID, Mplex
from libp2p.utils.varint import encode_uvarint
from multiaddr import Multiaddr

from tests.attacks import AttackTarget

LISTEN = "/ip4/127.0.0.1/tcp/0"
DIAL_TIMEOUT = 10.0  # seconds an attacking dial may take
FLOOD_ANNOUNCED = 1 << 30  # bytes the negotiation_flood's varint announces
FLOOD_CHUNK = 1024  # bytes sent every FLOOD_PACE seconds
FLOOD_PACE = 0.01
FLOOD_STOPPED_WITHIN = 64 * 1024  # bytes sent by the time the server must have closed
FLOOD_MAX_SENT = 4 * FLOOD_STOPPED_WITHIN  # the flood's own bound
FLOOD_TIMEOUT = 10.0  # seconds


class ClaimingKey:
    """A private key that names someone else's public key as its own (all plaintext asks)."""

    def __init__(self, private: object, claimed: object) -> None:
        self._private, self._claimed = private, claimed

    def get_public_key(self) -> object:
        return self._claimed

    def __getattr__(self, name: str) -> object:
        return getattr(self._private, name)


def impostor(victim: str) -> object:
    """A host that speaks plaintext only and, in that handshake, presents ``victim``'s public key as
    its own: no proof of the private key is asked, so it passes as ``victim``."""
    public = ID.from_base58(victim).extract_public_key()
    forged = KeyPair(ClaimingKey(create_new_key_pair().private_key, public), public)
    return new_host(
        key_pair=create_new_key_pair(),
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(forged)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
    )


def mplex_only() -> object:
    """A host with a real identity (Noise by default) and a muxer swarm-node does not speak."""
    return new_host(key_pair=create_new_key_pair(), muxer_opt={MPLEX_PROTOCOL_ID: Mplex})


async def dial(host: object, addr: str, probe: str | None = None) -> bool:
    """Did ``host`` get a connection to ``addr`` (a full multiaddr)? With ``probe``, it also opens
    a stream of that protocol on the connection (the listener's handler sees whom it came from)."""
    info = info_from_p2p_addr(Multiaddr(addr))
    async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
        with trio.move_on_after(DIAL_TIMEOUT):
            try:
                await host.connect(info)
                if probe is not None:
                    stream = await host.new_stream(info.peer_id, [probe])
                    await stream.write(b"hello")
            except Exception:  # noqa: BLE001 (any refusal is what the attack should meet)
                return False
            return bool(host.get_network().get_connections(info.peer_id))
    return False


async def attack_plaintext_impostor(target: AttackTarget) -> bool:
    victim = (
        target.peer_id(1)
        if len(target.servers) > 1
        else str(ID.from_pubkey(create_new_key_pair().public_key))
    )
    return not await dial(impostor(victim), target.servers[0])


async def attack_mplex_only(target: AttackTarget) -> bool:
    return not await dial(mplex_only(), target.servers[0])


async def flood_negotiation(addr: str) -> int | None:
    """The bytes sent (after the varint) by the time the server closed a raw TCP connection to
    ``addr`` that announces a FLOOD_ANNOUNCED-byte multistream message and then pours it; None if
    the server had not closed it when the flood gave up."""
    ma = Multiaddr(addr)
    stream = await trio.open_tcp_stream(
        ma.value_for_protocol("ip4"), int(ma.value_for_protocol("tcp"))
    )
    sent = 0
    closed_at: list[int] = []
    closed = trio.Event()

    async def watch() -> None:
        try:
            while await stream.receive_some(4096):  # the server's own header, then EOF
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        closed_at.append(sent)
        closed.set()

    async def pour() -> None:
        nonlocal sent
        try:
            await stream.send_all(encode_uvarint(FLOOD_ANNOUNCED))
            chunk = b"\x00" * FLOOD_CHUNK
            while sent < FLOOD_MAX_SENT:
                await stream.send_all(chunk)
                sent += len(chunk)
                await trio.sleep(FLOOD_PACE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            closed_at.append(sent)
            closed.set()

    async with stream:
        with trio.move_on_after(FLOOD_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                nursery.start_soon(pour)
                await closed.wait()
                nursery.cancel_scope.cancel()
    return closed_at[0] if closed_at else None


async def attack_negotiation_flood(target: AttackTarget) -> bool:
    sent = await flood_negotiation(target.servers[0])
    return sent is not None and sent <= FLOOD_STOPPED_WITHIN


ATTACKS = (
    ("plaintext_impostor", attack_plaintext_impostor),
    ("mplex_only", attack_mplex_only),
    ("negotiation_flood", attack_negotiation_flood),
)
