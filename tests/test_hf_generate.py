"""generate() is transformers' own over the swarm: every strategy against transformers on the same
weights (greedy, seeded sampling, beam search with the servers' caches reordered, a custom logits
processor, output_scores, stop strings, pipeline("text-generation") and a chat template), and what
is ours (sessions, client LoRA, deep prompts) kept under transformers' loop."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node import DistributedModelForCausalLM
from tests.model_fixtures import TINY_FAMILIES, make_tiny_model_dir, reference_model
from tests.swarm_helpers import local_swarm


def _with_model(path: Path, servers: Any, use: Any, **fields: Any) -> Any:
    with DistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=servers[0].addrs[:1], **fields
    ) as model:
        return use(model)


def _ban_even_tokens() -> Any:
    from transformers import LogitsProcessor, LogitsProcessorList

    class BanEven(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores[:, ::2] = -float("inf")
            return scores

    return LogitsProcessorList([BanEven()])


def _strategies(model: Any, ids: torch.Tensor, tokenizer: Any, stop: str) -> dict[str, Any]:
    """The same calls on our model and on transformers' (``model``: either)."""
    loop = {"decode_loop": "transformers"} if isinstance(model, DistributedModelForCausalLM) else {}
    common = {"max_new_tokens": 8, "pad_token_id": 0, **loop}
    out: dict[str, Any] = {"greedy": model.generate(ids, do_sample=False, **common)}
    torch.manual_seed(11)
    out["sampled"] = model.generate(ids, do_sample=True, top_k=20, temperature=0.9, **common)
    beams = model.generate(
        ids,
        num_beams=4,
        num_return_sequences=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        **common,
    )
    out["beams"], out["beam_scores"] = beams.sequences, beams.sequences_scores
    out["processed"] = model.generate(
        ids, do_sample=False, logits_processor=_ban_even_tokens(), **common
    )
    scored = model.generate(
        ids, do_sample=False, return_dict_in_generate=True, output_scores=True, **common
    )
    out["scores"] = torch.stack(scored.scores)  # (new, B, V)
    out["stopped"] = model.generate(
        ids[:1], do_sample=False, stop_strings=stop, tokenizer=tokenizer, **common
    )
    return out


async def test_strategies_equal_transformers(tiny_chat_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    reference = reference_model(tiny_chat_llama)
    ids = tokenizer(["Once upon a", "The end is."], return_tensors="pt").input_ids  # (2, 11)
    # transformers' stop strings cannot read this byte-level vocabulary (they never stop here):
    # the test on SmolLM2 below shows them stopping; this one that both sides agree
    stop = "ab"
    want = _strategies(reference, ids, tokenizer, stop)
    with trio.fail_after(180):
        async with local_swarm(tiny_chat_llama, [(0, 3), (3, 6)]) as (servers, _):

            def use(model: DistributedModelForCausalLM) -> dict[str, Any]:
                return _strategies(model, ids, tokenizer, stop)

            got = await trio.to_thread.run_sync(_with_model, tiny_chat_llama, servers, use)
    for name in ("greedy", "sampled", "beams", "processed", "stopped"):
        assert got[name].tolist() == want[name].tolist(), name
    assert got["beams"].shape == (4, 19) and not torch.equal(got["beams"][0], got["beams"][1])
    assert (got["processed"][:, 11:] % 2 == 1).all()
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["beam_scores"], want["beam_scores"], rtol=1e-4, atol=1e-4)


async def test_pipeline_and_chat_template(tiny_chat_llama: Path) -> None:
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    chat = [{"role": "user", "content": "hi there"}]
    settings = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}

    def texts(model: Any) -> list[Any]:
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        return [generator("Once upon a", **settings), generator(chat, **settings)]

    want = texts(reference_model(tiny_chat_llama))
    with trio.fail_after(120):
        async with local_swarm(tiny_chat_llama, [(0, 2), (2, 6)]) as (servers, _):
            got = await trio.to_thread.run_sync(_with_model, tiny_chat_llama, servers, texts)
    assert got == want
    assert got[1][0]["generated_text"][-1]["role"] == "assistant"  # the template's answer turn


@pytest.mark.parametrize("family", TINY_FAMILIES)
async def test_each_family_greedy_and_beams(tmp_path: Path, family: str) -> None:
    path = make_tiny_model_dir(tmp_path / family, family, num_layers=4, seed=3)
    ids = torch.randint(0, 256, (1, 7))
    settings = {"max_new_tokens": 6, "pad_token_id": 0, "do_sample": False}
    reference = reference_model(path)
    want = [
        reference.generate(ids, **settings),
        reference.generate(ids, num_beams=4, num_return_sequences=2, **settings),
    ]
    with trio.fail_after(120):
        async with local_swarm(path, [(0, 2), (2, 4)]) as (servers, _):

            def use(model: DistributedModelForCausalLM) -> list[torch.Tensor]:
                return [
                    model.generate(ids, decode_loop="transformers", **settings),
                    model.generate(ids, num_beams=4, num_return_sequences=2, **settings),
                ]

            got = await trio.to_thread.run_sync(_with_model, path, servers, use)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


