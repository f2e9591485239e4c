#!/usr/bin/env python
"""Load time and peak resident memory of a span of a shaped checkpoint (one JSON line).

    python scripts/bench_load.py                       # an 8B-shaped float16 checkpoint in /tmp
    python scripts/bench_load.py --quick               # a small one of the same proportions
    python scripts/bench_load.py --checkpoint FOLDER   # an existing sharded folder
    python scripts/bench_load.py --child FOLDER START END   # one measurement (what the tests run)

Each span (2, 4 and 8 blocks, from the middle of the model) loads in a fresh process: it first
imports everything and builds the model's skeleton once (so imports are not counted), records its
resident memory (VmRSS), resets the peak (/proc/self/clear_refs, else a 1 ms sampler thread) and
loads the span with `BlockSpan.load`. `peak_rss_over_span_bytes` is the worst span's
(peak RSS - RSS before) / the bytes the span's weights hold. Without --checkpoint the shaped
checkpoint is written under --workdir (default /tmp) and deleted afterwards (`--keep` keeps it);
`df` first: an 8B float16 checkpoint is ~16 GB.

`--modes read,mmap` measures each span both ways (rounds alternate): "mmap" is a CPU server's
--mmap-weights (the tensors stored in the served dtype are views of a private map of the files).
After the load, a forward touches every weight; `anon_after_forward_over_span_bytes` is then the
process's own memory and `file_after_forward_over_span_bytes` the file's pages it maps (shared
with the page cache and other processes of the same file, reclaimable).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK_SHAPE = [
    "--layers",
    "16",
    "--hidden",
    "1024",
    "--intermediate",
    "3584",
    "--heads",
    "16",
    "--kv-heads",
    "4",
    "--vocab",
    "16384",
    "--shard-mb",
    "200",
]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(folder: str, start: int, end: int, dtype_name: str, device: str, mode: str) -> dict:
    """Load blocks start..end-1 of ``folder`` in this process (``mode`` "mmap": a memory map of
    the files, --mmap-weights); what it cost, at load and once a forward touched every weight."""
    import gc

    import torch

    from swarm_node.model import BlockSpan, Checkpoint
    from swarm_node.model.skeleton import meta_skeleton

    checkpoint = Checkpoint.open(folder, memory_map=mode == "mmap")
    meta_skeleton(checkpoint.config)  # imports the family's modeling code: not the load's cost
    gc.collect()
    before = _status("VmRSS")
    anon, mapped = _status("RssAnon"), _status("RssFile")
    sampled = [before]
    stop = threading.Event()
    exact = _reset_peak()
    if not exact:

        def sample() -> None:
            while not stop.is_set():
                sampled.append(_status("VmRSS"))
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0 = time.perf_counter()
    span = BlockSpan.load(checkpoint, start, end, dtype=getattr(torch, dtype_name), device=device)
    seconds = time.perf_counter() - t0
    stop.set()
    peak = _status("VmHWM") if exact else max(sampled)
    span_bytes = span.memory_bytes()
    t0 = time.perf_counter()
    with torch.inference_mode():  # touches every weight: what serving holds
        span(torch.zeros(1, 1, span.hidden_size))
    first_forward = time.perf_counter() - t0
    anon, mapped = _status("RssAnon") - anon, _status("RssFile") - mapped
    files = sorted({checkpoint.weight_file(n) for n in checkpoint.names_read})
    return {
        "start": start,
        "end": end,
        "blocks": end - start,
        "seconds": round(seconds, 3),
        "span_bytes": span_bytes,
        "rss_before": before,
        "peak_rss": peak,
        "peak_rss_over_span_bytes": round((peak - before) / span_bytes, 4),
        "peak_measured_by": "VmHWM" if exact else "sampling",
        "mode": mode,
        "first_forward_s": round(first_forward, 3),  # a mapped span reads its pages here
        "tensors_mapped": len(checkpoint.names_mapped),
        # after a forward: private memory (the process's own) and file pages (shared, reclaimable)
        "anon_after_forward_over_span_bytes": round(anon / span_bytes, 4),
        "file_after_forward_over_span_bytes": round(mapped / span_bytes, 4),
        "tensors_read": len(checkpoint.names_read),
        "only_span_tensors": all(
            n.startswith(f"{checkpoint.family.layers}.")
            and start <= int(n.split(".")[len(checkpoint.family.layers.split("."))]) < end
            for n in checkpoint.names_read
        ),
        "shards_touched": files,
    }


def run_child(folder: Path, start: int, end: int, dtype: str, device: str, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), str(start), str(end)]
        + ["--dtype", dtype, "--device", device, "--modes", mode],
        capture_output=True,
        text=True,
        check=False,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", nargs=3, metavar=("FOLDER", "START", "END"))
    p.add_argument("--checkpoint", type=Path, help="an existing sharded folder")
    p.add_argument("--shape", default="llama-3-8b", help="make_shaped_checkpoint.py's --shape")
    p.add_argument("--quick", action="store_true", help="a small checkpoint (~0.5 GB), same ratios")
    p.add_argument("--spans", type=int, nargs="+", default=[2, 4, 8], help="blocks per span")
    p.add_argument("--repeats", type=int, default=1, help="loads per span (medians)")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--keep", action="store_true", help="keep the checkpoint written")
    p.add_argument(
        "--modes",
        default="read",
        help="read (each span reads its own copy), mmap (--mmap-weights), or read,mmap (rounds "
        "alternate)",
    )
    args = p.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= {"read", "mmap"}:
        p.error(f"--modes must be read, mmap or read,mmap, got {args.modes!r}")
    if args.child:
        folder, start, end = args.child
        print(json.dumps(child(folder, int(start), int(end), args.dtype, args.device, modes[0])))
        return
    folder, made = args.checkpoint, None
    if folder is None:
        made = folder = Path(tempfile.mkdtemp(prefix="shaped-", dir=args.workdir)) / "ckpt"
        command = [sys.executable, str(ROOT / "scripts" / "make_shaped_checkpoint.py")]
        command += ["--shape", args.shape, "--out", str(folder), "--dtype", args.dtype]
        command += QUICK_SHAPE if args.quick else []
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    try:
        total = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        rows = []
        for blocks in args.spans:
            start = max(0, (total - blocks) // 2)
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for _ in range(args.repeats):
                for mode in modes:  # rounds alternate
                    runs[mode].append(
                        run_child(folder, start, start + blocks, args.dtype, args.device, mode)
                    )
            for mode in modes:
                row = runs[mode][0] | {
                    "seconds": statistics.median(r["seconds"] for r in runs[mode]),
                    "peak_rss_over_span_bytes": max(
                        r["peak_rss_over_span_bytes"] for r in runs[mode]
                    ),
                }
                rows.append(row)
        print(
            json.dumps(
                {
                    "checkpoint": str(folder)
                    if made is None
                    else f"{args.shape} (written, deleted)",
                    "blocks_total": total,
                    "dtype": args.dtype,
                    "device": args.device,
                    "spans": rows,
                    "peak_rss_over_span_bytes": {
                        mode: max(r["peak_rss_over_span_bytes"] for r in rows if r["mode"] == mode)
                        for mode in modes
                    }
                    if len(modes) > 1
                    else max(r["peak_rss_over_span_bytes"] for r in rows),
                }
            )
        )
    finally:
        if made is not None and not args.keep:
            shutil.rmtree(made.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
