"""The chat page at ``/chat`` driven in headless Chromium (Playwright, Debian's chromium) against real
swarms: SmolLM2 on 2 servers for the answers, the tiny model for the errors a user must act on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import trio

from swarm_node.node.apps.api import ApiConfig, open_api
from swarm_node.node.config import ClientConfig
from tests.browser import chromium_page
from tests.swarm_helpers import local_swarm

SMOLLM2 = "smollm2-135m"
QUESTION = "What is the capital of France?"
SCRIPT_QUESTION = (
    "Write the HTML tag that starts a JavaScript block."  # SmolLM2 answers with <script>
)
REPLIES = "article[data-author=assistant]"


def settings(page: Any, *, temperature: str, max_tokens: str) -> None:
    if not page.locator("#settings").evaluate("d => d.open"):
        page.click("#settings summary")
    page.fill("#temperature", temperature)
    page.fill("#top-p", "1")
    page.fill("#max-tokens", max_tokens)


def ask(page: Any, question: str) -> Any:
    """Type ``question``, press Enter; the reply's article once it stopped streaming."""
    n = page.locator(REPLIES).count()
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    return finished(page, n)


def finished(page: Any, n: int) -> Any:
    reply = page.locator(f"{REPLIES}:not([data-state=streaming])").nth(n)
    reply.wait_for()
    return reply


def reply_view(reply: Any) -> dict[str, Any]:
    return {
        "state": reply.get_attribute("data-state"),
        "text": reply.locator("[data-role=content]").text_content(),
        "html": reply.locator("[data-role=content]").inner_html(),
        "meta": reply.locator("[data-role=meta]").text_content(),
        "hops": [
            (hop.get_attribute("data-blocks"), hop.get_attribute("data-peer"))
            for hop in reply.locator(".hop").all()
        ],
        "notes": reply.locator("[data-role=notes]").text_content(),
    }


def fresh(page: Any, url: str) -> None:
    page.goto(url)
    page.locator("body[data-ready='1']").wait_for()


