"""Server-to-server push: the same tokens as transformers, pushes really happen, failures fall back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import trio

from swarm_node import compression
from swarm_node.errors import ProtocolError, RemoteError
from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from swarm_node.node.net.dialing import open_stream
from swarm_node.protocol import messages as m
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm

CHAINS = {2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}
NEW_TOKENS = 10
H = 64  # hidden size of the tiny models


def expected_tokens(model: Path, input_ids: torch.Tensor) -> list[list[int]]:
    ref = reference_model(model)
    out = ref.generate(
        input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out.tolist()


@pytest.mark.parametrize("servers", [2, 3])
async def test_push_greedy_equals_transformers(tiny_llama: Path, servers: int) -> None:
    torch.manual_seed(5)
    input_ids = torch.randint(0, 256, (1, 6))
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, CHAINS[servers], client=ClientConfig(push=True)) as (
            peers,
            client,
        ):
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                SamplingConfig(max_new_tokens=NEW_TOKENS),
            )
            pushed = [p.server.pushed_steps for p in peers]
    assert ids.tolist() == expected_tokens(tiny_llama, input_ids)
    assert [(h.start, h.end) for h in stats.chain] == CHAINS[servers]
    # every step after the first hop arrived by push (prefill + NEW_TOKENS - 1 decode steps)
    assert pushed == [0] + [NEW_TOKENS] * (servers - 1)


async def test_push_falls_back_to_client_star_when_a_push_fails(tiny_llama: Path) -> None:
    torch.manual_seed(6)
    inputs = [torch.randn(1, 3, H)] + [torch.randn(1, 1, H) for _ in range(5)]
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, CHAINS[3]) as (peers, client):
            chain = await client.find_chain(tiny_llama.name, 6)
            async with client.inference_session(
                chain, SessionSettings(model=tiny_llama.name, max_length=8)
            ) as star:
                expected = [await star.step(x) for x in inputs]
            async with client.inference_session(
                chain, SessionSettings(model=tiny_llama.name, push=True, max_length=8)
            ) as s:
                outputs = [await s.step(x) for x in inputs[:3]]
                (session,) = peers[0].server.sessions.values()
                await session.push.conn.reset()  # the first server's next push fails
                outputs += [await s.step(x) for x in inputs[3:]]
            pushed = [p.server.pushed_steps for p in peers]
    for out, ref in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, ref)
    assert pushed == [0, 3, 6]  # pushes until the break, the client's copies after it


async def test_failed_push_is_reported_and_duplicates_are_dropped(tiny_llama: Path) -> None:
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, CHAINS[2]) as (peers, client):
            chain = await client.find_chain(tiny_llama.name, 6)
            async with client.inference_session(
                chain, SessionSettings(model=tiny_llama.name, push=True, max_length=8)
            ) as s:
                assert [span.pushes for span in s._spans] == [True, False]
                x = torch.randn(1, 2, H)
                first = await s.step(x)
                (target,) = peers[1].server.sessions
                bad = m.PushStepRequest(
                    session_id=target,
                    step_id=9,
                    position=5,
                    hidden=compression.encode(torch.randn(1, 1, H), "none"),
                )
                # pushes from anyone but the previous server are refused: the stream is reset
                stranger = await open_stream(
                    client.host, peers[1].peer_id, max_frame_size=2**20, timeout=5
                )
                await stranger.send(bad)
                assert await stranger.receive() is None  # the server reset the stream: no answer
                with pytest.raises(
                    ProtocolError, match="broke while sending"
                ):  # and the pusher sees it
                    await stranger.send(bad)
                # a push from the previous server with a wrong position: our client hears
                # bad_push (the pusher's fault: tests/test_routing_attacks.py bans it)
                conn = await open_stream(
                    peers[0].host, peers[1].peer_id, max_frame_size=2**20, timeout=5
                )
                await conn.send(bad)
                hop = s._spans[1]
                with pytest.raises(RemoteError, match="bad_push: pushed step 9: 'position'"):
                    await s.receive_step(hop, 2, sent=False)
                # one past the session's length is push_failed: the client sends it itself
                await conn.send(
                    replace(
                        bad, position=2, hidden=compression.encode(torch.randn(1, 7, H), "none")
                    )
                )
                assert await s.receive_step(hop, 2, sent=False) is None
                assert (hop.answers.push_failures, hop.answers.duplicates) == (1, 0)
                # the next step still works; sent again, the server answers from its record of
                # the pushed step (no second computation) and the client drops the extra answer
                steps_before = peers[1].server.sessions[target].steps
                y = torch.randn(1, 1, H)
                second = await s.step(y)
                await s.send_step(hop, torch.randn(1, 1, H), 2, 2)
                third = await s.step(torch.randn(1, 1, H))
                assert peers[1].server.sessions[target].steps == steps_before + 2
                assert (hop.answers.push_failures, hop.answers.duplicates) == (1, 1)
                assert first.shape == (1, 2, H) and second.shape == third.shape == (1, 1, H)
                await conn.close()
            # the same inputs client-star give the same outputs
            async with client.inference_session(
                chain, SessionSettings(model=tiny_llama.name, max_length=8)
            ) as star:
                torch.testing.assert_close(await star.step(x), first)
                torch.testing.assert_close(await star.step(y), second)


async def test_a_push_targets_record_serves_the_sessions_of_a_minute(tiny_llama: Path) -> None:
    # The first server checks the next one's signed record before it pushes there: fetched for the
    # first session, reused by the next ones (discovery.PUSH_RECORD_REUSE), each still pushed.
    x = torch.randn(1, 2, H)
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, CHAINS[2]) as (peers, client):
            fetched = []
            get_record = peers[0].dht.get_record

            async def counted(peer_id):  # the real lookup, counted
                fetched.append(peer_id.to_base58())
                return await get_record(peer_id)

            peers[0].dht.get_record = counted
            chain = await client.find_chain(tiny_llama.name, 6)
            settings = SessionSettings(model=tiny_llama.name, push=True, max_length=8)
            for _ in range(3):
                async with client.inference_session(chain, settings) as s:
                    await s.step(x)
    assert fetched == [peers[1].peer_id]
    assert [p.server.pushed_steps for p in peers] == [0, 3]
