"""Speculative decoding where a user generates: the Python generate() (transformers' spelling), the
`generate --speculative --draft` command and the OpenAI-compatible API; the same text as without."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node import DistributedModelForCausalLM
from swarm_node.errors import ConfigError
from swarm_node.node.apps import commands
from swarm_node.node.apps.cli import build_parser
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm
from tests.test_api import MODEL, api_swarm, client_of, reference_text


async def test_python_generate_takes_assistant_model_and_prompt_lookup(
    tiny_chat_llama: Path,
) -> None:
    """Both of transformers' spellings, across a session's turns, and cut by a stop string: the
    tokens of plain greedy decoding."""
    from transformers import AutoTokenizer

    reference = reference_model(tiny_chat_llama)
    torch.manual_seed(21)
    prompt = torch.randint(0, 256, (1, 6))
    turn2 = torch.randint(0, 256, (1, 3))

    def greedy(ids: torch.Tensor, new: int) -> torch.Tensor:
        return reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False
        )

    want = greedy(prompt, 12)
    want2 = greedy(torch.cat([want, turn2], dim=1), 6)
    with trio.fail_after(120):
        async with local_swarm(tiny_chat_llama, [(0, 3), (3, 6)]) as (servers, _):

            def use() -> dict[str, Any]:
                out: dict[str, Any] = {}
                with DistributedModelForCausalLM.from_pretrained(
                    str(tiny_chat_llama), initial_peers=servers[0].addrs[:1]
                ) as model:
                    out["assisted"] = model.generate(
                        prompt, max_new_tokens=12, assistant_model=reference
                    )
                    out["stats"] = model.last_stats
                    out["lookup"] = model.generate(
                        prompt, max_new_tokens=12, prompt_lookup_num_tokens=3
                    )
                    with model.inference_session(max_length=40):
                        model.generate(prompt, max_new_tokens=12, assistant_model=reference)
                        out["turn2"] = model.generate(
                            turn2, max_new_tokens=6, assistant_model=reference
                        )
                    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
                    stop = tokenizer.decode(want[0, 9:11])  # inside the first run of drafts
                    for name, extra in (("plain", {}), ("spec", {"assistant_model": reference})):
                        out[f"stop_{name}"] = model.generate(
                            prompt,
                            max_new_tokens=12,
                            stop_strings=stop,
                            tokenizer=tokenizer,
                            **extra,
                        )
                        out[f"stop_{name}_stats"] = model.last_stats
                    with pytest.raises(ConfigError, match="not both"):
                        model.generate(
                            prompt, assistant_model=reference, prompt_lookup_num_tokens=3
                        )
                    with pytest.raises(ConfigError, match="'prompt_lookup_num_tokens' must be"):
                        model.generate(prompt, prompt_lookup_num_tokens=0)
                return out

            got = await trio.to_thread.run_sync(use)
    assert got["assisted"].tolist() == got["lookup"].tolist() == want.tolist()
    assert got["stats"].accepted_tokens > 0 and got["stats"].steps < 12
    assert got["turn2"].tolist() == torch.cat([turn2, want2[:, -6:]], dim=1).tolist()
    stopped = got["stop_plain"]  # the stop string cut a run of accepted drafts: the same tokens
    assert got["stop_spec"].tolist() == stopped.tolist() == want[:, : stopped.shape[1]].tolist()
    assert stopped.shape[1] < want.shape[1] and got["stop_spec_stats"].finish_reason == "stop"
    assert got["stop_spec_stats"].steps < got["stop_plain_stats"].steps


async def test_generate_command_with_speculative_and_draft(tiny_chat_llama: Path) -> None:
    from transformers import AutoTokenizer

    prompt = "Speculate"
    ids = AutoTokenizer.from_pretrained(tiny_chat_llama)(prompt).input_ids
    want = reference_text(tiny_chat_llama, ids, 10)
    with trio.fail_after(120):
        async with local_swarm(tiny_chat_llama, [(0, 3), (3, 6)]) as (servers, client):
            argv = ["generate", prompt, "--model", str(tiny_chat_llama), "--max-new-tokens", "10"]
            argv += ["--speculative", "--draft", str(tiny_chat_llama), "--draft-tokens", "3"]
            args = build_parser().parse_args(argv)
            commands.resolve_client_device(args)  # as `generate` does first ("auto" -> concrete)
            out = io.StringIO()
            stats = await commands._generate_with(client, args, out)
    assert out.getvalue() == prompt + want + "\n"
    assert stats.accepted_tokens > 0 and stats.steps < 10
    assert "draft tokens accepted" in commands._describe(stats)


async def test_api_with_speculative_answers_the_same_text(tiny_chat_llama: Path) -> None:
    from transformers import AutoTokenizer

    prompt = "The swarm says"
    want = reference_text(
        tiny_chat_llama, AutoTokenizer.from_pretrained(tiny_chat_llama)(prompt).input_ids, 12
    )
    with trio.fail_after(120):
        async with api_swarm(tiny_chat_llama, [(0, 3), (3, 6)], speculative=True) as api:

            def use() -> tuple[Any, Any]:
                client = client_of(api)
                whole = client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=12, temperature=0
                )
                sampled = client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, seed=3
                )
                return whole, sampled

            whole, sampled = await trio.to_thread.run_sync(use)
    assert whole.choices[0].text == want
    assert sampled.usage.completion_tokens == 12


def test_generate_speculates_unless_told_not_to() -> None:
    # on by default since the quiet run of 2026-12-06 (docs/speculative.md): 2.02x on repeating text,
    # 0.98x on open chat; the Python generate() keeps transformers' spelling (off unless asked)
    base = ["generate", "Hi", "--model", "tiny"]
    assert build_parser().parse_args(base).speculative is True
    assert build_parser().parse_args([*base, "--no-speculative"]).speculative is False
