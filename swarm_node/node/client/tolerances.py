"""How far two honest servers' answers to the same hop input may lie apart, and how far they do.

Two honest servers differ by float rounding (threads, batch shapes, a prefill against one step at a
time), by the dtype or int8/nf4 weights they hold and by the codec they answer in. The comparison
is per position: the relative L2 distance of the two hidden states, ``|a - b| / max(|a|, |b|)``
over the hidden size, the worst of the batch. A bound is the sum of a weights term (the two
servers' kinds) and a codec term per answer; every term is ``MARGIN`` times the largest honest
distance ``scripts/calibrate_verify.py`` measured for it (the table below is its output).

Pure torch: knows nothing of peers, sessions or records beyond the few names it is given.
"""

from __future__ import annotations

import torch

MARGIN = 4.0  # bound / the largest honest distance measured

# (kind, kind) sorted -> the largest relative distance measured between honest servers answering
# uncompressed; a kind is the dtype of the weights, or their quantization ("int8", "nf4"). Each
# entry is the larger of two runs of scripts/calibrate_verify.py (prefill against step by step,
# batched with another session's step and not, 2026-12-05):
# - `--runs 8 --tokens 24` on the tiny test Llama (6 blocks, hidden 64), every kind;
# - SmolLM2-135M (30 blocks, hidden 576), reduced to fit the time it takes on CPU:
#   `--model smollm2-135m --runs 3 --tokens 16 --kinds float32,bfloat16` (float32/float32
#   6.7e-06, bfloat16/float32 6.7e-02, bfloat16/bfloat16 2.7e-02; codecs: float16 3.2e-04,
#   bfloat16 2.6e-03, blockwise8 8.7e-02, blockwise8-64 1.3e-02), and
#   `--model smollm2-135m --runs 2 --tokens 8 --kinds float32,int8` (float32/int8 6.3e-02,
#   int8/int8 1.4e-06), and
#   `--model smollm2-135m --runs 3 --tokens 16 --kinds float32,nf4` (2026-12-06, ~14 min on CPU:
#   float32/nf4 4.6e-01, nf4/nf4 8.2e-06; a run of 2 x 8 gave 3.5e-01 and 2.1e-06); bfloat16/nf4
#   and int8/nf4 are the tiny model's alone.
# nf4 on so narrow a random model keeps little (distance ~1 from float32; 0.46 on SmolLM2): a
# float32 checker of an nf4 server (or the reverse) catches only lies of ~4x that, so like-for-like
# checkers (the verifier prefers them) are what catches small lies there. A session's servers all
# compute in its dtype (a server refuses another), so float32 against bfloat16 arises only across
# sessions.
WEIGHTS_MEASURED: dict[tuple[str, str], float] = {
    ("float32", "float32"): 6.7e-06,
    ("bfloat16", "float32"): 6.7e-02,
    ("float32", "int8"): 1.1e-01,
    ("float32", "nf4"): 1.1e00,
    ("bfloat16", "bfloat16"): 2.7e-02,
    ("bfloat16", "int8"): 1.4e-01,
    ("bfloat16", "nf4"): 1.1e00,
    ("int8", "int8"): 4.1e-06,
    ("int8", "nf4"): 1.1e00,
    ("nf4", "nf4"): 8.2e-06,
}
# codec -> the largest relative distance measured between one honest answer sent in it and the
# same answer uncompressed (the same runs; blockwise8's 4096-value blocks share one scale between
# ~7 of SmolLM2's positions, so a position of small norm beside an outlier loses most: 8.7e-02
# there against 1.8e-02 on the tiny model)
CODEC_MEASURED: dict[str, float] = {
    "none": 0.0,
    "float16": 3.2e-04,
    "bfloat16": 2.6e-03,
    "blockwise8": 8.7e-02,
    "blockwise8-64": 1.4e-02,
}
# rounding elsewhere (bigger models, other kernels, GPUs) may exceed what the tiny model shows
# between like servers: no weights term is below this (a 1% lie stays 100x above it)
FLOOR = 1.0e-4
UNKNOWN = max(WEIGHTS_MEASURED.values())  # a kind the table lacks: the loosest bound


def weights_kind(dtype: str, quant: str) -> str:
    """What decides a server's rounding: its quantization, else its dtype."""
    return quant if quant and quant != "none" else dtype


def bound(kinds: tuple[str, str], codecs: tuple[str, str]) -> float:
    """The largest relative distance two honest answers may show, at any position."""
    pair = (min(kinds), max(kinds))
    weights = max(FLOOR, WEIGHTS_MEASURED.get(pair, UNKNOWN))
    wire = sum(CODEC_MEASURED.get(c, max(CODEC_MEASURED.values())) for c in codecs)
    return MARGIN * (weights + wire)


def position_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two answers ``# (B, T, H)`` -> their relative distance at each position ``# (T,)``."""
    a, b = a.float(), b.float()
    diff = (a - b).norm(dim=-1)  # (B, T)
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-12)
    return (diff / scale).amax(dim=0)
