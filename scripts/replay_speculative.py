#!/usr/bin/env python
"""Trips through the chain that prompt lookup would take on bench_speculative.py's prompts, without a
swarm: a load-free figure beside the bench's timed one.

Greedy output does not depend on the drafts, so the model's greedy continuation of each prompt
(transformers, float32, chat template; what the swarm emits too) is computed once, then replayed
step by step through ``Speculation.lookup`` and the adaptive ``DraftLength``: each step's drafts
are checked against the continuation (the longest agreeing prefix plus one token), and the step is
given a modelled time, ``1 + fixed + k * per_draft`` plain steps for k drafts (measured on the
2-core CPU servers: a step with drafts costs a fixed ~14% of a quiet trip, then ~1% a draft).
Prints one JSON line: per set and prompt the tokens, trips, tokens a trip, and the modelled
speedup of the decode (the prefill, the same for both, left out). ``--oracle``: the trips of a
drafter that knew the continuation and copied the longest piece of the text so far (at most
``--draft-tokens``), an upper bound for any copying drafter.

    .venv/bin/python scripts/replay_speculative.py [--new-tokens 48] [--fixed 0.14] [--per-draft 0.01]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_speculative import MODEL, PROMPTS  # noqa: E402

from swarm_node.model import load_tokenizer, resolve_model  # noqa: E402
from swarm_node.node.apps.commands import encode_prompt  # noqa: E402
from swarm_node.node.client.drafting import DraftLength, PromptLookup  # noqa: E402
from swarm_node.node.client.speculative import Speculation  # noqa: E402


def replay(prompt: list[int], out: list[int], args: argparse.Namespace) -> tuple[int, float]:
    """Trips and modelled plain-step units to emit ``out`` after ``prompt``."""
    speculation = Speculation(length=DraftLength(max_tokens=args.draft_tokens))
    done = trips = 0
    units = 0.0
    while done < len(out):
        text = prompt + out[:done]
        if args.oracle:
            drafts = longest_copy(text, out[done:], args.draft_tokens)
        else:
            drafts = speculation.lookup(PromptLookup(), text, len(out) - done - 1)
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == out[done + accepted]:
            accepted += 1
        seconds = 1.0 + (args.fixed + args.per_draft * len(drafts) if drafts else 0.0)
        speculation.length.observe(len(drafts), accepted + 1, seconds)
        done, trips, units = done + accepted + 1, trips + 1, units + seconds
    return trips, units


def longest_copy(text: list[int], future: list[int], most: int) -> list[int]:
    best = 0
    for start in range(len(text)):
        n = 0
        while n < min(most, len(future) - 1) and start + n < len(text):
            if text[start + n] != future[n]:
                break
            n += 1
        best = max(best, n)
    return future[:best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--draft-tokens", type=int, default=10)
    parser.add_argument("--fixed", type=float, default=0.14, help="a step with drafts, in steps")
    parser.add_argument("--per-draft", type=float, default=0.01, help="a draft token, in steps")
    parser.add_argument("--oracle", action="store_true", help="copy what the model will say")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    path = resolve_model(MODEL)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result: dict[str, object] = {"bench": "replay_speculative", **vars(args)}
    for name, prompts in PROMPTS.items():
        rows, tokens, trips, units = [], 0, 0, 0.0
        for text in prompts:
            ids = encode_prompt(tokenizer, text, chat=True)
            with torch.inference_mode():
                full = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
            out = full[0, ids.shape[1] :].tolist()
            n, u = replay(ids[0].tolist(), out, args)
            rows.append({"tokens": len(out), "trips": n, "tokens_per_trip": round(len(out) / n, 2)})
            tokens, trips, units = tokens + len(out), trips + n, units + u
        result[name] = {
            "per_prompt": rows,
            "tokens_per_trip": round(tokens / trips, 2),
            "decode_speedup": round(tokens / units, 3),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
