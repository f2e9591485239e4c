"""Client-owned LoRA trained through a 2-server swarm vs the same LoRA trained on the local model."""

from __future__ import annotations

from pathlib import Path

import torch

from swarm_node.model.client_lora import ClientLora
from swarm_node.model.lora import config_linear_shapes
from tests.model_fixtures import reference_model, tiny_config
from tests.test_prompt_tuning import _train as train
from tests.test_prompt_tuning import _with_swarm
from tests.training_reference import causal_lm_loss, greedy_tokens, lora_hooks

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")


def _train(model, loss_of, steps: int) -> list[float]:
    return train(model, loss_of, steps, lr=1e-2, seed=200, cycle=3, batch=3, tokens=9)


async def test_lora_training_and_generation_match_local(tiny_llama: Path) -> None:
    ref = reference_model(tiny_llama)
    ref.requires_grad_(False)
    prompt_ids = torch.randint(0, 256, (2, 4))

    def run(model):
        assert [n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad] == [
            "lora"
        ] * 36
        init = {k: v.clone() for k, v in model.lora.state_dict().items()}
        losses = _train(
            model, lambda m, ids, mask, labels: m(ids, attention_mask=mask, labels=labels).loss, 8
        )
        trained = {k: v.clone() for k, v in model.lora.state_dict().items()}
        return init, losses, trained, model.generate(prompt_ids, max_new_tokens=5)

    init, losses, trained, generated = await _with_swarm(
        tiny_llama, run, tuning_mode="lora", lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS
    )
    local = ClientLora(
        shapes=config_linear_shapes(tiny_config()),
        blocks=range(6),
        targets=TARGETS,
        rank=4,
        alpha=8.0,
    )
    local.load_state_dict(init)

    def local_loss(m, ids, mask, labels):
        with lora_hooks(ref, m.weights()):
            return causal_lm_loss(ref, ids, labels, None, None)

    expected = _train(local, local_loss, 8)
    assert losses[-1] < losses[0]
    assert max(abs(a - b) for a, b in zip(losses, expected, strict=True)) < 1e-4, (losses, expected)
    for key, value in local.state_dict().items():
        torch.testing.assert_close(trained[key], value, atol=1e-5, rtol=1e-5, msg=key)
    with lora_hooks(ref, local.weights()):
        assert generated.tolist() == greedy_tokens(ref, prompt_ids, None, None, 5).tolist()
