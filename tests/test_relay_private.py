"""Relays in a private swarm (--swarm-key): the relayed connection carries the swarm key end to
end, like every other connection (py-libp2p 0.8.1 put it only on the accepting side; relay.py's
dial puts it on the dialing side too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm_node.errors import SwarmError
from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.net.swarm_key import write_swarm_key
from swarm_node.node.peer import open_peer
from tests.test_relay import LOOPBACK, expected_tokens, relayed


async def test_peers_of_a_private_swarm_talk_through_its_relay_and_outsiders_cannot(
    tiny_llama: Path, tmp_path: Path
) -> None:
    key, other = tmp_path / "swarm.key", tmp_path / "other.key"
    write_swarm_key(key)
    write_swarm_key(other)
    torch.manual_seed(13)
    input_ids = torch.randint(0, 256, (1, 6))
    expected = expected_tokens(tiny_llama, input_ids, 8)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    settings = SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32")
    private = {"listen": (), "reachability": "private"}
    with trio.fail_after(90):
        async with open_peer(
            PeerConfig(listen=LOOPBACK, reachability="public", swarm_key=key)
        ) as relay:
            assert relay.relays is not None and relay.relays.relay_slots > 0
            initial = (relay.addrs[0],)
            async with (
                open_peer(
                    PeerConfig(initial_peers=initial, swarm_key=key, **private),
                    server=ServerConfig(model=str(tiny_llama), start=0, end=6, throughput=100.0),
                ) as server,
                open_peer(PeerConfig(initial_peers=initial, swarm_key=key, **private)) as client,
            ):
                assert server.addrs and all("/p2p-circuit/" in a for a in server.addrs)
                ids, _ = await generate_tokens(
                    client, head, input_ids, settings, SamplingConfig(max_new_tokens=8)
                )
                assert relayed(client, server)
                for outsider_key in (None, other):  # no key, another swarm's key
                    with pytest.raises(SwarmError, match="could not reach any initial peer"):
                        async with open_peer(
                            PeerConfig(
                                initial_peers=initial,
                                swarm_key=outsider_key,
                                connect_timeout=2.0,
                                **private,
                            )
                        ):
                            pass
    assert ids.tolist() == expected
