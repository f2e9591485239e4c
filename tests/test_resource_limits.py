"""A server under pressure refuses new sessions with clear errors and keeps serving the admitted ones;
`swarm-node serve` flags set those limits on a running server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import trio

from swarm_node.errors import ConfigError, RemoteError
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.process_swarm import server_processes
from tests.swarm_helpers import LOOPBACK, local_swarm

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


@pytest.mark.slow  # starts a `swarm-node serve` process
async def test_serve_flags_set_the_limits_of_a_running_server(tiny_llama: Path) -> None:
    model = tiny_llama.name
    flags = [
        *("--throughput", "100", "--max-sessions-per-peer", "1"),
        *("--max-session-length", "16", "--cache-tokens", "30"),
    ]
    no_recovery = ClientConfig(max_attempts=0)
    with trio.fail_after(120):
        async with server_processes(tiny_llama, ["0:6"], extra=flags) as (server,):
            config = PeerConfig(listen=LOOPBACK, initial_peers=(server.addr,))
            async with (
                open_peer(config, client=no_recovery) as client,
                open_peer(config, client=no_recovery) as other,
            ):
                chain = await client.find_chain(model, 6, max_length=16)
                (hop,) = chain
                assert hop.server.cache_tokens_left == 30  # --cache-tokens, in its record

                async def refused(peer: Peer, max_length: int) -> str:
                    with pytest.raises(RemoteError) as caught:
                        async with peer.inference_session(
                            chain, SessionSettings(model=model, max_length=max_length)
                        ):
                            pass
                    return caught.value.code

                assert await refused(client, 17) == "too_long"  # --max-session-length 16
                async with client.inference_session(
                    chain, SessionSettings(model=model, max_length=16)
                ) as a:
                    x = torch.randn(1, 2, H)
                    first = await a.step(x)
                    assert await refused(client, 8) == "too_many_sessions"  # per peer: 1
                    # 11 of 30 tokens left: a holds 16 cache + 3 for its kept answer
                    assert await refused(other, 16) == "cache_full"
                    async with other.inference_session(
                        chain, SessionSettings(model=model, max_length=8)
                    ) as b:
                        torch.testing.assert_close(await b.step(x), first)
                    assert (await a.step(torch.randn(1, 1, H))).shape == (1, 1, H)  # a goes on


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_peer_cache_share", 1.5, "'max_peer_cache_share' must be in [0.0, 1.0], got 1.5"),
        ("max_peer_cache_share", -0.1, "'max_peer_cache_share' must be in [0.0, 1.0], got -0.1"),
        ("send_timeout", 0, "'send_timeout' must be in >= 0.01, got 0"),
    ],
)
def test_share_and_send_timeout_are_checked(field: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ServerConfig(model="m", start=0, end=1, **{field: value})
    defaults = ServerConfig(model="m", start=0, end=1)
    assert (defaults.max_peer_cache_share, defaults.send_timeout) == (0.5, 30.0)
