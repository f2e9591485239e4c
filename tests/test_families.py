"""Mixtral, Phi-3, Gemma 2/3, Falcon and BLOOM spans and heads against transformers on tiny random
models (tests/family_fixtures.py): greedy tokens, hidden states, the plain-torch head's parts,
cache sizes, checkpoints with fused experts, and the settings refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm_node.errors import ModelError
from swarm_node.model import BlockSpan, Checkpoint, ClientHead, sample_next_token
from swarm_node.model.families import family_for
from tests.family_fixtures import SLIDING, VARIANTS, make_variant_dir
from tests.model_fixtures import TINY_HIDDEN, reference_model

PROMPT = torch.tensor([[5, 77, 13, 200, 42, 9, 128, 3, 99, 61, 17]])  # (1, 11): past the window


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {v: make_variant_dir(root / v, v, seed=i) for i, v in enumerate(VARIANTS)}


@pytest.fixture(scope="module")
def references(variant_dirs):
    return {v: reference_model(path) for v, path in variant_dirs.items()}


def _chain(path: Path, bounds, dtype=torch.float32):
    checkpoint = Checkpoint.open(path)
    spans = [BlockSpan.load(checkpoint, a, b, dtype=dtype) for a, b in bounds]
    return ClientHead.load(checkpoint, dtype=dtype), spans


def _greedy(head, spans, prompt, new_tokens, chunks):
    caches = [span.new_cache(max_length=64) for span in spans]
    ids, pieces = prompt, list(prompt.tensor_split(chunks, dim=1))
    for _ in range(new_tokens):
        for piece in pieces:
            hidden = head.embed(piece)
            for span, cache in zip(spans, caches, strict=True):
                hidden = span(hidden, cache)
        token = sample_next_token(head.logits(hidden)[:, -1], temperature=0, top_p=1.0)
        ids = torch.cat([ids, token[:, None]], dim=1)
        pieces = [token[:, None]]
    return ids


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_tokens_equal_transformers(variant_dirs, references, variant, chunks):
    # chunks=3: the prompt arrives in pieces, each attending to a cache (alibi over past keys,
    # sliding windows already full)
    head, spans = _chain(variant_dirs[variant], [(0, 1), (1, 4)])
    assert not any(span.uses_fast_decode(1) for span in spans)  # the generic path: see docs
    got = _greedy(head, spans, PROMPT, 8, chunks)
    want = references[variant].generate(
        PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False, max_new_tokens=8
    )
    assert got.tolist() == want.tolist()
    assert len(set(got[0, PROMPT.shape[1] :].tolist())) > 2  # the model does not just repeat


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cacheless_forward_equals_transformers_logits(variant_dirs, references, variant):
    head, spans = _chain(variant_dirs[variant], [(0, 2), (2, 4)])
    with torch.no_grad():
        want = references[variant](PROMPT).logits  # (1, T, V)
        hidden = head.embed(PROMPT)
        for span in spans:
            hidden = span(hidden)
        got = head.logits(hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _block_io(
    ref, variant: str, ids: torch.Tensor, *, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' own (first block's input, final norm's input, logits) for ``ids``."""
    family = family_for(ref.config)
    seen: dict[str, torch.Tensor] = {}
    first = ref.get_submodule(family.layers)[0]
    norm = ref.get_submodule(family.norm)
    hooks = [
        first.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0])),
        norm.register_forward_pre_hook(lambda m, args: seen.setdefault("last", args[0])),
    ]
    try:
        with torch.set_grad_enabled(grad):
            logits = ref(ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return seen["in"], seen["last"], logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_plain_torch_head_equals_transformers_modules(variant_dirs, variant, dtype):
    """Embedding (Gemma's scaling, BLOOM's norm), final norm (Gemma's 1 + w in float32,
    LayerNorm) and logits (Gemma's soft-capping), bit for bit, in float32 and bfloat16."""
    path = variant_dirs[variant]
    ref = reference_model(path, dtype=dtype)
    first_in, last, logits = _block_io(ref, variant, PROMPT)
    head = ClientHead.load(Checkpoint.open(path), dtype=dtype)
    assert torch.equal(head.embed(PROMPT), first_in)
    assert torch.equal(head.logits(last), logits)
    assert torch.equal(head.norm(last), ref.get_submodule(family_for(ref.config).norm)(last))


def test_gemma_head_parts(variant_dirs):
    head = ClientHead.load(Checkpoint.open(variant_dirs["gemma2"]))
    assert head.softcap == 30.0 and head.embed_tokens.scale == TINY_HIDDEN**0.5
    big = torch.full((1, 1, TINY_HIDDEN), 1e4)
    assert head.logits(big).abs().max() <= 30.0  # capped
    bloom = ClientHead.load(Checkpoint.open(variant_dirs["bloom"]))
    assert bloom.softcap is None and isinstance(bloom.embed_norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cache_bytes_per_token_matches_real_cache(variant_dirs, variant):
    _, (span,) = _chain(variant_dirs[variant], [(1, 4)])
    cache = span.new_cache(max_length=16, batch_size=2)
    tokens = SLIDING - 1  # within Gemma's window: every layer keeps every position
    span(torch.randn(2, tokens, TINY_HIDDEN), cache)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.dynamic.layers)
    assert held == tokens * span.cache_bytes_per_token(batch_size=2)


def test_gemma_sliding_cache_cannot_roll_back(variant_dirs):
    _, (span,) = _chain(variant_dirs["gemma3"], [(0, 4)])
    assert span.layer_types == ["sliding_attention", "full_attention"] * 2
    assert not span.new_cache(max_length=8).can_truncate


def test_mixtral_reads_per_expert_tensors_of_its_blocks_only(variant_dirs):
    checkpoint = Checkpoint.open(variant_dirs["mixtral"])
    assert checkpoint.has_tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    BlockSpan.load(checkpoint, 1, 3)
    assert checkpoint.names_read
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in checkpoint.names_read)
    assert "model.layers.2.block_sparse_moe.experts.0.w3.weight" in checkpoint.names_read


