"""The parts of scripts/gpu_check.py, each run by it in a process of its own (under a timeout):
``run_part(name, ctx)`` -> the part's JSON-able result. On a CPU every part runs (a dry run of the
script on a tiny model); what only CUDA can measure says ``SKIPPED``.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CLI = str(Path(sys.executable).with_name("swarm-node"))
SKIPPED = "skipped: no CUDA"
FOLDER_NAME = "llama-3-8b-shaped"


@dataclass(frozen=True, kw_only=True)
class Context:
    device: str  # "cuda" or "cpu"
    workdir: Path  # the checkpoint and the servers' logs
    shape: dict  # overrides of the llama-3-8b shape ({}: the real one)
    prompt_tokens: int
    new_tokens: int

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def dtype_name(self) -> str:
        return "float16" if self.cuda else "float32"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)

    @property
    def folder(self) -> Path:
        return self.workdir / FOLDER_NAME

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def prompt_ids(vocab: int, batch: int, tokens: int) -> torch.Tensor:
    """The same ids in every process whatever the device (drawn by the CPU's generator)."""
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))


# -- the checkpoint, and what the device is ------------------------------------------------------
def checkpoint(ctx: Context) -> dict:
    from make_shaped_checkpoint import shaped_config, write_checkpoint

    from swarm_node.model import identity_of

    info: dict[str, Any] = {"name": "cpu", "memory_bytes": SKIPPED, "free_bytes": SKIPPED}
    if ctx.cuda:
        free, total = torch.cuda.mem_get_info(0)
        info = {"name": torch.cuda.get_device_name(0), "memory_bytes": total, "free_bytes": free}
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    config = shaped_config("llama-3-8b", **ctx.shape)
    written = write_checkpoint(ctx.folder, config, dtype=ctx.dtype, device=ctx.device)
    t0 = time.perf_counter()
    identity_of(str(ctx.folder))  # the digests once, cached for every process after
    return {"device": info, "checkpoint": written, "identity_s": round(time.perf_counter() - t0, 1)}


# -- local transformers ----------------------------------------------------------------------------
def local(ctx: Context) -> dict:
    from bench_processes import TokenClock
    from transformers import AutoModelForCausalLM

    device = ctx.device
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ctx.folder, dtype=ctx.dtype, device_map=device)
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    ids = prompt_ids(vocab, 1, ctx.prompt_tokens).to(device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, **kwargs)  # warm-up
    clock = TokenClock()
    ctx.sync()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=ctx.new_tokens, streamer=clock, **kwargs)
    ctx.sync()
    total = time.perf_counter() - t0
    batch = prompt_ids(vocab, 8, 32).to(device)
    times = []
    with torch.inference_mode():
        for _ in range(6):
            ctx.sync()
            t1 = time.perf_counter()
            model(batch, use_cache=False)
            ctx.sync()
            times.append(time.perf_counter() - t1)
    return {
        "tokens": out[0, ctx.prompt_tokens :].tolist(),
        "tokens_per_second": round((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]), 2),
        "time_to_first_token_s": round(clock.times[0] - t0, 4),
        "total_s": round(total, 3),
        "load_s": round(load_s, 1),
        "prefill_8x32_s": round(statistics.median(times[1:]), 4),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if ctx.cuda else SKIPPED,
    }


# -- two servers on the one device, the client's head on it too ------------------------------------
def start_server(ctx: Context, blocks: str, initial: str, log: Path, extra: list[str]) -> tuple:
    command = [CLI, "-v", "serve", "--model", str(ctx.folder), "--blocks", blocks]
    command += ["--device", ctx.device, "--dtype", ctx.dtype_name, "--throughput", "100"]
    command += ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-verify-weights", *extra]
    if initial:
        command += ["--initial-peers", initial]
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
    addr = proc.stdout.readline().strip() if proc.stdout else ""  # the part's timeout bounds it
    if not addr:
        proc.kill()
        raise RuntimeError(f"server {blocks} did not start:\n{log.read_text()[-3000:]}")
    return proc, addr


def server_lines(log: Path) -> list[str]:
    wanted = re.compile(r"memory plan|loaded blocks|serving blocks|out of memory|Traceback")
    return [line.split(": ", 1)[-1] for line in log.read_text().splitlines() if wanted.search(line)]


