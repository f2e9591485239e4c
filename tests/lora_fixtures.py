"""PEFT adapters for tests, made by the peft library itself (its own math is the reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.model_fixtures import reference_model

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def make_peft_model(model_dir: Path, *, seed: int = 0, **lora_fields: Any) -> Any:
    """The reference model with a random (non-zero) LoRA from PEFT, in eval mode."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    fields = dict(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False
    )
    fields.update(lora_fields)
    model = get_peft_model(reference_model(model_dir), LoraConfig(**fields))
    with torch.no_grad():  # init_lora_weights=False is random but small: make the adapter matter
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(1.0)
    return model.eval()


def save_peft_adapter(model_dir: Path, out: Path, *, seed: int = 0, **lora_fields: Any) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) saved by PEFT."""
    make_peft_model(model_dir, seed=seed, **lora_fields).save_pretrained(out)
    return out


def merged_reference(model_dir: Path, adapter_dir: Path) -> Any:
    """The base model with the adapter merged into its weights by PEFT (merge_and_unload)."""
    from peft import PeftModel

    return (
        PeftModel.from_pretrained(reference_model(model_dir), adapter_dir).merge_and_unload().eval()
    )
