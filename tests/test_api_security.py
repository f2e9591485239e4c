"""The HTTP API among strangers: every attack of tests/attacks/api.py against a real API in front of a
real local swarm, while an honest request's completion stays exactly transformers' greedy text."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import trio

from swarm_node.node.apps.api import ApiConfig, ApiServer, open_api
from swarm_node.node.apps.api.guard import allowed_host_names, host_name
from swarm_node.node.config import ClientConfig
from tests.attacks import AttackTarget
from tests.attacks.api import ATTACKS, attack_request_flood
from tests.swarm_helpers import local_swarm
from tests.test_api import reference_text

MODEL = "tiny-chat"
KEY = "sk-test-0123456789"
PROMPT = "The swarm says"
BEARER = {"authorization": f"Bearer {KEY}"}


@asynccontextmanager
async def attacked_api(
    model: Path, spans: list[tuple[int, int]], *, client: ClientConfig | None = None, **config: Any
) -> AsyncIterator[tuple[list[Any], ApiServer, AttackTarget]]:
    async with local_swarm(model, spans, client=client) as (servers, client_peer):
        settings = ApiConfig(models=(str(model),), port=0, api_key=KEY, **config)
        async with open_api(client_peer, settings) as api:
            target = AttackTarget(
                model=MODEL,
                model_path=model,
                servers=tuple(s.addrs[0] for s in servers),
                api_url=api.url,
                api_key=KEY,
            )
            yield servers, api, target


def greedy(model: Path, max_tokens: int = 10) -> str:
    from transformers import AutoTokenizer

    return reference_text(model, AutoTokenizer.from_pretrained(model)(PROMPT).input_ids, max_tokens)


async def honest_completion(api: ApiServer, max_tokens: int = 10) -> str:
    async with httpx.AsyncClient(base_url=api.url, headers=BEARER, timeout=60) as http:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        reply = await http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


@pytest.mark.parametrize("name", [name for name, _ in ATTACKS if name != "request_flood"])
async def test_each_attack_is_stopped_while_an_honest_completion_stays_exact(
    tiny_chat_llama: Path, name: str
) -> None:
    attack = dict(ATTACKS)[name]
    want = greedy(tiny_chat_llama)
    results: dict[str, Any] = {}
    with trio.fail_after(90):
        async with attacked_api(tiny_chat_llama, [(0, 3), (3, 6)]) as (_, api, target):

            async def attack_it() -> None:
                results["stopped"] = await attack(target)

            async def honest() -> None:
                results["text"] = await honest_completion(api)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack_it)
                nursery.start_soon(honest)
            results["after"] = await honest_completion(api)
            generation = api.state()["generation"]
    assert results["stopped"] is True, name
    assert results["text"] == want and results["after"] == want
    assert api.admitted == 0  # every request the attack made was counted out again
    assert generation["failed"] == 0 and generation["completed"] == 2  # none reached the swarm


async def test_a_flood_past_the_waiting_bound_is_answered_429(tiny_chat_llama: Path) -> None:
    want = greedy(tiny_chat_llama, 24)
    results: dict[str, Any] = {}
    with trio.fail_after(90):
        async with attacked_api(
            tiny_chat_llama, [(0, 3), (3, 6)], max_concurrent=2, max_waiting=3
        ) as (_, api, target):
            async with httpx.AsyncClient(base_url=api.url, headers=BEARER, timeout=60) as http:
                body = {
                    "model": MODEL,
                    "prompt": PROMPT,
                    "max_tokens": 24,
                    "temperature": 0,
                    "stream": True,
                }
                async with http.stream("POST", "/v1/completions", json=body) as reply:
                    lines = reply.aiter_lines()
                    first = await anext(lines)  # admitted and generating: now the flood
                    results["stopped"] = await attack_request_flood(target)
                    results["events"] = [first] + [line async for line in lines]
            while api.admitted:  # noqa: ASYNC110 (each hang-up is noticed by its request's own task)
                await trio.sleep(0.05)  # every flooding request, waiting or generating, counted out
            generation = api.state()["generation"]
    chunks = [json.loads(e[6:]) for e in results["events"] if e.startswith("data: {")]
    assert results["stopped"] is True
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert generation["peak_active"] <= 2


class GatedTokenizer:
    """The model's own tokenizer, held at the door of a long text until ``release`` is set: the
    test knows a big tokenization is under way and sees what else is answered meanwhile."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.timed_out = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        if len(text) > 10_000:
            self.entered.set()
            self.timed_out = not self.release.wait(20)
        return self.inner(text, **kwargs)


async def test_a_huge_prompt_is_tokenized_off_the_event_loop(tiny_chat_llama: Path) -> None:
    want = greedy(tiny_chat_llama)
    results: dict[str, Any] = {}
    with trio.fail_after(90):
        async with attacked_api(tiny_chat_llama, [(0, 6)]) as (_, api, _target):
            gate = GatedTokenizer(api.runtimes[MODEL].tokenizer)
            api.runtimes[MODEL] = dataclasses.replace(api.runtimes[MODEL], tokenizer=gate)
            async with httpx.AsyncClient(base_url=api.url, headers=BEARER, timeout=60) as http:

                async def big() -> None:
                    body = {"model": MODEL, "prompt": "a " * 480_000, "max_tokens": 1}
                    results["big"] = await http.post("/v1/completions", json=body)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(big)
                    await trio.to_thread.run_sync(gate.entered.wait, 30)
                    models = await http.get("/v1/models")
                    results["answered_while_held"] = not gate.release.is_set()
                    results["honest_started"] = trio.current_time()
                    gate.release.set()
                    results["text"] = await honest_completion(api)
    assert models.status_code == 200 and results["answered_while_held"]
    assert not gate.timed_out  # the loop answered while the tokenizer was held
    assert results["big"].status_code == 400
    assert results["big"].json()["error"]["code"] == "context_length_exceeded"
    assert results["text"] == want


