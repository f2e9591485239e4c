"""Greedy generation through real loopback swarms equals transformers' generate on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm_node.dht.routing import Hop
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from tests.model_fixtures import make_tiny_model_dir, reference_model
from tests.swarm_helpers import local_swarm

CHAINS = {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}


@pytest.mark.parametrize("servers", [1, 2, 3])
async def test_greedy_equals_transformers(tiny_llama: Path, servers: int) -> None:
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    reference = reference_model(tiny_llama)
    expected = reference.generate(
        input_ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, CHAINS[servers]) as (peers, client):
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                SamplingConfig(max_new_tokens=12),
            )
    assert ids.tolist() == expected.tolist()
    assert [(h.start, h.end) for h in stats.chain] == CHAINS[servers]
    assert {h.server.peer_id for h in stats.chain} == {p.peer_id for p in peers}


async def test_each_span_matches_local_computation(tiny_llama: Path) -> None:
    torch.manual_seed(1)
    input_ids = torch.randint(0, 256, (2, 5))
    checkpoint = Checkpoint.open(tiny_llama)
    head = ClientHead.load(checkpoint)
    reference = reference_model(tiny_llama)
    with torch.no_grad():
        ref_hidden = reference(
            input_ids, output_hidden_states=True
        ).hidden_states  # (L+1) x (B, T, H)
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, CHAINS[3]) as (peers, client):
            chain = await client.find_chain(tiny_llama.name, 6)
            for hop in chain:
                local = BlockSpan.load(checkpoint, hop.start, hop.end)
                async with client.inference_session(
                    [hop], SessionSettings(model=tiny_llama.name, max_length=8, batch_size=2)
                ) as s:
                    inputs = head.embed(input_ids) if hop.start == 0 else ref_hidden[hop.start]
                    remote = await s.step(inputs[:, :3])  # prefill in two chunks, then one token
                    remote = torch.cat(
                        [remote, await s.step(inputs[:, 3:4]), await s.step(inputs[:, 4:])], dim=1
                    )
                cache = local.new_cache(8, batch_size=2)  # the same chunks, computed here
                expected = torch.cat(
                    [local(inputs[:, a:b], cache) for a, b in ((0, 3), (3, 4), (4, 5))], dim=1
                )
                torch.testing.assert_close(remote, expected, atol=1e-5, rtol=0)
                if hop.end < 6:  # the model's last hidden state has the final norm applied
                    # one whole pass vs three chunks: float32 rounding, relative to |h| up to ~10
                    torch.testing.assert_close(remote, ref_hidden[hop.end], atol=1e-5, rtol=1e-5)


async def test_overlapping_servers_use_sub_spans(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "overlap", num_layers=6, seed=3)
    torch.manual_seed(2)
    input_ids = torch.randint(0, 256, (1, 4))
    expected = reference_model(model).generate(
        input_ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(model))
    with trio.fail_after(60):
        async with local_swarm(model, [(0, 4), (2, 6)]) as (peers, client):
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=model.name, num_blocks=6, dtype="float32"),
                SamplingConfig(max_new_tokens=6),
            )
    # every switch point in 2..4 costs the same (compute is linear in blocks, one round trip per
    # server): which one wins is float rounding of the measured round trips
    assert [(h.start, h.end) for h in stats.chain] in ([(0, k), (k, 6)] for k in (2, 3, 4))
    assert ids.tolist() == expected.tolist()


async def test_client_finds_every_block_from_any_server(tiny_llama: Path) -> None:
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, CHAINS[3]) as (peers, client):
            for peer in [client, *peers]:
                servers = await peer.find_servers(tiny_llama.name, 6)
                assert sorted((s.start, s.end) for s in servers) == CHAINS[3]
                chain = await peer.find_chain(tiny_llama.name, 6)
                assert isinstance(chain[0], Hop) and chain[-1].end == 6
