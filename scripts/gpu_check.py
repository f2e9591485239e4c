#!/usr/bin/env python
"""One prepared run on a machine with a CUDA GPU (never needed by the tests; ~4-6 min on an H100).

    python scripts/gpu_check.py                 # Llama-3-8B-shaped, float16, on cuda:0
    python scripts/gpu_check.py --quick         # 4 of its 32 blocks, a 32k vocabulary
    python scripts/gpu_check.py --device cpu    # a dry run of every part on a tiny model (~1.5 min)

Each part runs in a process of its own, under its own timeout (and all under --budget-s), so a hang
or a crash costs that part only; what a part started (the servers) dies with it. In this order:
1. checkpoint: a random-weight checkpoint of Llama-3-8B's shape in float16 (scripts/
   make_shaped_checkpoint.py, random numbers drawn on the GPU) under --workdir, deleted afterwards;
   the device's name, memory and free memory (mem_get_info).
2. local: transformers on the GPU: greedy generation of --new-tokens after a --prompt-tokens prompt
   (tokens/s, time to first token), a 32-token prefill of a batch of 8 (median of 5).
3. swarm: the same through two `swarm-node serve --device cuda --dtype float16` processes on the one
   GPU (blocks 0:16 and 16:32; the second with --cache-tokens auto: its memory plan is reported), a
   client with its head on the GPU: tokens/s and its ratio to local, time to first token, the same
   prefill, whether the tokens are local's.
4. spans: 2 blocks in float16, int8 and nf4 (bitsandbytes' CUDA kernels): memory per block as held
   and as allocated, cosine of the output against float16's, milliseconds per decode step.
5. oom: the allocator failing inside a step (4 EiB asked) is refused as out_of_memory, the cached
   blocks go back, the span computes the same after.
6. codecs: the blockwise8 torch path on the GPU gives the host's bytes; bitsandbytes' CUDA
   quantize/dequantize_blockwise read ours and we read theirs.

Prints progress on stderr and the report as one JSON line on stdout (last); writes it to --out
(default on a GPU: docs/gpu_check_<date>_<gpu>.json) and, when $OUT is set, to $OUT/gpu_check.json
after every part (with the servers' logs), so a call cut short still leaves what was measured.
Without CUDA, --device auto runs on the CPU (--tiny implied): what only CUDA measures says
"skipped: no CUDA". --device cuda without CUDA exits 2. Exit status 1 when a part failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import date
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check_parts import NEEDS_CHECKPOINT, PARTS, Context, run_part  # noqa: E402

QUICK = dict(num_hidden_layers=4, vocab_size=32768)  # the 8B's layers, 4 of them
TINY = dict(  # a tiny model of the same family: the whole script on a CPU
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=896,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=4096,
)
# seconds each part may take, by size (--timeout PART=S overrides; --budget-s bounds them all)
TIMEOUTS = {
    "full": dict(checkpoint=180, local=150, swarm=240, spans=90, oom=60, codecs=60),
    "quick": dict(checkpoint=90, local=90, swarm=150, spans=90, oom=60, codecs=60),
    # a dry run on a CPU: generous, shared cores can be slow
    "tiny": dict(checkpoint=300, local=300, swarm=400, spans=300, oom=300, codecs=300),
}
STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(
        f"gpu_check [{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True
    )


def fail(message: str) -> None:
    print(f"gpu_check.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def pump(stream, tail: collections.deque) -> None:
    """A part's output onto our stderr, its last lines kept for the report."""
    for line in stream:
        tail.append(line.rstrip()[:300])
        print(f"  | {line.rstrip()}", file=sys.stderr, flush=True)


