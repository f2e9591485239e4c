"""The OpenAI-compatible API, driven by the official ``openai`` client over real HTTP on loopback,
in front of a real local swarm. The client is synchronous: it runs in a worker thread."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import trio

from swarm_node.node.apps.api import ApiConfig, ApiServer, open_api
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm

MODEL = "tiny-chat"


@asynccontextmanager
async def api_swarm(
    model: Path, spans: list[tuple[int, int]], **config: Any
) -> AsyncIterator[ApiServer]:
    async with local_swarm(model, spans) as (_, client_peer):
        async with open_api(client_peer, ApiConfig(models=(str(model),), port=0, **config)) as api:
            yield api


def client_of(api: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference_text(model: Path, ids: list[int], max_new_tokens: int) -> str:
    """What transformers' greedy generate makes of the same ids, decoded."""
    from transformers import AutoTokenizer

    out = reference_model(model).generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )
    return AutoTokenizer.from_pretrained(model).decode(
        out[0, len(ids) :].tolist(), skip_special_tokens=True
    )


async def test_completions_chat_and_streams_match_transformers(tiny_chat_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    prompt = "The swarm says"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    want_completion = reference_text(tiny_chat_llama, tokenizer(prompt).input_ids, 10)
    want_chat = reference_text(tiny_chat_llama, list(chat_ids), 7)
    with trio.fail_after(120):
        async with api_swarm(tiny_chat_llama, [(0, 3), (3, 6)]) as api:

            def use() -> dict[str, Any]:
                client = client_of(api)
                out: dict[str, Any] = {"models": [m.id for m in client.models.list().data]}
                out["completion"] = client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=10, temperature=0
                )
                out["chat"] = client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=7, temperature=0
                )
                out["completion_chunks"] = list(
                    client.completions.create(
                        model=MODEL,
                        prompt=prompt,
                        max_tokens=10,
                        temperature=0,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
                out["chat_chunks"] = list(
                    client.chat.completions.create(
                        model=MODEL,
                        messages=messages,
                        max_tokens=7,
                        temperature=0,
                        stream=True,
                    )
                )
                sampled = [
                    client.completions.create(
                        model=MODEL,
                        prompt=prompt,
                        max_tokens=12,
                        temperature=1.0,
                        top_p=0.9,
                        seed=7,
                    )
                    .choices[0]
                    .text
                    for _ in range(2)
                ]
                out["sampled"] = sampled
                return out

            got = await trio.to_thread.run_sync(use)
            state = api.state()
    assert got["models"] == [MODEL]
    completion = got["completion"]
    assert completion.object == "text_completion" and completion.model == MODEL
    assert completion.choices[0].text == want_completion
    assert completion.choices[0].finish_reason == "length"
    assert (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    ) == (len(tokenizer(prompt).input_ids), 10, len(tokenizer(prompt).input_ids) + 10)
    chat = got["chat"]
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == want_chat
    assert chat.usage.prompt_tokens == len(chat_ids) and chat.usage.completion_tokens == 7

    chunks = got["completion_chunks"]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want_completion
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10  # include_usage
    chat_chunks = got["chat_chunks"]
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == want_chat
    assert chat_chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chat_chunks}) == 1
    # the 'swarm' extension (the chat page's chain): in the finish chunk and the whole response,
    # kept by the OpenAI client as an extra field
    assert [c.model_extra.get("swarm") is not None for c in chat_chunks] == [False] * (
        len(chat_chunks) - 1
    ) + [True]
    for swarm in (chat_chunks[-1].model_extra["swarm"], chat.model_extra["swarm"]):
        hops = [f"{hop['blocks']}@{hop['peer'][-8:]}" for hop in swarm["chain"]]
        assert hops == state["generation"]["recent"][0]["chain"] and len(hops) == 2
        assert swarm["recoveries"] == [] and swarm["hedges"] == []
        assert swarm["time_to_first_token_s"] > 0 and swarm["tokens_per_s"] > 0
    assert [c.model_extra.get("swarm") is not None for c in chunks] == [False] * (
        len(chunks) - 2
    ) + [True, False]  # the usage chunk comes after the finish chunk

    assert got["sampled"][0] == got["sampled"][1]  # the same seed, the same text
    generation = state["generation"]
    assert generation["completed"] == 6 and generation["failed"] == 0 and generation["active"] == []
    assert generation["tokens_generated"] == 10 + 7 + 10 + 7 + 12 + 12


