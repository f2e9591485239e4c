"""Bad input gets a specific error while the server keeps serving everyone else."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node import compression
from swarm_node.errors import (
    ConfigError,
    MissingBlocksError,
    ModelError,
    ProtocolError,
    RemoteError,
    SessionError,
)
from swarm_node.node.apps.cli import main
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig, parse_blocks
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import request
from swarm_node.node.peer import open_peer
from swarm_node.protocol import messages as m
from tests.swarm_helpers import LOOPBACK, local_swarm

H = 64  # tiny model hidden size


def _open(model: str, **kw: object) -> m.OpenSessionRequest:
    fields: dict = dict(
        model=model, start=0, end=6, max_length=16, dtype="float32", compression="none"
    )
    fields.update(kw)
    return m.OpenSessionRequest(**fields)


async def test_bad_requests_get_specific_errors_and_others_keep_working(tiny_llama: Path) -> None:
    model = tiny_llama.name
    torch.manual_seed(0)
    x = torch.randn(1, 3, H)
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)], max_session_length=32) as (servers, client):
            server_id = servers[0].peer_id
            chain = await client.find_chain(model, 6)
            async with client.inference_session(
                chain, SessionSettings(model=model, max_length=32)
            ) as good:
                expected = [await good.step(x)]

                async def still_serving() -> None:
                    token = torch.randn(1, 1, H)
                    expected.append(await good.step(token))

                async def fresh() -> object:
                    return await open_stream(
                        client.host, server_id, max_frame_size=2**26, timeout=5
                    )

                conn = await fresh()
                # blocks out of range / unknown model / too long / unknown session
                with pytest.raises(
                    RemoteError,
                    match="out_of_range: blocks 2:9 are not within the served blocks 0:6",
                ):
                    await request(
                        conn, _open(model, start=2, end=9), m.OpenSessionResponse, timeout=5
                    )
                with pytest.raises(RemoteError, match="unknown_model: this server serves"):
                    await request(conn, _open("no-such-model"), m.OpenSessionResponse, timeout=5)
                with pytest.raises(
                    RemoteError, match=r"too_long: 'max_length' must be in \[1, 32\], got 100"
                ):
                    await request(
                        conn, _open(model, max_length=100), m.OpenSessionResponse, timeout=5
                    )
                step = m.StepRequest(
                    session_id="feedbeef",
                    step_id=1,
                    position=0,
                    hidden=compression.encode(x, "none"),
                )
                with pytest.raises(RemoteError, match="unknown_session: no session 'feedbeef'"):
                    await request(conn, step, m.StepResponse, timeout=5)
                await still_serving()

                opened = await request(
                    conn, _open(model, max_length=4), m.OpenSessionResponse, timeout=5
                )
                sid = opened.session_id
                # wrong hidden size, wrong dtype, wrong position, prompt longer than max_length
                bad_cases = [
                    (torch.randn(1, 2, H + 1), "bad_request: hidden states must have shape"),
                    (
                        torch.randn(1, 2, H, dtype=torch.float16),
                        "bad_request: hidden states must be float32, got float16",
                    ),
                    (torch.randn(1, 5, H), "too_long: session max_length is 4"),
                ]
                for tensor, message in bad_cases:
                    req = m.StepRequest(
                        session_id=sid,
                        step_id=1,
                        position=0,
                        hidden=compression.encode(tensor, "none"),
                    )
                    with pytest.raises(RemoteError, match=message):
                        await request(conn, req, m.StepResponse, timeout=5)
                req = m.StepRequest(
                    session_id=sid, step_id=1, position=7, hidden=compression.encode(x, "none")
                )
                with pytest.raises(
                    RemoteError, match="'position' must equal the session's cache length 0, got 7"
                ):
                    await request(conn, req, m.StepResponse, timeout=5)
                await still_serving()

                # a frame over the size limit: refused from its length prefix alone, stream closed
                conn2 = await fresh()
                await conn2.stream.write(struct.pack(">I", 2**30) + b"\x00" * 16)
                with pytest.raises(RemoteError, match="bad_request: .*frame"):
                    await request(conn2, m.InfoRequest(), m.InfoResponse, timeout=5)
                await still_serving()

                # garbage bytes
                conn3 = await fresh()
                await conn3.stream.write(struct.pack(">I", 12) + b"\xc1garbage!!!!")
                with pytest.raises(RemoteError, match="bad_request"):
                    await request(conn3, m.InfoRequest(), m.InfoResponse, timeout=5)
                await still_serving()

                info = await request(await fresh(), m.InfoRequest(), m.InfoResponse, timeout=5)
                assert (info.model, info.start, info.end, info.hidden_size) == (model, 0, 6, H)
    assert len(expected) == 5


async def test_client_side_length_check(tiny_llama: Path) -> None:
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, client):
            chain = await client.find_chain(tiny_llama.name, 6)
            async with client.inference_session(
                chain, SessionSettings(model=tiny_llama.name, max_length=4)
            ) as s:
                with pytest.raises(SessionError, match="max_length is 4"):
                    await s.step(torch.randn(1, 5, H))


async def test_cache_budget_refuses_new_sessions(tiny_llama: Path) -> None:
    with trio.fail_after(60):
        no_recovery = ClientConfig(
            max_attempts=0
        )  # the server's own refusal, not the client's recovery
        async with local_swarm(
            tiny_llama, [(0, 6)], cache_budget_tokens=100, client=no_recovery
        ) as (servers, client):
            chain = await client.find_chain(tiny_llama.name, 6)
            async with client.inference_session(
                chain, SessionSettings(model=tiny_llama.name, max_length=80)
            ) as first:
                await first.step(torch.randn(1, 2, H))
                with pytest.raises(
                    RemoteError,
                    match=r"cache_full: attention cache full: the session needs 94 tokens \(80 cache "
                    r"\+ 14 kept answer\), 6 of 100",
                ):
                    async with client.inference_session(
                        chain, SessionSettings(model=tiny_llama.name, max_length=80)
                    ):
                        pass
                await first.step(torch.randn(1, 1, H))
            # closing the first session frees its room
            async with client.inference_session(
                chain, SessionSettings(model=tiny_llama.name, max_length=80)
            ) as again:
                await again.step(torch.randn(1, 2, H))


@asynccontextmanager
async def stepped_session(model: Path) -> AsyncIterator[tuple[Any, Any]]:
    """A 1-server swarm whose sessions idle out after 0.3 s, and a session that took one step:
    (the server, the session). No recovery: the session sees the closed stream itself."""
    async with local_swarm(
        model, [(0, 6)], session_idle_timeout=0.3, client=ClientConfig(max_attempts=0)
    ) as (servers, client):
        chain = await client.find_chain(model.name, 6)
        async with client.inference_session(
            chain, SessionSettings(model=model.name, max_length=8)
        ) as s:
            await s.step(torch.randn(1, 2, H))
            yield servers[0].server, s


async def test_idle_sessions_time_out(tiny_llama: Path) -> None:
    # No sleeping here: the client waits for the server's own idle-timeout message.
    with trio.fail_after(60):
        async with stepped_session(tiny_llama) as (server, s):
            assert server.active_sessions == 1
            notice = await s._spans[0].conn.receive()
            assert isinstance(notice, m.ErrorResponse) and notice.code == "idle_timeout"
            assert server.active_sessions == 0
            assert server.cache_tokens_left == server.config.cache_budget_tokens
            with pytest.raises(ProtocolError):  # the server closed the stream
                await s.step(torch.randn(1, 1, H))


async def test_blocks_out_of_range_and_unknown_model(tiny_llama: Path) -> None:
    with trio.fail_after(30):
        with pytest.raises(
            ConfigError, match=r"'--blocks' 4:10 is out of range: tiny-llama has 6 blocks \(0:6\)"
        ):
            async with open_peer(
                PeerConfig(listen=LOOPBACK),
                server=ServerConfig(model=str(tiny_llama), start=4, end=10),
            ):
                pass
        with pytest.raises(ModelError, match="smollm2-135m"):
            async with open_peer(
                PeerConfig(listen=LOOPBACK),
                server=ServerConfig(model="no-such-model", start=0, end=1),
            ):
                pass


async def test_missing_blocks_named(tiny_llama: Path) -> None:
    with trio.fail_after(30):
        async with local_swarm(tiny_llama, [(0, 2), (4, 6)]) as (servers, client):
            with pytest.raises(MissingBlocksError, match="no server for blocks 2-3 of tiny-llama"):
                await client.find_chain(tiny_llama.name, 6)


@pytest.mark.parametrize("text", ["abc", "5", "3:1", "4:4", "-1:3", "1:2:3"])
def test_malformed_blocks_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="'--blocks' must"):
        parse_blocks(text)


def test_cli_reports_bad_flags(capsys: pytest.CaptureFixture[str], tiny_chat_llama: Path) -> None:
    assert main(["serve", "--blocks", "ten:20"]) == 2
    assert (
        "'--blocks' must look like START:END (e.g. 0:15), got 'ten:20'" in capsys.readouterr().err
    )
    unreachable = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWHPevRC5wBG7ooxYwFP8HLN7Hn682edvYswGWx2Dk5jYz"
    argv = ["generate", "hi", "--initial-peers", unreachable, "--model"]
    # a whole model folder (tokenizer too): the model's side loads while the peer dials, so a
    # folder without a tokenizer could fail first and say so instead
    assert main([*argv, str(tiny_chat_llama)]) == 2
    assert "could not reach any initial peer" in capsys.readouterr().err
    # the model is found before any dial (its client's side loads while the peer starts)
    assert main([*argv, "no-such-model"]) == 2
    assert "model must be a bundled model name" in capsys.readouterr().err
    assert main(["generate", "hi"]) == 2
    assert "'--initial-peers' must name at least one peer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--blocks", "0:1", "--dtype", "int3"])
