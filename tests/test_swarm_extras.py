"""Cache-less forward, bfloat16 sessions, withdrawal on shutdown, stable identities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm_node import compression
from swarm_node.errors import ConfigError
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.identity import load_or_create_identity
from swarm_node.node.net.message_stream import request
from swarm_node.node.peer import open_peer
from swarm_node.protocol import messages as m
from tests.swarm_helpers import LOOPBACK, local_swarm


async def test_cacheless_forward_equals_local(tiny_llama: Path) -> None:
    torch.manual_seed(4)
    hidden = torch.randn(3, 5, 64)
    local = BlockSpan.load(Checkpoint.open(tiny_llama), 2, 5)
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, client):
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            req = m.ForwardRequest(
                model=tiny_llama.name,
                start=2,
                end=5,
                compression="none",
                hidden=compression.encode(hidden, "none"),
            )
            reply = await request(conn, req, m.ForwardResponse, timeout=10)
            await conn.close()
    out = compression.decode(reply.hidden, max_numel=hidden.numel())
    torch.testing.assert_close(out, local(hidden), atol=1e-5, rtol=0)


async def test_bfloat16_swarm_equals_local_bfloat16(tiny_llama: Path) -> None:
    checkpoint = Checkpoint.open(tiny_llama)
    head = ClientHead.load(checkpoint, dtype=torch.bfloat16)
    spans = [BlockSpan.load(checkpoint, a, b, dtype=torch.bfloat16) for a, b in ((0, 3), (3, 6))]
    torch.manual_seed(6)
    input_ids = torch.randint(0, 256, (1, 5))
    # the same decode loop computed here, in bfloat16
    caches = [s.new_cache(16) for s in spans]
    ids, hidden = input_ids, head.embed(input_ids)
    for _ in range(6):
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, cache)
        token = head.logits(hidden[:, -1:])[:, -1].float().argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        hidden = head.embed(token[:, None])
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)], dtype="bfloat16") as (servers, client):
            remote, _ = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="bfloat16"),
                SamplingConfig(max_new_tokens=6),
            )
    assert remote.tolist() == ids.tolist()


async def test_shutdown_withdraws_the_record(tiny_llama: Path) -> None:
    with trio.fail_after(60):
        async with open_peer(
            PeerConfig(listen=LOOPBACK),
            server=ServerConfig(model=str(tiny_llama), start=0, end=6, throughput=1.0),
        ) as first:
            boot = tuple(first.addrs[:1])
            async with open_peer(PeerConfig(listen=LOOPBACK, initial_peers=boot)) as client:
                async with open_peer(
                    PeerConfig(listen=LOOPBACK, initial_peers=boot),
                    server=ServerConfig(model=str(tiny_llama), start=0, end=6, throughput=1.0),
                ) as second:
                    leaving = second.peer_id
                    found = {s.peer_id for s in await client.find_servers(tiny_llama.name, 6)}
                    assert found == {first.peer_id, leaving}
                found = {s.peer_id for s in await client.find_servers(tiny_llama.name, 6)}
                assert found == {first.peer_id}


def test_identity_file_keeps_the_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "peer.key"
    a = load_or_create_identity(path)
    b = load_or_create_identity(path)
    assert a.public_key.serialize() == b.public_key.serialize()
    assert path.stat().st_mode & 0o777 == 0o600
    for mode in (0o640, 0o604, 0o620):  # another user could read (or replace) the key: refused
        path.chmod(mode)
        with pytest.raises(
            ConfigError,
            match=f"must be readable by its owner only .mode 0600., got mode 0{mode:o}.*chmod 600",
        ):
            load_or_create_identity(path)
    path.chmod(0o600)
    assert load_or_create_identity(path).public_key.serialize() == a.public_key.serialize()
    path.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="is not a libp2p private key file"):
        load_or_create_identity(path)


async def test_a_record_is_asked_of_its_server_first_then_of_what_others_hold(
    tiny_llama: Path,
) -> None:
    from swarm_node.dht.records import record_key
    from swarm_node.dht.signing import sign_record

    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, client):
            target = servers[0].host.get_id()
            key = record_key(servers[0].peer_id).encode()
            client.dht.kad.value_store.remove(
                key
            )  # no local copy: the answer comes from the server
            assert client.dht.kad.value_store.get(key) is None
            direct = await client.dht.get_record(target)
            assert direct is not None and direct.peer_id == servers[0].peer_id
            # the server stops answering lookups (as after a timeout): a signed copy held by a peer
            # (here the client's own store) is what the lookup falls back to
            client.dht._mark_unreachable(target, "test")
            client.dht.kad.value_store.remove(key)
            elsewhere = servers[1].dht.kad.value_store.get(key) is not None
            assert (
                await client.dht.get_record(target) is not None
            ) == elsewhere  # nothing else to ask
            client.dht.kad.value_store.put(key, sign_record(direct, servers[0].dht._key_pair))
            fallback = await client.dht.get_record(target)
            assert fallback is not None
            assert (fallback.peer_id, fallback.start, fallback.end) == (servers[0].peer_id, 0, 3)
