"""A PEFT LoRA on the real bundled SmolLM2, held by two servers, equals PEFT's merged model."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from swarm_node.model import Checkpoint, ClientHead, load_tokenizer
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import HopTuning, SessionSettings
from tests.lora_fixtures import merged_reference, save_peft_adapter
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm

pytestmark = pytest.mark.slow


async def test_smollm2_with_a_server_held_adapter(smollm2_path: Path, tmp_path: Path) -> None:
    adapter = save_peft_adapter(
        smollm2_path,
        tmp_path / "smol-lora",
        seed=1,
        r=8,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "up_proj"],
    )
    tokenizer = load_tokenizer(smollm2_path)
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = merged_reference(smollm2_path, adapter).generate(
        input_ids, max_new_tokens=12, do_sample=False
    )
    base = reference_model(smollm2_path).generate(input_ids, max_new_tokens=12, do_sample=False)
    assert expected.tolist() != base.tolist()  # the adapter changes the greedy text
    head = ClientHead.load(Checkpoint.open(smollm2_path))
    with trio.fail_after(300):
        async with local_swarm(
            "smollm2-135m", [(0, 15), (15, 30)], adapters=(("smol", str(adapter)),)
        ) as (servers, client):
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model="smollm2-135m", num_blocks=30, dtype="float32"),
                SamplingConfig(max_new_tokens=12, eos_token_ids=(2,)),
                tuning=HopTuning(adapter="smol"),
            )
    assert ids.tolist() == expected.tolist()  # the same tokens, as many: none missing, none extra
    assert [(h.start, h.end) for h in stats.chain] == [(0, 15), (15, 30)]
