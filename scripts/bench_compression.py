#!/usr/bin/env python
"""Compression: codec speed against bitsandbytes, bytes on the wire, and quality through a swarm.

One JSON line with:
- `codecs`: encode/decode MB/s of our blockwise8 vs bitsandbytes' quantize/dequantize_blockwise on
  the same tensors, interleaved, median ratio (target >= 1.0); bytes on the wire per generated
  token and for a 2048-token prefill under every codec (see bench_compression_codecs.py);
- `quality`: through a 2-server loopback swarm of SmolLM2 (float32, blocks 0:15 and 15:30, in this
  process), greedy-token agreement of float16 (a control), blockwise8 and blockwise8-64 vs none
  over 10 prompts x 64 new tokens, free-running (the issue's figure, target >= 0.95) and
  teacher-forced top-1 (each flip counted once), and perplexity of a held-out text
  (tests/data/heldout.txt) under each codec (target: within 1% of none).

    .venv/bin/python scripts/bench_compression.py [--repeats 30] [--new-tokens 64]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_compression_codecs.py

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from contextlib import AsyncExitStack  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import trio  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compression_codecs import codec_report  # noqa: E402

from swarm_node.model import Checkpoint, ClientHead, load_tokenizer, resolve_model  # noqa: E402
from swarm_node.node.client.generation import SamplingConfig, generate_tokens  # noqa: E402
from swarm_node.node.client.settings import SessionSettings  # noqa: E402
from swarm_node.node.config import PeerConfig, ServerConfig  # noqa: E402
from swarm_node.node.peer import open_peer  # noqa: E402

MODEL = "smollm2-135m"
HELDOUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "heldout.txt"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "A good way to learn a new language is",
    "In computer science, a hash table is",
    "The human heart has four chambers:",
    "Photosynthesis is the process by which",
]
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


LOSSY = ("float16", "blockwise8", "blockwise8-64")  # codecs whose agreement with "none" is measured


async def teacher_forced(
    session, head, ids: torch.Tensor, reference: list[int]
) -> tuple[list[int], list[float]]:
    """Top-1 token and top-1 minus top-2 logit at each position, the session being fed the
    reference tokens rather than its own."""
    tops, margins = [], []
    hidden = head.embed(ids)  # (1, T, H)
    for token in reference:
        out = await session.step(hidden)
        with torch.inference_mode():
            top2 = head.logits(out[:, -1:, :])[0, -1].float().topk(2)
        tops.append(int(top2.indices[0]))
        margins.append(float(top2.values[0] - top2.values[1]))
        hidden = head.embed(torch.tensor([[token]]))
    return tops, margins


async def quality(new_tokens: int) -> dict:
    """Greedy agreement (free-running and teacher-forced) and perplexity through a 2-server swarm.

    Free-running (the issue's figure): each codec generates its own 64 tokens and position i
    counts as agreeing when both runs chose the same token there, so once a run takes another
    token everything after it usually differs too. Teacher-forced: the codec's session is fed the
    reference ("none") tokens and position i agrees when its top-1 equals the reference token,
    which counts each flip once. ``reference_margin_at_first_difference``: the reference's top-1 minus
    top-2 logit where the free-running runs first differ (near-ties flip easily).
    """
    path = resolve_model(MODEL)
    checkpoint = Checkpoint.open(path)
    tokenizer = load_tokenizer(path)
    head = ClientHead.load(checkpoint)
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            open_peer(
                PeerConfig(listen=LOOPBACK),
                server=ServerConfig(model=MODEL, start=0, end=15, throughput=1.0),
            )
        )
        boot = tuple(first.addrs[:1])
        await stack.enter_async_context(
            open_peer(
                PeerConfig(listen=LOOPBACK, initial_peers=boot),
                server=ServerConfig(model=MODEL, start=15, end=30, throughput=1.0),
            )
        )
        client = await stack.enter_async_context(
            open_peer(PeerConfig(listen=LOOPBACK, initial_peers=boot))
        )
        chain = await client.find_chain(MODEL, 30)
        per_codec = {
            codec: {"agree": 0, "forced": 0, "prefix": [], "margins": []} for codec in LOSSY
        }
        total = 0
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            outs = {}
            for codec in ("none", *LOSSY):
                out, _ = await generate_tokens(
                    client,
                    head,
                    ids,
                    SessionSettings(model=MODEL, num_blocks=30, dtype="float32", compression=codec),
                    SamplingConfig(max_new_tokens=new_tokens),
                    chain=chain,
                )
                outs[codec] = out[0, ids.shape[1] :].tolist()
            reference = outs["none"]
            total += len(reference)
            async with client.inference_session(
                chain,
                SessionSettings(
                    model=MODEL, compression="none", max_length=ids.shape[1] + len(reference)
                ),
            ) as session:
                _, ref_margins = await teacher_forced(session, head, ids, reference)
            for codec in LOSSY:
                mine = outs[codec] + [-1] * (len(reference) - len(outs[codec]))  # stopped at EOS
                pairs = list(zip(reference, mine, strict=True))
                stats = per_codec[codec]
                stats["agree"] += sum(a == b for a, b in pairs)
                same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
                stats["prefix"].append(same)
                if same < len(pairs):
                    stats["margins"].append(round(ref_margins[same], 3))
                async with client.inference_session(
                    chain,
                    SessionSettings(
                        model=MODEL, compression=codec, max_length=ids.shape[1] + len(reference)
                    ),
                ) as session:
                    tops, _ = await teacher_forced(session, head, ids, reference)
                stats["forced"] += sum(a == b for a, b in zip(reference, tops, strict=True))
                print(
                    f"{codec} {prompt!r}: {same}/{len(pairs)} tokens before the first difference",
                    file=sys.stderr,
                )
        ids = tokenizer(HELDOUT.read_text(), return_tensors="pt").input_ids
        perplexity = {}
        for codec in ("none", *LOSSY):
            async with client.inference_session(
                chain, SessionSettings(model=MODEL, compression=codec, max_length=ids.shape[1])
            ) as session:
                hidden = await session.step(head.embed(ids))
            with torch.inference_mode():
                logits = head.logits(hidden)[0, :-1].float()  # (T-1, V)
                nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
            perplexity[codec] = round(float(torch.exp(nll)), 4)
    agreement = {
        codec: {
            "free_running": round(stats["agree"] / total, 4),
            "teacher_forced_top1": round(stats["forced"] / total, 4),
            "tokens_before_first_difference": stats["prefix"],
            "reference_margin_at_first_difference": stats["margins"],
        }
        for codec, stats in per_codec.items()
    }
    return {
        "prompts": len(PROMPTS),
        "new_tokens": new_tokens,
        "greedy_token_agreement_vs_none": agreement,  # free_running is the figure
        "heldout_tokens": int(ids.shape[1]),
        "perplexity": perplexity,
        "perplexity_ratio_vs_none": {
            codec: round(perplexity[codec] / perplexity["none"], 5) for codec in LOSSY
        },
        "targets": {"agreement_free_running": 0.95, "perplexity_ratio_max": 1.01},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    report = {"benchmark": "compression", "codecs": codec_report(args.repeats)}
    report["quality"] = trio.run(quality, args.new_tokens)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