def browse_smollm2(url: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with chromium_page() as page:
        fresh(page, url + "/chat")
        seen["models"] = page.locator("#model option").all_text_contents()
        seen["picker_visible"] = page.locator("#model").is_visible()
        settings(page, temperature="0", max_tokens="16")
        seen["greedy"] = reply_view(ask(page, QUESTION))
        page.click("#regenerate")
        seen["regenerated"] = reply_view(finished(page, 0))
        seen["replies_after_regenerate"] = page.locator(REPLIES).count()

        fresh(page, url + "/chat")
        settings(page, temperature="0", max_tokens="16")
        seen["script"] = reply_view(ask(page, SCRIPT_QUESTION))
        seen["script_elements"] = page.evaluate("document.querySelectorAll('#log script').length")

        fresh(page, url + "/chat")
        settings(page, temperature="0", max_tokens="400")
        page.fill("#prompt", "Write a long story about a dragon who learns to fly.")
        page.press("#prompt", "Enter")
        page.wait_for_function(
            "() => (document.querySelector('article[data-author=assistant] [data-role=content]')"
            " || {}).textContent"
        )  # tokens are arriving
        page.click("#stop")
        seen["stopped"] = reply_view(finished(page, 0))
        seen["send_enabled"] = page.locator("#send").is_enabled()

        fresh(page, url + "/chat")
        page.select_option("#model", "tiny-chat")  # served by the API, but no server holds it
        seen["missing"] = reply_view(ask(page, "hello"))
    return seen


async def greedy_answer(url: str, question: str, max_tokens: int) -> str:
    body = {
        "model": SMOLLM2,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "top_p": 1,
    }
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        reply = await http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


@pytest.mark.slow  # SmolLM2 on 2 servers and a chromium process
async def test_chat_page_in_chromium(smollm2_path: Path, tiny_chat_llama: Path) -> None:
    models = (str(smollm2_path), str(tiny_chat_llama))
    with trio.fail_after(600):
        async with local_swarm(smollm2_path, [(0, 15), (15, 30)]) as (servers, client):
            async with open_api(client, ApiConfig(models=models, port=0)) as api:
                want = await greedy_answer(api.url, QUESTION, 16)
                want_script = await greedy_answer(api.url, SCRIPT_QUESTION, 16)
                seen = await trio.to_thread.run_sync(
                    browse_smollm2, api.url, abandon_on_cancel=True
                )
                while api.tracker.active:  # noqa: ASYNC110 (the tracker is a dict, not an event)
                    await trio.sleep(0.05)
                stopped = next(r for r in api.state()["generation"]["recent"] if r["error"])
    assert seen["models"] == [SMOLLM2, "tiny-chat"] and seen["picker_visible"]
    greedy = seen["greedy"]
    assert greedy["state"] == "done" and greedy["text"] == want and "Paris" in want
    chain = [("0:15", servers[0].peer_id), ("15:30", servers[1].peer_id)]
    assert greedy["hops"] == chain  # which blocks ran where
    assert re.search(r"first token \d+\.\d\d s\d+ tokens\d+\.\d tokens/s", greedy["meta"])
    assert seen["regenerated"]["text"] == want and seen["replies_after_regenerate"] == 1

    script = seen["script"]
    assert script["text"] == want_script and "<script>" in script["text"]
    assert "&lt;script&gt;" in script["html"] and seen["script_elements"] == 0  # text, not HTML

    halted = seen["stopped"]
    assert halted["state"] == "stopped" and halted["text"] and "stopped" in halted["meta"]
    assert seen["send_enabled"]
    assert stopped["error"] == "cancelled" and 1 <= stopped["new_tokens"] < 400  # the swarm stopped

    missing = seen["missing"]
    assert missing["state"] == "error" and missing["text"] == ""
    assert "no server" in missing["notes"] and "blocks 0-5" in missing["notes"]
    assert "start one for them (swarm-node serve)" in missing["notes"]


def browse_tiny(url: str, key: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with chromium_page() as page:
        fresh(page, url + "/chat")
        seen["notice"] = page.locator("#notice").text_content()
        seen["key_focused"] = page.evaluate("document.activeElement.id")
        seen["without_key"] = reply_view(ask(page, "hi"))
        page.fill("#api-key", key)
        page.locator("#api-key").dispatch_event("change")
        page.locator("body[data-models='1']").wait_for()  # the models load with the key
        seen["notice_after"] = page.locator("#notice").text_content()
        settings(page, temperature="0", max_tokens="8")
        page.click("#regenerate")  # retry the failed request, now with the key
        seen["recovered"] = reply_view(finished(page, 0))
        page.goto("about:blank")
        page.goto(f"{url}/chat#key={key}")  # the key in the address, as the map takes it
        page.locator("body[data-models='1']").wait_for()
        seen["map_link"] = page.locator("#map-link").get_attribute("href")
        page.set_viewport_size({"width": 390, "height": 800})  # a phone
        seen["phone_width"] = page.evaluate("document.documentElement.scrollWidth")
    return seen


FAST = ClientConfig(step_timeout=5.0, retry_delay=0.05, max_attempts=3)


@pytest.mark.slow  # a chromium process
async def test_chat_page_shows_a_missing_key_and_a_recovery(tiny_chat_llama: Path) -> None:
    # The server of blocks 3:6 in the API's chain starts answering NaN on its second step (its own
    # code changed, as in tests/test_api_security.py): the client replaces it mid-reply with the
    # other server of those blocks, and the page says so under an answer that stays exact.
    key = "chat-page-key"
    steps: list[int] = []
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(300):
        async with local_swarm(tiny_chat_llama, [(0, 3), (3, 6), (3, 6)], client=FAST) as (
            servers,
            client,
        ):
            config = ApiConfig(models=(str(tiny_chat_llama),), port=0, api_key=key)
            async with open_api(client, config) as api:
                async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
                    page = await http.get("/chat")  # the page itself needs no key: its script does
                assert page.status_code == 200 and "<title>swarm-node chat</title>" in page.text
                assert "script-src 'sha256-" in page.headers["content-security-policy"]
                headers = {"Authorization": f"Bearer {key}"}
                async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=60) as http:
                    reply = await http.post(
                        "/v1/chat/completions", json={**body, "max_tokens": 8, "temperature": 0}
                    )
                    assert reply.status_code == 200, reply.text
                    want = reply.json()["choices"][0]["message"]["content"]
                    hops = reply.json()["swarm"]["chain"]
                liar = next(s for s in servers if s.peer_id == hops[-1]["peer"])
                spare = next(s for s in servers[1:] if s is not liar)
                run_span = liar.server._run_span

                def lying(*args: Any, **kwargs: Any) -> torch.Tensor:
                    steps.append(1)
                    out = run_span(*args, **kwargs)
                    return out if len(steps) < 2 else out * float("nan")

                liar.server._run_span = lying
                seen = await trio.to_thread.run_sync(
                    browse_tiny, api.url, key, abandon_on_cancel=True
                )
    assert "needs its key" in seen["notice"] and seen["key_focused"] == "api-key"
    without = seen["without_key"]
    assert without["state"] == "error" and "needs its key" in without["notes"]
    assert seen["notice_after"] == "" and seen["map_link"] == f"./#key={key}"
    assert seen["phone_width"] <= 390  # nothing wider than a phone's screen
    recovered = seen["recovered"]
    assert recovered["state"] == "done" and recovered["text"] == want
    assert len(steps) >= 2
    assert recovered["hops"] == [
        ("0:3", hops[0]["peer"]),
        ("3:6", liar.peer_id),
        ("3:6", spare.peer_id),  # the replacement, after the server it replaced
    ]
    assert f"server …{liar.peer_id[-8:]} was lost mid-reply" in recovered["notes"]
    assert f"…{spare.peer_id[-8:]} took over" in recovered["notes"]


def test_chat_page_is_self_contained() -> None:
    from swarm_node.node.apps.api.chat_page import HEADERS, PAGE

    assert "http://" not in PAGE and "https://" not in PAGE  # nothing fetched from elsewhere
    assert "innerHTML" not in PAGE and "insertAdjacentHTML" not in PAGE and "eval(" not in PAGE
    assert PAGE.count("<script>") == 1  # the one script the policy's hash allows
    policy = HEADERS["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_the_swarm_field_names_recoveries_and_hedges() -> None:
    from swarm_node.node.apps.api.engine import swarm_report
    from swarm_node.node.client.generation import GenerationStats
    from swarm_node.node.client.recovery import HedgeEvent, RecoveryEvent

    stats = GenerationStats(new_tokens=3, total_time=1.2, time_to_first_token=0.2)
    stats.recoveries = [
        RecoveryEvent(
            start=3,
            end=6,
            failed="lost",
            replacements=("spare",),
            attempts=1,
            replayed_steps=2,
            seconds=0.51234,
            replay_seconds=0.1,
        )
    ]
    stats.hedges = [
        HedgeEvent(
            start=0, end=3, late=("slow",), replacements=("fast",), late_after=1, seconds=1.2
        )
    ]
    assert swarm_report(stats) == {
        "chain": [],
        "recoveries": [
            {"blocks": "3:6", "failed": "lost", "replacements": ["spare"], "seconds": 0.512}
        ],
        "hedges": [{"blocks": "0:3", "late": ["slow"], "replacements": ["fast"], "seconds": 1.2}],
        "time_to_first_token_s": 0.2,
        "tokens_per_s": 2.0,
    }