def test_mixtral_file_with_fused_experts_loads_the_same(tmp_path, variant_dirs, references):
    """A folder whose experts are already fused (transformers' in-memory names) loads as is."""
    from safetensors.torch import save_file

    ref = references["mixtral"]
    folder = tmp_path / "fused"
    folder.mkdir()
    (folder / "config.json").write_text((variant_dirs["mixtral"] / "config.json").read_text())
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(folder / "model.safetensors"))
    got = _greedy(*_chain(folder, [(0, 2), (2, 4)]), PROMPT, 4, 1)
    want = _greedy(*_chain(variant_dirs["mixtral"], [(0, 2), (2, 4)]), PROMPT, 4, 1)
    assert got.tolist() == want.tolist()


def test_bloom_config_names_are_read_without_transformers(variant_dirs):
    checkpoint = Checkpoint.open(variant_dirs["bloom"])
    assert "n_layer" in checkpoint.settings and "num_hidden_layers" not in checkpoint.settings
    assert checkpoint.num_blocks == 4 and checkpoint.setting("num_attention_heads") == 4


@pytest.mark.parametrize(
    ("variant", "overrides", "match"),
    [
        ("falcon", {"alibi": True}, "'alibi' must be false"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ],
)
def test_settings_a_span_cannot_run_are_refused(tmp_path, variant, overrides, match):
    path = make_variant_dir(tmp_path, variant, num_layers=2, **overrides)
    with pytest.raises(ModelError, match=match):
        BlockSpan.load(Checkpoint.open(path), 0, 1)


def test_a_gguf_split_over_packages_is_joined_checked_and_cleaned_up(tmp_path, monkeypatch):
    import hashlib
    import shutil
    from dataclasses import replace

    from swarm_node.model import bundled

    chunks = [b"GGUF" + bytes(range(200)), bytes(100), b"end"]
    for i, chunk in enumerate(chunks):
        package = tmp_path / "site" / f"fake_gguf_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (package / "data" / f"m.gguf.part{i}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = replace(
        bundled.BUNDLED_MODELS["gemma3-270m"],
        name="fake-split",
        parts=tuple((f"fake_gguf_part{i}", f"data/m.gguf.part{i}") for i in range(3)),
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
        gguf_file="m.gguf",
    )
    seen = []

    def fake_convert(source, out, *, desc):
        seen.append(source.read_bytes())
        for item in make_variant_dir(tmp_path / "tiny", "phi3", num_layers=2).iterdir():
            shutil.copy(item, out / item.name)

    monkeypatch.setattr(bundled, "_convert_gguf", fake_convert)
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "fake-split", model)
    folder = bundled.resolve_model("fake-split", cache_dir=tmp_path / "cache")
    assert seen == [b"".join(chunks)] and Checkpoint.open(folder).num_blocks == 2
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [
        ".fake-split.lock",
        "fake-split",
    ]  # the joined GGUF and the temp folder are gone
    monkeypatch.setitem(
        bundled.BUNDLED_MODELS, "bad-split", replace(model, name="bad-split", sha256="0" * 64)
    )
    with pytest.raises(ModelError, match="must have sha256 0000"):
        bundled.resolve_model("bad-split", cache_dir=tmp_path / "cache")
    (tmp_path / "site" / "fake_gguf_part1" / "data" / "m.gguf.part1").unlink()
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "gone-split", replace(model, name="gone-split"))
    with pytest.raises(ModelError, match=r"must ship .*m\.gguf\.part1"):
        bundled.resolve_model("gone-split", cache_dir=tmp_path / "cache")


