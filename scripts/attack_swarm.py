#!/usr/bin/env python
"""Attack a live 2-server swarm while an honest client generates, and report what held.

Starts two `swarm-node serve` processes (the model's blocks split in halves) and a `swarm-node api`
in front of them; an honest client in this process generates greedily, again and again, while every
attack in tests/attacks/*.py (each module's ``ATTACKS``) runs in turn, then ``--fuzz-frames`` fuzzed
frames (tests/attacks/fuzz.py) go to the servers in batches, shared by both at once. After each
attack and each batch every server is asked for its info, and the API for its models, within
``--hang-timeout`` seconds. The servers run with ``--cache-tokens`` (16,384) and
``--session-idle-timeout`` (10 s, so that a session held with pings only closes within an attack's
20 s; with 5 s, honest sessions waiting on a server busy with an attack idled out, and recovered); the API runs only for a model with a tokenizer, with a random key (SWARM_API_KEY) when
AttackTarget has an ``api_key``. Prints one JSON line:

- ``attacks``: [{name, stopped, seconds, error?}]; ``fuzz``: what the fuzzer sent and got back;
- ``crashes``: server/api processes that died; ``hangs``: health checks that got no answer in time
  (a fuzzed stream the server neither answered nor closed within 30 s misses that target too);
- ``honest``: generations, exact ones, errors, servers replaced by recovery, the slowest (s);
  ``honest_exact``: every honest generation equal to transformers' greedy tokens for the same
  prompt, computed in a separate clean subprocess at torch defaults (float32);
- ``server_peak_rss_mb``: the largest VmHWM (/proc/PID/status) among the servers, read before they
  are stopped; ``memory_budget_mb``: the largest server's configured budget, derived as
      weights of its blocks (parameter count from the safetensors headers x the dtype's size)
    + its attention cache budget (--cache-tokens x 2 (keys, values) x key/value heads x head dim
      x the dtype's size x its blocks)
    + its budget for large frames being received (--max-receiving-mb, --receiving-mb here: 128)
    + BASELINE_MB, the stated constant: 448 MiB for python, torch, transformers and py-libp2p (an
      idle server of a 1 MB model measured 405 MiB) + 2 x 64 MiB for one frame of the maximum size
      being decoded (its bytes copied once, and its tensors);
- ``targets``: which held; the exit code is 1 if any missed.

    .venv/bin/python scripts/attack_swarm.py [--quick] [--model PATH] [--fuzz-frames N]

The fuzzer's rate is bounded by py-libp2p's cost of a stream (most fuzzed frames break the framing,
and the server closes a stream after a broken frame; the server's side costs ~6 ms of CPU a stream,
the sender's ~2 ms), so both servers are fuzzed at once: ~85 frames/s on 2 cores shared with other
work (load average 5.5), an idle machine does better.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLI = str(Path(sys.executable).with_name("swarm-node"))
BASELINE_MB = 448 + 2 * 64
PROMPT = "The capital of France is"
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or model folder")
    parser.add_argument("--quick", action="store_true", help="2,000 fuzzed frames, short answers")
    parser.add_argument("--fuzz-frames", type=int, default=None, help="default 100,000")
    parser.add_argument("--fuzz-batch", type=int, default=10_000, help="frames between checks")
    parser.add_argument("--fuzz-concurrency", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=None, help="per honest generation")
    parser.add_argument("--cache-tokens", type=int, default=16_384, help="each server's budget")
    parser.add_argument("--session-idle-timeout", type=float, default=10.0)
    parser.add_argument("--receiving-mb", type=int, default=128, help="each server's budget")
    parser.add_argument("--hang-timeout", type=float, default=10.0)
    parser.add_argument("--attack-timeout", type=float, default=60.0)
    parser.add_argument("--only", default="", help="run the attacks whose name contains this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ids", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fuzz_frames is None:
        args.fuzz_frames = 2_000 if args.quick else 100_000
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 16
    if args.quick:
        args.fuzz_batch = min(args.fuzz_batch, 1_000)
    return args


# -- the ground truth, in its own process ------------------------------------------------------
def reference_tokens(path: Path, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy tokens, from a clean subprocess at torch defaults."""
    command = [sys.executable, __file__, "--reference", "--model", str(path)]
    command += ["--ids", ",".join(map(str, ids)), "--new-tokens", str(new_tokens)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_reference(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.tensor([[int(x) for x in args.ids.split(",")]])
    out = model.generate(
        ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    print(json.dumps(out[0].tolist()))


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def prompt_ids(path: Path, vocab_size: int) -> list[int]:
    from swarm_node.model import load_tokenizer

    if has_tokenizer(path):
        return [int(t) for t in load_tokenizer(path)(PROMPT).input_ids]
    return [(7919 * i + 13) % vocab_size for i in range(8)]  # fixed ids


# -- the memory budget ---------------------------------------------------------------------------
def block_weight_bytes(path: Path, dtype: str) -> dict[int, int]:
    """Block index -> bytes of its parameters in ``dtype``, from the safetensors headers."""
    from safetensors import safe_open

    sizes: dict[int, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                found = re.search(r"\.layers\.(\d+)\.", name)
                if found:
                    numel = math.prod(f.get_slice(name).get_shape())
                    block = int(found.group(1))
                    sizes[block] = sizes.get(block, 0) + numel * ELEMENT_BYTES[dtype]
    return sizes


def memory_budget_mb(
    config: Any, weights: dict[int, int], span: tuple[int, int], args: Any
) -> float:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    blocks = span[1] - span[0]
    cache = args.cache_tokens * 2 * kv_heads * head_dim * ELEMENT_BYTES["float32"] * blocks
    block_bytes = sum(weights.get(i, 0) for i in range(*span))
    return round((block_bytes + cache) / 2**20 + args.receiving_mb + BASELINE_MB, 1)


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# -- processes -----------------------------------------------------------------------------------
async def start_process(
    nursery: Any, command: list[str], log: Path, env: dict[str, str] | None = None
) -> tuple[Any, str]:
    """Start ``command`` with stderr to ``log``; returns it and the first line it prints."""
    import trio

    with open(log, "wb") as err:  # noqa: ASYNC230 (a new local log file)
        process = await nursery.start(
            lambda task_status: trio.run_process(  # noqa: ASYNC105 (nursery.start awaits it)
                command,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                task_status=task_status,
                check=False,
            )
        )
    data = b""
    with trio.fail_after(300):
        while b"\n" not in data:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise SystemExit(f"{command[1]} exited before printing its address; see {log}")
            data += chunk
    nursery.start_soon(_drain, process.stdout)
    return process, data.split(b"\n", 1)[0].decode()


async def _drain(stream: Any) -> None:
    while await stream.receive_some(65536):
        pass


# -- health --------------------------------------------------------------------------------------
async def health_check(
    host: Any, target: Any, processes: dict[str, Any], timeout: float, after: str
) -> list[dict[str, Any]]:
    """Ask every server for its info and the API for its models: the ones without an answer."""
    import httpx
    import trio

    from swarm_node.node.net.dialing import open_stream
    from swarm_node.node.net.message_stream import request
    from swarm_node.protocol import DEFAULT_MAX_FRAME_SIZE
    from swarm_node.protocol import messages as m

    hangs: list[dict[str, Any]] = []

    async def server(i: int) -> None:
        try:
            with trio.fail_after(timeout):
                conn = await open_stream(
                    host, target.peer_id(i), max_frame_size=DEFAULT_MAX_FRAME_SIZE, timeout=timeout
                )
                try:
                    await request(conn, m.InfoRequest(), m.InfoResponse, timeout=timeout)
                finally:
                    await conn.close()
        except Exception as exc:  # noqa: BLE001 (no answer, whatever the way)
            hangs.append({"process": f"server{i}", "after": after, "error": repr(exc)[:200]})

    async def api() -> None:
        try:
            key = getattr(target, "api_key", None)
            headers = {"authorization": f"Bearer {key}"} if key else {}
            async with httpx.AsyncClient(
                base_url=target.api_url, timeout=timeout, headers=headers
            ) as http:
                (await http.get("/v1/models")).raise_for_status()
        except Exception as exc:  # noqa: BLE001 (no answer, whatever the way)
            hangs.append({"process": "api", "after": after, "error": repr(exc)[:200]})

    async with trio.open_nursery() as nursery:
        for i in range(len(target.servers)):
            nursery.start_soon(server, i)
        if target.api_url:
            nursery.start_soon(api)
    return hangs


def discover_attacks(only: str = "") -> list[tuple[str, Any]]:
    """Every (module.name, function) in the ATTACKS tuples of tests/attacks/*.py."""
    found: list[tuple[str, Any]] = []
    for file in sorted((ROOT / "tests" / "attacks").glob("*.py")):
        if file.stem == "__init__":
            continue
        try:
            module = importlib.import_module(f"tests.attacks.{file.stem}")
        except Exception as exc:  # noqa: BLE001 (a module that does not import: its attacks fail)
            found.append((f"{file.stem}.*", _raises(exc)))
            continue
        for name, function in getattr(module, "ATTACKS", ()):
            qualified = f"{file.stem}.{name}"
            if only in qualified:
                found.append((qualified, function))
    return found


def _raises(exc: Exception) -> Any:
    async def attack(target: Any) -> bool:
        raise exc

    return attack


async def run_attack(name: str, attack: Any, target: Any, args: Any) -> dict[str, Any]:
    """{name, stopped, seconds, error?} of one attack, bounded by ``--attack-timeout``."""
    import trio

    t0 = time.perf_counter()
    entry: dict[str, Any] = {"name": name, "stopped": False}
    try:
        with trio.move_on_after(args.attack_timeout) as bound:
            entry["stopped"] = bool(await attack(target))
        if bound.cancelled_caught:
            entry["error"] = f"still running after {args.attack_timeout} s"
    except Exception as exc:  # noqa: BLE001 (an attack that fails is not stopped)
        entry["error"] = repr(exc)[:300]
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"attack {entry}", file=sys.stderr, flush=True)
    return entry


async def fuzz_servers(addrs: Sequence[str], count: int, seed: int, args: Any) -> Any:
    """``count`` fuzzed frames shared between the servers, fuzzed at the same time (the servers'
    side of a stream costs ~3x the sender's: in parallel, both cores work)."""
    import trio

    from tests.attacks.fuzz import FuzzStats, fuzz_server

    total = FuzzStats()

    async def one(i: int, addr: str) -> None:
        share = count // len(addrs) + (i < count % len(addrs))
        total.add(
            await fuzz_server(
                addr, frames=share, seed=seed * len(addrs) + i, concurrency=args.fuzz_concurrency
            )
        )

    async with trio.open_nursery() as nursery:
        for i, addr in enumerate(addrs):
            nursery.start_soon(one, i, addr)
    return total


# -- the run -------------------------------------------------------------------------------------
async def attack_swarm(args: argparse.Namespace, path: Path, expected: list[int]) -> dict[str, Any]:
    import torch
    import trio

    from swarm_node.model import Checkpoint, ClientHead
    from swarm_node.model.bundled import model_id_of
    from swarm_node.node.client.generation import SamplingConfig, generate_tokens
    from swarm_node.node.client.settings import SessionSettings
    from swarm_node.node.config import PeerConfig
    from swarm_node.node.net.host import quiet_libp2p_logging
    from swarm_node.node.peer import open_peer
    from tests.attacks import AttackTarget
    from tests.attacks.fuzz import FuzzStats

    quiet_libp2p_logging(0)  # its routine DHT chatter, and the refused dials of the attacks
    checkpoint = Checkpoint.open(path)
    num_blocks = checkpoint.num_blocks
    spans = [(0, num_blocks // 2), (num_blocks // 2, num_blocks)]
    model_arg = str(path) if path.name != args.model else args.model  # a folder or a bundled name
    model_id = model_id_of(model_arg)
    head = ClientHead.load(checkpoint)
    ids = torch.tensor([expected[: -args.new_tokens]])
    attacks = discover_attacks(args.only)
    logs = Path(tempfile.mkdtemp(prefix="attack_swarm_"))
    result: dict[str, Any] = {"attacks": [], "hangs": [], "logs": str(logs)}
    honest: dict[str, Any] = {"generations": 0, "exact": 0, "errors": [], "recoveries": 0}
    honest["slowest_s"] = 0.0
    processes: dict[str, Any] = {}

    async with trio.open_nursery() as nursery:
        try:
            addrs: list[str] = []
            for i, (start, end) in enumerate(spans):
                command = [CLI, "serve", "--model", model_arg, "--blocks", f"{start}:{end}"]
                command += ["--listen", "/ip4/127.0.0.1/tcp/0", "--throughput", "100"]
                command += ["--cache-tokens", str(args.cache_tokens), "--torch-threads", "1"]
                command += ["--session-idle-timeout", str(args.session_idle_timeout)]
                command += ["--max-receiving-mb", str(args.receiving_mb)]
                command += ["--initial-peers", addrs[0]] if addrs else []
                processes[f"server{i}"], addr = await start_process(
                    nursery, command, logs / f"server{i}.log"
                )
                addrs.append(addr)
            api: dict[str, Any] = {"api_url": None}
            if has_tokenizer(path):  # the API needs one; without, the API's attacks skip
                if "api_key" in {f.name for f in dataclasses.fields(AttackTarget)}:
                    api["api_key"] = secrets.token_urlsafe(24)  # by environment, as advised
                env = {**os.environ, "SWARM_API_KEY": api["api_key"]} if len(api) > 1 else None
                command = [CLI, "api", "--model", model_arg, "--initial-peers", addrs[0]]
                processes["api"], api["api_url"] = await start_process(
                    nursery, [*command, "--port", "0"], logs / "api.log", env
                )
            target = AttackTarget(model=model_id, model_path=path, servers=tuple(addrs), **api)
            config = PeerConfig(listen=("/ip4/127.0.0.1/tcp/0",), initial_peers=(addrs[0],))
            async with open_peer(config) as client:
                ready, done = trio.Event(), trio.Event()
                settings = SessionSettings(model=model_id, num_blocks=num_blocks)
                sampling = SamplingConfig(max_new_tokens=args.new_tokens)

                async def generate_honestly() -> None:
                    while not done.is_set():
                        try:
                            with trio.fail_after(300):
                                out, stats = await generate_tokens(
                                    client, head, ids, settings, sampling
                                )
                            honest["exact"] += out[0].tolist() == expected
                            honest["recoveries"] += len(stats.recoveries)
                            slowest = max(honest["slowest_s"], stats.total_time)
                            honest["slowest_s"] = round(slowest, 2)
                        except Exception as exc:  # noqa: BLE001 (a failed generation is a finding)
                            honest["errors"].append(repr(exc)[:300])
                        honest["generations"] += 1
                        ready.set()

                async def check(after: str) -> None:
                    result["hangs"] += await health_check(
                        client.host, target, processes, args.hang_timeout, after
                    )

                async with trio.open_nursery() as inner:
                    inner.start_soon(generate_honestly)
                    await ready.wait()
                    started = time.perf_counter()
                    for name, attack in attacks:
                        result["attacks"].append(await run_attack(name, attack, target, args))
                        await check(f"attack {name}")
                    attacks_s = time.perf_counter() - started
                    fuzz, sent, batch = FuzzStats(), 0, 0
                    while sent < args.fuzz_frames:
                        count = min(args.fuzz_batch, args.fuzz_frames - sent)
                        fuzz.add(await fuzz_servers(addrs, count, args.seed + batch, args))
                        sent, batch = sent + count, batch + 1
                        print(f"fuzzed {sent} frames", file=sys.stderr, flush=True)
                        await check(f"fuzz batch {batch}")
                    fuzz_s = time.perf_counter() - started - attacks_s
                    await ready.wait()
                    ready = trio.Event()
                    await ready.wait()  # one more whole generation after the last batch
                    done.set()
            result["crashes"] = [
                {"process": name, "returncode": p.returncode}
                for name, p in processes.items()
                if p.returncode is not None
            ]
            peaks = {name: peak_rss_mb(p.pid) for name, p in processes.items()}
        finally:
            for process in processes.values():
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                for process in processes.values():
                    await process.wait()
            for process in processes.values():
                if process.returncode is None:
                    process.kill()
            nursery.cancel_scope.cancel()

    weights = block_weight_bytes(path, "float32")
    budgets = [memory_budget_mb(checkpoint.config, weights, span, args) for span in spans]
    server_peaks = [peaks[f"server{i}"] or 0.0 for i in range(len(spans))]
    result.update(
        honest=honest,
        honest_exact=honest["generations"] > 0 and honest["exact"] == honest["generations"],
        fuzz=fuzz.as_dict(),
        server_peak_rss_mb=max(server_peaks),
        memory_budget_mb=max(budgets),
        servers=[
            {"blocks": f"{s}:{e}", "peak_rss_mb": peak, "memory_budget_mb": budget}
            for (s, e), peak, budget in zip(spans, server_peaks, budgets, strict=True)
        ],
        api_peak_rss_mb=peaks.get("api"),
        seconds={"attacks": round(attacks_s, 1), "fuzz": round(fuzz_s, 1)},
        within_budget=all(p <= b for p, b in zip(server_peaks, budgets, strict=True)),
    )
    return result


def machine() -> dict[str, Any]:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference:
        print_reference(args)
        return 0
    import logging

    import trio

    from swarm_node.model import Checkpoint, resolve_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    path = resolve_model(args.model)
    ids = prompt_ids(path, Checkpoint.open(path).config.vocab_size)
    expected = reference_tokens(path, ids, args.new_tokens)
    started = machine()
    result = trio.run(attack_swarm, args, path, expected)
    result["targets"] = {
        "every_attack_stopped": all(a["stopped"] for a in result["attacks"]),
        "no_crash": not result["crashes"],
        "no_hang": not result["hangs"] and not result["fuzz"]["stalled"],
        "honest_exact": result["honest_exact"],
        "memory_within_budget": result["within_budget"],
    }
    out = {
        "benchmark": "attack_swarm",
        "model": args.model,
        **result,
        "counts": {
            "attacks": len(result["attacks"]),
            "stopped": sum(a["stopped"] for a in result["attacks"]),
            "fuzz_frames": result["fuzz"]["frames"],
            "honest_generations": result["honest"]["generations"],
        },
        "machine": {**started, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))
    return 0 if all(out["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
