"""Memory per block and held-out perplexity of SmolLM2-135M: float32 vs int8 vs nf4 block weights.

The client head (embeddings, final norm, LM head) stays float32; only the 30 decoder blocks are
quantized, as a server would hold them. Perplexity is over tests/data/heldout.txt (hand-written
English, ~2.3 KB), one forward pass over the whole text. Prints one JSON line.
Usage: python scripts/bench_weights.py [--model smollm2-135m] [--text tests/data/heldout.txt]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from swarm_node.model import BlockSpan, Checkpoint, ClientHead, load_tokenizer, resolve_model

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "heldout.txt"


def perplexity(head: ClientHead, span: BlockSpan, input_ids: torch.Tensor) -> float:
    with torch.inference_mode():
        hidden = span(head.embed(input_ids))  # (1, T, H)
        logits = head.logits(hidden)[0, :-1].float()  # (T-1, V)
        loss = torch.nn.functional.cross_entropy(logits, input_ids[0, 1:])
    return math.exp(loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args()
    path = resolve_model(args.model)
    checkpoint = Checkpoint.open(path)
    tokenizer = load_tokenizer(path)
    input_ids = torch.tensor([tokenizer(args.text.read_text())["input_ids"]])  # (1, T)
    head = ClientHead.load(checkpoint)
    blocks = checkpoint.num_blocks
    results = {}
    for quant in (None, "int8", "nf4"):
        start = time.perf_counter()
        span = BlockSpan.load(checkpoint, 0, blocks, quant=quant)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        ppl = perplexity(head, span, input_ids)
        forward_s = time.perf_counter() - start
        results[quant or "float32"] = {
            "bytes_per_block": span.memory_bytes() // blocks,
            "perplexity": round(ppl, 4),
            "load_s": round(load_s, 2),
            "forward_s": round(forward_s, 2),
        }
        del span
    base = results["float32"]
    for name in ("int8", "nf4"):
        results[name]["memory_ratio"] = round(
            results[name]["bytes_per_block"] / base["bytes_per_block"], 4
        )
        results[name]["perplexity_ratio"] = round(
            results[name]["perplexity"] / base["perplexity"], 4
        )
    line = {
        "bench": "weights",
        "model": args.model,
        "blocks": blocks,
        "tokens": input_ids.shape[1],
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
