#!/usr/bin/env python
"""One prepared run on a machine with a CUDA GPU (never needed by the tests; ~5-8 min on an H100).

    python scripts/gpu_check.py                 # Llama-3-8B-shaped, float16, on cuda:0
    python scripts/gpu_check.py --quick         # a 2-layer-deep slice of it: tries the script fast

1. Writes a random-weight checkpoint of Llama-3-8B's shape in float16 (scripts/
   make_shaped_checkpoint.py, random numbers drawn on the GPU) under --workdir, deleted afterwards.
2. Local transformers on the GPU, in a clean process of its own: greedy generation of
   --new-tokens after a --prompt-tokens prompt (tokens/s, time to first token), and a 32-token
   prefill of a batch of 8 (median of 5).
3. The same through the swarm: two `swarm-node serve --device cuda --dtype float16` processes on
   the one GPU (blocks 0:16 and 16:32; the second with --cache-tokens auto: its memory plan is
   reported), a client in this process with its head on the GPU: tokens/s and its ratio to local,
   time to first token, the same prefill, whether the tokens are the local ones.
4. Spans of 2 blocks in float16, int8 and nf4 (bitsandbytes' CUDA kernels): memory per block as
   held and as allocated, cosine of the output against float16's (cosine_vs_unquantized),
   milliseconds per decode step.
5. Codecs on the GPU: the blockwise8 torch path gives the host's bytes; bitsandbytes' CUDA
   quantize/dequantize_blockwise read ours and we read theirs.

Writes one JSON file under docs/ (gpu_check_<date>_<device>.json, --out to choose) naming the
device, and prints it as one line. Exits with a clear message when torch sees no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
CLI = str(Path(sys.executable).with_name("swarm-node"))
QUICK = dict(num_hidden_layers=4, vocab_size=32768)  # the 8B's layers, 4 of them
# --smoke: a tiny model of the same family, to try the whole script on a CPU (--device cpu)
SMOKE = dict(
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=896,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=4096,
)
DEVICE = "cuda"  # --device
DTYPE_NAME = "float16"
DTYPE = None  # torch.float16 (float32 on a CPU), set by main


def fail(message: str) -> None:
    print(f"gpu_check.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_bytes() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def allocated_bytes() -> int:
    import torch

    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


# -- 2. local transformers, in its own process ---------------------------------------------------
def local_worker(folder: str, prompt_tokens: int, new_tokens: int) -> dict:
    import torch
    from bench_processes import TokenClock
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE, device_map=DEVICE).eval()
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), device=DEVICE)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up
    clock = TokenClock()
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, streamer=clock, **kwargs)
    sync()
    total = time.perf_counter() - t0
    ttft = clock.times[0] - t0
    steady = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    batch = torch.randint(0, vocab, (8, 32), device=DEVICE)
    times = []
    with torch.inference_mode():
        for _ in range(6):
            sync()
            t1 = time.perf_counter()
            model(batch)
            sync()
            times.append(time.perf_counter() - t1)
    return {
        "tokens": out[0, prompt_tokens:].tolist(),
        "tokens_per_second": round(steady, 2),
        "time_to_first_token_s": round(ttft, 4),
        "total_s": round(total, 3),
        "prefill_8x32_s": round(statistics.median(times[1:]), 4),
        "peak_gpu_bytes": peak_bytes(),
    }


def run_local(folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", str(folder), "--device", DEVICE]
    command += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- 3. the swarm ---------------------------------------------------------------------------------
def start_server(folder: Path, blocks: str, initial: str, log: Path, extra: list[str]) -> tuple:
    command = [CLI, "-v", "serve", "--model", str(folder), "--blocks", blocks]
    command += ["--device", DEVICE, "--dtype", DTYPE_NAME, "--throughput", "100"]
    command += ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-verify-weights", *extra]
    if initial:
        command += ["--initial-peers", initial]
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
    addr = proc.stdout.readline().strip() if proc.stdout else ""
    if not addr:
        proc.kill()
        raise SystemExit(f"server {blocks} did not start:\n{log.read_text()[-3000:]}")
    return proc, addr


def server_lines(log: Path) -> list[str]:
    wanted = re.compile(r"memory plan|loaded blocks|serving blocks")
    return [line.split(": ", 1)[-1] for line in log.read_text().splitlines() if wanted.search(line)]


async def swarm_client(folder: Path, addr: str, args: argparse.Namespace) -> dict:
    import torch
    import trio

    from swarm_node.model import Checkpoint, ClientHead, model_id_of
    from swarm_node.node.client.generation import SamplingConfig, generate_tokens
    from swarm_node.node.client.settings import SessionSettings
    from swarm_node.node.config import PeerConfig
    from swarm_node.node.peer import open_peer

    checkpoint = Checkpoint.open(folder)
    blocks = checkpoint.num_blocks
    head = ClientHead.load(checkpoint, dtype=DTYPE, device=DEVICE)
    config = PeerConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(addr,))
    torch.manual_seed(0)
    ids = torch.randint(0, head.vocab_size, (1, args.prompt_tokens))
    batch = torch.randint(0, head.vocab_size, (8, 32))
    async with open_peer(config) as peer:
        identity = await peer.pin_model(str(folder))
        model = model_id_of(str(folder)) if identity is None else identity.name
        settings = SessionSettings(model=model, num_blocks=blocks, dtype=DTYPE_NAME)
        with trio.fail_after(300):
            await generate_tokens(peer, head, ids, settings, SamplingConfig(max_new_tokens=4))
            out, stats = await generate_tokens(
                peer, head, ids, settings, SamplingConfig(max_new_tokens=args.new_tokens)
            )
            chain = await peer.find_chain(model, blocks)
            prefill = SessionSettings(
                model=model, num_blocks=blocks, dtype=DTYPE_NAME, max_length=64, batch_size=8
            )
            hidden = head.embed(batch)  # (8, 32, H) on the GPU
            times = []
            for _ in range(5):  # a fresh session each time: its opening is not timed
                async with peer.inference_session(chain, prefill) as session:
                    t0 = time.perf_counter()
                    await session.step(hidden)
                    times.append(time.perf_counter() - t0)
    return {
        "tokens": out[0, args.prompt_tokens :].tolist(),
        "tokens_per_second": round(stats.tokens_per_second, 2),
        "time_to_first_token_s": round(stats.time_to_first_token, 4),
        "total_s": round(stats.total_time, 3),
        "prefill_8x32_s": round(statistics.median(times[1:] or times), 4),
        "chain": [f"{h.start}:{h.end}" for h in stats.chain],
    }


def run_swarm(folder: Path, workdir: Path, args: argparse.Namespace) -> dict:
    import trio

    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    half = blocks // 2
    logs = [workdir / "server-a.log", workdir / "server-b.log"]
    procs = []
    try:
        a, addr = start_server(folder, f"0:{half}", "", logs[0], [])
        procs.append(a)
        b, _ = start_server(folder, f"{half}:{blocks}", addr, logs[1], ["--cache-tokens", "auto"])
        procs.append(b)
        result = trio.run(swarm_client, folder, addr, args)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    result["servers"] = {f"{log.stem}": server_lines(log) for log in logs}
    return result


# -- 4. quantized spans -----------------------------------------------------------------------------
def span_checks(folder: Path) -> dict:
    import torch

    from swarm_node.model import BlockSpan, Checkpoint

    torch.manual_seed(1)
    checkpoint = Checkpoint.open(folder)
    x = torch.randn(1, 32, checkpoint.config.hidden_size, device=DEVICE) * 0.5
    results: dict = {}
    reference = None
    for quant in (None, "int8", "nf4"):
        name = quant or DTYPE_NAME
        try:
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            before = allocated_bytes()
            span = BlockSpan.load(checkpoint, 0, 2, dtype=DTYPE, quant=quant, device=DEVICE)
            allocated = allocated_bytes() - before
            cache = span.new_cache(64)
            with torch.inference_mode():
                out = span(x, cache).float()
                sync()
                t0 = time.perf_counter()
                for i in range(16):
                    span(x[:, i : i + 1], cache)
                sync()
            if reference is None:
                reference = out
            cos = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
            results[name] = {
                "bytes_per_block": span.memory_bytes() // 2,
                "allocated_per_block": allocated // 2,
                "cosine_vs_unquantized": round(float(cos), 6),
                "ms_per_decode_step": round((time.perf_counter() - t0) / 16 * 1e3, 3),
            }
            del span, cache
        except Exception as exc:  # noqa: BLE001 (report what failed, keep checking the rest)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return results


# -- 5. codecs on the GPU ----------------------------------------------------------------------------
def codec_checks() -> dict:
    import bitsandbytes.functional as F
    import torch

    from swarm_node.compression import blockwise8, codecs, decode, encode
    from swarm_node.protocol import WireTensor

    torch.manual_seed(0)
    x = torch.randn(1, 2048, 4096, device=DEVICE)
    x[..., :4] *= 60  # outlier channels
    out: dict = {}
    for codec, block in (("blockwise8", 4096), ("blockwise8-64", 64)):
        on_gpu = bytes(blockwise8.encode_payload_torch(x, block).cpu().numpy())
        wire = encode(x.cpu(), codec)
        codes, state = F.quantize_blockwise(x, blocksize=block)
        theirs = F.dequantize_blockwise(codes, state)
        payload = state.absmax.float().cpu().numpy().astype("<f4").tobytes()
        payload += codes.cpu().numpy().tobytes()
        ours_of_theirs = decode(
            WireTensor(codec, "float32", tuple(x.shape), payload), max_numel=x.numel()
        )
        blocks = -(-x.numel() // block)
        data = bytes(wire.data)
        absmax = torch.frombuffer(bytearray(data[: 4 * blocks]), dtype=torch.float32).to(DEVICE)
        our_codes = torch.frombuffer(bytearray(data[4 * blocks :]), dtype=torch.uint8).to(DEVICE)
        theirs_of_ours = F.dequantize_blockwise(our_codes, absmax=absmax, blocksize=block)
        out[codec] = {
            "gpu_path_gives_host_bytes": on_gpu == data,
            "encode_of_a_gpu_tensor_gives_host_bytes": bytes(encode(x, codec).data) == data,
            "we_decode_cuda_output_exactly": bool(torch.equal(ours_of_theirs, theirs.cpu())),
            "cuda_decodes_ours_exactly": bool(
                torch.equal(
                    theirs_of_ours.reshape(x.shape).cpu(), decode(wire, max_numel=x.numel())
                )
            ),
            "code_agreement_with_cuda_encoder": round(
                float((our_codes == codes.flatten()).float().mean()), 5
            ),
        }
    for codec in ("none", "float16", "bfloat16"):
        out[codec] = {
            "encode_of_a_gpu_tensor_gives_host_bytes": bytes(encode(x, codec).data)
            == bytes(codecs.encode(x.cpu(), codec).data)
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 blocks of the 8B shape, 32k vocab")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--keep", action="store_true", help="keep the checkpoint written")
    p.add_argument(
        "--out", type=Path, help="the JSON file (default docs/gpu_check_<date>_<gpu>.json)"
    )
    p.add_argument("--device", default="cuda", help="cuda (cpu: only to try the script, --smoke)")
    p.add_argument("--smoke", action="store_true", help="a tiny model: try the script on a CPU")
    p.add_argument("--worker", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    global DEVICE, DTYPE, DTYPE_NAME
    DEVICE = args.device
    DTYPE_NAME = "float16" if DEVICE == "cuda" else "float32"
    DTYPE = getattr(torch, DTYPE_NAME)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        fail(
            f"needs a CUDA device, and torch {torch.__version__} (built with CUDA "
            f"{torch.version.cuda or 'none'}) sees none; nothing was measured"
        )
    if args.worker:
        print(json.dumps(local_worker(args.worker, args.prompt_tokens, args.new_tokens)))
        return
    import bitsandbytes
    from make_shaped_checkpoint import shaped_config, write_checkpoint

    started = time.perf_counter()
    cuda = DEVICE == "cuda"
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu (a smoke run of the script)"
    report: dict = {
        "device": gpu,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bitsandbytes": bitsandbytes.__version__,
        "date": date.today().isoformat(),
        "shape": "llama-3-8b"
        + (" (4 blocks, 32k vocab: --quick)" if args.quick else "")
        + (" (--smoke: hidden 256, 4 blocks)" if args.smoke else ""),
        "dtype": DTYPE_NAME,
    }
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.workdir))
    os.environ["SWARM_CACHE_DIR"] = str(workdir / "cache")  # servers and client share digests
    folder = workdir / "llama-3-8b-shaped"
    try:
        shape = SMOKE if args.smoke else QUICK if args.quick else {}
        config = shaped_config("llama-3-8b", **shape)
        report["checkpoint"] = write_checkpoint(folder, config, dtype=DTYPE, device=DEVICE)
        from swarm_node.model import identity_of

        t0 = time.perf_counter()
        identity_of(str(folder))  # the digests once, for every process
        report["identity_s"] = round(time.perf_counter() - t0, 1)
        report["local"] = run_local(folder, args)
        report["swarm"] = run_swarm(folder, workdir, args)
        local, swarm = report["local"], report["swarm"]
        if "error" not in local:
            report["swarm_over_local_tokens_per_second"] = round(
                swarm["tokens_per_second"] / local["tokens_per_second"], 4
            )
            report["same_tokens"] = swarm["tokens"] == local["tokens"]
        report["spans"] = span_checks(folder)
        report["codecs"] = codec_checks()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = args.out or ROOT / "docs" / f"gpu_check_{report['date']}_{slug}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
