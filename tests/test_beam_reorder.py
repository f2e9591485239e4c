"""Beam search's cache reordering: a step's 'reorder' field (protocol rules, the client's
InferenceSession.reorder) and the servers' rows it moves, kept through push and recovery's replay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm_node.dht.routing import Hop
from swarm_node.errors import ConfigError, LocalProtocolError, RequestError
from swarm_node.node.client.inference_session import InferenceSession
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from swarm_node.protocol import messages as m
from swarm_node.protocol.framing import encode_message
from swarm_node.protocol.server_session import SessionRules
from swarm_node.protocol.tensors import WireTensor
from tests.swarm_helpers import local_swarm

H = 64
FAST = ClientConfig(step_timeout=5.0, retry_delay=0.05, max_attempts=3)


def _step(reorder: tuple[int, ...]) -> m.StepRequest:
    hidden = WireTensor("none", "float32", (2, 1, 4), bytes(32))
    return m.StepRequest("s", 1, 0, hidden, reorder=reorder)


def test_the_rules_check_reorder_against_the_batch() -> None:
    rules = SessionRules(session_id="s", max_length=8, batch_size=2)
    assert rules.step(_step((1, 0)), 0) is None and rules.step(_step(()), 0) is None
    for rows in [(0, 2), (1,), (0, 1, 1)]:
        with pytest.raises(
            RequestError, match=r"'reorder' must be empty or 2 row indices in \[0, 2\)"
        ):
            rules.step(_step(rows), 0)
    with pytest.raises(LocalProtocolError, match="'reorder' must be a list of at most 64 ints"):
        encode_message(_step(tuple(range(65))))


def test_the_client_composes_reorders_until_the_next_step() -> None:
    settings = SessionSettings(model="m", num_blocks=1, batch_size=3, max_length=4)
    session = InferenceSession(None, [], settings, step_timeout=1.0, max_frame_size=1 << 20)
    with pytest.raises(ConfigError, match=r"'rows' must be 3 row indices in \[0, 3\)"):
        session.reorder([0, 3, 1])
    session.reorder([2, 0, 1])
    session.reorder([1, 1, 0])  # row i <- row [1, 1, 0][i] of what the first left
    assert session._reorder == (0, 0, 2)
    session.reorder([0, 1, 2])
    assert session._reorder == (0, 0, 2) and session.reorder_of(1) == ()
    session = InferenceSession(None, [], settings, step_timeout=1.0, max_frame_size=1 << 20)
    session.reorder([2, 0, 1])
    session.reorder([1, 2, 0])  # back to where the rows were: nothing to send
    assert session._reorder == ()


@pytest.mark.parametrize("push", [False, True], ids=["client-star", "push"])
async def test_reordered_rows_survive_a_failover(tiny_llama: Path, push: bool) -> None:
    """Rows swapped, then one row copied to both, on a two-server chain: the outputs are those of
    the rows moved (checked against a session fed the moved inputs), and a server lost after the
    reorders is replaced by one whose replayed cache holds the same rows."""
    model = tiny_llama.name
    torch.manual_seed(4)
    prompt = torch.randn(2, 5, H)
    steps = [torch.randn(2, 1, H) for _ in range(4)]
    same = torch.randn(1, 1, H).expand(2, 1, H).contiguous()
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6), (3, 6)], client=FAST) as (
            peers,
            client,
        ):
            records = {r.peer_id: r for r in await client.find_servers(model, 6)}
            chain = [Hop(records[peers[0].peer_id], 0, 3), Hop(records[peers[1].peer_id], 3, 6)]
            settings = SessionSettings(model=model, push=push, max_length=16, batch_size=2)

            async def run(broken: bool) -> list[torch.Tensor]:
                async with client.inference_session(chain, settings) as s:
                    outs = [await s.step(prompt), await s.step(steps[0])]
                    s.reorder([1, 0])
                    outs.append(await s.step(steps[1]))
                    s.reorder([1, 1])
                    outs.append(await s.step(same))
                    if broken:
                        await s._slots[1].spans[0].conn.reset()  # blocks 3:6 lost
                    outs += [await s.step(steps[2]), await s.step(steps[3])]
                    if broken:
                        assert s._slots[1].spans[0].hop.server.peer_id == peers[2].peer_id
                    return outs

            async with client.inference_session(chain, settings) as plain:  # rows 1 and 0 fed
                await plain.step(prompt.flip(0))
                await plain.step(steps[0].flip(0))
                expected_swap = await plain.step(steps[1])
            healthy = await run(broken=False)
            recovered = await run(broken=True)
    # rows computed in another order move by float rounding (~1e-5 here); wrong rows would be O(1) off
    torch.testing.assert_close(healthy[2], expected_swap, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(healthy[3][0], healthy[3][1], rtol=1e-4, atol=1e-4)  # one row, twice
    for a, b in zip(recovered, healthy, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
