"""Fuzzed frames (tests/attacks/fuzz.py) at a live server: it refuses them, closes those streams,
keeps nothing of them, and keeps serving an honest client exactly."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import trio

from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.protocol import DEFAULT_MAX_FRAME_SIZE, encode_message
from swarm_node.protocol import messages as m
from tests.attacks.fuzz import KINDS, batches, fuzz_server, read_locally, valid_messages
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm

INFO = m.InfoResponse(
    model="tiny", start=0, end=3, num_blocks=6, hidden_size=64, dtype="float32",
    throughput=1.0, cache_tokens_left=100, version="0",
)  # fmt: skip


def test_batches_end_at_the_first_frame_the_server_would_close_the_stream_on() -> None:
    valid = [encode_message(msg) for msg in valid_messages(INFO)]
    assert all(read_locally(frame, DEFAULT_MAX_FRAME_SIZE) is not None for frame in valid[:3])
    seen: set[str] = set()
    total = clean = 0
    for frames, kinds in batches(random.Random(0), valid, 3000, DEFAULT_MAX_FRAME_SIZE):
        readable = [read_locally(f, DEFAULT_MAX_FRAME_SIZE) is not None for f in frames]
        assert all(readable[:-1]) and len(frames) == sum(kinds.values())
        seen |= set(kinds)
        total += len(frames)
        clean += sum(readable)
    assert total == 3000 and seen == set(KINDS)
    assert 0.05 < clean / total < 0.5  # mutated messages reach the server's checks, most break


async def test_a_server_fuzzed_with_2000_frames_serves_an_honest_client_exactly(
    tiny_llama: Path,
) -> None:
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    expected = reference_model(tiny_llama).generate(
        input_ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    outputs: list[list[int]] = []
    with trio.fail_after(240):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, client):
            fuzzed = trio.Event()

            async def generate_meanwhile() -> None:
                while True:
                    done = fuzzed.is_set()
                    ids, _ = await generate_tokens(
                        client,
                        head,
                        input_ids,
                        SessionSettings(model=tiny_llama.name, num_blocks=6),
                        SamplingConfig(max_new_tokens=8),
                    )
                    outputs.append(ids[0].tolist())
                    if done:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(generate_meanwhile)
                stats = await fuzz_server(servers[0].addrs[0], frames=2000, seed=1)
                fuzzed.set()
            server = servers[0].server
            assert server is not None
            assert server.active_sessions == server.reserved_tokens == server.steps_in_flight == 0
    assert stats.frames == 2000 and set(stats.kinds) == set(KINDS)
    assert (stats.stalled, stats.bad_replies, stats.dial_failures) == (0, 0, 0)
    assert stats.refusals > 1000  # the broken frames were answered with bad_request
    assert len(outputs) >= 2 and all(ids == expected[0].tolist() for ids in outputs)
