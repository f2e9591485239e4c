"""Attacks on how clients choose servers: a server claiming to be far faster than it is.

A record's throughput is signed by its server, so a liar can claim anything up to records.py's
MAX_THROUGHPUT (1e6 tokens/s). The attack runs such a server (real blocks, an honest compute, a
signed record saying 1e6) and an honest client, both joined to the target swarm over the network,
and has the client choose chains: the liar must carry at most the client's bounded share of them
(ClientConfig.max_server_share of any ChainShares.window chains in a row) and rank no higher than
twice the other servers' median claim until the client has measured it.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import replace

import trio

from swarm_node.dht.records import MAX_THROUGHPUT
from swarm_node.dht.routing import UNOBSERVED_CAP, trusted_throughputs
from swarm_node.model import Checkpoint
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig
from swarm_node.node.peer import open_peer
from tests.attacks import Attack, AttackTarget

ATTACK_SECONDS = 18.0
ROUTES = 20  # chains of each kind (inference, training) the honest client chooses
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


async def attack_throughput_liar(target: AttackTarget) -> bool:
    """Serve every block announcing MAX_THROUGHPUT tokens/s; stopped when an honest client's
    chains go through the liar at most ``max_server_share`` of the time and its trusted
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
            servers = await client.find_servers(target.model, num_blocks)
            trusted = {s.peer_id: s for s in trusted_throughputs(servers, {})}
            # claims compared as block rates (tokens/s x blocks): spans differ in length
            honest = [
                s.throughput * (s.end - s.start) for s in servers if s.peer_id != liar.peer_id
            ]
            if liar.peer_id not in trusted or not honest:
                return False  # the liar's record was not found: the attack did not happen
            ceiling = UNOBSERVED_CAP * statistics.median(honest)
            capped = trusted[liar.peer_id].throughput * num_blocks <= ceiling
            settings = SessionSettings(model=target.model, max_length=8)
            rng = random.Random(0)
            through_liar = 0
            for i in range(2 * ROUTES):
                chain = await client.route(
                    replace(settings, push=False),
                    0,
                    num_blocks,
                    rng=rng if i % 2 else None,
                    max_age=5.0,
                )
                through_liar += any(h.server.peer_id == liar.peer_id for h in chain)
            return capped and through_liar <= client_config.max_server_share * 2 * ROUTES
    return False  # out of time: not shown stopped


ATTACKS: tuple[tuple[str, Attack], ...] = (("throughput_liar", attack_throughput_liar),)
