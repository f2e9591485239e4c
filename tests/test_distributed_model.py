"""The transformers-style sync client, used from plain Python while a swarm runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm_node import DistributedModelForCausalLM
from swarm_node.errors import ConfigError
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm


async def test_generate_like_transformers(tiny_llama: Path) -> None:
    torch.manual_seed(5)
    input_ids = torch.randint(0, 256, (2, 6))
    expected = reference_model(tiny_llama).generate(
        input_ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, _):

            def use_model() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                with DistributedModelForCausalLM.from_pretrained(
                    str(tiny_llama), initial_peers=servers[0].addrs[:1]
                ) as model:
                    greedy = model.generate(input_ids, max_new_tokens=8)
                    a = model.generate(
                        input_ids[:1], max_new_tokens=5, do_sample=True, temperature=0.8, seed=3
                    )
                    b = model.generate(
                        input_ids[:1], max_new_tokens=5, do_sample=True, temperature=0.8, seed=3
                    )
                    return greedy, a, b

            greedy, a, b = await trio.to_thread.run_sync(use_model)
    assert greedy.tolist() == expected.tolist()
    assert torch.equal(a, b) and a.shape == (1, 11)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="'initial_peers' must name at least one peer"):
        DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=[])
    with pytest.raises(ConfigError, match="'dtype' must be one of"):
        DistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=["x"], dtype="int3"
        )
