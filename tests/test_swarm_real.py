"""The real bundled SmolLM2 through a 2-server loopback swarm equals transformers' generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm_node.model import Checkpoint, ClientHead, load_tokenizer
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm

pytestmark = pytest.mark.slow


async def test_smollm2_two_servers_exact(smollm2_path: Path) -> None:
    tokenizer = load_tokenizer(smollm2_path)
    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = reference_model(smollm2_path).generate(input_ids, max_new_tokens=16, do_sample=False)
    head = ClientHead.load(Checkpoint.open(smollm2_path))
    with trio.fail_after(240):
        async with local_swarm("smollm2-135m", [(0, 15), (15, 30)]) as (servers, client):
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model="smollm2-135m", num_blocks=30, dtype="float32"),
                SamplingConfig(max_new_tokens=16, eos_token_ids=(2,)),
            )
    assert ids.tolist() == expected[:, : ids.shape[1]].tolist()
    assert ids.shape[1] == expected.shape[1]
    assert " Paris" in tokenizer.decode(ids[0, input_ids.shape[1] :])
    assert [(h.start, h.end) for h in stats.chain] == [(0, 15), (15, 30)]
    assert torch.equal(ids[:, : input_ids.shape[1]], input_ids)
