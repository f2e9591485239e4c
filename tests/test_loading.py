"""Checkpoints of a real model's shape: written tensor by tensor, read by span, within the span's memory.

The shaped checkpoint here has Llama-3-8B's proportions scaled down to fit CI (hidden 1024,
intermediate 3584, GQA 16/4 heads, vocab 16384, 8 blocks of ~27 MB in float16, ~285 MB in three
100 MB shards); `scripts/bench_load.py` runs the same measurement on the full 8B shape.
"""

from __future__ import annotations

import gc
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarm_node.errors import ModelError
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.model.tensor_files import read_header, read_tensor

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["--layers", "8", "--hidden", "1024", "--intermediate", "3584", "--heads", "16"]
SHAPE += ["--kv-heads", "4", "--vocab", "16384", "--shard-mb", "100"]
# what loading may take beyond 1.3x the span's bytes: torch's allocator arenas, the rotary
# embedding, a layer's Python objects (measured: ~0 to 4 MiB on top of 1.00-1.03x)
RSS_CONSTANT = 32 * 2**20


def run_script(*args: str, timeout: float = 240) -> dict:
    out = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shaped") / "llama-3-8b-small"
    script = str(ROOT / "scripts" / "make_shaped_checkpoint.py")
    summary = run_script(script, "--shape", "llama-3-8b", "--out", str(folder), *SHAPE)
    assert summary["shards"] == 3 and summary["blocks"] == 8
    return folder


def test_shaped_checkpoint_is_sharded_like_the_hubs_and_readable_by_safetensors(
    shaped: Path,
) -> None:
    from safetensors import safe_open

    index = json.loads((shaped / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    config = json.loads((shaped / "config.json").read_text())
    assert (config["hidden_size"], config["num_key_value_heads"]) == (1024, 4)
    assert (config["intermediate_size"], config["vocab_size"]) == (3584, 16384)
    total = 0
    checkpoint = Checkpoint.open(shaped)
    for shard in shards:
        ours = read_header(shaped / shard)
        with safe_open(str(shaped / shard), framework="pt") as f, open(shaped / shard, "rb") as g:
            assert sorted(f.keys()) == sorted(ours)
            for name in list(ours)[:6]:  # the official reader agrees, byte for byte
                assert torch.equal(f.get_tensor(name), read_tensor(g, ours[name]))
        total += sum(e.nbytes for e in ours.values())
    assert total == index["metadata"]["total_size"]
    assert checkpoint.num_blocks == 8 and checkpoint.has_tensor("lm_head.weight")
    q = checkpoint.load_tensors(["model.layers.3.self_attn.q_proj.weight"])
    weights = next(iter(q.values())).float()
    assert weights.shape == (1024, 1024) and abs(weights.std().item() - 0.02) < 0.002
    norm = checkpoint.load_tensors(["model.layers.3.input_layernorm.weight"])
    assert torch.equal(next(iter(norm.values())), torch.ones(1024, dtype=torch.float16))


def test_four_of_eight_blocks_load_within_their_own_memory(shaped: Path) -> None:
    """A fresh process loads blocks 2:6: its resident memory grows by at most 1.3x the span's
    bytes plus RSS_CONSTANT, and it reads those blocks' tensors only (from two of three shards)."""
    row = run_script(str(ROOT / "scripts" / "bench_load.py"), "--child", str(shaped), "2", "6")
    layer_bytes = 2 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 3584 + 2 * 1024)
    assert row["span_bytes"] == 4 * layer_bytes
    grew = row["peak_rss"] - row["rss_before"]
    assert grew <= 1.3 * row["span_bytes"] + RSS_CONSTANT, row
    assert row["only_span_tensors"] and row["tensors_read"] == 4 * 9
    assert len(row["shards_touched"]) == 2


def test_a_memory_mapped_span_copies_nothing_and_computes_the_same(shaped: Path) -> None:
    """--mmap-weights: blocks 2:6 as views of a map of the files. A fresh process grows by a small
    part of the span's bytes at load; once a forward touched every weight they are the file's
    pages (shared with the page cache), not the process's own memory. In this process the mapped
    span computes bit for bit what a span that read its weights computes, after its checkpoint
    object is gone (the tensors keep the map alive)."""
    script = str(ROOT / "scripts" / "bench_load.py")
    row = run_script(script, "--child", str(shaped), "2", "6", "--modes", "mmap")
    assert row["mode"] == "mmap" and row["tensors_mapped"] == row["tensors_read"] == 4 * 9
    assert row["peak_rss"] - row["rss_before"] <= 0.1 * row["span_bytes"] + RSS_CONSTANT, row
    assert row["anon_after_forward_over_span_bytes"] < 0.1, row
    assert row["file_after_forward_over_span_bytes"] > 0.9, row
    read = BlockSpan.load(Checkpoint.open(shaped), 2, 4, dtype=torch.float16)
    mapped_checkpoint = Checkpoint.open(shaped, memory_map=True)
    mapped = BlockSpan.load(mapped_checkpoint, 2, 4, dtype=torch.float16)
    assert len(mapped_checkpoint.names_mapped) == 2 * 9
    del mapped_checkpoint
    gc.collect()
    x = torch.randn(1, 5, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(mapped(x), read(x))
    as_float32 = Checkpoint.open(shaped, memory_map=True)  # another dtype: read and cast
    BlockSpan.load(as_float32, 2, 3, dtype=torch.float32)
    assert as_float32.names_mapped == []


def test_a_span_reads_only_its_blocks_and_the_client_only_its_head(shaped: Path) -> None:
    checkpoint = Checkpoint.open(shaped)
    span = BlockSpan.load(checkpoint, 6, 8, dtype=torch.float16, device="cpu")
    assert {n.split(".")[2] for n in checkpoint.names_read} == {"6", "7"}
    assert span.device == torch.device("cpu")
    out = span(torch.randn(1, 3, 1024, dtype=torch.float16), span.new_cache(8))
    assert out.shape == (1, 3, 1024) and bool(torch.isfinite(out).all())
    checkpoint = Checkpoint.open(shaped)
    head = ClientHead.load(checkpoint, dtype=torch.float16, device="cpu")
    assert sorted(checkpoint.names_read) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]
    assert head.device == torch.device("cpu")


def _write(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("entry", "data", "message"),
    [
        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, bytes(8), "'dtype' must be one of"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}, bytes(8), "inside the file"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, bytes(8), "needs 12 bytes"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}, bytes(8), "list of ints"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [4, 2]}, bytes(8), "inside the file"),
    ],
)
def test_a_lying_safetensors_header_is_refused(
    tmp_path: Path, entry: dict, data: bytes, message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        read_header(_write(tmp_path / "x.safetensors", {"w": entry}, data))


def test_a_header_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ModelError, match="header length must be at most"):
        read_header(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_plain_reads_give_what_safetensors_wrote(tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    tensors = {
        "a": (torch.randn(5, 7) * 100).to(dtype),
        "b": torch.zeros(0, 3, dtype=dtype),
        "c": torch.arange(11).to(dtype),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    entries = read_header(tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "rb") as f:
        for name, tensor in tensors.items():
            got = read_tensor(f, entries[name])
            assert got.dtype == dtype and torch.equal(got, tensor)
            assert entries[name].nbytes == math.prod(tensor.shape) * dtype.itemsize
