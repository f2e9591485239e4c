"""PEFT's own API on the distributed model: what its wrapping reaches is the client's part (the LM
head, the input embeddings), so a PEFT LoRA of the head and PEFT prompt tuning train through the
remote blocks and save; a PEFT LoRA of the blocks' projections has no local module to wrap (the
client-owned LoRA, tuning_mode="lora", is the way to train those)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node import DistributedModelForCausalLM
from tests.swarm_helpers import local_swarm


def _train_step(peft_model: Any, ids: torch.Tensor) -> float:
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    out = peft_model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    out.loss.backward()
    torch.optim.SGD(trainable, lr=0.5).step()
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(trainable, before, strict=True))
    return moved


async def test_peft_lora_of_the_head_and_prompt_tuning(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    ids = torch.randint(0, 256, (2, 6))
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, _):

            def use() -> dict[str, Any]:
                out: dict[str, Any] = {}
                with DistributedModelForCausalLM.from_pretrained(
                    str(tiny_llama), initial_peers=servers[0].addrs[:1]
                ) as model:
                    with pytest.raises(NoMatchingPeftModuleError):
                        get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=4))
                    lora = get_peft_model(model, LoraConfig(target_modules=["lm_head"], r=4))
                    out["lora_moved"] = _train_step(lora, ids)
                    with torch.no_grad():
                        out["lora_logits"] = lora(input_ids=ids).logits
                    out["lora_text"] = lora.generate(
                        input_ids=ids, max_new_tokens=4, pad_token_id=0
                    )
                    lora.save_pretrained(tmp_path / "lora")
                    base = lora.unload()  # the head as it was, for the reload below
                    with torch.no_grad():
                        out["base_logits"] = base(input_ids=ids).logits
                    reloaded = PeftModel.from_pretrained(base, tmp_path / "lora")
                    with torch.no_grad():
                        out["reloaded_logits"] = reloaded(input_ids=ids).logits
                    base = reloaded.unload()
                    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
                    prompted = get_peft_model(base, config)
                    out["prompt_moved"] = _train_step(prompted, ids)
                    prompted.save_pretrained(tmp_path / "prompt")
                return out

            got = await trio.to_thread.run_sync(use)
    assert (
        got["lora_moved"] > 0 and got["prompt_moved"] > 0
    )  # gradients came back through the swarm
    assert not torch.allclose(got["lora_logits"], got["base_logits"])
    torch.testing.assert_close(got["reloaded_logits"], got["lora_logits"])
    assert got["lora_text"].shape == (2, 10)
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "prompt" / "adapter_model.safetensors").exists()