async def swarm_client(ctx: Context, addr: str) -> dict:
    import trio

    from swarm_node.model import Checkpoint, ClientHead, model_id_of
    from swarm_node.node.client.generation import SamplingConfig, generate_tokens
    from swarm_node.node.client.settings import SessionSettings
    from swarm_node.node.config import PeerConfig
    from swarm_node.node.peer import open_peer

    checkpoint = Checkpoint.open(ctx.folder)
    blocks = checkpoint.num_blocks
    head = ClientHead.load(checkpoint, dtype=ctx.dtype, device=ctx.device)
    config = PeerConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(addr,))
    ids = prompt_ids(head.vocab_size, 1, ctx.prompt_tokens)
    batch = prompt_ids(head.vocab_size, 8, 32)
    async with open_peer(config) as peer:
        identity = await peer.pin_model(str(ctx.folder))
        model = model_id_of(str(ctx.folder)) if identity is None else identity.name
        settings = SessionSettings(model=model, num_blocks=blocks, dtype=ctx.dtype_name)
        await generate_tokens(peer, head, ids, settings, SamplingConfig(max_new_tokens=4))
        out, stats = await generate_tokens(
            peer, head, ids, settings, SamplingConfig(max_new_tokens=ctx.new_tokens)
        )
        chain = await peer.find_chain(model, blocks)
        prefill = SessionSettings(
            model=model, num_blocks=blocks, dtype=ctx.dtype_name, max_length=64, batch_size=8
        )
        hidden = head.embed(batch)  # (8, 32, H) on the device
        ctx.sync()
        times = []
        for _ in range(5):  # a fresh session each time: its opening is not timed
            async with peer.inference_session(chain, prefill) as session:
                t0 = trio.current_time()
                await session.step(hidden)
                times.append(trio.current_time() - t0)
    return {
        "tokens": out[0, ctx.prompt_tokens :].tolist(),
        "tokens_per_second": round(stats.tokens_per_second, 2),
        "time_to_first_token_s": round(stats.time_to_first_token, 4),
        "total_s": round(stats.total_time, 3),
        "prefill_8x32_s": round(statistics.median(times[1:]), 4),
        "chain": [f"{h.start}:{h.end}" for h in stats.chain],
        "head_peak_gpu_bytes": torch.cuda.max_memory_allocated() if ctx.cuda else SKIPPED,
    }


def swarm(ctx: Context) -> dict:
    import trio

    blocks = json.loads((ctx.folder / "config.json").read_text())["num_hidden_layers"]
    half = blocks // 2
    logs = [ctx.workdir / "server-a.log", ctx.workdir / "server-b.log"]
    procs = []
    result: dict[str, Any] = {}
    try:
        a, addr = start_server(ctx, f"0:{half}", "", logs[0], [])
        procs.append(a)
        b, _ = start_server(ctx, f"{half}:{blocks}", addr, logs[1], ["--cache-tokens", "auto"])
        procs.append(b)
        result = trio.run(swarm_client, ctx, addr)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["servers"] = {log.stem: server_lines(log) for log in logs if log.exists()}
    return result


# -- spans of 2 blocks: float, int8, nf4 ------------------------------------------------------------
def spans(ctx: Context) -> dict:
    from swarm_node.model import BlockSpan, Checkpoint

    checkpoint = Checkpoint.open(ctx.folder)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 48, checkpoint.config.hidden_size, generator=generator) * 0.5
    x = x.to(ctx.device)  # (1, 48, H) float32: the span casts it to its dtype
    results: dict = {}
    reference = None
    for quant in (None, "int8", "nf4"):
        name = quant or ctx.dtype_name
        try:
            if ctx.cuda:
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated()
            span = BlockSpan.load(checkpoint, 0, 2, dtype=ctx.dtype, quant=quant, device=ctx.device)
            allocated = torch.cuda.memory_allocated() - before if ctx.cuda else None
            cache = span.new_cache(64)
            with torch.inference_mode():
                out = span(x[:, :32], cache).float()
                ctx.sync()
                t0 = time.perf_counter()
                for i in range(32, 48):
                    span(x[:, i : i + 1], cache)
                ctx.sync()
                step_ms = (time.perf_counter() - t0) / 16 * 1e3
            if reference is None:
                reference = out
            cos = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
            results[name] = {
                "span_dtype": str(span.dtype).removeprefix("torch."),
                "out_dtype": str(out.dtype).removeprefix("torch."),
                "bytes_per_block": span.memory_bytes() // 2,
                "allocated_per_block": SKIPPED if allocated is None else allocated // 2,
                "cosine_vs_unquantized": round(float(cos), 6),
                "finite": bool(torch.isfinite(out).all()),
                "ms_per_decode_step": round(step_ms, 3),
            }
            del span, cache
        except Exception as exc:  # noqa: BLE001 (report what failed, keep checking the rest)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return results


