"""Attacks on how clients choose and blame servers: a server claiming to be far faster than it
is, and a server pushing bad hidden states to the next one.

A record's throughput is signed by its server, so a liar can claim anything up to records.py's
MAX_THROUGHPUT (1e6 tokens/s). The attack runs such a server (real blocks, an honest compute, a
signed record saying 1e6) and an honest client, both joined to the target swarm over the network,
and has the client choose chains: the liar must carry at most the client's bounded share of them
(ClientConfig.max_server_share of any ChainShares.window chains in a row, in chains' worth of blocks) and rank no higher than
twice the other servers' median claim until the client has measured it.

The push liar serves the blocks before a target server, answers its clients honestly but pushes NaN
to the target server: an honest client in push mode must ban the liar (the target refused its
pushes with ``bad_push``), not the target, and get the honest chain's outputs to the bit.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import trio

from swarm_node import compression
from swarm_node.dht.records import MAX_THROUGHPUT, ServerRecord
from swarm_node.dht.routing import UNOBSERVED_CAP, Hop, trusted_throughputs
from swarm_node.model import Checkpoint
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.attacks import Attack, AttackTarget

ATTACK_SECONDS = 18.0
ROUTES = 20  # chains of each kind (inference, training) the honest client chooses
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


async def found_with(client: Peer, model: str, num_blocks: int, peer_id: str) -> list[ServerRecord]:
    """The servers of blocks 0..num_blocks-1 once a lookup finds ``peer_id`` among them (its
    blocks' provider records may be published a little after its own record)."""
    while True:
        servers = await client.find_servers(model, num_blocks)
        if any(s.peer_id == peer_id for s in servers):
            return servers
        await trio.sleep(0.2)


async def attack_throughput_liar(target: AttackTarget) -> bool:
    """Serve every block announcing MAX_THROUGHPUT tokens/s; stopped when the liar runs at most
    ``max_server_share`` of the blocks of an honest client's 40 chains and its trusted
    throughput is at most UNOBSERVED_CAP x the honest servers' median claim."""
    num_blocks = Checkpoint.open(target.model_path).num_blocks
    joined = PeerConfig(listen=LOOPBACK, initial_peers=target.servers[:1])
    liar_config = ServerConfig(
        model=str(target.model_path), start=0, end=num_blocks, throughput=MAX_THROUGHPUT
    )
    client_config = ClientConfig(step_timeout=5.0)
    with trio.move_on_after(ATTACK_SECONDS):
        async with (
            open_peer(joined, server=liar_config) as liar,
            open_peer(joined, client=client_config) as client,
        ):
            servers = await found_with(client, target.model, num_blocks, liar.peer_id)
            trusted = {s.peer_id: s for s in trusted_throughputs(servers, {})}
            # claims compared as block rates (tokens/s x blocks): spans differ in length
            honest = [
                s.throughput * (s.end - s.start) for s in servers if s.peer_id != liar.peer_id
            ]
            if not honest:
                return False  # only the liar serves: nothing to compare with
            ceiling = UNOBSERVED_CAP * statistics.median(honest)
            capped = trusted[liar.peer_id].throughput * num_blocks <= ceiling
            settings = SessionSettings(model=target.model, max_length=8)
            rng = random.Random(0)
            carried = 0.0  # chains' worth of blocks the liar ran
            for i in range(2 * ROUTES):
                chain = await client.route(
                    replace(settings, push=False),
                    0,
                    num_blocks,
                    rng=rng if i % 2 else None,
                    max_age=5.0,
                )
                carried += sum(
                    (h.end - h.start) / num_blocks
                    for h in chain
                    if h.server.peer_id == liar.peer_id
                )
            return capped and carried <= client_config.max_server_share * 2 * ROUTES + 1e-9
    return False  # out of time: not shown stopped


def lie_in_pushes(bad: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Peer], None]:
    """Make ``liar`` (a server of this process: the attacker's own code) push ``bad(output)`` of
    one-token steps on its open sessions, still answering their clients honestly."""

    def install(liar: Peer) -> None:
        sessions = liar.server.sessions if liar.server is not None else {}
        for session in sessions.values():
            link = session.push
            if link is None:
                continue
            push = link.push

            async def lying(step_id: int, position: int, hidden: Any, push: Any = push) -> bool:
                out = compression.decode(hidden, max_numel=1 << 24)
                if out.shape[1] == 1:
                    hidden = compression.encode(bad(out), "none")
                return await push(step_id, position, hidden)

            link.push = lying

    return install


async def attack_push_liar(target: AttackTarget) -> bool:
    """Serve the blocks before the target server of the latest blocks and push it NaN; stopped
    when an honest push-mode client bans the liar and not the target server, and its outputs are
    those of the target's own chain (client-star), to the bit but for batching with other sessions."""
    ckpt = Checkpoint.open(target.model_path)
    joined = PeerConfig(listen=LOOPBACK, initial_peers=target.servers[:1])
    client_config = ClientConfig(step_timeout=5.0, retry_delay=0.05, max_attempts=3)
    torch.manual_seed(0)
    width = int(ckpt.config.hidden_size)
    inputs = [torch.randn(1, 4, width)] + [torch.randn(1, 1, width) for _ in range(3)]
    with trio.move_on_after(ATTACK_SECONDS):
        async with open_peer(joined, client=client_config) as client:
            records = {
                r.peer_id: r for r in await client.find_servers(target.model, ckpt.num_blocks)
            }
            ours = [
                records[p] for p in map(target.peer_id, range(len(target.servers))) if p in records
            ]
            victim = max(ours, key=lambda r: r.start)
            first = next((r for r in ours if r.start == 0 and r.end >= victim.start), None)
            if victim.start == 0 or first is None:
                return True  # no server of the target takes pushes from a server before it
            blocks = (victim.start, min(victim.end, ckpt.num_blocks))
            settings = SessionSettings(model=target.model, max_length=16)
            star = [Hop(first, 0, blocks[0]), Hop(victim, *blocks)]
            async with client.inference_session(star, settings) as honest:
                expected = [await honest.step(x) for x in inputs]
            liar_config = ServerConfig(model=str(target.model_path), start=0, end=blocks[0])
            async with open_peer(joined, server=liar_config) as liar:
                found = await found_with(client, target.model, blocks[0], liar.peer_id)
                liar_record = next(r for r in found if r.peer_id == liar.peer_id)
                chain = [Hop(liar_record, 0, blocks[0]), Hop(victim, *blocks)]
                pushed = replace(settings, push=True)
                async with client.inference_session(chain, pushed) as s:
                    lie_in_pushes(lambda out: out * float("nan"))(liar)
                    outputs = [await s.step(x) for x in inputs]
                now = trio.current_time()
                blamed = client.bans.is_banned(liar.peer_id, now)
                spared = not client.bans.is_banned(victim.peer_id, now)
            # equal but for batching: a server computing this step together with other sessions'
            # moves it by ~1e-5 of the hidden states' scale (tests/test_batching.py); a NaN or a
            # skipped block is far outside 1e-4 of it
            exact = all(
                bool((o - e).abs().max() <= 1e-4 * e.abs().max())
                for o, e in zip(outputs, expected, strict=True)
            )
            return blamed and spared and exact
    return False  # out of time: not shown stopped


ATTACKS: tuple[tuple[str, Attack], ...] = (
    ("throughput_liar", attack_throughput_liar),
    ("push_liar", attack_push_liar),
)
