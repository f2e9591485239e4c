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
    assert torch.equal(a, b) and a.shape == (1, 11)  # the same seed, the same tokens
    assert not torch.equal(a, greedy[:1, :11])  # and sampled, not greedy


BATCH = 64  # rows per generate call (a server's limit); every row samples on its own


def nucleus(probs: torch.Tensor, top_p: float) -> dict[int, float]:
    """Token -> probability after top-p: the most likely tokens whose mass before them is < top_p."""
    ordered, order = probs.sort(descending=True)
    kept = (ordered.cumsum(0) - ordered) < top_p
    mass = ordered[kept].sum()
    return {int(t): float(q / mass) for t, q in zip(order[kept], ordered[kept], strict=True)}


async def test_sampling_follows_temperature_and_top_p(tiny_llama: Path) -> None:
    # The next token of one prompt, drawn BATCH times per call with fixed seeds, against the
    # softmax of transformers' logits for that prompt: deterministic, and wrong if the swarm
    # ignored temperature or top_p.
    torch.manual_seed(5)
    prompt = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        logits = reference_model(tiny_llama)(prompt).logits[0, -1]  # (V,)
    greedy = int(logits.argmax())
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, _):

            def use_model() -> dict[str, torch.Tensor]:
                with DistributedModelForCausalLM.from_pretrained(
                    str(tiny_llama), initial_peers=servers[0].addrs[:1]
                ) as model:

                    def draw(calls: int, **settings: float) -> torch.Tensor:
                        return torch.cat(
                            [
                                model.generate(
                                    prompt.expand(BATCH, -1),
                                    max_new_tokens=1,
                                    do_sample=True,
                                    seed=seed,
                                    **settings,
                                )[:, -1]
                                for seed in range(calls)
                            ]
                        )  # (calls * BATCH,)

                    return {
                        "nucleus": draw(4, temperature=0.5, top_p=0.8),
                        "cold": draw(2, temperature=0.3),
                        "hot": draw(2, temperature=2.0),
                        "tiny_p": draw(1, temperature=1.0, top_p=1e-6),
                    }

            got = await trio.to_thread.run_sync(use_model)
    # temperature 0.5 makes the top token 0.71 likely and the next 0.10: top_p 0.8 keeps those two
    kept = nucleus(torch.softmax(logits / 0.5, -1), 0.8)
    assert len(kept) == 2 and set(got["nucleus"].tolist()) == set(kept)
    share = (got["nucleus"] == greedy).float().mean().item()
    assert abs(share - kept[greedy]) < 0.06, (share, kept)  # 0.874; 3 sd of 256 draws is 0.062
    cold = torch.softmax(logits / 0.3, -1)[greedy].item()  # 0.95
    assert abs((got["cold"] == greedy).float().mean().item() - cold) < 0.06
    assert len(set(got["hot"].tolist())) > 10 * len(set(got["cold"].tolist()))
    assert (got["hot"] == greedy).float().mean().item() < 0.1  # 0.04 at temperature 2
    assert got["tiny_p"].tolist() == [greedy] * BATCH  # top_p that small: only the top token


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="'initial_peers' must name at least one peer"):
        DistributedModelForCausalLM.from_pretrained("smollm2-135m", initial_peers=[])
    with pytest.raises(ConfigError, match="'dtype' must be one of"):
        DistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=["x"], dtype="int3"
        )