# -- an out-of-memory while computing, refused, the span computing the same after --------------------
def oom(ctx: Context) -> dict:
    from swarm_node.errors import RequestError
    from swarm_node.model import BlockSpan, Checkpoint
    from swarm_node.node.server.memory import out_of_memory_refused

    span = BlockSpan.load(Checkpoint.open(ctx.folder), 0, 1, dtype=ctx.dtype, device=ctx.device)
    x = torch.randn(1, 8, span.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = span(x, span.new_cache(16)).cpu()
    result: dict[str, Any] = {"refused": None}
    if ctx.cuda:
        spare = torch.empty(2**30, dtype=torch.uint8, device=ctx.device)  # cached once freed
        del spare
        result["reserved_before"] = torch.cuda.memory_reserved()
    try:
        with out_of_memory_refused(span.device, "a step"):
            torch.empty(2**62, dtype=torch.uint8, device=ctx.device)  # 4 EiB: the allocator fails
    except RequestError as exc:
        result["refused"] = f"{exc.code}: {exc.message}"[:300]
    if ctx.cuda:
        result["reserved_after"] = torch.cuda.memory_reserved()  # the cached blocks handed back
        result["free_bytes_after"] = torch.cuda.mem_get_info(0)[0]
    else:
        result["reserved_before"] = result["reserved_after"] = SKIPPED
    with torch.inference_mode():
        after = span(x, span.new_cache(16)).cpu()
    result["same_output_after"] = bool(torch.equal(before, after))
    return result


# -- codecs on the device against the host's bytes and bitsandbytes' kernels --------------------------
def codecs(ctx: Context) -> dict:
    import bitsandbytes.functional as F

    from swarm_node.compression import blockwise8, decode, encode
    from swarm_node.compression import codecs as host_codecs
    from swarm_node.protocol import WireTensor

    device = ctx.device
    rows = 2048 if ctx.cuda else 256  # bitsandbytes' CPU kernels are slow
    x = torch.randn(1, rows, 4096, generator=torch.Generator().manual_seed(0)).to(device)
    x[..., :4] *= 60  # outlier channels
    out: dict = {"bitsandbytes_kernels": device}
    for codec, block in (("blockwise8", 4096), ("blockwise8-64", 64)):
        on_device = bytes(blockwise8.encode_payload_torch(x, block).cpu().numpy())
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
        absmax = torch.frombuffer(bytearray(data[: 4 * blocks]), dtype=torch.float32).to(device)
        our_codes = torch.frombuffer(bytearray(data[4 * blocks :]), dtype=torch.uint8).to(device)
        theirs_of_ours = F.dequantize_blockwise(our_codes, absmax=absmax, blocksize=block)
        out[codec] = {
            "device_path_gives_host_bytes": on_device == data,
            "encode_of_a_device_tensor_gives_host_bytes": bytes(encode(x, codec).data) == data,
            "we_decode_bitsandbytes_output_exactly": bool(
                torch.equal(ours_of_theirs, theirs.cpu())
            ),
            "bitsandbytes_decodes_ours_exactly": bool(
                torch.equal(
                    theirs_of_ours.reshape(x.shape).cpu(), decode(wire, max_numel=x.numel())
                )
            ),
            "code_agreement_with_bitsandbytes_encoder": round(
                float((our_codes == codes.flatten()).float().mean()), 5
            ),
        }
    for codec in ("none", "float16", "bfloat16"):
        out[codec] = {
            "encode_of_a_device_tensor_gives_host_bytes": bytes(encode(x, codec).data)
            == bytes(host_codecs.encode(x.cpu(), codec).data)
        }
    return out


PARTS = {
    "checkpoint": checkpoint,
    "local": local,
    "swarm": swarm,
    "spans": spans,
    "oom": oom,
    "codecs": codecs,
}
NEEDS_CHECKPOINT = {"local", "swarm", "spans", "oom"}


def run_part(name: str, ctx: Context) -> dict:
    return PARTS[name](ctx)