def run_in_process(name: str, ctx: Context, timeout: float) -> dict:
    """Part ``name`` in a fresh process (its own session: a timeout kills all it started)."""
    result_file = ctx.workdir / f"part-{name}.json"
    command = [
        sys.executable,
        __file__,
        "--part",
        name,
        "--context",
        json.dumps(asdict(ctx), default=str),
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tail: collections.deque = collections.deque(maxlen=20)
    reader = threading.Thread(target=pump, args=(proc.stdout, tail), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:  # also when this run is stopped (SIGTERM, ^C): nothing of the part outlives it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        reader.join(timeout=5)
    if code is None:
        return {"error": f"timed out after {timeout:.0f} s (killed with what it started)"}
    if code != 0 or not result_file.exists():
        return {"error": f"exit status {code}", "output_tail": list(tail)[-12:]}
    return json.loads(result_file.read_text())


def part_main(name: str, raw: str) -> None:
    fields = json.loads(raw)
    fields["workdir"] = Path(fields["workdir"])
    ctx = Context(**fields)
    result = run_part(name, ctx)
    (ctx.workdir / f"part-{name}.json").write_text(json.dumps(result))


def write_report(report: dict, out: Path | None, workdir: Path) -> None:
    text = json.dumps(report, indent=1) + "\n"
    if out is not None:
        out.write_text(text)
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"])
        target.mkdir(parents=True, exist_ok=True)
        (target / "gpu_check.json").write_text(text)
        for log in workdir.glob("server-*.log"):
            lines = log.read_text(errors="replace").splitlines()[-300:]
            (target / f"gpu_check_{log.name}").write_text("\n".join(lines) + "\n")


def summarize(report: dict) -> None:
    local, swarm = report.get("local", {}), report.get("swarm", {})
    if "tokens_per_second" in local and "tokens_per_second" in swarm:
        report["swarm_over_local_tokens_per_second"] = round(
            swarm["tokens_per_second"] / local["tokens_per_second"], 4
        )
        report["same_tokens"] = swarm["tokens"] == local["tokens"]
        pairs = zip(swarm["tokens"], local["tokens"], strict=False)
        report["first_different_token"] = next(
            (i for i, (a, b) in enumerate(pairs) if a != b), None
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="4 blocks of the 8B shape, 32k vocab")
    size.add_argument("--tiny", action="store_true", help="a tiny model (implied on a CPU)")
    p.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}"
    )
    p.add_argument("--timeout", action="append", default=[], metavar="PART=S")
    p.add_argument(
        "--budget-s", type=float, help="all parts together (default 540 on a GPU, 1800 on a CPU)"
    )
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--keep", action="store_true", help="keep the checkpoint written")
    p.add_argument("--out", type=Path, help="the JSON file (default on a GPU: docs/gpu_check_...)")
    p.add_argument("--part", choices=tuple(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--context", help=argparse.SUPPRESS)
    return p.parse_args()


def part_timeouts(args: argparse.Namespace, size: str) -> dict[str, float]:
    timeouts = dict(TIMEOUTS[size])
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            fail(
                f"'--timeout' must be PART=SECONDS with PART one of {', '.join(PARTS)}, got {item!r}"
            )
        timeouts[name] = float(seconds)
    return timeouts


def stopped(signum: int, frame: object) -> None:
    raise SystemExit(f"gpu_check.py: stopped by signal {signum}")


def main() -> None:
    args = parse_args()
    if args.part:
        part_main(args.part, args.context)
        return
    signal.signal(signal.SIGTERM, stopped)  # the running part is killed on the way out
    import torch

    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in parts if name not in PARTS]
    if unknown:
        fail(f"'--parts' must name parts among {', '.join(PARTS)}, got {', '.join(unknown)}")
    cuda = torch.cuda.is_available()  # no CUDA context here: the parts make their own
    if args.device == "cuda" and not cuda:
        fail(
            f"--device cuda needs a CUDA device, and torch {torch.__version__} (built with CUDA "
            f"{torch.version.cuda or 'none'}) sees none; nothing was measured (--device cpu: a dry run)"
        )
    device = "cuda" if args.device == "auto" and cuda else args.device.replace("auto", "cpu")
    size = "quick" if args.quick else "tiny" if args.tiny or device == "cpu" else "full"
    timeouts = part_timeouts(args, size)
    budget = args.budget_s or (540.0 if device == "cuda" else 1800.0)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.workdir))
    os.environ["SWARM_CACHE_DIR"] = str(workdir / "cache")  # the parts and servers share digests
    ctx = Context(
        device=device,
        workdir=workdir,
        shape={"quick": QUICK, "tiny": TINY, "full": {}}[size],
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
    )
    report: dict = {
        "device": {"name": device},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bitsandbytes": version("bitsandbytes"),
        "date": date.today().isoformat(),
        "shape": f"llama-3-8b ({size}: {ctx.shape or 'the real shape'})",
        "dtype": ctx.dtype_name,
        "complete": False,
    }
    progress(f"on {device}, size {size}, parts {','.join(parts)}, budget {budget:.0f} s")
    failed = []
    try:
        for name in parts:
            left = budget - (time.perf_counter() - STARTED)
            if name in NEEDS_CHECKPOINT and "error" in report.get("checkpoint", {}):
                result = {"skipped": "the checkpoint was not written"}
            elif left < 10:
                result = {"skipped": f"the budget of {budget:.0f} s was spent"}
            else:
                timeout = min(timeouts[name], left)
                progress(f"{name}: started (timeout {timeout:.0f} s)")
                t0 = time.perf_counter()
                result = run_in_process(name, ctx, timeout)
                result["part_s"] = round(time.perf_counter() - t0, 1)
                progress(
                    f"{name}: {'failed' if 'error' in result else 'done'} in {result['part_s']} s"
                )
            if "error" in result:
                failed.append(name)
            report[name] = result
            if name == "checkpoint" and "device" in result:
                report["device"] = result["device"]
            summarize(report)
            write_report(report, args.out, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir / "llama-3-8b-shaped", ignore_errors=True)
    report["failed_parts"] = failed
    report["complete"] = True
    report["seconds"] = round(time.perf_counter() - STARTED, 1)
    out = args.out
    if out is None and device == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", report["device"]["name"].lower()).strip("-")
        out = ROOT / "docs" / f"gpu_check_{report['date']}_{slug}.json"
    write_report(report, out, workdir)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report), flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
