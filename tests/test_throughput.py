"""Measured throughput: once per model, dtype, weights and device, cached as JSON; --throughput wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import trio

from swarm_node.model import BlockSpan, Checkpoint
from swarm_node.node.config import ServerConfig
from swarm_node.node.server.loading import prepare_span
from swarm_node.node.server.throughput import CACHE_FILE, cache_key, span_throughput


def test_measured_once_then_read_from_the_cache(tiny_llama: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_llama)
    span = BlockSpan.load(checkpoint, 0, 2)
    key = cache_key(model="tiny", dtype="float32", quant=None, device="cpu", threads=1)
    first, cached = span_throughput(span, key=key, dtype=torch.float32, cache_dir=tmp_path)
    assert not cached and first > 0
    per_block = json.loads((tmp_path / CACHE_FILE).read_text())[key]
    assert first == pytest.approx(1 / (2 * per_block))
    again, cached = span_throughput(span, key=key, dtype=torch.float32, cache_dir=tmp_path)
    assert cached and again == first
    # another span of the same model: the same per-block rate, scaled to its length
    wider, cached = span_throughput(
        BlockSpan.load(checkpoint, 0, 6), key=key, dtype=torch.float32, cache_dir=tmp_path
    )
    assert cached and wider == pytest.approx(first * 2 / 6)


def test_a_corrupt_cache_is_measured_over(tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / CACHE_FILE).write_text("{not json")
    span = BlockSpan.load(Checkpoint.open(tiny_llama), 0, 1)
    value, cached = span_throughput(span, key="k", dtype=torch.float32, cache_dir=tmp_path)
    assert not cached and value > 0
    assert set(json.loads((tmp_path / CACHE_FILE).read_text())) == {"k"}


async def test_server_start_uses_the_cache_dir_and_the_override(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    with trio.fail_after(60):
        _, measured, _ = await prepare_span(ServerConfig(model=str(tiny_llama), start=0, end=3))
        (key,) = json.loads((tmp_path / CACHE_FILE).read_text())
        assert key.startswith(f"{tiny_llama.name}|float32|none|cpu|threads=")
        _, again, _ = await prepare_span(ServerConfig(model=str(tiny_llama), start=0, end=3))
        assert again == measured
        _, given, _ = await prepare_span(
            ServerConfig(model=str(tiny_llama), start=0, end=3, throughput=7.5)
        )
    assert given == 7.5
