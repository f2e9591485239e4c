#!/usr/bin/env python
"""The honest distances behind node/client/tolerances.py's table: how far two honest servers'
answers to the same hop input lie apart, for each pair of weight kinds and for each codec.

For every kind (float32, bfloat16 weights, int8 and nf4 weights) it loads both halves of the model
as a server would and runs the same random prompts through each half three ways a server may:
step by step with a KV cache (a decode), batched with another session's step (the server's
batcher) and as one prefill (a checker's catch-up). For a pair of kinds the distance is the
largest relative L2 distance (tolerances.position_errors) between any way of the one and any way
of the other, over every position; each codec's is that between an answer and its decode(encode()).
Prints the table as Python (paste into tolerances.py) and one JSON line.

    PYTHONPATH=. .venv/bin/python scripts/calibrate_verify.py [--model tiny|smollm2-135m|PATH]
        [--runs 8] [--tokens 24] [--kinds float32,bfloat16,int8,nf4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm_node import compression  # noqa: E402
from swarm_node.choices import CODECS  # noqa: E402
from swarm_node.model import BlockSpan, Checkpoint, ClientHead, resolve_model  # noqa: E402
from swarm_node.node.client.tolerances import position_errors  # noqa: E402

KINDS = ("float32", "bfloat16", "int8", "nf4")


def model_path(name: str) -> Path:
    if name == "tiny":
        from tests.model_fixtures import make_tiny_model_dir

        return make_tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny-llama", num_layers=6)
    return resolve_model(name)


def load(checkpoint: Checkpoint, start: int, end: int, kind: str) -> BlockSpan:
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    quant = kind if kind in ("int8", "nf4") else None
    return BlockSpan.load(checkpoint, start, end, dtype=dtype, quant=quant)


@torch.inference_mode()
def three_ways(span: BlockSpan, hidden: torch.Tensor, other: torch.Tensor) -> list[torch.Tensor]:
    """``hidden`` ``# (1, T, H)`` through ``span``: step by step, batched beside ``other``'s
    steps, and as one prefill; each ``# (1, T, H)`` in float32."""
    tokens = hidden.shape[1]
    cache, side, own = (span.new_cache(tokens) for _ in range(3))
    steps = [span.forward(hidden[:, t : t + 1], cache) for t in range(tokens)]
    batched = [
        span.forward_batch([hidden[:, t : t + 1], other[:, t : t + 1]], [own, side])[0]
        for t in range(tokens)
    ]
    prefill = span.forward(hidden, span.new_cache(tokens))
    return [torch.cat(steps, 1).float(), torch.cat(batched, 1).float(), prefill.float()]


def calibrate(path: Path, runs: int, tokens: int, kinds: tuple[str, ...]) -> dict:
    checkpoint = Checkpoint.open(path)
    head = ClientHead.load(checkpoint)
    blocks = checkpoint.num_blocks
    halves = [(0, blocks // 2), (blocks // 2, blocks)]
    torch.manual_seed(0)
    vocab = int(checkpoint.config.vocab_size)
    prompts = [torch.randint(0, vocab, (1, tokens)) for _ in range(runs)]
    others = [torch.randint(0, vocab, (1, tokens)) for _ in range(runs)]
    exact = [load(checkpoint, s, e, "float32") for s, e in halves]
    ways: dict[str, list[list[torch.Tensor]]] = {}  # kind -> [run x half] -> 3 answers
    inputs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for prompt, other in zip(prompts, others, strict=True):
        x, y = head.embed(prompt), head.embed(other)  # (1, T, H)
        per_half = []
        for span in exact:  # the second half's input: the honest first half's answer
            per_half.append((x, y))
            with torch.inference_mode():
                x, y = span.forward(x), span.forward(y)
        inputs.append(per_half)
    for kind in kinds:
        spans = [load(checkpoint, s, e, kind) for s, e in halves]
        ways[kind] = [
            three_ways(span, *inputs[r][h]) for r in range(runs) for h, span in enumerate(spans)
        ]
    weights: dict[str, float] = {}
    for a, b in itertools.combinations_with_replacement(kinds, 2):
        worst = 0.0
        for ours, theirs in zip(ways[a], ways[b], strict=True):
            for u, v in itertools.product(ours, theirs):
                worst = max(worst, float(position_errors(u, v).max()))
        weights[",".join(sorted((a, b)))] = worst
    codecs: dict[str, float] = {}
    for codec in CODECS:
        worst = 0.0
        for answers in ways[kinds[0]]:
            out = answers[0]
            back = compression.decode(compression.encode(out, codec), max_numel=out.numel())
            worst = max(worst, float(position_errors(back, out).max()))
        codecs[codec] = worst
    return {
        "model": str(path.name),
        "runs": runs,
        "tokens": tokens,
        "weights": weights,
        "codecs": codecs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    kinds = tuple(args.kinds.split(","))
    result = calibrate(model_path(args.model), args.runs, args.tokens, kinds)
    print("WEIGHTS_MEASURED = {")
    for pair, worst in result["weights"].items():
        print(f"    {tuple(pair.split(','))!r}: {worst:.1e},")
    print("}\nCODEC_MEASURED = {")
    for codec, worst in result["codecs"].items():
        print(f"    {codec!r}: {worst:.1e},")
    print("}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