FAST = ClientConfig(step_timeout=5.0, retry_delay=0.05, max_attempts=3)


@pytest.mark.parametrize("replacement", [True, False])
async def test_a_server_answering_nan_is_replaced_or_the_error_is_clean(
    tiny_chat_llama: Path, replacement: bool
) -> None:
    # The server of blocks 3..5 in the API's chain starts answering NaN (its own code changed: the
    # attacker's). With another server for those blocks the client replaces it and the completion is
    # exact; with none the API answers a clean 502/503, never a 500.
    want = greedy(tiny_chat_llama)
    spans = [(0, 3), (3, 6), (3, 6)] if replacement else [(0, 3), (3, 6)]
    steps: list[int] = []
    with trio.fail_after(90):
        async with attacked_api(tiny_chat_llama, spans, client=FAST) as (servers, api, _):
            before = await _completion_or_error(api)
            hop = api.state()["generation"]["recent"][0]["chain"][-1]  # "3:6@<peer id's end>"
            liar = next(s for s in servers[1:] if s.peer_id.endswith(hop.split("@")[1]))
            run_span = liar.server._run_span

            def lying(*args: Any, **kwargs: Any) -> torch.Tensor:
                steps.append(1)
                out = run_span(*args, **kwargs)
                return out if len(steps) < 2 else out * float("nan")

            liar.server._run_span = lying
            during = await _completion_or_error(api)
            banned = api.peer.bans.is_banned(liar.peer_id, trio.current_time())
            events = api.state()["events"]  # the map's list of late hops, hedges, recoveries
    assert before == (200, want) and len(steps) >= 2 and banned
    kind = "recovery" if replacement else "lost"
    assert {"kind": kind, "blocks": "3:6", "peer": liar.peer_id}.items() <= events[0].items()
    if replacement:
        assert during == (200, want)
    else:
        assert during[0] in (502, 503), during


async def _completion_or_error(api: ApiServer) -> tuple[int, str]:
    async with httpx.AsyncClient(base_url=api.url, headers=BEARER, timeout=60) as http:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
        reply = await http.post("/v1/completions", json=body)
    if reply.status_code != 200:
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        return reply.status_code, str(reply.json()["error"]["message"])
    return 200, str(reply.json()["choices"][0]["text"])


async def test_a_public_bind_warns_without_a_key_and_answers_the_listed_names(
    tiny_chat_llama: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(60), caplog.at_level(logging.WARNING):
        async with local_swarm(tiny_chat_llama, [(0, 6)]) as (_, peer):
            config = ApiConfig(
                models=(str(tiny_chat_llama),),
                host="0.0.0.0",
                port=0,
                allowed_hosts=("Node.LAN",),
            )
            async with open_api(peer, config) as api:
                port = api.url.rsplit(":", 1)[1]
                url = f"http://127.0.0.1:{port}"
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                    codes = {
                        host: (await http.get("/v1/models", headers={"host": host})).status_code
                        for host in (
                            f"node.lan:{port}",
                            "node.lan.",
                            f"localhost:{port}",
                            "0.0.0.0",
                        )
                    }
                    codes["other"] = (
                        await http.get("/v1/models", headers={"host": "other.lan"})
                    ).status_code
    assert codes == {
        f"node.lan:{port}": 200,
        "node.lan.": 200,
        f"localhost:{port}": 200,
        "0.0.0.0": 421,
        "other": 421,
    }
    assert any("without --api-key" in r.getMessage() for r in caplog.records)


def test_host_names() -> None:
    assert host_name("Example.COM:8000") == "example.com"
    assert host_name("[::1]:80") == "::1" and host_name("[::1]") == "::1"
    assert host_name("localhost.") == "localhost" and host_name("") == ""
    assert allowed_host_names("0.0.0.0", ()) == {"localhost", "127.0.0.1", "::1"}
    assert "10.0.0.5" in (allowed_host_names("10.0.0.5", ("a.lan:80",)) or ())
    assert "a.lan" in (allowed_host_names("10.0.0.5", ("a.lan:80",)) or ())
    assert "fe80::1" in (allowed_host_names("fe80::1", ()) or ())
    assert allowed_host_names("0.0.0.0", ("*",)) is None


@pytest.mark.slow  # starts a chromium process
async def test_the_map_page_sends_the_key_given_in_its_address(tiny_chat_llama: Path) -> None:
    from tests.browser import dump_dom

    with trio.fail_after(180):
        async with attacked_api(tiny_chat_llama, [(0, 6)]) as (_, api, _target):
            keyed = await dump_dom(f"{api.url}/#key={KEY}")
            bare = await dump_dom(f"{api.url}/")
    assert 'data-ready="1"' in keyed and "6 blocks" in keyed
    assert 'data-ready="1"' not in bare and "open this page as /#key=KEY" in bare