async def test_sampling_settings_reach_the_sampler(tiny_chat_llama: Path) -> None:
    # Fixed seeds, so every draw below is the same on every run.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    prompt = "The swarm says"
    ids = tokenizer(prompt).input_ids
    greedy = reference_text(tiny_chat_llama, ids, 12)
    with torch.no_grad():
        logits = reference_model(tiny_chat_llama)(torch.tensor([ids])).logits[0, -1]  # (V,)
    probs = torch.softmax(logits / 0.3, -1)
    top = probs.topk(3)
    # at temperature 0.3 the three likeliest first tokens hold 0.89, the two first 0.83: top_p 0.85
    nucleus = {
        tokenizer.decode([int(t)]): float(q) for t, q in zip(top.indices, top.values, strict=True)
    }
    assert top.values[:2].sum() < 0.85 <= top.values.sum() and len(nucleus) == 3
    with trio.fail_after(180):
        async with api_swarm(tiny_chat_llama, [(0, 3), (3, 6)]) as api:

            def use() -> dict[str, list[str]]:
                client = client_of(api)

                def texts(seeds: range, **settings: Any) -> list[str]:
                    return [
                        client.completions.create(model=MODEL, prompt=prompt, seed=s, **settings)
                        .choices[0]
                        .text
                        for s in seeds
                    ]

                return {
                    "sampled": texts(range(2), max_tokens=12, temperature=1.0),
                    "tiny_p": texts(range(2), max_tokens=12, temperature=1.0, top_p=1e-6),
                    "nucleus": texts(range(64), max_tokens=1, temperature=0.3, top_p=0.85),
                    "hot": texts(range(32), max_tokens=1, temperature=2.0),
                }

            got = await trio.to_thread.run_sync(use)
    assert greedy not in got["sampled"] and len(set(got["sampled"])) == 2  # seeds reach the sampler
    assert got["tiny_p"] == [greedy, greedy]  # top_p that small keeps only the top token
    assert set(got["nucleus"]) <= set(nucleus)  # temperature and top_p both shape the choice
    first = max(nucleus, key=nucleus.__getitem__)
    share = got["nucleus"].count(first) / 64
    expected = nucleus[first] / sum(nucleus.values())  # 0.80; 3 sd of 64 draws is 0.15
    assert abs(share - expected) < 0.15, (share, expected)
    assert got["hot"].count(first) / 32 < 0.2 and len(set(got["hot"])) > 2 * len(nucleus)


async def test_stop_strings_cut_the_text_streamed_or_not(tiny_chat_llama: Path) -> None:
    from transformers import AutoTokenizer

    prompt = "stop here"
    full = reference_text(
        tiny_chat_llama, AutoTokenizer.from_pretrained(tiny_chat_llama)(prompt).input_ids, 16
    )
    clean = full.replace("\ufffd", "")
    stop = clean[
        len(clean) // 2 : len(clean) // 2 + 2
    ]  # two characters from the middle of the text
    want = full[: full.find(stop)]
    with trio.fail_after(120):
        async with api_swarm(tiny_chat_llama, [(0, 6)]) as api:

            def use() -> tuple[Any, list[Any], Any]:
                client = client_of(api)
                whole = client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "never"]
                )
                chunks = list(
                    client.completions.create(
                        model=MODEL,
                        prompt=prompt,
                        max_tokens=16,
                        temperature=0,
                        stop=stop,
                        stream=True,
                    )
                )
                unstopped = client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop="never"
                )
                return whole, chunks, unstopped

            whole, chunks, unstopped = await trio.to_thread.run_sync(use)
    assert stop and want != full
    assert whole.choices[0].text == want and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 16
    assert "".join(c.choices[0].text for c in chunks) == want  # no piece of the stop string leaked
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert unstopped.choices[0].text == full and unstopped.choices[0].finish_reason == "length"


