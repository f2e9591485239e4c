"""Sessions opened while the client's side of the model loads (node/client/early_spans.py).

A cold `generate` counts its prompt's tokens (no torch needed) and chooses its chain while torch
loads, and opens the chain's sessions then; the session takes each only where it would have sent
the very same request, so its outputs are those of sessions opened after the load, to the bit.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node.model import load_tokenizer
from swarm_node.node.apps import commands
from swarm_node.node.apps.cli import build_parser
from swarm_node.node.client.early_spans import EarlySpans, early_spans, open_plain_sessions
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from swarm_node.node.peer import ChainWants
from tests.swarm_helpers import local_swarm
from tests.test_api import reference_text

H = 64
# no spot checks: a checker's session would be one more session on the servers counted here
UNCHECKED = ClientConfig(step_timeout=5.0, retry_delay=0.05, max_attempts=3, verify_rate=0.0)


def active(servers: list[Any]) -> list[int]:
    return [peer.server.active_sessions for peer in servers]


async def test_generate_opens_its_sessions_while_its_side_of_the_model_loads(
    tiny_chat_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = "Speculate"  # decodes whole (a random model may end on half a character)
    ids = load_tokenizer(tiny_chat_llama)(prompt).input_ids
    want = reference_text(tiny_chat_llama, ids, 10)
    # the client's side of the model waits in its worker thread until released: what `generate`
    # does meanwhile is what it does while torch loads
    release = threading.Event()
    load = commands._client_side

    def held_load(*args: Any) -> Any:
        release.wait(60)
        return load(*args)

    monkeypatch.setattr(commands, "_client_side", held_load)
    started = trio.Event()
    made: list[EarlySpans] = []

    def starting(early: EarlySpans, *args: Any, **kwargs: Any) -> bool:
        made.append(early)
        began = open_plain_sessions(early, *args, **kwargs)
        started.set()
        return began

    monkeypatch.setattr(commands, "open_plain_sessions", starting)
    argv = ["generate", prompt, "--model", str(tiny_chat_llama), "--max-new-tokens", "10"]
    args = build_parser().parse_args(argv)
    out = io.StringIO()
    got: dict[str, Any] = {}
    with trio.fail_after(120):
        async with local_swarm(tiny_chat_llama, [(0, 3), (3, 6)], client=UNCHECKED) as (
            servers,
            client,
        ):

            async def generate() -> None:
                got["stats"] = await commands._generate_with(client, args, out)

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(generate)
                    await started.wait()
                    (early,) = made
                    await early.settled()
                    # both sessions are open, and the model's side has not finished loading
                    assert active(servers) == [1, 1] and not release.is_set()
                    release.set()
            finally:
                release.set()  # a failure above must not leave the worker thread waiting
            assert active(servers) == [0, 0]
    assert out.getvalue() == prompt + want + "\n"
    assert early.started == early.taken == 2  # the session took both: none was opened twice
    assert [(h.start, h.end) for h in got["stats"].chain] == [(0, 3), (3, 6)]


@pytest.mark.parametrize("same", [True, False], ids=["same-request", "other-max-length"])
async def test_a_session_takes_only_a_span_opened_with_its_own_request(
    tiny_llama: Path, same: bool
) -> None:
    model = tiny_llama.name
    torch.manual_seed(3)
    steps = [torch.randn(1, 5, H), torch.randn(1, 1, H), torch.randn(1, 1, H)]
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)], client=UNCHECKED) as (
            servers,
            client,
        ):
            chain = await client.route(ChainWants(model=model, max_length=8), 0, 6)
            async with client.inference_session(
                chain, SessionSettings(model=model, max_length=8)
            ) as plain:
                want = [await plain.step(x) for x in steps]
            async with early_spans() as early:
                assert open_plain_sessions(
                    early, client, chain, model=model, max_length=8, dtype="float32"
                )
                await early.settled()
                assert active(servers) == [1, 1]
                settings = SessionSettings(model=model, max_length=8 if same else 9)
                async with client.inference_session(chain, settings, early=early) as session:
                    if same:  # its own sessions are those opened early: no others
                        assert active(servers) == [1, 1]
                    outputs = [await session.step(x) for x in steps]
                assert early.taken == (2 if same else 0)
            assert active(servers) == [0, 0]  # what the session did not take was closed too
    for out, ref in zip(outputs, want, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


async def test_a_span_refused_when_opened_early_is_moved_like_a_refusal_at_open(
    tiny_llama: Path,
) -> None:
    model = tiny_llama.name
    x = torch.randn(1, 3, H)
    with trio.fail_after(60):
        async with local_swarm(
            tiny_llama, [(0, 6), (0, 6)], client=UNCHECKED, cache_budget_tokens=19
        ) as (servers, client):  # room for one 16-token session: 16 cache + 3 for its kept answer
            chain = await client.route(ChainWants(model=model, max_length=16), 0, 6)
            busy = servers.index(next(s for s in servers if s.peer_id == chain[0].server.peer_id))
            settings = SessionSettings(model=model, max_length=16)
            async with client.inference_session(chain, settings) as holder:
                want = await holder.step(x)
                # the chain's server is full now: the session opened early there is refused
                async with early_spans() as early:
                    open_plain_sessions(
                        early, client, chain, model=model, max_length=16, dtype="float32"
                    )
                    await early.settled()
                    async with client.inference_session(chain, settings, early=early) as s:
                        assert [span.hop.server.peer_id for span in s._spans] == [
                            servers[1 - busy].peer_id
                        ]
                        torch.testing.assert_close(await s.step(x), want, rtol=0, atol=0)
                    assert early.taken == 0


async def test_a_client_with_push_or_a_named_adapter_opens_nothing_early(tiny_llama: Path) -> None:
    model = tiny_llama.name
    for client_config in (ClientConfig(push=True), ClientConfig(adapter="chat")):
        with trio.fail_after(60):
            async with local_swarm(tiny_llama, [(0, 6)], client=client_config) as (servers, client):
                chain = await client.route(ChainWants(model=model, max_length=8), 0, 6)
                async with early_spans() as early:
                    assert not open_plain_sessions(
                        early, client, chain, model=model, max_length=8, dtype="float32"
                    )
                    assert early.started == 0 and active(servers) == [0]


def test_the_dtype_opened_early_is_the_one_the_session_asks_for() -> None:
    def early(device: str, dtype: str) -> str | None:
        return commands._early_dtype(argparse.Namespace(device=device, dtype=dtype))

    assert early("auto", "bfloat16") == "bfloat16"  # named: itself
    assert early("cpu", "auto") == "float32"  # resolve_dtype("auto", cpu)
    assert early("cuda:0", "auto") is None  # bfloat16 or float16: torch says which
    if not list(Path("/dev").glob("nvidia[0-9]*")):  # this machine: "auto" is the CPU
        assert early("auto", "auto") == "float32"


COUNT_PROBE = """
import json, sys
from swarm_node.model import load_tokenizer
tokenizer = load_tokenizer(sys.argv[1], plain=True)
print(json.dumps([len(tokenizer("The capital of France is").input_ids), "torch" in sys.modules]))
"""


@pytest.mark.slow
def test_a_plain_prompt_is_counted_without_torch(tiny_chat_llama: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", COUNT_PROBE, str(tiny_chat_llama)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    tokens, torch_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert tokens == len(load_tokenizer(tiny_chat_llama)("The capital of France is").input_ids)
    assert torch_loaded is False
