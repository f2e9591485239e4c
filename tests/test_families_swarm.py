"""Each family beyond the Llama-like ones through a real 2-server swarm against transformers:
greedy tokens (our decode loop and transformers' own), and deep prompt tuning's loss and gradients
against the whole model run locally; and a cold client's head for these families without
transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node import DistributedModelForCausalLM
from swarm_node.model.families import family_for
from tests.family_fixtures import VARIANTS, make_variant_dir
from tests.model_fixtures import add_byte_tokenizer, reference_model
from tests.swarm_helpers import local_swarm
from tests.test_first_token import COLD_CLIENT_PROBE

TOL = dict(atol=1e-5, rtol=1e-6)  # as tests/test_prompt_tuning.py
PROMPT = torch.tensor([[5, 77, 13, 200, 42, 9, 128, 3, 99]])  # (1, 9)
GENERATE = {"do_sample": False, "max_new_tokens": 6, "pad_token_id": 0}


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # one right-padded row
    return ids, mask, ids.masked_fill(mask == 0, -100)


def reference_prompt_loss(
    ref: Any, ids: torch.Tensor, labels: torch.Tensor, prompt: torch.Tensor, deep: torch.Tensor
) -> torch.Tensor:
    """transformers' loss with the soft prompt put in front of the first block's input and deep
    prompts added before every block, by hooks on transformers' own layers: the prompts live in
    the blocks' input space (after Gemma's scaling, BLOOM's embedding norm), as in the swarm."""
    n, batch = prompt.shape[0], ids.shape[0]
    layers = ref.get_submodule(family_for(ref.config).layers)

    def hook(i: int) -> Any:
        def add(module: Any, args: tuple, kwargs: dict) -> tuple:
            hidden = args[0]
            head = prompt.expand(batch, -1, -1) if i == 0 else hidden[:, :n]
            return (torch.cat([head + deep[i], hidden[:, n:]], dim=1), *args[1:]), kwargs

        return add

    handles = [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    labels = labels.clone()
    labels[:, 0] = -100  # the first token is not predicted from the prompt (as in Petals)
    ignore = torch.full((batch, n), -100, dtype=labels.dtype)
    placeholders = torch.zeros((batch, n), dtype=ids.dtype)  # replaced by the prompt
    try:
        out = ref(
            input_ids=torch.cat([placeholders, ids], dim=1),
            labels=torch.cat([ignore, labels], dim=1),
        )
    finally:
        for handle in handles:
            handle.remove()
    return out.loss


@pytest.mark.parametrize("variant", sorted(VARIANTS))
async def test_two_servers_generate_and_train_like_transformers(
    tmp_path: Path, variant: str
) -> None:
    path = make_variant_dir(tmp_path / variant, variant, seed=11)
    ref = reference_model(path)
    want = ref.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), **GENERATE)
    ids, mask, labels = _batch()

    def use(servers: list[Any]) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        peers = servers[0].addrs[:1]
        with DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=peers) as model:
            tokens = [
                model.generate(PROMPT, decode_loop=loop, **GENERATE)
                for loop in ("swarm", "transformers")
            ]
        with DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=peers, tuning_mode="deep_ptune", pre_seq_len=3
        ) as model:
            with torch.no_grad():
                model.ptune.deep_prompts.normal_(std=0.1)
            loss = model(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            trained = (
                loss.detach(),
                model.ptune.prompts.detach().clone(),
                model.ptune.deep_prompts.detach().clone(),
                model.ptune.prompts.grad,
                model.ptune.deep_prompts.grad,
            )
        return tokens, trained

    with trio.fail_after(240):
        async with local_swarm(path, [(0, 2), (2, 4)]) as (servers, _):
            tokens, (loss, prompt, deep, g_prompt, g_deep) = await trio.to_thread.run_sync(
                use, servers
            )
    assert [t.tolist() for t in tokens] == [want.tolist()] * 2
    prompt.requires_grad_(True)
    deep.requires_grad_(True)
    expected = reference_prompt_loss(ref, ids, labels, prompt, deep)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    torch.testing.assert_close(g_prompt, prompt.grad, **TOL)
    torch.testing.assert_close(g_deep, deep.grad, **TOL)
    assert g_prompt.abs().max() > 1e-4 and g_deep.abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gemma3", "bloom", "falcon"])
def test_a_cold_client_head_of_each_family_loads_without_transformers(
    tmp_path: Path, variant: str
) -> None:
    """`generate`'s client side (config.json's own names, BLOOM's "n_layer" among them; Gemma's
    scaled embedding and capped logits; LayerNorms) imports neither transformers nor dynamo."""
    path = add_byte_tokenizer(make_variant_dir(tmp_path / variant, variant))
    done = subprocess.run(
        [sys.executable, "-c", COLD_CLIENT_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
