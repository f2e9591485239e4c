"""Prompt tuning and a classification head through a 2-server swarm vs the model run locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm_node import DistributedModelForCausalLM, DistributedModelForSequenceClassification
from swarm_node.errors import ConfigError
from swarm_node.model.prompts import PromptTuning
from swarm_node.node.client.settings import HopTuning, SessionSettings
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm
from tests.training_reference import causal_lm_loss, classifier_logits, cross_entropy, greedy_tokens

TOL = dict(atol=1e-5, rtol=1e-6)  # see test_remote_training.py
SPANS = [(0, 3), (3, 6)]


def _batch(
    seed: int, batch: int = 3, tokens: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[0, tokens - 3 :] = 0  # one right-padded sequence
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _with_swarm(tiny_llama: Path, fn, **model_fields):
    """Run ``fn(model)`` in a worker thread with a model joined to a fresh 2-server swarm."""

    async def main():
        with trio.fail_after(150):
            async with local_swarm(tiny_llama, SPANS) as (servers, _):

                def use():
                    cls = model_fields.pop("cls", DistributedModelForCausalLM)
                    with cls.from_pretrained(
                        str(tiny_llama), initial_peers=servers[0].addrs[:1], **model_fields
                    ) as model:
                        return fn(model)

                return await trio.to_thread.run_sync(use)

    return main()


async def test_soft_and_deep_prompt_gradients_match_local(tiny_llama: Path) -> None:
    ref = reference_model(tiny_llama)
    ids, mask, labels = _batch(0)

    def run(model):
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [
            "ptune.prompts",
            "ptune.deep_prompts",
        ]
        with torch.no_grad():
            model.ptune.deep_prompts.normal_(std=0.1)  # trained-looking, not zeros
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        assert out.logits.shape == (3, 10, 256)
        return (
            out.loss.detach(),
            model.ptune.prompts.detach().clone(),
            model.ptune.deep_prompts.detach().clone(),
            model.ptune.prompts.grad,
            model.ptune.deep_prompts.grad,
        )

    loss, prompt, deep, g_prompt, g_deep = await _with_swarm(
        tiny_llama, run, tuning_mode="deep_ptune", pre_seq_len=4
    )
    prompt.requires_grad_(True)
    deep.requires_grad_(True)
    expected = causal_lm_loss(ref, ids, labels, prompt, deep)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    torch.testing.assert_close(g_prompt, prompt.grad, **TOL)
    torch.testing.assert_close(g_deep, deep.grad, **TOL)
    assert g_deep.abs().max() > 1e-4 and g_prompt.abs().max() > 1e-4


class LocalPromptModel(torch.nn.Module):
    """The same prompts trained on the whole model held locally (transformers' forward and loss)."""

    def __init__(self, ref, ptune: PromptTuning) -> None:
        super().__init__()
        self.ref = ref
        self.ptune = ptune

    def forward(self, ids, labels):
        return causal_lm_loss(self.ref, ids, labels, self.ptune.prompts, self.ptune.deep_prompts)


def _train(
    model,
    loss_of,
    steps: int = 20,
    *,
    lr: float = 3e-2,
    seed: int = 100,
    cycle: int = 4,
    batch: int = 4,
    tokens: int = 12,
) -> list[float]:
    """Adam over the trainable parameters for ``steps`` steps on ``cycle`` fixed batches; the losses."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        ids, mask, labels = _batch(seed + step % cycle, batch=batch, tokens=tokens)
        opt.zero_grad()
        loss = loss_of(model, ids, mask, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


async def test_twenty_training_steps_match_local_and_the_trained_prompts_generate(
    tiny_llama: Path,
) -> None:
    ref = reference_model(tiny_llama)
    ref.requires_grad_(False)
    prompt_ids = torch.randint(0, 256, (2, 5))

    def run(model):
        init = {k: v.clone() for k, v in model.ptune.state_dict().items()}
        losses = _train(
            model, lambda m, ids, mask, labels: m(ids, attention_mask=mask, labels=labels).loss
        )
        generated = model.generate(prompt_ids, max_new_tokens=6)
        return init, losses, {k: v.clone() for k, v in model.ptune.state_dict().items()}, generated

    init, losses, trained, generated = await _with_swarm(
        tiny_llama, run, tuning_mode="deep_ptune", pre_seq_len=3
    )
    ptune = PromptTuning(mode="deep_ptune", pre_seq_len=3, hidden_size=64, num_blocks=6)
    ptune.load_state_dict(init)
    local = LocalPromptModel(ref, ptune)
    expected = _train(local, lambda m, ids, mask, labels: m(ids, labels))
    assert losses[-1] < losses[0] - 0.5  # it learns
    assert max(abs(a - b) for a, b in zip(losses, expected, strict=True)) < 1e-4, (losses, expected)
    assert trained["deep_prompts"].abs().max() > 1e-2  # the deep prompts moved away from zero
    # the trained prompts take part in generation (sessions carry the deep prompts)
    assert (
        generated.tolist()
        == greedy_tokens(ref, prompt_ids, trained["prompts"], trained["deep_prompts"], 6).tolist()
    )
    assert (
        generated.tolist() != greedy_tokens(ref, prompt_ids, trained["prompts"], None, 6).tolist()
    )


async def test_sequence_classification_head_matches_local(tiny_llama: Path) -> None:
    ref = reference_model(tiny_llama)
    ids, mask, _ = _batch(7, batch=4)
    labels = torch.tensor([0, 2, 1, 2])

    def run(model):
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return (
            out.logits.detach(),
            out.loss.detach(),
            model.score.weight.detach().clone(),
            model.score.weight.grad,
            model.ptune.prompts.detach().clone(),
            model.ptune.prompts.grad,
        )

    logits, loss, weight, g_weight, prompt, g_prompt = await _with_swarm(
        tiny_llama,
        run,
        cls=DistributedModelForSequenceClassification,
        num_labels=3,
        tuning_mode="ptune",
        pre_seq_len=2,
    )
    score = torch.nn.Linear(64, 3, bias=False)
    score.weight.data.copy_(weight)
    prompt.requires_grad_(True)
    expected_logits = classifier_logits(ref, score, ids, mask, prompt)
    expected = cross_entropy(expected_logits, labels)
    expected.backward()
    torch.testing.assert_close(logits, expected_logits.detach(), **TOL)
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    torch.testing.assert_close(g_weight, score.weight.grad, **TOL)
    torch.testing.assert_close(g_prompt, prompt.grad, **TOL)


def test_bad_tuning_arguments() -> None:
    with pytest.raises(ConfigError, match="'tuning_mode' must be one of"):
        DistributedModelForCausalLM.from_pretrained(
            "smollm2-135m", initial_peers=["x"], tuning_mode="lora9"
        )
    with pytest.raises(ConfigError, match="'pre_seq_len' must be an int in"):
        PromptTuning(mode="ptune", pre_seq_len=0, hidden_size=8, num_blocks=2)
    from swarm_node.node.distributed_model import _check_right_padded

    with pytest.raises(ConfigError, match="must mark right padding"):
        _check_right_padded(torch.tensor([[0, 1, 1]]), torch.zeros(1, 3, dtype=torch.long))


async def test_deep_prompts_in_push_sessions_generate_like_local(tiny_llama: Path) -> None:
    from swarm_node.model import Checkpoint, ClientHead
    from swarm_node.node.client.generation import SamplingConfig, generate_tokens
    from swarm_node.node.config import ClientConfig

    ref = reference_model(tiny_llama)
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    torch.manual_seed(9)
    prompt, deep = torch.randn(3, 64) * 0.3, torch.randn(6, 3, 64) * 0.3
    ids = torch.randint(0, 256, (2, 4))
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, SPANS, client=ClientConfig(push=True)) as (
            servers,
            client,
        ):
            out, _ = await generate_tokens(
                client,
                head,
                ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32", push=True),
                SamplingConfig(max_new_tokens=6),
                tuning=HopTuning(prompts=deep),
                prefix=prompt,
            )
            pushed = sum(s.server.pushed_steps for s in servers)
    assert pushed > 0  # the second server got its steps from the first, and still added its prompts
    assert out.tolist() == greedy_tokens(ref, ids, prompt, deep, 6).tolist()