def test_int8_spans_of_the_families_stay_close_and_falcon_refuses(variant_dirs):
    from swarm_node.errors import ConfigError

    hidden = torch.randn(1, 6, TINY_HIDDEN)
    for variant in ("mixtral", "phi3", "gemma3", "bloom"):
        checkpoint = Checkpoint.open(variant_dirs[variant])
        exact = BlockSpan.load(checkpoint, 0, 2)(hidden)
        int8 = BlockSpan.load(checkpoint, 0, 2, quant="int8")
        assert int8.memory_bytes() < BlockSpan.load(checkpoint, 0, 2).memory_bytes()
        cosine = torch.nn.functional.cosine_similarity(int8(hidden), exact, dim=-1)
        assert cosine.min() > 0.98, (variant, cosine)
    with pytest.raises(ConfigError, match="'quant' must be None for falcon blocks"):
        BlockSpan.load(Checkpoint.open(variant_dirs["falcon"]), 0, 2, quant="int8")


LORA_TARGETS = {
    "mixtral": ("self_attn.q_proj", "self_attn.v_proj"),
    "phi3": ("self_attn.qkv_proj", "mlp.down_proj"),
    "gemma2": ("self_attn.q_proj", "mlp.up_proj"),
    "gemma3": ("self_attn.v_proj", "self_attn.o_proj"),
    "falcon": ("self_attention.query_key_value", "mlp.dense_4h_to_h"),
    "falcon-7b": ("self_attention.query_key_value", "self_attention.dense"),
    "bloom": ("self_attention.query_key_value", "mlp.dense_h_to_4h"),
}


@pytest.mark.parametrize("variant", sorted(LORA_TARGETS))
def test_client_lora_on_each_family_equals_hooks_on_transformers(variant_dirs, references, variant):
    """A client-owned LoRA on the family's own Linear names: two spans' output and the adapter's
    gradients equal transformers' whole model with the same deltas added by forward hooks."""
    from swarm_node.model.client_lora import ClientLora
    from swarm_node.model.lora import config_linear_shapes

    ref = references[variant]
    family = family_for(ref.config)
    lora = ClientLora(
        shapes=config_linear_shapes(ref.config),
        blocks=range(4),
        targets=LORA_TARGETS[variant],
        rank=4,
        alpha=8.0,
    )
    with torch.no_grad():
        for b in lora.b.values():
            b.normal_(std=0.05)  # trained-looking, not zeros
    weights = lora.weights()
    head, spans = _chain(variant_dirs[variant], [(0, 2), (2, 4)])
    hidden = head.embed(PROMPT)
    for span in spans:
        hidden = span(hidden, lora=weights.for_blocks(span.start, span.end))
    hidden.square().mean().backward()
    got = {k: p.grad.clone() for k, p in lora.named_parameters()}
    lora.zero_grad()

    hooks = []
    for block, modules in weights.modules.items():
        layer = ref.get_submodule(family.layers)[block]
        for name, mod in modules.items():
            hooks.append(
                layer.get_submodule(name).register_forward_hook(
                    lambda m, args, out, mod=mod: out + (args[0] @ mod.a.T @ mod.b.T) * mod.scale
                )
            )
    try:
        ref.requires_grad_(False)
        _, last, _ = _block_io(ref, variant, PROMPT, grad=True)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(hidden, last, rtol=1e-5, atol=1e-5)
    last.square().mean().backward()
    for key, param in lora.named_parameters():
        torch.testing.assert_close(got[key], param.grad, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max() for g in got.values()) > 1e-4


@pytest.mark.parametrize("cap", ["30", -1.0, True])
def test_a_bad_softcap_in_config_is_refused(tmp_path, variant_dirs, cap):
    import json
    import shutil

    folder = shutil.copytree(variant_dirs["gemma2"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["final_logit_softcapping"] = cap
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="'final_logit_softcapping' must be a number > 0 or null"):
        ClientHead.load(Checkpoint.open(folder))
