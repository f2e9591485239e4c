"""int8 / nf4 span weights (bitsandbytes on CPU): close to float32, smaller, and loaded lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from swarm_node.errors import ConfigError
from swarm_node.model import BlockSpan, Checkpoint
from tests.model_fixtures import make_tiny_model_dir

# Measured on this tiny llama (init 0.05, 4 blocks): cosine int8 0.999998, nf4 0.99959; error of
# the span's update (out - in) relative to float32's update: int8 ~1.0%, nf4 ~13.5%.
LIMITS = {"int8": (0.99999, 0.03, 0.30), "nf4": (0.999, 0.25, 0.20)}  # cosine, update err, memory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_model_dir(
        tmp_path_factory.mktemp("tiny"), num_layers=4, initializer_range=0.05
    )
    return Checkpoint.open(path)


@pytest.fixture(scope="module")
def hidden():
    return torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))  # (B, T, H)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_span_is_close_to_float32_and_smaller(checkpoint, hidden, quant):
    reference = BlockSpan.load(checkpoint, 0, 4)
    span = BlockSpan.load(checkpoint, 0, 4, quant=quant)
    expected, out = reference(hidden), span(hidden)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), expected.flatten(), dim=0)
    update_err = (out - expected).norm() / (expected - hidden).norm()
    min_cosine, max_update_err, max_memory = LIMITS[quant]
    assert cosine > min_cosine, f"{quant}: cosine {float(cosine):.6f}"
    assert update_err < max_update_err, f"{quant}: update error {float(update_err):.4f}"
    assert span.quant == quant and quant in repr(span)
    assert span.memory_bytes() < max_memory * reference.memory_bytes()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_span_with_cache_matches_its_own_full_forward(checkpoint, hidden, quant):
    span = BlockSpan.load(checkpoint, 1, 3, quant=quant)
    full = span(hidden)
    cache = span.new_cache(16, batch_size=2)
    steps = [span(hidden[:, :4], cache), span(hidden[:, 4:5], cache), span(hidden[:, 5:], cache)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_nf4_span_computes_exactly_the_float_span_with_dequantized_weights(checkpoint, hidden):
    import bitsandbytes.functional as functional

    span = BlockSpan.load(checkpoint, 0, 2, quant="nf4")
    emulated = BlockSpan.load(checkpoint, 0, 2)
    for (_, module), (_, float_module) in zip(
        span.named_modules(), emulated.named_modules(), strict=True
    ):
        if type(module).__name__ == "Linear4bit":
            weight = functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            float_module.weight.data = weight.reshape(float_module.weight.shape)
    assert torch.equal(span(hidden), emulated(hidden))


def test_float_span_memory_counts_its_weights(checkpoint):
    span = BlockSpan.load(checkpoint, 0, 2)
    expected = sum(p.numel() * 4 for p in span.layers.parameters())
    assert span.memory_bytes() == expected


@pytest.mark.parametrize("quant", ["int4", "fp8", "", 8])
def test_unknown_quant_modes_are_config_errors(checkpoint, quant):
    with pytest.raises(ConfigError, match="'quant' must be one of"):
        BlockSpan.load(checkpoint, 0, 1, quant=quant)


def test_float_span_does_not_import_bitsandbytes(checkpoint):
    code = (
        "import sys\n"
        "from swarm_node.model import BlockSpan, Checkpoint\n"
        f"BlockSpan.load(Checkpoint.open({str(checkpoint.path)!r}), 0, 1)\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
