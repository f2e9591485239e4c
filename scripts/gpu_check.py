#!/usr/bin/env python
"""One-shot check of the CUDA paths of bitsandbytes that swarm-node uses (run where a GPU is).

1. Quantized span weights: a Llama span (SmolLM2-sized layers, random weights) in float16, int8
   (LLM.int8, Linear8bitLt) and nf4 (Linear4bit) on CUDA, quantized by swarm-node's own
   `quantize_linears(..., device=DEVICE)`: output agreement with float32, weight bytes, time per
   decode step.
2. Wire codec: swarm-node's blockwise8 payload against bitsandbytes' CUDA quantize/dequantize_blockwise,
   both directions, with outlier channels.

Prints one JSON line. Needs only torch, transformers, safetensors, msgpack, numpy and bitsandbytes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm_node.compression import decode, encode  # noqa: E402
from swarm_node.model import BlockSpan, Checkpoint  # noqa: E402
from swarm_node.model.quantization import quantize_linears, weight_bytes  # noqa: E402
from swarm_node.protocol import WireTensor  # noqa: E402
from tests.model_fixtures import make_tiny_model_dir  # noqa: E402

LAYERS = 4
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # "cpu" only to try the script itself


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
    )


def run_span(span: BlockSpan, x: torch.Tensor, steps: int = 16) -> tuple[torch.Tensor, float]:
    cache = span.new_cache(64)
    with torch.inference_mode():
        out = span(x, cache)  # prefill
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            span(x[:, i : i + 1], cache)
        sync()
    return out, (time.perf_counter() - t0) / steps


def span_checks(folder: Path, x: torch.Tensor) -> dict:
    ck = Checkpoint.open(folder)
    ref = BlockSpan.load(ck, 0, LAYERS, dtype=torch.float32).to(DEVICE)
    ref_out, ref_t = run_span(ref, x.float())
    results: dict = {
        "float32": {"ms_per_step": round(ref_t * 1e3, 3), "weight_bytes": weight_bytes(ref)}
    }
    for mode in ("float16", "int8", "nf4"):
        try:
            span = BlockSpan.load(ck, 0, LAYERS, dtype=torch.float16)
            if mode != "float16":
                for layer in span.layers:
                    quantize_linears(layer, mode, compute_dtype=torch.float16, device=DEVICE)
            span = span.to(DEVICE)
            out, t = run_span(span, x.half())
            delta_ref, delta = ref_out - x.float(), out.float() - x.float()
            results[mode] = {
                "cosine_vs_float32": round(cosine(out, ref_out), 6),
                "update_rel_error": round(float((delta - delta_ref).norm() / delta_ref.norm()), 4),
                "weight_bytes": weight_bytes(span),
                "ms_per_step": round(t * 1e3, 3),
                "weight_classes": sorted(
                    {type(m).__name__ for m in span.modules() if "Linear" in type(m).__name__}
                ),
            }
        except Exception as exc:  # noqa: BLE001 (report what failed, keep checking the rest)
            results[mode] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return results


def codec_checks() -> dict:
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    x = torch.randn(1, 2048, 576, device=DEVICE)
    x[..., :4] *= 60  # outlier channels
    out: dict = {}
    for codec, block in (("blockwise8", 4096), ("blockwise8-64", 64)):
        codes, state = F.quantize_blockwise(x, blocksize=block)
        theirs = F.dequantize_blockwise(codes, state)
        payload = (
            state.absmax.float().cpu().numpy().astype("<f4").tobytes()
            + codes.cpu().numpy().tobytes()
        )
        ours_of_theirs = decode(
            WireTensor(codec, "float32", tuple(x.shape), payload), max_numel=x.numel()
        )
        wire = encode(x.cpu(), codec)
        n_blocks = -(-x.numel() // block)
        data = bytes(wire.data)
        absmax = torch.frombuffer(bytearray(data[: 4 * n_blocks]), dtype=torch.float32).to(DEVICE)
        our_codes = torch.frombuffer(bytearray(data[4 * n_blocks :]), dtype=torch.uint8).to(DEVICE)
        theirs_of_ours = F.dequantize_blockwise(our_codes, absmax=absmax, blocksize=block).reshape(
            x.shape
        )
        ours = decode(wire, max_numel=x.numel())
        normal = (ours.to(DEVICE) - x)[..., 4:].norm() / x[..., 4:].norm()
        code_agree = float((our_codes == codes.flatten()).float().mean())
        out[codec] = {
            "we_decode_cuda_output_exactly": bool(torch.equal(ours_of_theirs, theirs.cpu())),
            "cuda_decodes_ours_exactly": bool(torch.equal(theirs_of_ours.cpu(), ours)),
            "code_agreement_with_cuda_encoder": round(code_agree, 5),
            "normal_channel_rel_error": round(float(normal), 4),
        }
    return out


def main() -> None:
    import bitsandbytes

    report: dict = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
        "bitsandbytes": bitsandbytes.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_model_dir(
            Path(tmp) / "llama-576",
            num_layers=LAYERS,
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            initializer_range=0.02,
        )
        torch.manual_seed(1)
        x = torch.randn(1, 32, 576, device=DEVICE)
        report["span"] = span_checks(folder, x)
    report["codec"] = codec_checks()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
