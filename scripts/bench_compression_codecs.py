"""Our blockwise8 codec vs bitsandbytes' quantize_blockwise / dequantize_blockwise on CPU.

Prints one JSON line: encode and decode MB/s (MB of float32 input) for each shape and block size,
measured interleaved (ours, theirs, ours, ...), the median per-repeat ratio ours/bitsandbytes
(target >= 1.0), and the payload bytes on the wire per generated token and for a 2048-token prefill
(hidden 576) under every codec. Usage: python scripts/bench_compression_codecs.py [--repeats 30]
"""

from __future__ import annotations

import os

# Idle OpenMP threads (bitsandbytes' libgomp pool, torch's) otherwise spin after each call and take
# the 2 cores from whatever runs next, i.e. from the other codec in an interleaved comparison.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from swarm_node.compression import CODECS, decode, encode  # noqa: E402
from swarm_node.compression.blockwise8 import BLOCK_SIZES  # noqa: E402

HIDDEN = 576
SHAPES = {  # a token, a batch of 8 tokens, one streamed prefill chunk, a whole 2048-token prefill
    "token": (1, 1, HIDDEN),
    "token_batch8": (8, 1, HIDDEN),
    "chunk_256": (1, 256, HIDDEN),
    "prefill_2048": (1, 2048, HIDDEN),
}


def _seconds(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def bench_shape(functional, shape: tuple[int, ...], codec: str, repeats: int) -> dict:
    x = torch.randn(shape)
    block = BLOCK_SIZES[codec]
    wire = encode(x, codec)
    codes, state = functional.quantize_blockwise(x, blocksize=block)
    inner = max(3, 200_000 // x.numel())
    jobs = {
        "encode_ours": lambda: encode(x, codec),
        "encode_bnb": lambda: functional.quantize_blockwise(x, blocksize=block),
        "decode_ours": lambda: decode(wire, max_numel=x.numel()),
        "decode_bnb": lambda: functional.dequantize_blockwise(codes, state),
    }
    for fn in jobs.values():  # warm up
        fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            times[name].append(_seconds(fn, inner))
    megabytes = x.numel() * 4 / 1e6
    result: dict = {"codec": codec, "shape": list(shape)}
    for op in ("encode", "decode"):
        ours, theirs = times[f"{op}_ours"], times[f"{op}_bnb"]
        result[f"{op}_MBps_ours"] = round(megabytes / statistics.median(ours), 1)
        result[f"{op}_MBps_bnb"] = round(megabytes / statistics.median(theirs), 1)
        ratios = [t / o for o, t in zip(ours, theirs, strict=True)]  # speed ours / bnb
        result[f"{op}_ratio_ours_over_bnb"] = round(statistics.median(ratios), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps(codec_report(args.repeats)))


def codec_report(repeats: int) -> dict:
    """Speed of our blockwise8 against bitsandbytes and bytes on the wire under every codec."""
    import bitsandbytes.functional as functional

    results = [
        {"case": name, **bench_shape(functional, shape, codec, repeats)}
        for codec in BLOCK_SIZES
        for name, shape in SHAPES.items()
    ]
    args = argparse.Namespace(repeats=repeats)
    wire_bytes = {
        codec: {
            "per_token": encode(torch.randn(SHAPES["token"]), codec).nbytes,
            "prefill_2048": encode(torch.randn(SHAPES["prefill_2048"]), codec).nbytes,
        }
        for codec in CODECS
    }
    line = {
        "bench": "compression_codecs",
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "repeats": args.repeats,
        "results": results,
        "min_ratio": min(
            min(r["encode_ratio_ours_over_bnb"], r["decode_ratio_ours_over_bnb"]) for r in results
        ),
        "wire_bytes": wire_bytes,
    }
    return line


if __name__ == "__main__":
    main()
