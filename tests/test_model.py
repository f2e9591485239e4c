"""model/: spans, caches, client head and sampling against transformers on tiny random models."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from swarm_node.errors import ConfigError, ModelError, SessionError
from swarm_node.model import (
    BlockSpan,
    Checkpoint,
    ClientHead,
    bundled,
    resolve_model,
    sample_next_token,
)
from tests.model_fixtures import TINY_HIDDEN, TINY_VOCAB, make_tiny_model_dir, reference_model

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SPLITS = {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 1), (1, 4), (4, 6)]}
PROMPT = torch.tensor([[5, 77, 13, 200, 42, 9, 128]])  # (1, 7)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {
        family: make_tiny_model_dir(root / family, family, seed=i)
        for i, family in enumerate(FAMILIES)
    }
    dirs["sharded"] = make_tiny_model_dir(root / "sharded", "qwen2", seed=7, sharded=True)
    dirs["tied"] = make_tiny_model_dir(root / "tied", "llama", seed=8, tie=True)
    dirs["sliding"] = make_tiny_model_dir(root / "sliding", "mistral", seed=9, sliding_window=3)
    return dirs


@pytest.fixture(scope="module")
def references(model_dirs):
    return {name: reference_model(path) for name, path in model_dirs.items()}


def load_chain(path: Path, bounds, dtype=torch.float32):
    checkpoint = Checkpoint.open(path)
    spans = [BlockSpan.load(checkpoint, a, b, dtype=dtype) for a, b in bounds]
    return ClientHead.load(checkpoint, dtype=dtype), spans


def greedy_generate(head, spans, prompt, new_tokens, *, chunks=1):
    caches = [span.new_cache(max_length=64, batch_size=prompt.shape[0]) for span in spans]
    ids = prompt
    step_inputs = list(prompt.tensor_split(chunks, dim=1))
    for _ in range(new_tokens):
        for piece in step_inputs:
            hidden = head.embed(piece)
            for span, cache in zip(spans, caches, strict=True):
                hidden = span(hidden, cache)
        token = sample_next_token(head.logits(hidden)[:, -1], temperature=0, top_p=1.0)
        ids = torch.cat([ids, token[:, None]], dim=1)
        step_inputs = [token[:, None]]
    assert all(cache.length == ids.shape[1] - 1 for cache in caches)
    return ids


# --- exactness against transformers ---------------------------------------------------------


@pytest.mark.parametrize("parts", sorted(SPLITS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(model_dirs, references, family, parts):
    head, spans = load_chain(model_dirs[family], SPLITS[parts])
    expected = references[family].generate(PROMPT, do_sample=False, max_new_tokens=8)
    assert greedy_generate(head, spans, PROMPT, 8).tolist() == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_span_outputs_equal_reference_hidden_states(model_dirs, references, family):
    head, spans = load_chain(model_dirs[family], SPLITS[3])
    with torch.no_grad():
        expected = references[family](PROMPT, output_hidden_states=True)
    hidden = head.embed(PROMPT)
    torch.testing.assert_close(hidden, expected.hidden_states[0], atol=1e-5, rtol=0)
    for span in spans:
        cache = span.new_cache(max_length=16)
        hidden = span(hidden, cache)
        if span.end < 6:
            torch.testing.assert_close(hidden, expected.hidden_states[span.end], atol=1e-5, rtol=0)
        else:  # transformers reports the last hidden state after the final norm
            normed = head.norm(hidden)
            torch.testing.assert_close(normed, expected.hidden_states[6], atol=1e-5, rtol=0)
    torch.testing.assert_close(head.logits(hidden), expected.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_prefill_equals_one_step(model_dirs, family):
    head, spans = load_chain(model_dirs[family], SPLITS[2])
    one = greedy_generate(head, spans, PROMPT, 4, chunks=1)
    assert greedy_generate(head, spans, PROMPT, 4, chunks=2).tolist() == one.tolist()
    assert greedy_generate(head, spans, PROMPT, 4, chunks=3).tolist() == one.tolist()
    # hidden states too, not only argmaxes
    span = spans[0]
    whole = span(head.embed(PROMPT), span.new_cache(16))
    cache = span.new_cache(16)
    parts = [span(head.embed(piece), cache) for piece in PROMPT.tensor_split([3, 4], dim=1)]
    # other matmul shapes round differently: float32 noise relative to |h| (up to ~30 here)
    scale = float(whole.abs().max())
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=2e-6 * scale, rtol=0)


def test_cacheless_forward_equals_reference_and_keeps_autograd(model_dirs, references):
    head, spans = load_chain(model_dirs["llama"], SPLITS[2])
    with torch.no_grad():
        expected = references["llama"](PROMPT, output_hidden_states=True)
    hidden = spans[0](head.embed(PROMPT))
    torch.testing.assert_close(hidden, expected.hidden_states[3], atol=1e-5, rtol=0)
    logits = head.logits(spans[1](hidden))
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)

    inputs = head.embed(PROMPT).clone().requires_grad_(True)  # e.g. trainable prompts
    spans[1](spans[0](inputs)).sum().backward()
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in spans[0].parameters())  # server weights stay frozen

    # a trainable part after an inference-mode span (e.g. a client-side adapter) still trains
    spans[1].layers[0].mlp.down_proj.weight.requires_grad_(True)
    frozen_out = spans[0](head.embed(PROMPT))
    assert frozen_out.is_inference()
    spans[1](frozen_out).sum().backward()
    assert spans[1].layers[0].mlp.down_proj.weight.grad is not None


def test_batch_of_two_with_cache_equals_reference(model_dirs, references):
    head, spans = load_chain(model_dirs["qwen3"], SPLITS[2])
    prompt = torch.cat([PROMPT, PROMPT.flip(1)])  # (2, 7)
    expected = references["qwen3"].generate(prompt, do_sample=False, max_new_tokens=5)
    assert greedy_generate(head, spans, prompt, 5).tolist() == expected.tolist()


def test_sliding_window_layers_equal_reference(model_dirs, references):
    head, spans = load_chain(model_dirs["sliding"], SPLITS[2])
    assert spans[0].layer_types == ["sliding_attention"] * 3
    expected = references["sliding"].generate(PROMPT, do_sample=False, max_new_tokens=8)
    assert greedy_generate(head, spans, PROMPT, 8).tolist() == expected.tolist()
    assert greedy_generate(head, spans, PROMPT, 8, chunks=3).tolist() == expected.tolist()


def test_sharded_checkpoint(model_dirs, references):
    assert (model_dirs["sharded"] / "model.safetensors.index.json").is_file()
    head, spans = load_chain(model_dirs["sharded"], SPLITS[3])
    expected = references["sharded"].generate(PROMPT, do_sample=False, max_new_tokens=8)
    assert greedy_generate(head, spans, PROMPT, 8).tolist() == expected.tolist()


def test_tied_embeddings(model_dirs, references):
    checkpoint = Checkpoint.open(model_dirs["tied"])
    assert not checkpoint.has_tensor("lm_head.weight")
    head = ClientHead.load(checkpoint)
    assert head.tied and head.lm_head.weight is head.embed_tokens.weight
    head_, spans = load_chain(model_dirs["tied"], SPLITS[2])
    expected = references["tied"].generate(PROMPT, do_sample=False, max_new_tokens=8)
    assert greedy_generate(head_, spans, PROMPT, 8).tolist() == expected.tolist()


def test_bfloat16_span_close_to_float32(model_dirs, references):
    head, spans = load_chain(model_dirs["llama"], SPLITS[2], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in spans[0].parameters())
    with torch.no_grad():
        expected = references["llama"](PROMPT, output_hidden_states=True)
    cache = spans[0].new_cache(16)
    hidden = spans[0](head.embed(PROMPT), cache)
    assert hidden.dtype == torch.bfloat16
    reference = expected.hidden_states[3]
    assert (hidden.float() - reference).norm() / reference.norm() < 0.05  # measured 0.018
    logits = head.logits(spans[1](hidden, spans[1].new_cache(16))).float()
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), expected.logits.flatten(), 0)
    assert cosine > 0.99
    assert (
        spans[0].cache_bytes_per_token() * 2
        == load_chain(model_dirs["llama"], SPLITS[2])[1][0].cache_bytes_per_token()
    )


# --- what gets read, and how much the cache costs ---------------------------------------------


@pytest.mark.parametrize("name", ["llama", "sharded"])
def test_span_reads_only_its_own_tensors(model_dirs, name):
    checkpoint = Checkpoint.open(model_dirs[name])
    BlockSpan.load(checkpoint, 2, 4)
    read = set(checkpoint.names_read)
    own = ("model.layers.2.", "model.layers.3.")
    assert read == {n for n in checkpoint.tensor_names() if n.startswith(own)}
    assert len(checkpoint.names_read) == len(read)  # each once

    checkpoint.names_read.clear()
    ClientHead.load(checkpoint)
    assert not any(".layers." in n for n in checkpoint.names_read)
    assert "model.embed_tokens.weight" in checkpoint.names_read


def test_load_tensors_by_predicate_and_missing_names(model_dirs):
    checkpoint = Checkpoint.open(model_dirs["sharded"])
    norms = checkpoint.load_tensors(lambda n: n.endswith("input_layernorm.weight"))
    assert len(norms) == 6 and all(t.shape == (TINY_HIDDEN,) for t in norms.values())
    with pytest.raises(ModelError, match="model.layers.99.mlp"):
        checkpoint.load_tensors(["model.layers.99.mlp.weight"])


def test_cache_bytes_per_token_matches_real_cache(model_dirs):
    _, spans = load_chain(model_dirs["qwen2"], SPLITS[2])
    span = spans[1]
    cache = span.new_cache(max_length=16, batch_size=2)
    span(torch.randn(2, 5, TINY_HIDDEN), cache)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.dynamic.layers)
    assert len(cache.dynamic.layers) == 3
    assert held == 5 * span.cache_bytes_per_token(batch_size=2)


# --- bad inputs ---------------------------------------------------------------------------------


def test_missing_folder_config_and_weights(tmp_path, model_dirs):
    with pytest.raises(ModelError, match="must be an existing directory"):
        Checkpoint.open(tmp_path / "nope")
    with pytest.raises(ModelError, match="must hold config.json"):
        Checkpoint.open(tmp_path)
    (tmp_path / "config.json").write_text((model_dirs["llama"] / "config.json").read_text())
    with pytest.raises(ModelError, match=r"must hold model.safetensors or model.safetensors.index"):
        Checkpoint.open(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        Checkpoint.open(tmp_path)


def test_missing_shard(tmp_path, model_dirs):
    import shutil

    folder = shutil.copytree(model_dirs["sharded"], tmp_path / "m")
    (folder / "model-00003-of-00032.safetensors").unlink()
    with pytest.raises(ModelError, match="00003-of-00032.*missing"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("model_type", ["gpt2", "no-such-architecture"])
def test_unsupported_model_type(tmp_path, model_type):
    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    with pytest.raises(ModelError, match="model_type|config.json"):
        Checkpoint.open(tmp_path)
    if model_type == "gpt2":
        supported = r"must be one of \['bloom', 'falcon', 'gemma2', .*'qwen3'\], got 'gpt2'"
        with pytest.raises(ModelError, match=supported):
            Checkpoint.open(tmp_path)


@pytest.mark.parametrize("bounds", [(0, 0), (3, 2), (-1, 2), (4, 7), (6, 7)])
def test_span_out_of_range(model_dirs, bounds):
    checkpoint = Checkpoint.open(model_dirs["llama"])
    with pytest.raises(ConfigError, match=r"the model has 6 blocks"):
        BlockSpan.load(checkpoint, *bounds)


def test_cache_limits_and_misuse(model_dirs):
    _, spans = load_chain(model_dirs["llama"], SPLITS[2])
    span = spans[0]
    cache = span.new_cache(max_length=8)
    span(torch.randn(1, 6, TINY_HIDDEN), cache)
    full = r"'max_length' is 8: it holds 6 positions and cannot take 3"
    with pytest.raises(SessionError, match=full):
        span(torch.randn(1, 3, TINY_HIDDEN), cache)
    assert cache.length == 6  # refused steps leave the cache as it was
    span(torch.randn(1, 2, TINY_HIDDEN), cache)
    assert cache.length == 8
    with pytest.raises(SessionError, match="batch_size"):
        span(torch.randn(2, 1, TINY_HIDDEN), span.new_cache(8))
    with pytest.raises(SessionError, match="cache belongs to blocks 0:3"):
        spans[1](torch.randn(1, 1, TINY_HIDDEN), span.new_cache(8))
    with pytest.raises(ConfigError, match=r"'hidden' must have shape \(B, T, 64\)"):
        span(torch.randn(1, 2, 65))
    with pytest.raises(ConfigError, match="'max_length' must be an int"):
        span.new_cache(0)


def test_client_head_rejects_bad_ids(model_dirs):
    head = ClientHead.load(Checkpoint.open(model_dirs["llama"]))
    with pytest.raises(ConfigError, match=r"'input_ids' must lie in \[0, 256\)"):
        head.embed(torch.tensor([[1, TINY_VOCAB]]))
    with pytest.raises(ConfigError, match="'input_ids' must be a \\(B, T\\) tensor"):
        head.embed(torch.tensor([1, 2]))


# --- sampling -----------------------------------------------------------------------------------


def test_sampling_greedy_seeded_and_top_p():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    greedy = sample_next_token(logits, temperature=0, top_p=1.0)
    assert greedy.tolist() == logits.argmax(-1).tolist()

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return [
            sample_next_token(logits, temperature=1.0, top_p=0.9, generator=gen) for _ in range(5)
        ]

    assert torch.equal(torch.stack(draw(3)), torch.stack(draw(3)))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        picked = sample_next_token(logits, temperature=1.5, top_p=1e-6, generator=gen)
        assert picked.tolist() == logits.argmax(-1).tolist()
    many = torch.stack(
        [sample_next_token(logits, temperature=5.0, top_p=1.0, generator=gen) for _ in range(50)]
    )
    assert len(set(many[:, 0].tolist())) > 5  # it really samples


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {
        int(sample_next_token(logits, temperature=1, top_p=0.8, generator=gen)) for _ in range(200)
    }
    assert seen == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=-1, top_p=1.0), "'temperature' must be a finite number >= 0"),
        (dict(temperature=float("nan"), top_p=1.0), "'temperature'"),
        (dict(temperature=1.0, top_p=0), r"'top_p' must be a number in \(0, 1\]"),
        (dict(temperature=1.0, top_p=1.5), "'top_p'"),
    ],
)
def test_sampling_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        sample_next_token(torch.zeros(1, 4), **kwargs)
    with pytest.raises(ConfigError, match="'logits' must be a non-empty"):
        sample_next_token(torch.zeros(4), temperature=0, top_p=1.0)


# --- bundled models -----------------------------------------------------------------------------


def test_resolve_model_paths_and_unknown_names(tmp_path, model_dirs):
    assert resolve_model(str(model_dirs["llama"])) == model_dirs["llama"]
    with pytest.raises(ModelError, match=r"bundled model name \['gemma3-270m', 'smollm2-135m'\]"):
        resolve_model("gpt-17", cache_dir=tmp_path)
    with pytest.raises(ModelError, match="must hold config.json"):
        resolve_model(str(tmp_path))


def test_bundled_conversion_runs_once_under_a_lock(tmp_path, model_dirs, monkeypatch):
    calls = []

    def fake_convert(source, out, *, desc):
        calls.append(out)
        import shutil
        import time

        time.sleep(0.2)  # widen the race window: both threads must be inside resolve_model
        for item in model_dirs["llama"].iterdir():
            shutil.copy(item, out / item.name)

    monkeypatch.setattr(bundled, "_convert_gguf", fake_convert)
    monkeypatch.setattr(bundled, "gguf_path", lambda model: Path("/fake.gguf"))
    # a half-written leftover (no marker) must be replaced, never used
    (tmp_path / "models" / "smollm2-135m").mkdir(parents=True)
    results = []

    def resolve() -> None:
        results.append(resolve_model("smollm2-135m", cache_dir=tmp_path))

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = tmp_path / "models" / "smollm2-135m"
    assert results == [final] * 3 and len(calls) == 1
    assert bundled.is_complete(final) and Checkpoint.open(final).num_blocks == 6
    left = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert left == [".smollm2-135m.lock", "smollm2-135m"]  # no temp folders


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken_convert(source, out, *, desc):
        (out / "config.json").write_text("{}")
        raise ModelError("disk full")

    monkeypatch.setattr(bundled, "_convert_gguf", broken_convert)
    monkeypatch.setattr(bundled, "gguf_path", lambda model: Path("/fake.gguf"))
    with pytest.raises(ModelError, match="disk full"):
        resolve_model("smollm2-135m", cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m.lock"]
