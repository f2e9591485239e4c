"""Tuned files (trained prompts and LoRA as safetensors with a header): round trips and every bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from swarm_node.errors import ConfigError, ModelError
from swarm_node.model import Checkpoint
from swarm_node.model.lora import LoraModule, LoraWeights, load_peft_adapter
from swarm_node.model.tuned_files import TunedFile, load_tuned, save_tuned
from tests.lora_fixtures import save_peft_adapter
from tests.model_fixtures import tiny_config

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def config(tiny_llama: Path):
    return Checkpoint.open(tiny_llama).config


def _deep(tmp_path: Path, config, **changes) -> Path:
    tuned = TunedFile(
        model=MODEL,
        method="deep_ptune",
        start=0,
        end=6,
        prompts=torch.randn(3, 64),
        deep_prompts=torch.randn(6, 3, 64),
    )
    return save_tuned(tmp_path / "deep.safetensors", tuned, config=config)


def test_round_trips(tiny_llama: Path, config, tmp_path: Path) -> None:
    prompts = torch.randn(4, 64)
    saved = save_tuned(
        tmp_path / "p.safetensors",
        TunedFile(model=MODEL, method="ptune", start=0, end=6, prompts=prompts),
        config=config,
    )
    back = load_tuned(saved, model=MODEL, config=config)
    assert (back.method, back.start, back.end, back.deep_prompts) == ("ptune", 0, 6, None)
    assert torch.equal(back.prompts, prompts)

    deep = torch.randn(2, 4, 64)
    tuned = TunedFile(
        model=MODEL, method="deep_ptune", start=2, end=4, prompts=prompts, deep_prompts=deep
    )
    back = load_tuned(
        save_tuned(tmp_path / "d.safetensors", tuned, config=config), model=MODEL, config=config
    )
    full = back.deep_prompts_for(6)  # (6, 4, 64): zeros outside blocks 2..3
    assert torch.equal(full[2:4], deep) and not full[:2].any() and not full[4:].any()

    adapter = save_peft_adapter(tiny_llama, tmp_path / "peft", seed=3)
    lora = load_peft_adapter(adapter, config, start=1, end=5)
    tuned = TunedFile(model=MODEL, method="lora", start=1, end=5, lora=lora)
    back = load_tuned(
        save_tuned(tmp_path / "l.safetensors", tuned, config=config),
        model=MODEL,
        config=config,
        methods=("lora",),
    )
    assert back.lora is not None and back.lora.blocks == [1, 2, 3, 4]
    for (key, mine), (key2, theirs) in zip(back.lora.items(), lora.items(), strict=True):
        assert key == key2 and mine.scale == theirs.scale
        assert torch.equal(mine.a, theirs.a) and torch.equal(mine.b, theirs.b)


def _rewrite(path: Path, *, tensors=None, **meta_changes) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata.update({k: v for k, v in meta_changes.items() if v is not None})
    for k in [k for k, v in meta_changes.items() if v is None]:
        metadata.pop(k)
    tensors = tensors if tensors is not None else load_file(str(path))
    save_file(tensors, str(path), metadata=metadata)


def _shapes(tensors: dict) -> str:
    return json.dumps({n: list(t.shape) for n, t in tensors.items()})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "must be an existing file"),
        (
            lambda p: p.write_bytes(b"\x01\x02"),
            "must start with a safetensors header of 2 to 1048576 bytes",
        ),
        (
            lambda p: p.write_bytes(struct.pack("<Q", 2**60) + b"{}"),
            "got a length of 1152921504606846976",
        ),
        (
            lambda p: p.write_bytes(struct.pack("<Q", 8) + b"not json"),
            "is not a readable safetensors file",
        ),
        (
            lambda p: save_file({"prompts": torch.zeros(3, 64)}, str(p)),
            "header 'format'/'version' must be",
        ),
        (
            lambda p: _rewrite(p, model="gpt-9"),
            "was trained for model 'gpt-9'; it must be for 'tiny-llama'",
        ),
        (
            lambda p: _rewrite(p, num_blocks="30"),
            "header 'num_blocks' must be 6 (the model's), got 30",
        ),
        (
            lambda p: _rewrite(p, hidden_size="576"),
            "header 'hidden_size' must be 64 (the model's), got 576",
        ),
        (
            lambda p: _rewrite(p, start="4", end="2"),
            "block range must satisfy 0 <= start < end <= 6, got 4:2",
        ),
        (
            lambda p: _rewrite(p, end="-1"),
            "header field 'end' must be a non-negative int, got '-1'",
        ),
        (lambda p: _rewrite(p, method=None), "header field 'method' must be present"),
        (
            lambda p: _rewrite(p, method="prefix"),
            "'method' must be one of ['ptune', 'deep_ptune'] here",
        ),
        (lambda p: _rewrite(p, shapes="{]"), "header 'shapes' and 'scales' must be JSON"),
        (
            lambda p: _rewrite(p, shapes='{"prompts": [3, 64]}'),
            "header 'shapes' must list every tensor's shape",
        ),
        (
            lambda p: _rewrite(
                p,
                end="4",
                shapes=_shapes(
                    {"prompts": torch.zeros(3, 64), "deep_prompts": torch.zeros(6, 3, 64)}
                ),
            ),
            "'deep_prompts' must have shape (4, 3, 64) (blocks, P, H), got (6, 3, 64)",
        ),
        (
            lambda p: _rewrite(
                p,
                tensors=(
                    t := {"prompts": torch.zeros(3, 65), "deep_prompts": torch.zeros(6, 3, 65)}
                ),
                shapes=_shapes(t),
            ),
            "'prompts' must have shape (P, 64) with 1 <= P <= 1024, got (3, 65)",
        ),
        (
            lambda p: _rewrite(
                p, tensors=(t := {"prompts": torch.zeros(3, 64)}), shapes=_shapes(t)
            ),
            "a 'deep_ptune' file must hold tensors ['deep_prompts', 'prompts'], got ['prompts']",
        ),
        (
            lambda p: _rewrite(
                p,
                tensors=(
                    t := {
                        "prompts": torch.zeros(3, 64, dtype=torch.int32),
                        "deep_prompts": torch.zeros(6, 3, 64),
                    }
                ),
                shapes=_shapes(t),
            ),
            "tensor 'prompts' must be one of ['BF16', 'F16', 'F32'], got I32",
        ),
        (
            lambda p: _rewrite(
                p,
                tensors={
                    "prompts": torch.full((3, 64), float("nan")),
                    "deep_prompts": torch.zeros(6, 3, 64),
                },
            ),
            "tensor 'prompts' must be finite",
        ),
        (
            lambda p: _rewrite(p, scales='{"x": "big"}'),
            "header 'scales' must map module names to finite numbers",
        ),
    ],
)
def test_bad_prompt_files(config, tmp_path: Path, damage, message: str) -> None:
    path = _deep(tmp_path, config)
    damage(path)
    with pytest.raises(ModelError) as info:
        load_tuned(path, model=MODEL, config=config, methods=("ptune", "deep_ptune"))
    assert message in str(info.value)


def test_size_limit_and_other_model(config, tmp_path: Path) -> None:
    path = _deep(tmp_path, config)
    with pytest.raises(ModelError, match=r"must be at most 1000 bytes, got \d+"):
        load_tuned(path, model=MODEL, config=config, max_bytes=1000)
    other = tiny_config(num_layers=4)  # same name, different shape: still refused
    with pytest.raises(
        ModelError, match="header 'num_blocks' must be 4 .* got 6: a different model"
    ):
        load_tuned(path, model=None, config=other)


def test_bad_lora_files_and_bad_saves(tiny_llama: Path, config, tmp_path: Path) -> None:
    mod = LoraModule(torch.randn(2, 64), torch.randn(64, 2), 0.5)
    tuned = TunedFile(
        model=MODEL, method="lora", start=0, end=6, lora=LoraWeights({1: {"self_attn.q_proj": mod}})
    )
    path = save_tuned(tmp_path / "l.safetensors", tuned, config=config)
    key = "model.layers.1.self_attn.q_proj"
    bad_b = {f"{key}.lora_A.weight": mod.a, f"{key}.lora_B.weight": torch.zeros(32, 2)}
    _rewrite(path, tensors=bad_b, shapes=_shapes(bad_b))
    with pytest.raises(
        ModelError,
        match=r"A must have shape \(2, 64\) and B \(64, 2\), got A \(2, 64\) and B \(32, 2\)",
    ):
        load_tuned(path, model=MODEL, config=config)
    good = {f"{key}.lora_A.weight": mod.a, f"{key}.lora_B.weight": mod.b}
    _rewrite(path, tensors=good, shapes=_shapes(good), scales="{}")
    with pytest.raises(ModelError, match="scales must name exactly the adapted modules"):
        load_tuned(path, model=MODEL, config=config)
    with pytest.raises(ConfigError, match="block indices must lie in 2:6, got 1"):
        save_tuned(
            tmp_path / "x.safetensors",
            TunedFile(model=MODEL, method="lora", start=2, end=6, lora=tuned.lora),
            config=config,
        )
    with pytest.raises(
        ConfigError, match="'deep_prompts' must be given exactly when the method is 'deep_ptune'"
    ):
        save_tuned(
            tmp_path / "y.safetensors",
            TunedFile(
                model=MODEL,
                method="ptune",
                start=0,
                end=6,
                prompts=torch.zeros(2, 64),
                deep_prompts=torch.zeros(6, 2, 64),
            ),
            config=config,
        )
    with pytest.raises(ConfigError, match=r"'prompts' must have shape \(P, 64\)"):
        save_tuned(
            tmp_path / "z.safetensors",
            TunedFile(model=MODEL, method="ptune", start=0, end=6, prompts=torch.zeros(2, 63)),
            config=config,
        )


@pytest.mark.parametrize(
    "fields",
    [{"tuning_mode": "deep_ptune", "pre_seq_len": 3}, {"tuning_mode": "lora", "lora_rank": 2}],
    ids=["deep_ptune", "lora"],
)
async def test_a_model_saves_and_loads_what_it_trains(
    tiny_llama: Path, tmp_path: Path, fields: dict
) -> None:
    from tests.test_prompt_tuning import _with_swarm

    def run(model):
        trainable = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in trainable:
                p.normal_()
        saved = [p.detach().clone() for p in trainable]
        path = model.save_tuned(tmp_path / "mine.safetensors")
        with torch.no_grad():
            for p in trainable:
                p.zero_()
        model.load_tuned(path)
        other = tmp_path / "other.safetensors"
        wrong = TunedFile(model=MODEL, method="ptune", start=0, end=6, prompts=torch.zeros(5, 64))
        save_tuned(other, wrong, config=model.config)
        with pytest.raises(ConfigError) as info:
            model.load_tuned(other)
        return saved, [p.detach().clone() for p in trainable], str(info.value)

    saved, loaded, error = await _with_swarm(tiny_llama, run, **fields)
    assert len(saved) == len(loaded) > 0
    assert all(torch.equal(a, b) for a, b in zip(saved, loaded, strict=True))
    if fields["tuning_mode"] == "lora":
        assert "method 'ptune' must be the model's tuning_mode, got 'lora'" in error
    else:
        assert "method 'ptune' must be the model's tuning_mode, got 'deep_ptune'" in error
