"""A server under pressure refuses new sessions with clear errors and keeps serving the admitted ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm_node.errors import RemoteError
from swarm_node.node.apps.cli import build_parser
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from tests.swarm_helpers import local_swarm

H = 64


async def test_per_peer_limit_refuses_the_extra_session_and_serves_the_others(
    tiny_llama: Path,
) -> None:
    model = tiny_llama.name
    no_recovery = ClientConfig(max_attempts=0)
    with trio.fail_after(60):
        async with local_swarm(
            tiny_llama, [(0, 6)], max_sessions_per_peer=2, client=no_recovery
        ) as (servers, client):
            chain = await client.find_chain(model, 6)
            async with (
                client.inference_session(chain, SessionSettings(model=model, max_length=8)) as a,
                client.inference_session(chain, SessionSettings(model=model, max_length=8)) as b,
            ):
                x = torch.randn(1, 2, H)
                first = await a.step(x)
                with pytest.raises(
                    RemoteError,
                    match="too_many_sessions: peer already holds 2 sessions here "
                    r"\(the limit\); close one or use another server",
                ):
                    async with client.inference_session(
                        chain, SessionSettings(model=model, max_length=8)
                    ):
                        pass
                torch.testing.assert_close(await b.step(x), first)  # the admitted ones go on
                await a.step(torch.randn(1, 1, H))
            async with client.inference_session(
                chain, SessionSettings(model=model, max_length=8)
            ) as c:  # room again
                torch.testing.assert_close(await c.step(x), first)
            assert servers[0].server.active_sessions == 0


def test_serve_flags_reach_the_limits() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--blocks",
            "0:2",
            "--max-sessions-per-peer",
            "3",
            "--session-idle-timeout",
            "9.5",
        ]
    )
    assert (args.max_sessions_per_peer, args.session_idle_timeout) == (3, 9.5)