async def test_each_error_has_openai_shape(tiny_chat_llama: Path) -> None:
    with trio.fail_after(120):
        async with api_swarm(tiny_chat_llama, [(0, 6)]) as api:

            def use() -> dict[str, Any]:
                client = client_of(api)
                errors: dict[str, Any] = {}

                def catch(name: str, call: Any) -> None:
                    try:
                        call()
                    except openai.APIStatusError as exc:
                        errors[name] = (exc.status_code, exc.body)
                    else:
                        errors[name] = None

                chat = client.chat.completions.create
                user = [{"role": "user", "content": "hi"}]
                catch(
                    "unknown_model", lambda: client.completions.create(model="gpt-4o", prompt="x")
                )
                catch("temperature", lambda: chat(model=MODEL, messages=user, temperature=3.5))
                catch("top_p", lambda: chat(model=MODEL, messages=user, top_p=0))
                catch(
                    "max_tokens",
                    lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=0),
                )
                catch(
                    "too_long",
                    lambda: client.completions.create(model=MODEL, prompt="x" * 600, max_tokens=4),
                )
                catch(
                    "room",
                    lambda: client.completions.create(model=MODEL, prompt="x" * 500, max_tokens=20),
                )
                catch("messages", lambda: chat(model=MODEL, messages=[]))
                catch(
                    "role", lambda: chat(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
                )
                catch("n", lambda: chat(model=MODEL, messages=user, n=3))
                catch(
                    "stop", lambda: chat(model=MODEL, messages=user, stop=["a", "b", "c", "d", "e"])
                )
                catch(
                    "stream_too_long",
                    lambda: list(
                        client.completions.create(model=MODEL, prompt="x" * 600, stream=True)
                    ),
                )
                with httpx.Client(base_url=api.url, timeout=30) as raw:
                    bad_json = raw.post(
                        "/v1/chat/completions",
                        content=b"{not json",
                        headers={"content-type": "application/json"},
                    )
                    errors["bad_json"] = (bad_json.status_code, bad_json.json()["error"])
                    not_object = raw.post("/v1/completions", json=[1, 2])
                    errors["not_object"] = (not_object.status_code, not_object.json()["error"])
                    route = raw.get("/v1/engines")
                    errors["route"] = (route.status_code, route.json()["error"])
                    method = raw.get("/v1/chat/completions")
                    errors["method"] = (method.status_code, method.json()["error"])
                return errors

            errors = await trio.to_thread.run_sync(use)
            # the server keeps serving after all of that
            again = await trio.to_thread.run_sync(
                lambda: client_of(api).completions.create(model=MODEL, prompt="ok", max_tokens=2)
            )
    assert again.usage.completion_tokens == 2

    def check(name: str, status: int, param: str | None, code: str | None, says: str) -> None:
        assert errors[name] is not None, f"{name}: no error"
        got_status, body = errors[name]
        assert got_status == status, (name, errors[name])
        assert set(body) == {"message", "type", "param", "code"}, (name, body)
        assert body["param"] == param and body["code"] == code, (name, body)
        assert says in body["message"], (name, body)

    check("unknown_model", 404, "model", "model_not_found", "'gpt-4o' does not exist")
    check(
        "temperature",
        400,
        "temperature",
        "invalid_value",
        "'temperature' must be in [0.0, 2.0], got 3.5",
    )
    check("top_p", 400, "top_p", "invalid_value", "'top_p' must be in (0.0, 1.0]")
    check(
        "max_tokens",
        400,
        "max_tokens",
        "invalid_value",
        "'max_tokens' must be an integer >= 1, got 0",
    )
    check(
        "too_long", 400, "prompt", "context_length_exceeded", "maximum context length is 512 tokens"
    )
    check("room", 400, "prompt", "context_length_exceeded", "500 prompt tokens and asks for 20")
    check("messages", 400, "messages", "invalid_value", "'messages' must be a non-empty list")
    check("role", 400, "messages[0]", "invalid_value", "role system, developer, user or assistant")
    check("n", 400, "n", "invalid_value", "'n' must be 1")
    check("stop", 400, "stop", "invalid_value", "at most 4")
    check("stream_too_long", 400, "prompt", "context_length_exceeded", "maximum context length")
    check("bad_json", 400, None, "invalid_json", "must be valid JSON")
    check("not_object", 400, None, None, "must be a JSON object, got list")
    check("route", 404, None, None, "GET /v1/engines")
    check("method", 405, None, None, "GET /v1/chat/completions")
    assert errors["unknown_model"][1]["type"] == "invalid_request_error"


async def test_missing_blocks_is_503(tiny_chat_llama: Path) -> None:
    with trio.fail_after(120):
        async with api_swarm(tiny_chat_llama, [(0, 4)]) as api:

            def use() -> tuple[int, Any]:
                try:
                    client_of(api).completions.create(model=MODEL, prompt="hi", max_tokens=2)
                except openai.APIStatusError as exc:
                    return exc.status_code, exc.body
                return 200, None

            status, body = await trio.to_thread.run_sync(use)
            await api.refresh()
            view = api.state()["models"][0]
    assert status == 503 and body["code"] == "missing_blocks" and body["type"] == "server_error"
    assert "4" in body["message"]
    assert view["missing"] == [4, 5] and view["coverage"] == [1, 1, 1, 1, 0, 0]


async def test_concurrent_requests_run_concurrently(tiny_chat_llama: Path) -> None:
    requests = 4
    with trio.fail_after(120):
        async with api_swarm(tiny_chat_llama, [(0, 3), (3, 6)]) as api:
            barrier = threading.Barrier(requests)
            results: list[Any] = [None] * requests

            def one(i: int) -> None:
                client = client_of(api)
                barrier.wait(timeout=30)
                results[i] = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"request {i}"}],
                    max_tokens=16,
                    temperature=0,
                )

            async with trio.open_nursery() as nursery:
                for i in range(requests):
                    nursery.start_soon(trio.to_thread.run_sync, one, i)
            generation = api.state()["generation"]
    assert all(r.usage.completion_tokens == 16 for r in results)
    assert generation["completed"] == requests
    assert generation["peak_active"] >= 2  # several inference sessions were open at the same time
    assert len({tuple(r["chain"]) for r in generation["recent"]}) == 1


