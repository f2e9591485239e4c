"""Seed attacks the harness was first tried with, both closed on main before the harness came.

- a plaintext dial claiming the second server's id (its public key is public) at the first server:
  refused at negotiation, the transport being Noise only;
- a session kept with pings only (its cache reserved): the server closes it after
  --session-idle-timeout seconds without a step. Stopped only if that notice comes within the
  attack's 20 s bound: servers attacked this way need a shorter idle timeout than the default 120 s
  (scripts/attack_swarm.py starts them with 10 s).
"""

from __future__ import annotations

from typing import Any

import torch
import trio
from libp2p import YAMUX_PROTOCOL_ID, Yamux, new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from multiaddr import Multiaddr

from swarm_node import compression
from swarm_node.errors import ProtocolError
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.node.net.dialing import open_stream
from swarm_node.protocol import DEFAULT_MAX_FRAME_SIZE
from swarm_node.protocol import messages as m
from tests.attacks import AttackTarget
from tests.attacks.fuzz import LOOPBACK, attacker_host, server_info

ATTACK_SECONDS = 20.0


class _ClaimingKey:
    """A private key that names someone else's public key as its own (all plaintext asks)."""

    def __init__(self, private: object, claimed: object) -> None:
        self._private, self._claimed = private, claimed

    def get_public_key(self) -> object:
        return self._claimed

    def __getattr__(self, name: str) -> object:
        return getattr(self._private, name)


async def attack_seed_plaintext_impostor(target: AttackTarget) -> bool:
    public = ID.from_base58(target.peer_id(1)).extract_public_key()
    forged = KeyPair(_ClaimingKey(create_new_key_pair().private_key, public), public)
    host = new_host(
        key_pair=create_new_key_pair(),
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(forged)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
    )
    info = info_from_p2p_addr(Multiaddr(target.servers[0]))
    async with host.run(listen_addrs=[Multiaddr(LOOPBACK)]):
        with trio.move_on_after(ATTACK_SECONDS):
            try:
                await host.connect(info)
            except Exception:  # noqa: BLE001 (any refusal is what the attack should meet)
                return True
            return not host.get_network().get_connections(info.peer_id)
    return True  # no connection within the bound


async def attack_seed_pings_only_session(target: AttackTarget) -> bool:
    async with attacker_host(target.servers[0]) as host:
        peer = target.peer_id(0)
        info = await server_info(host, peer)
        conn = await open_stream(host, peer, max_frame_size=DEFAULT_MAX_FRAME_SIZE, timeout=10)
        try:
            with trio.move_on_after(ATTACK_SECONDS):
                return await _hold_with_pings(conn, info)
        finally:
            await conn.reset()
    return False  # the session outlived the bound


async def _hold_with_pings(conn: Any, info: m.InfoResponse) -> bool:
    span = dict(model=info.model, start=info.start, end=info.end)
    await conn.send(
        m.OpenSessionRequest(**span, max_length=8, dtype=info.dtype, compression="none")
    )
    opened = await conn.receive()
    if not isinstance(opened, m.OpenSessionResponse):
        return False  # refused outright: not the attack this is
    hidden = torch.zeros(1, 2, info.hidden_size, dtype=TORCH_DTYPES[info.dtype])
    await conn.send(
        m.StepRequest(
            session_id=opened.session_id,
            step_id=1,
            position=0,
            hidden=compression.encode(hidden, "none"),
        )
    )
    if not isinstance(await conn.receive(), m.StepResponse):
        return False
    while True:
        try:
            await conn.send(m.InfoRequest())
            reply = await conn.receive()
        except ProtocolError:  # the stream closed without the notice
            return False
        if not isinstance(reply, m.InfoResponse):
            return isinstance(reply, m.ErrorResponse) and reply.code == "idle_timeout"
        await trio.sleep(0.5)


ATTACKS = (
    ("seed_plaintext_impostor", attack_seed_plaintext_impostor),
    ("seed_pings_only_session", attack_seed_pings_only_session),
)
