"""The transformers-style client: GenerationConfig, TextStreamer, repetition penalty, stop strings,
and several generate() calls continuing one inference session (a chat), against transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node import DistributedModelForCausalLM
from swarm_node.errors import ConfigError
from swarm_node.model import apply_repetition_penalty, sample_next_token
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm


def _with_model(tiny: Path, servers: Any, use: Any) -> Any:
    with DistributedModelForCausalLM.from_pretrained(
        str(tiny), initial_peers=servers[0].addrs[:1]
    ) as model:
        return use(model)


async def test_generation_config_streamer_and_stop_strings(tiny_chat_llama: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig, TextStreamer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    reference = reference_model(tiny_chat_llama)
    input_ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    # < 1 favours tokens already seen: this random model never repeats by itself
    config = GenerationConfig(
        max_new_tokens=12, do_sample=False, repetition_penalty=0.3, pad_token_id=0
    )
    want_penalized = reference.generate(input_ids, generation_config=config)
    want_plain = reference.generate(input_ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    text = tokenizer.decode(want_plain[0, input_ids.shape[1] :])
    stop = max(text.split("\ufffd"), key=len)[
        -2:
    ]  # two whole characters near the middle of the text
    new = want_plain[0, input_ids.shape[1] :].tolist()
    # transformers' own stop strings cannot read this byte-level vocabulary; its rule: stop after the
    # token that completes the first occurrence
    first = next(n for n in range(1, len(new) + 1) if stop in tokenizer.decode(new[:n]))
    want_stopped = want_plain[:, : input_ids.shape[1] + first]

    class Captured(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True)
            self.pieces: list[str] = []
            self.ended = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.pieces.append(text)
            self.ended = self.ended or stream_end

    streamer = Captured()
    with trio.fail_after(120):
        async with local_swarm(tiny_chat_llama, [(0, 3), (3, 6)]) as (servers, _):

            def use(model: DistributedModelForCausalLM) -> dict[str, Any]:
                return {
                    "penalized": model.generate(input_ids, config),
                    "plain": model.generate(input_ids, max_new_tokens=12, streamer=streamer),
                    "stopped": model.generate(
                        input_ids, max_new_tokens=12, stop_strings=stop, tokenizer=tokenizer
                    ),
                    "stats": model.last_stats,
                }

            got = await trio.to_thread.run_sync(_with_model, tiny_chat_llama, servers, use)
    assert not torch.equal(want_penalized, want_plain)  # the penalty changes this text
    assert got["penalized"].tolist() == want_penalized.tolist()
    assert got["plain"].tolist() == want_plain.tolist()
    assert (
        "".join(streamer.pieces) == tokenizer.decode(want_plain[0, input_ids.shape[1] :])
        and streamer.ended
    )
    assert (
        got["stopped"].tolist() == want_stopped.tolist()
        and got["stopped"].shape[1] < want_plain.shape[1]
    )
    assert got["stats"].finish_reason == "stop"


async def test_generate_calls_continue_one_session(tiny_chat_llama: Path) -> None:
    torch.manual_seed(3)
    turn1 = torch.randint(0, 256, (1, 5))
    turn2 = torch.randint(0, 256, (1, 4))
    reference = reference_model(tiny_chat_llama)

    def greedy(
        ids: torch.Tensor, new: int
    ) -> torch.Tensor:  # token 0 is a real token here, not padding
        return reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )

    want1 = greedy(turn1, 4)
    history = torch.cat(
        [want1, turn2], dim=1
    )  # what the second turn sees: all of the first, then its own
    want2 = greedy(history, 3)
    want3 = greedy(want2, 2)
    with trio.fail_after(120):
        async with local_swarm(tiny_chat_llama, [(0, 2), (2, 6)]) as (servers, _):

            def use(model: DistributedModelForCausalLM) -> dict[str, Any]:
                out: dict[str, Any] = {}
                with model.inference_session(max_length=32) as session:
                    out["one"] = model.generate(turn1, max_new_tokens=4)
                    out["two"] = model.generate(turn2, max_new_tokens=3)
                    out["sent_two"] = model.last_stats.prompt_tokens
                    out["three"] = model.generate(None, max_new_tokens=2)  # just go on
                    out["position"] = session.position
                    out["fed"] = session.token_session.fed
                    out["remote_position"] = session.token_session.session.position
                    try:
                        model.generate(turn2, max_new_tokens=30)
                    except ConfigError as exc:
                        out["full"] = str(exc)
                out["after"] = model.generate(turn1, max_new_tokens=4)  # a fresh session again
                return out

            got = await trio.to_thread.run_sync(_with_model, tiny_chat_llama, servers, use)
    assert got["one"].tolist() == want1.tolist()
    assert got["two"].tolist() == torch.cat([turn2, want2[:, history.shape[1] :]], dim=1).tolist()
    assert got["three"].tolist() == want3[:, want2.shape[1] :].tolist()
    assert got["sent_two"] == 4
    assert got["position"] == want3.shape[1] == 5 + 4 + 4 + 3 + 2
    assert (
        got["fed"] == got["remote_position"] == got["position"] - 1
    )  # the servers hold all but the last
    assert "do not fit" in got["full"]
    assert got["after"].tolist() == want1.tolist()


async def test_unsupported_settings_are_refused(tiny_chat_llama: Path) -> None:
    # beam search and min_length were refused before generate() became transformers' own; what a
    # swarm cannot do is still refused, each with its reason
    left_padded = torch.tensor([[0, 1, 1]])
    with trio.fail_after(120):
        async with local_swarm(tiny_chat_llama, [(0, 6)]) as (servers, _):

            def use(model: DistributedModelForCausalLM) -> list[str]:
                errors = []
                for kwargs in (
                    {"stop_strings": "x"},
                    {"attention_mask": left_padded, "max_new_tokens": 2},
                    {"output_hidden_states": True, "return_dict_in_generate": True},
                    {"decode_loop": "beams"},
                ):
                    try:
                        model.generate(torch.tensor([[1, 2, 3]]), **kwargs)
                    except ConfigError as exc:
                        errors.append(str(exc))
                return errors

            errors = await trio.to_thread.run_sync(_with_model, tiny_chat_llama, servers, use)
    assert "need the 'tokenizer'" in errors[0]
    assert "'attention_mask' must be all ones in generation" in errors[1]
    assert "cannot be returned: the blocks run on the swarm" in errors[2]
    assert "'decode_loop' must be one of" in errors[3]


def test_repetition_penalty_and_top_k_are_transformers_rules() -> None:
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
    )

    logits = torch.randn(2, 50)
    seen = torch.tensor([[1, 4, 4, 9], [0, 2, 3, 49]])
    want = RepetitionPenaltyLogitsProcessor(1.7)(seen, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.7), want)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    kept = TopKLogitsWarper(3)(seen, logits.clone()).isfinite()
    for _ in range(20):
        token = sample_next_token(logits, temperature=1.0, top_p=1.0, top_k=3)
        assert kept[torch.arange(2), token].all()
    with pytest.raises(ConfigError, match="'repetition_penalty' must be a finite number > 0"):
        apply_repetition_penalty(logits, seen, 0.0)
    with pytest.raises(ConfigError, match="'top_k' must be an int >= 0"):
        sample_next_token(logits, temperature=1.0, top_p=1.0, top_k=-1)


@pytest.mark.slow
async def test_a_real_chat_in_one_session(smollm2_path: Path) -> None:
    """SmolLM2's chat template over two turns in one session: the second answer is what the whole
    conversation sent at once gives, and names Rome."""
    from swarm_node.model import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    with trio.fail_after(300):
        async with local_swarm(smollm2_path, [(0, 15), (15, 30)]) as (servers, _):

            def use(model: DistributedModelForCausalLM) -> tuple[str, bool]:
                with model.inference_session(max_length=256) as session:
                    ids = tokenizer.apply_chat_template(
                        [{"role": "user", "content": "What is the capital of France?"}],
                        add_generation_prompt=True,
                        return_tensors="pt",
                        return_dict=True,
                    )["input_ids"]
                    model.generate(ids, max_new_tokens=24)
                    more = tokenizer(
                        "\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n",
                        return_tensors="pt",
                    ).input_ids
                    out = model.generate(more, max_new_tokens=24)
                    history = session.token_session.ids[:, : -(out.shape[1] - more.shape[1])]
                new = out.shape[1] - more.shape[1]
                whole = model.generate(
                    history, max_new_tokens=new
                )  # no session: everything sent at once
                return tokenizer.decode(
                    out[0, more.shape[1] :], skip_special_tokens=True
                ), torch.equal(whole[:, -new:], out[:, -new:])

            answer, same = await trio.to_thread.run_sync(_with_model, smollm2_path, servers, use)
    assert "Rome" in answer and same