@pytest.mark.slow
async def test_chat_template_of_smollm2(smollm2_path: Path) -> None:
    """The real model's chat template, end to end: a greedy answer names Paris."""
    with trio.fail_after(300):
        async with api_swarm(smollm2_path, [(0, 15), (15, 30)]) as api:
            reply = await trio.to_thread.run_sync(
                lambda: client_of(api).chat.completions.create(
                    model="smollm2-135m",
                    messages=[{"role": "user", "content": "What is the capital of France?"}],
                    max_tokens=16,
                    temperature=0,
                )
            )
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")


async def test_a_client_that_leaves_mid_stream_ends_its_session(tiny_chat_llama: Path) -> None:
    with trio.fail_after(120):
        async with api_swarm(tiny_chat_llama, [(0, 6)]) as api:
            async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
                body = {
                    "model": MODEL,
                    "prompt": "leave",
                    "max_tokens": 400,
                    "stream": True,
                    "temperature": 0,
                }
                async with http.stream("POST", "/v1/completions", json=body) as reply:
                    async for line in reply.aiter_lines():
                        if line.startswith("data: "):
                            break  # the first event: generation is under way; hang up now
            # the server notices the hang-up and cancels the generation; the tracker is a dict, not an event
            while api.tracker.active:  # noqa: ASYNC110
                await trio.sleep(0.05)
            recent = api.state()["generation"]["recent"][0]
            after = await http_completion(api)
    assert recent["error"] == "cancelled" and 1 <= recent["new_tokens"] < 400
    assert after == 3  # and it keeps serving


async def http_completion(api: ApiServer) -> int:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        reply = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}
        )
    return int(reply.json()["usage"]["completion_tokens"])


async def test_requests_beyond_max_concurrent_wait_their_turn(tiny_chat_llama: Path) -> None:
    with trio.fail_after(120):
        async with api_swarm(tiny_chat_llama, [(0, 6)], max_concurrent=2) as api:
            counts: list[int] = []

            async def one() -> None:
                counts.append(await http_completion(api))

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(one)
            generation = api.state()["generation"]
    assert counts == [3] * 5 and generation["completed"] == 5
    assert generation["peak_active"] == 2