async def test_sessions_continue_across_both_loops(tiny_chat_llama: Path) -> None:
    """Inside one session a call through transformers' loop (a logits processor) and one through
    ours continue the same servers' caches; a beam search needs a call of its own."""
    from swarm_node.errors import ConfigError

    torch.manual_seed(3)
    turn1, turn2 = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 4))
    reference = reference_model(tiny_chat_llama)
    settings = {"do_sample": False, "pad_token_id": 0}
    want1 = reference.generate(
        turn1, max_new_tokens=4, logits_processor=_ban_even_tokens(), **settings
    )
    history = torch.cat([want1, turn2], dim=1)  # token 0 is a real token here, not padding
    want2 = reference.generate(
        history, attention_mask=torch.ones_like(history), max_new_tokens=3, **settings
    )
    with trio.fail_after(120):
        async with local_swarm(tiny_chat_llama, [(0, 2), (2, 6)]) as (servers, _):

            def use(model: DistributedModelForCausalLM) -> dict[str, Any]:
                out: dict[str, Any] = {}
                with model.inference_session(max_length=32) as session:
                    out["one"] = model.generate(
                        turn1, max_new_tokens=4, logits_processor=_ban_even_tokens()
                    )
                    out["two"] = model.generate(turn2, max_new_tokens=3)  # our loop
                    out["sent"] = model.last_stats.prompt_tokens
                    out["held"] = session.token_session.session.position
                    try:
                        model.generate(turn2, max_new_tokens=2, num_beams=2)
                    except ConfigError as exc:
                        out["beams"] = str(exc)
                return out

            got = await trio.to_thread.run_sync(_with_model, tiny_chat_llama, servers, use)
    assert got["one"].tolist() == want1.tolist()
    assert got["two"].tolist() == torch.cat([turn2, want2[:, -3:]], dim=1).tolist()
    assert got["sent"] == 4 and got["held"] == want2.shape[1] - 1
    assert "need a generate() call of their own" in got["beams"]


@pytest.mark.parametrize("tuning_mode", ["lora", "deep_ptune"])
async def test_tuning_takes_part_in_transformers_loop(tiny_llama: Path, tuning_mode: str) -> None:
    """A client LoRA (made non-zero) or deep prompts change the text, the same way in both loops."""
    ids = torch.randint(0, 256, (2, 5))
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, _):

            def use(model: DistributedModelForCausalLM) -> list[torch.Tensor]:
                plain = model.generate(ids, decode_loop="transformers", **settings)
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.normal_(0, 0.5)
                return [
                    plain,
                    model.generate(ids, decode_loop="transformers", **settings),
                    model.generate(ids, decode_loop="swarm", **settings),
                ]

            run = functools.partial(_with_model, tuning_mode=tuning_mode, pre_seq_len=3)
            plain, hf, ours = await trio.to_thread.run_sync(run, tiny_llama, servers, use)
    assert hf.tolist() == ours.tolist() and not torch.equal(hf, plain)


@pytest.mark.slow
async def test_smollm2_stop_strings_and_chat_pipeline(smollm2_path: Path) -> None:
    from transformers import pipeline

    from swarm_node.model import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    reference = reference_model(smollm2_path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    settings = {"max_new_tokens": 16, "do_sample": False}

    def run(model: Any) -> list[Any]:
        loop = {"decode_loop": "transformers"} if model is not reference else {}
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        return [
            model.generate(ids, stop_strings=".", tokenizer=tokenizer, **settings, **loop),
            model.generate(ids, num_beams=4, num_return_sequences=2, **settings),
            generator(chat, **settings)[0]["generated_text"][-1]["content"],
        ]

    want = run(reference)
    with trio.fail_after(300):
        async with local_swarm(smollm2_path, [(0, 15), (15, 30)]) as (servers, _):
            got = await trio.to_thread.run_sync(_with_model, smollm2_path, servers, run)
    assert tokenizer.decode(got[0][0, ids.shape[1] :]) == " Paris."  # stopped at the period
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
    assert got[2] == want[2] and "Paris" in got[2]


async def test_assisted_generation_needs_server_side_rollback(tiny_chat_llama: Path) -> None:
    """prompt_lookup_num_tokens= and assistant_model= crop the cache after a rejected draft: with
    the servers' truncate (the speculative-decoding work) they give transformers' tokens; without
    it the call says what is missing."""
    from swarm_node.node.client.remote_cache import can_crop

    ids = torch.randint(0, 256, (1, 6)).repeat(1, 3)  # repeats: prompt lookup finds drafts
    reference = reference_model(tiny_chat_llama)
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    want = reference.generate(ids, **settings)
    with trio.fail_after(120):
        async with local_swarm(tiny_chat_llama, [(0, 3), (3, 6)]) as (servers, _):

            def use(model: DistributedModelForCausalLM) -> list[Any]:
                got: list[Any] = []
                for assisted in ({"prompt_lookup_num_tokens": 3}, {"assistant_model": reference}):
                    try:
                        got.append(model.generate(ids, **assisted, **settings))
                    except NotImplementedError as exc:
                        got.append(str(exc))
                return got

            got = await trio.to_thread.run_sync(_with_model, tiny_chat_llama, servers, use)
    for out in got:
        if can_crop():
            assert out.tolist() == want.tolist()
        else:
            assert "needs server-side rollback" in out and "speculative-decoding" in out
