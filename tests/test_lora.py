"""LoRA on a span: PEFT's adapter files, PEFT's math (outputs and gradients), frozen weights, threads."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from swarm_node.errors import ConfigError, ModelError
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    LoraModule,
    LoraWeights,
    check_lora,
    load_peft_adapter,
    lora_from_state,
    lora_state,
)
from tests.lora_fixtures import make_peft_model, save_peft_adapter


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_peft_adapter(tiny_llama, tmp_path_factory.mktemp("lora") / "adapter")


def _peft_hidden(
    model_dir: Path, adapter_dir: Path, input_ids: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    from peft import PeftModel

    from tests.model_fixtures import reference_model

    peft_model = PeftModel.from_pretrained(reference_model(model_dir), adapter_dir).eval()
    with torch.no_grad():
        return peft_model(input_ids, output_hidden_states=True).hidden_states  # (L+1) x (B, T, H)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"use_rslora": True, "r": 8, "lora_alpha": 3},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 5}},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_span_with_adapter_equals_peft(tiny_llama: Path, tmp_path: Path, fields: dict) -> None:
    adapter_dir = save_peft_adapter(tiny_llama, tmp_path / "a", seed=4, **fields)
    input_ids = torch.randint(0, 256, (2, 7))
    expected = _peft_hidden(tiny_llama, adapter_dir, input_ids)
    checkpoint = Checkpoint.open(tiny_llama)
    hidden = ClientHead.load(checkpoint).embed(input_ids)
    for start, end in ((0, 3), (3, 5)):
        span = BlockSpan.load(checkpoint, start, end)
        lora = load_peft_adapter(adapter_dir, checkpoint.config, start=start, end=end)
        assert lora.blocks == list(range(start, end))  # only the span's blocks are read
        out = span(expected[start], lora=lora)
        torch.testing.assert_close(out, expected[end], atol=1e-5, rtol=0)
        assert (out - span(expected[start])).abs().max() > 1e-2  # the adapter matters
    cache_span = BlockSpan.load(checkpoint, 0, 3)  # with a cache, token by token after a prefill
    lora = load_peft_adapter(adapter_dir, checkpoint.config, start=0, end=3)
    cache = cache_span.new_cache(7, batch_size=2)
    steps = [cache_span(hidden[:, :4], cache, lora=lora)]
    steps += [cache_span(hidden[:, t : t + 1], cache, lora=lora) for t in range(4, 7)]
    # chunks vs one whole pass: float32 rounding of different kernel shapes (the base model without
    # an adapter differs by ~3e-5 too, at |h| up to ~30); the whole passes above match within 1e-5
    torch.testing.assert_close(torch.cat(steps, dim=1), expected[3], atol=1e-4, rtol=1e-5)


def test_frozen_weights_never_change_and_no_adapter_is_the_base(
    tiny_llama: Path, adapter: Path
) -> None:
    checkpoint = Checkpoint.open(tiny_llama)
    span = BlockSpan.load(checkpoint, 0, 6)
    before = {k: v.clone() for k, v in span.state_dict().items()}
    hidden = torch.randn(1, 5, 64)
    base = span(hidden)
    lora = load_peft_adapter(adapter, checkpoint.config, start=0, end=6)
    assert not torch.equal(span(hidden, lora=lora), base)
    assert torch.equal(span(hidden), base)  # the hooks stay, inert without an adapter
    after = span.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_two_threads_with_different_adapters_at_once(tiny_llama: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_llama)
    span = BlockSpan.load(checkpoint, 0, 6)
    adapters = [None] + [
        load_peft_adapter(
            save_peft_adapter(tiny_llama, tmp_path / f"a{i}", seed=i),
            checkpoint.config,
            start=0,
            end=6,
        )
        for i in (1, 2)
    ]
    hidden = torch.randn(1, 5, 64)
    alone = [span(hidden, lora=lora) for lora in adapters]
    barrier = threading.Barrier(len(adapters), timeout=30)

    def meet(module: torch.nn.Module, args: tuple) -> None:
        barrier.wait()  # every thread is inside the forward, between block 1 and block 2

    handle = span.layers[2].register_forward_pre_hook(meet)
    results: list[torch.Tensor | None] = [None] * len(adapters)

    def run(i: int) -> None:
        results[i] = span(hidden, lora=adapters[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(adapters))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        handle.remove()
    for got, want in zip(results, alone, strict=True):
        assert got is not None and torch.equal(got, want)


def test_client_owned_lora_gradients_equal_peft(tiny_llama: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    peft_model = make_peft_model(tiny_llama, seed=5)
    input_ids = torch.randint(0, 256, (2, 6))
    out = peft_model(input_ids, output_hidden_states=True).hidden_states
    (out[4] ** 2).mean().backward()  # a loss on the output of blocks 0..3
    state = get_peft_model_state_dict(peft_model)  # PEFT's saved names
    tensors = {
        k.removeprefix(PEFT_PREFIX): v.detach().clone().requires_grad_(True)
        for k, v in state.items()
    }
    scales = {
        name.removeprefix(PEFT_PREFIX.removesuffix(".") + "."): m.scaling["default"]
        for name, m in peft_model.named_modules()
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
    }
    checkpoint = Checkpoint.open(tiny_llama)
    span = BlockSpan.load(checkpoint, 0, 4)
    lora = lora_from_state(
        {k: v for k, v in tensors.items() if int(k.split(".")[2]) < 4},
        {k: v for k, v in scales.items() if int(k.split(".")[2]) < 4},
        shapes=span.lora_shapes,
        start=0,
        end=4,
    )
    hidden = out[0].detach().requires_grad_(True)
    mine = span(hidden, lora=lora)
    torch.testing.assert_close(mine, out[4], atol=1e-5, rtol=0)
    (mine**2).mean().backward()
    params = dict(peft_model.named_parameters())
    for key, mod in lora.items():
        for side, tensor in (("A", mod.a), ("B", mod.b)):
            reference = params[f"{PEFT_PREFIX}{key}.lora_{side}.default.weight"].grad
            torch.testing.assert_close(tensor.grad, reference, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in span.parameters())  # frozen weights get no gradient
    assert lora_state(lora)[1] == {k: v for k, v in scales.items() if int(k.split(".")[2]) < 4}


# -- every bad adapter folder gets a clear error ----------------------------------------------------
def _copy(adapter: Path, to: Path) -> Path:
    to.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (to / name).write_bytes((adapter / name).read_bytes())
    return to


def _edit_config(folder: Path, **changes: object) -> None:
    data = json.loads((folder / ADAPTER_CONFIG).read_text())
    data.update(changes)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(data))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    save_file(edit(tensors), str(folder / ADAPTER_WEIGHTS))


Q_A = f"{PEFT_PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / ADAPTER_CONFIG).unlink(), "must hold adapter_config.json"),
        (lambda f: (f / ADAPTER_WEIGHTS).unlink(), "must hold adapter_model.safetensors"),
        (lambda f: (f / ADAPTER_CONFIG).write_text("{not json"), "must be JSON"),
        (
            lambda f: _edit_config(f, use_dora=True),
            "'use_dora' must be one of [False, None], got True",
        ),
        (
            lambda f: _edit_config(f, peft_type="IA3"),
            "'peft_type' must be one of ['LORA'], got 'IA3'",
        ),
        (lambda f: _edit_config(f, r=-2), "'r' must be a number > 0, got -2"),
        (lambda f: _edit_config(f, r=8), "A must have shape (8, "),
        (
            lambda f: _edit_config(f, target_modules=["q_proj"]),
            "which 'target_modules' ['q_proj'] does not name",
        ),
        (
            lambda f: (f / ADAPTER_WEIGHTS).write_bytes(
                b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"
            ),
            "is not a readable safetensors file",
        ),
        (
            lambda f: _edit_tensors(f, lambda t: {**t, Q_A: torch.zeros(4, 65)}),
            "A must have shape (4, 64)",
        ),
        (
            lambda f: _edit_tensors(f, lambda t: {k: v for k, v in t.items() if k != Q_A}),
            "must have both lora_A and lora_B, got ['B']",
        ),
        (
            lambda f: _edit_tensors(
                f, lambda t: {**t, Q_A.replace("layers.1", "layers.9"): t[Q_A].clone()}
            ),
            "names block 9, the model has blocks 0:6",
        ),
        (
            lambda f: _edit_tensors(
                f, lambda t: {**t, Q_A.replace("q_proj", "rotary"): t[Q_A].clone()}
            ),
            "names module 'self_attn.rotary', which must be a Linear of the block",
        ),
        (
            lambda f: _edit_tensors(
                f, lambda t: {**t, f"{PEFT_PREFIX}lm_head.lora_A.weight": t[Q_A].clone()}
            ),
            "LoRA on embeddings, the LM head, biases or DoRA is not supported",
        ),
        (
            lambda f: _edit_tensors(f, lambda t: {**t, Q_A: t[Q_A].to(torch.int32)}),
            "must be a float tensor, got I32",
        ),
    ],
)
def test_bad_adapter_folders(
    tiny_llama: Path, adapter: Path, tmp_path: Path, damage, message: str
) -> None:
    folder = _copy(adapter, tmp_path / "bad")
    damage(folder)
    with pytest.raises(ModelError) as info:
        load_peft_adapter(folder, Checkpoint.open(tiny_llama).config, start=0, end=6)
    assert message in str(info.value)


def test_adapter_file_size_is_checked_before_reading(tiny_llama: Path, adapter: Path) -> None:
    with pytest.raises(ModelError, match="must be at most 100 bytes"):
        load_peft_adapter(
            adapter, Checkpoint.open(tiny_llama).config, start=0, end=6, max_bytes=100
        )
    with pytest.raises(ModelError, match="must be a folder in PEFT's format"):
        load_peft_adapter(
            adapter / ADAPTER_WEIGHTS, Checkpoint.open(tiny_llama).config, start=0, end=6
        )


def test_bad_lora_weights_given_to_a_span(tiny_llama: Path) -> None:
    span = BlockSpan.load(Checkpoint.open(tiny_llama), 2, 4)
    hidden = torch.randn(1, 3, 64)
    good = LoraModule(torch.zeros(2, 64), torch.zeros(64, 2), 1.0)
    cases = [
        (LoraWeights({5: {"self_attn.q_proj": good}}), "block indices must lie in 2:4, got 5"),
        (LoraWeights({2: {"self_attn.nope": good}}), "the module must be a Linear of the block"),
        (LoraWeights({2: {"mlp.down_proj": good}}), "A must have shape (2, 128) and B (64, 2)"),
        (
            LoraWeights(
                {2: {"self_attn.q_proj": LoraModule(torch.zeros(0, 64), torch.zeros(64, 0), 1.0)}}
            ),
            "rank must be an int in [1, 1024], got 0",
        ),
        (
            LoraWeights({2: {"self_attn.q_proj": LoraModule(good.a, good.b, float("nan"))}}),
            "'scale' must be a finite",
        ),
        (
            LoraWeights({2: {"self_attn.q_proj": LoraModule(good.a.long(), good.b, 1.0)}}),
            "must be a floating tensor",
        ),
    ]
    for lora, message in cases:
        with pytest.raises(ConfigError) as info:
            span(hidden, lora=lora)
        assert message in str(info.value)
    with pytest.raises(ConfigError, match="must be a LoraWeights, got dict"):
        check_lora({}, shapes=span.lora_shapes, start=2, end=4)
    with pytest.raises(
        ConfigError, match="must look like 'model.layers.<i>.<module>.lora_A.weight'"
    ):
        lora_from_state({"layers.2.q.lora_A": good.a}, {}, shapes=span.lora_shapes, start=2, end=4)
    with pytest.raises(ConfigError, match="scales must name exactly the adapted modules"):
        lora_from_state(
            {
                "model.layers.2.self_attn.q_proj.lora_A.weight": good.a,
                "model.layers.2.self_attn.q_proj.lora_B.weight": good.b,
            },
            {},
            shapes=span.lora_shapes,
            start=2,
            end=4,
        )


def test_pack_round_trip_and_gradients_land_in_the_flat_tensor(
    tiny_llama: Path, adapter: Path
) -> None:
    from swarm_node.model.lora_pack import manifest_entries, pack_lora, unpack_lora

    checkpoint = Checkpoint.open(tiny_llama)
    span = BlockSpan.load(checkpoint, 2, 5)
    lora = load_peft_adapter(adapter, checkpoint.config, start=2, end=5)
    flat, manifest = pack_lora(lora)
    assert flat.shape == (lora.numel(),)
    leaf = flat.detach().clone().requires_grad_(True)
    back = unpack_lora(leaf, manifest, shapes=span.lora_shapes, start=2, end=5)
    hidden = torch.randn(1, 4, 64)
    out = span(hidden, lora=back)
    torch.testing.assert_close(out, span(hidden, lora=lora), atol=0, rtol=0)
    out.pow(2).mean().backward()
    tensors = lora.to(torch.float32)
    for _, mod in tensors.items():
        mod.a.requires_grad_(True)
        mod.b.requires_grad_(True)
    span(hidden, lora=tensors).pow(2).mean().backward()
    expected, _ = pack_lora(
        LoraWeights(
            {
                i: {n: LoraModule(m.a.grad, m.b.grad, m.scale) for n, m in mods.items()}
                for i, mods in tensors.modules.items()
            }
        )
    )
    torch.testing.assert_close(leaf.grad, expected, atol=1e-6, rtol=0)
    shapes = span.lora_shapes
    for bad, message in [
        ("[]", "must list 1 to"),
        ((), "must list 1 to"),
        ((("model.layers.7.self_attn.q_proj", 4, 1.0),), "must be a distinct Linear of blocks 2:5"),
        (
            (("model.layers.2.self_attn.q_proj", 0, 1.0),),
            "rank of 'model.layers.2.self_attn.q_proj' must be an int",
        ),
        ((("model.layers.2.self_attn.q_proj", 4, "x"),), "must be a finite number"),
        ((("x", 4, 1.0),), "entries must be"),
        ((("model.layers.2.self_attn.q_proj", 4),), "entries must be"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            manifest_entries(bad, shapes=shapes, start=2, end=5)
    with pytest.raises(ConfigError, match=f"must be a flat tensor of {flat.numel()} numbers"):
        unpack_lora(flat[:-1], manifest, shapes=shapes, start=2, end=5)
