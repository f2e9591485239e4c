"""The swarm map at ``/`` rendered by headless Chromium against a real local swarm, its JSON twin,
and the ``swarm-node api`` command as a real process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from swarm_node.node.apps.api import ApiConfig, open_api
from tests.browser import dump_dom
from tests.swarm_helpers import local_swarm

CLI = str(Path(sys.executable).with_name("swarm-node"))


@pytest.mark.slow  # starts a chromium process
async def test_map_in_headless_chromium(tiny_chat_llama: Path) -> None:
    with trio.fail_after(180):
        async with local_swarm(tiny_chat_llama, [(0, 2), (2, 6), (0, 4)]) as (servers, client):
            async with open_api(client, ApiConfig(models=(str(tiny_chat_llama),), port=0)) as api:
                async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
                    reply = await http.post(
                        "/v1/completions",
                        json={"model": "tiny-chat", "prompt": "map", "max_tokens": 5},
                    )
                    assert reply.status_code == 200, reply.text
                    await api.refresh()
                    state = (await http.get("/api/v1/state")).json()
                dom = await dump_dom(api.url + "/")
    model = state["models"][0]
    assert model["model"] == "tiny-chat" and model["num_blocks"] == 6 and model["missing"] == []
    assert model["coverage"] == [2, 2, 2, 2, 1, 1]
    assert {s["peer_id"] for s in model["servers"]} == {p.peer_id for p in servers}
    assert all(s["state"] == "ONLINE" and s["rtt_ms"] is not None for s in model["servers"])
    digest = servers[0].identity.digest[:12]
    assert {s["model_digest"] for s in model["servers"]} == {digest}
    assert model["variants"] == [
        {
            "digest": digest,
            "local": True,
            "servers": 3,
            "quants": ["none"],
            "held_as": {"float32": 3},
            "missing": [],
        }
    ]
    assert state["generation"]["completed"] == 1 and state["generation"]["tokens_generated"] == 5
    assert state["events"] == []  # no late hop, hedge or recovery (tests/test_api_security has one)

    assert 'data-ready="1"' in dom, dom[:2000]  # the script ran and drew the state
    assert '<a href="chat" id="chat-link">' in dom  # the chat page beside the map
    assert '<tbody id="e-rows"></tbody>' in dom
    assert (
        'data-model="tiny-chat"' in dom
        and "6 blocks · 3 server(s)" in dom
        and "every block served" in dom
    )
    assert f"weights by digest: {digest} (this API's): 3 server(s)" in dom
    cells = re.findall(r'<div class="c(\d)" title="block (\d+): (\d+) server', dom)
    assert [(int(b), int(n)) for _, b, n in cells] == list(enumerate([2, 2, 2, 2, 1, 1]))
    for peer, span in zip(servers, ["0:2", "2:6", "0:4"], strict=True):
        row = re.search(rf'<tr data-peer="{peer.peer_id}">(.*?)</tr>', dom)
        assert row is not None, f"no row for {peer.peer_id}"
        assert (
            f"<td>{span}</td>" in row.group(1)
            and "ONLINE" in row.group(1)
            and " ms</td>" in row.group(1)
        )
        assert f"…{peer.peer_id[-8:]}  blocks {span}" in dom  # its bar over the blocks it serves
    assert '<b id="g-completed">1</b>' in dom and '<b id="g-tokens">5</b>' in dom
    assert "<td>#1</td><td>tiny-chat</td><td>completion</td>" in dom


async def _first_line(stream: trio.abc.ReceiveStream) -> str:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise AssertionError(f"process exited before printing its URL: {data!r}")
        data += chunk
    return data.split(b"\n", 1)[0].decode()


@pytest.mark.slow
async def test_api_command_as_a_process(tiny_chat_llama: Path, tmp_path: Path) -> None:
    log = tmp_path / "stderr.txt"
    with trio.fail_after(180), log.open("wb") as stderr:
        async with local_swarm(tiny_chat_llama, [(0, 6)]) as (servers, _):
            async with trio.open_nursery() as nursery:
                process = await nursery.start(
                    lambda task_status: trio.run_process(  # noqa: ASYNC105 (nursery.start awaits it)
                        [
                            CLI,
                            "api",
                            "--model",
                            str(tiny_chat_llama),
                            "--initial-peers",
                            servers[0].addrs[0],
                            "--port",
                            "0",
                        ],
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                        task_status=task_status,
                        check=False,
                    )
                )
                url = await _first_line(process.stdout)
                assert url.startswith("http://127.0.0.1:")
                async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                    models = (await http.get("/v1/models")).json()
                    page = await http.get("/chat")
                    chat = (
                        await http.post(
                            "/v1/chat/completions",
                            json={
                                "model": "tiny-chat",
                                "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 3,
                            },
                        )
                    ).json()
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 0
    assert [m["id"] for m in models["data"]] == ["tiny-chat"]
    assert page.status_code == 200 and "<title>swarm-node chat</title>" in page.text
    assert f"swarm map at {url}/; chat at {url}/chat" in log.read_text()  # printed at start
    assert (
        chat["usage"]["completion_tokens"] == 3
        and chat["choices"][0]["message"]["role"] == "assistant"
    )


async def test_api_flags_are_checked() -> None:
    with trio.fail_after(60):
        result = await trio.run_process(
            [
                CLI,
                "api",
                "--initial-peers",
                "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWRDKfYGWwwCeWjBi4Xk3hTosZCAZorEoKoVMVxJ3towhU",
                "--port",
                "70000",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert "'port' must be an int in [0, 65535], got 70000" in result.stderr.decode()
