"""The ``swarm-node`` command: a thin shell over ``open_peer``.

swarm-node demo                                  # a local 2-server swarm answers a prompt
swarm-node serve --blocks 0:15                   # start a swarm, serve blocks 0..14
swarm-node serve --blocks 15:30 --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/12D3...
swarm-node generate "The capital of France is" --initial-peers /ip4/.../p2p/12D3...
swarm-node status --initial-peers /ip4/.../p2p/12D3... [--model M] [--json]
swarm-node keygen --swarm-key swarm.key           # then --swarm-key swarm.key on every peer
swarm-node api --initial-peers /ip4/.../p2p/12D3... --port 8000   # OpenAI-compatible API + swarm map
swarm-node demo --api                             # a local swarm that keeps serving the API
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import trio

from swarm_node.errors import SwarmError

CODECS = [
    "none",
    "float16",
    "bfloat16",
    "blockwise8",
    "blockwise8-64",
]  # compression.CODECS, without importing torch

log = logging.getLogger("swarm_node.cli")

DEFAULT_MODEL = "smollm2-135m"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"SWARM_{name}", default)


def _env_list(name: str) -> list[str]:
    value = _env(name)
    return value.split() if value else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-node",
        description="Run large language models collaboratively over a peer-to-peer swarm: servers hold "
        "spans of transformer blocks, clients hold the embeddings and LM head.",
        epilog="Every flag has an environment default SWARM_<FLAG> (e.g. SWARM_INITIAL_PEERS, SWARM_MODEL).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=_env("MODEL", DEFAULT_MODEL),
            help=f"bundled model name or a local Hugging Face folder (default: {DEFAULT_MODEL})",
        )
        p.add_argument(
            "--dtype",
            default=_env("DTYPE", "float32"),
            choices=["float32", "bfloat16"],
            help="weights and hidden-state dtype (default: float32)",
        )
        p.add_argument(
            "--initial-peers",
            nargs="+",
            default=_env_list("INITIAL_PEERS"),
            metavar="MULTIADDR",
            help="full multiaddrs (/ip4/HOST/tcp/PORT/p2p/ID) of peers already in the swarm",
        )
        p.add_argument(
            "--identity",
            type=Path,
            default=_env("IDENTITY"),
            metavar="FILE",
            help="key file keeping this peer's id across restarts (created if missing)",
        )
        p.add_argument(
            "--swarm-key",
            type=Path,
            default=_env("SWARM_KEY"),
            metavar="FILE",
            help="pre-shared key of a private swarm (make one with `swarm-node keygen`)",
        )

    serve = sub.add_parser(
        "serve",
        help="serve a span of transformer blocks",
        description="Serve blocks START..END-1 of a model (--blocks), or N blocks where the "
        "swarm needs them most (--num-blocks). With no --initial-peers, start a new swarm.",
    )
    common(serve)
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--blocks", metavar="START:END", help="blocks to serve, e.g. 20:40")
    where.add_argument(
        "--num-blocks",
        type=int,
        metavar="N",
        help="serve N blocks chosen from the DHT records: where the weakest coverage (by "
        "throughput) rises most; re-checked every --rebalance-interval s, moving only when "
        "the gain passes --min-gain and no block is left uncovered",
    )
    serve.add_argument(
        "--start-delay",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="with --num-blocks: wait a random time up to this before choosing, so servers "
        "starting together do not pile onto the same blocks (default: 3)",
    )
    serve.add_argument(
        "--rebalance-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --num-blocks: mean seconds between re-checks of the chosen blocks (default: 60)",
    )
    serve.add_argument(
        "--min-gain",
        type=float,
        default=0.2,
        help="with --num-blocks: move only if the weakest block's coverage rises by this "
        "fraction (default: 0.2)",
    )
    serve.add_argument(
        "--listen",
        nargs="+",
        default=_env_list("LISTEN") or ["/ip4/0.0.0.0/tcp/0"],
        metavar="MULTIADDR",
        help="where to listen (default: /ip4/0.0.0.0/tcp/0, any free port)",
    )
    serve.add_argument(
        "--announce",
        nargs="+",
        default=_env_list("ANNOUNCE"),
        metavar="MULTIADDR",
        help="addresses to advertise instead of the listening ones (e.g. behind NAT or a proxy)",
    )
    serve.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    serve.add_argument(
        "--throughput",
        type=float,
        default=None,
        help="tokens/s to announce (default: measured at start, cached per model, dtype and "
        "device in the cache folder: $SWARM_CACHE_DIR or ~/.cache/swarm-node)",
    )
    serve.add_argument(
        "--max-session-length", type=int, default=4096, help="tokens one session may hold"
    )
    serve.add_argument(
        "--cache-tokens",
        type=int,
        default=64 * 1024,
        help="attention-cache budget in tokens across all sessions (default: 65536)",
    )
    serve.add_argument(
        "--max-sessions-per-peer",
        type=int,
        default=16,
        help="sessions one client may hold here at once; more are refused (default: 16)",
    )
    serve.add_argument(
        "--session-idle-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="close a client's sessions after this long without a message (default: 120)",
    )
    serve.add_argument(
        "--compression",
        default=_env("COMPRESSION", "none"),
        choices=CODECS,
        help="codec of hidden states this server sends when a client leaves it the "
        "choice (default: none; blockwise8-64 sends ~3.8x fewer bytes with ~1%% error per token; "
        "blockwise8's 4096-value blocks share one scale between ~7 prompt tokens)",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=float(_env("SHUTDOWN_GRACE", "5")),
        metavar="SECONDS",
        help="on Ctrl-C or SIGTERM: refuse new sessions, withdraw the record, and give the "
        "steps being computed this long to finish (default: 5)",
    )
    serve.add_argument(
        "--quant",
        default=_env("QUANT"),
        choices=["int8", "nf4"],
        help="hold the weights in 8-bit (LLM.int8) or 4-bit (NF4) via bitsandbytes: "
        "~4x / ~8x less memory per block, slower on CPU (default: --dtype weights)",
    )
    serve.add_argument(
        "--adapters",
        nargs="+",
        default=_env_list("ADAPTERS"),
        metavar="NAME=PATH",
        help="LoRA adapters to hold, each a folder in PEFT's format (adapter_config.json + "
        "adapter_model.safetensors); announced by NAME, applied to the sessions that name it",
    )

    gen = sub.add_parser(
        "generate",
        help="generate text through the swarm",
        description="Generate a continuation of PROMPT through the swarm, streaming tokens to stdout.",
    )
    common(gen)
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    gen.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds one server may take to answer a step; one that misses it (or fails) is "
        "banned for a while and its blocks move to other servers (default: 60)",
    )
    gen.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        help="attempts to find new servers for a failed server's blocks before giving up "
        "with the blocks named (default: 5; 0: fail at once)",
    )
    gen.add_argument(
        "--compression",
        default=_env("COMPRESSION"),
        choices=CODECS,
        help="codec of hidden states on the wire, both ways (default: send uncompressed "
        "and let each server answer in its own --compression)",
    )
    gen.add_argument(
        "--push",
        action="store_true",
        help="servers pass hidden states straight to the next server (N+1 delays a token, not 2N)",
    )
    gen.add_argument(
        "--adapter",
        default=_env("ADAPTER"),
        metavar="NAME|FILE",
        help="a LoRA adapter: the NAME servers announce (only they are chosen), or a FILE "
        "saved by swarm-node (a client-owned LoRA, sent with the requests)",
    )
    gen.add_argument(
        "--prompt-file",
        type=Path,
        default=_env("PROMPT_FILE"),
        metavar="FILE",
        help="a trained soft prompt saved by swarm-node (tuned file, method ptune or "
        "deep_ptune), put before the prompt",
    )

    status = sub.add_parser(
        "status",
        help="show which servers cover which blocks of a model",
        description="Print the block coverage map of a model: every block, the servers "
        "covering it, their throughput, free cache and round trip; missing blocks stand out.",
    )
    common(status)
    status.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    status.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="blocks of the model (default: asked from a server)",
    )

    api = sub.add_parser(
        "api",
        help="serve an OpenAI-compatible HTTP API and a live swarm map",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (OpenAI's "
        "shapes, streaming as server-sent events) over the swarm, and a live swarm map at / "
        "(JSON at /api/v1/state). Point any OpenAI client at http://HOST:PORT/v1.",
    )
    common(api)
    api.add_argument(
        "--also-model",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="more models to serve besides --model (bundled names or folders)",
    )
    api_flags(api)

    keygen = sub.add_parser("keygen", help="make a swarm key file for a private swarm")
    keygen.add_argument(
        "--swarm-key", type=Path, required=True, metavar="FILE", help="where to write the key"
    )

    demo = sub.add_parser(
        "demo",
        help="start a local swarm of servers and answer a prompt",
        description="Start a local swarm on 127.0.0.1 with the model split between servers, "
        "answer a prompt, and show which peer served which blocks.",
    )
    demo.add_argument("--model", default=_env("MODEL", DEFAULT_MODEL))
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    demo.add_argument("--servers", type=int, default=2, help="number of server peers (default: 2)")
    demo.add_argument("--prompt", default="The capital of France is")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--chat", action="store_true")
    demo.add_argument(
        "--api",
        action="store_true",
        help="after answering, keep the swarm up and serve the OpenAI-compatible API and map",
    )
    api_flags(demo)
    return parser


def api_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default=_env("API_HOST", "127.0.0.1"),
        help="address the HTTP API listens on (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(_env("API_PORT", "8000") or 8000),
        help="HTTP port (default: 8000; 0 picks a free one)",
    )
    p.add_argument(
        "--max-context", type=int, default=2048, help="prompt + completion tokens of a request"
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=16,
        help="requests generating at once, more wait their turn (default 16: servers allow 16 sessions a peer)",
    )
    p.add_argument(
        "--refresh", type=float, default=5.0, help="seconds between DHT reads for the swarm map"
    )


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("swarm_node").setLevel(logging.INFO if verbose < 2 else logging.DEBUG)
    from swarm_node.node.net.host import quiet_libp2p_logging

    quiet_libp2p_logging(verbose)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from swarm_node.node.apps import commands  # imports libp2p, which resets its loggers on import

    _setup_logging(args.verbose)

    runners: dict[str, Any] = {
        "serve": commands.serve,
        "generate": commands.generate,
        "demo": commands.demo,
        "status": commands.status,
        "api": commands.api,
    }
    try:
        if args.command == "keygen":
            return commands.keygen(args)
        return trio.run(runners[args.command], args)
    except SwarmError as exc:
        print(f"swarm-node {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
