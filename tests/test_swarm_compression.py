"""Codecs negotiated per session, long prompts streamed in chunks, quantized servers."""

from __future__ import annotations

from pathlib import Path

import torch
import trio

from swarm_node import compression
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import request
from swarm_node.protocol import messages as m
from tests.model_fixtures import make_tiny_model_dir
from tests.swarm_helpers import local_swarm


async def test_blockwise8_session_stays_within_the_codec_bound(tmp_path: Path) -> None:
    # a model with realistic (small) weights: the random 0.2-init one amplifies any rounding
    model = make_tiny_model_dir(tmp_path / "tame", num_layers=6, seed=4, initializer_range=0.02)
    checkpoint = Checkpoint.open(model)
    local = [BlockSpan.load(checkpoint, a, b) for a, b in ((0, 3), (3, 6))]
    torch.manual_seed(7)
    x = torch.randn(1, 9, 64)
    with trio.fail_after(60):
        async with local_swarm(
            model, [(0, 3), (3, 6)], client=ClientConfig(compression="blockwise8")
        ) as (
            servers,
            client,
        ):
            chain = await client.find_chain(model.name, 6)
            async with client.inference_session(
                chain, SessionSettings(model=model.name, max_length=16)
            ) as session:
                assert (session.uplink, session.downlink) == ("blockwise8", "blockwise8")
                remote = await session.step(x)
    # every crossing of the wire goes through the codec: x, span 0's output (twice), span 1's output
    q = lambda t: compression.decode(compression.encode(t, "blockwise8"), max_numel=t.numel())  # noqa: E731
    expected = q(local[1](q(q(local[0](q(x))))))
    exact = local[1](local[0](x))
    codec_error = float((q(exact) - exact).norm() / exact.norm())  # one pass: ~1%
    assert float((remote - expected).norm() / expected.norm()) < 1e-3
    assert float((remote - exact).norm() / exact.norm()) < 3 * codec_error


async def test_server_default_codec_answers_when_the_client_leaves_the_choice(
    tiny_llama: Path,
) -> None:
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)], compression="float16") as (servers, client):
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            opened = await request(
                conn,
                m.OpenSessionRequest(
                    model=tiny_llama.name,
                    start=0,
                    end=6,
                    max_length=8,
                    dtype="float32",
                    compression="default",
                ),
                m.OpenSessionResponse,
                timeout=5,
            )
            step = m.StepRequest(
                session_id=opened.session_id,
                step_id=1,
                position=0,
                hidden=compression.encode(torch.randn(1, 2, 64), "blockwise8-64"),
            )
            reply = await request(conn, step, m.StepResponse, timeout=5)
            assert (
                reply.hidden.codec == "float16"
            )  # the client sent blockwise8-64, the server answers float16
            assert compression.decode(reply.hidden, max_numel=128).dtype == torch.float32
            await conn.close()


async def test_long_prompt_streams_in_chunks_under_the_frame_limit(tmp_path: Path) -> None:
    model = make_tiny_model_dir(
        tmp_path / "long", num_layers=4, seed=9, max_position_embeddings=2048
    )
    checkpoint = Checkpoint.open(model)
    head = ClientHead.load(checkpoint)
    torch.manual_seed(8)
    ids = torch.randint(0, 256, (1, 700))
    hidden = head.embed(ids)  # (1, 700, 64): 179 KB in float32, frames are capped at 64 KiB
    spans = [BlockSpan.load(checkpoint, a, b) for a, b in ((0, 2), (2, 4))]
    caches = [s.new_cache(800) for s in spans]
    expected = hidden
    for span, cache in zip(spans, caches, strict=True):
        expected = span(expected, cache)
    with trio.fail_after(120):
        async with local_swarm(model, [(0, 2), (2, 4)], max_frame_size=64 * 1024) as (
            servers,
            client,
        ):
            chain = await client.find_chain(model.name, 4)
            async with client.inference_session(
                chain, SessionSettings(model=model.name, max_length=800)
            ) as session:
                assert session.chunk_tokens(hidden) < 700  # it really is cut up
                remote = await session.step(hidden)
                nxt = await session.step(hidden[:, :1])  # decoding goes on from position 700
    torch.testing.assert_close(remote, expected, atol=1e-4, rtol=1e-4)
    local_next = hidden[:, :1]
    for span, cache in zip(spans, caches, strict=True):
        local_next = span(local_next, cache)
    torch.testing.assert_close(nxt, local_next, atol=1e-4, rtol=1e-4)


async def test_int8_server_announces_its_memory_and_serves(tiny_llama: Path) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 4, 64)
    exact = BlockSpan.load(Checkpoint.open(tiny_llama), 0, 6)(x)
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 6)], quant="int8") as (servers, client):
            (record,) = await client.find_servers(tiny_llama.name, 6)
            assert record.quant == "int8"
            float_bytes = BlockSpan.load(Checkpoint.open(tiny_llama), 0, 1).memory_bytes()
            assert 0 < record.bytes_per_block < 0.5 * float_bytes
            chain = await client.find_chain(tiny_llama.name, 6)
            async with client.inference_session(
                chain, SessionSettings(model=tiny_llama.name, max_length=8)
            ) as session:
                out = await session.step(x)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0)
    assert cosine > 0.99
