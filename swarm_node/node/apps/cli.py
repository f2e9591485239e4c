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
from dataclasses import fields
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

import trio

from swarm_node.errors import SwarmError
from swarm_node.node.config import (
    ApiConfig,
    ClientConfig,
    PeerConfig,
    ServerConfig,
    count_or_auto,
)

log = logging.getLogger("swarm_node.cli")

_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS |= {"0": False, "false": False, "no": False, "off": False}
_KINDS = {int: "an int", float: "a number", count_or_auto: "an int or 'auto'"}


class _BadEnv:
    """A SWARM_* value that does not parse: an error unless its flag is given."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        namespace, rest = super().parse_known_args(args, namespace)
        for value in vars(namespace).values():
            if isinstance(value, _BadEnv):
                self.error(value.message)
        return namespace, rest


def _from_env(env: str, raw: str, kind: Any, nargs: str | None, choices: Any) -> Any:
    if kind is bool:
        if raw.strip().lower() in _BOOLS:
            return _BOOLS[raw.strip().lower()]
        return _BadEnv(f"{env} must be one of {'/'.join(_BOOLS)}, got {raw!r}")
    values = []
    for item in raw.split() if nargs else [raw]:
        try:
            value = kind(item)
        except ValueError:
            return _BadEnv(f"{env} must be {_KINDS[kind]}, got {raw!r}")
        if choices is not None and value not in choices:
            return _BadEnv(f"{env} must be one of {', '.join(choices)}, got {raw!r}")
        values.append(value)
    return values if nargs else values[0]


def _add(p: Any, *names: str, help: str, kind: Any = str, env: str = "", **kw: Any) -> None:
    """One flag, its default overridden by SWARM_<FLAG>; its help names the default and the variable."""
    env = env or "SWARM_" + names[-1].lstrip("-").replace("-", "_").upper()
    default = kw.get("default")
    shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
    shown = f"{shown:g}" if isinstance(shown, float) else shown
    note = "" if shown is None or shown is False or shown == "" else f"default: {shown}; "
    raw = os.environ.get(env)
    if raw:
        kw["default"] = _from_env(env, raw, kind, kw.get("nargs"), kw.get("choices"))
        kw.pop("required", None)
    if kind is bool:  # a flag on by default is turned off with --no-FLAG
        kw.setdefault("action", argparse.BooleanOptionalAction if default else "store_true")
    elif "action" not in kw and kind is not str:
        kw["type"] = kind
    p.add_argument(*names, help=f"{help} ({note}env {env})".replace("%", "%%"), **kw)


def _kind(hint: Any) -> tuple[Any, str | None]:
    if isinstance(hint, UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is tuple:
        return (get_args(hint)[0] if get_args(hint)[0] in (str, Path) else str), "+"
    return hint, None


def _fields(p: Any, cls: type, *names: str) -> None:
    """The flags of a config dataclass's fields: name, default, help and choices from the field."""
    hints, by_name = get_type_hints(cls), {f.name: f for f in fields(cls)}
    for name in names:
        meta = dict(by_name[name].metadata)
        flag = meta.pop("flag") or "--" + name.replace("_", "-")
        kind, nargs = _kind(hints[name])
        kind = meta.pop("kind", kind)
        if kind is not bool and "choices" not in meta:
            meta.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
        default = meta.pop("cli_default", by_name[name].default)
        if nargs:
            meta.update(nargs=nargs, default=list(default))
        else:
            meta["default"] = default
        _add(p, flag, dest=name, kind=kind, **meta)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="swarm-node",
        description="Run large language models collaboratively over a peer-to-peer swarm: servers hold "
        "spans of transformer blocks, clients hold the embeddings and LM head.",
        epilog="Every flag has an environment default SWARM_<FLAG> (e.g. SWARM_INITIAL_PEERS, SWARM_MODEL), "
        "named in its help; flags override it.",
    )
    _add(
        parser,
        "-v",
        "--verbose",
        kind=int,
        action="count",
        default=0,
        help="more logs (-vv: debug)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        _fields(p, ServerConfig, "model", "dtype", "device")
        _fields(p, PeerConfig, "initial_peers", "identity", "swarm_key")

    serve = sub.add_parser(
        "serve",
        help="serve a span of transformer blocks",
        description="Serve blocks START..END-1 of a model (--blocks), or N blocks where the "
        "swarm needs them most (--num-blocks). With no --initial-peers, start a new swarm.",
    )
    common(serve)
    chosen = any(os.environ.get(env) for env in ("SWARM_BLOCKS", "SWARM_NUM_BLOCKS"))
    where = serve.add_mutually_exclusive_group(required=not chosen)
    _add(where, "--blocks", metavar="START:END", help="blocks to serve, e.g. 20:40")
    _fields(where, ServerConfig, "num_blocks")
    _fields(serve, ServerConfig, "start_delay", "rebalance_interval", "min_gain")
    _fields(
        serve,
        PeerConfig,
        "listen",
        "announce_addrs",
        "reachability",
        "no_relay",
        "no_hole_punch",
        "relay_max_reservations",
        "relay_max_circuits",
        "relay_max_circuit_mb",
        "relay_max_circuit_seconds",
        "relays",
    )
    _fields(
        serve,
        ServerConfig,
        *("torch_threads", "throughput", "max_session_length", "cache_budget_tokens"),
        *("max_sessions_per_peer", "max_peer_cache_share", "session_idle_timeout"),
        *("send_timeout", "max_request_tokens", "max_activation_mb", "max_queued"),
        *("max_queued_per_peer", "max_queued_mb", "max_queued_mb_per_peer", "max_receiving_mb"),
        *("compression", "shutdown_grace", "quant", "adapters", "mmap_weights"),
        *("no_batching", "prefill_chunk", "no_verify_weights", "operator", "max_memory_mb"),
    )

    gen = sub.add_parser(
        "generate",
        help="generate text through the swarm",
        description="Generate a continuation of PROMPT through the swarm, streaming tokens to stdout.",
    )
    common(gen)
    gen.add_argument("prompt", help="the text to continue")
    _add(gen, "--max-new-tokens", kind=int, default=32, help="tokens to generate")
    _add(gen, "--temperature", kind=float, default=0.0, help="0 = greedy")
    _add(gen, "--top-p", kind=float, default=1.0, help="nucleus sampling: keep this much mass")
    _add(gen, "--seed", kind=int, help="seed for sampling")
    _add(gen, "--chat", kind=bool, help="wrap the prompt in the model's chat template")
    _fields(
        gen,
        ClientConfig,
        "step_timeout",
        "max_attempts",
        "compression",
        "push",
        "adapter",
        "max_server_share",
        "idle_ping",
        "verify_rate",
        "publish_evidence",
        "publish_activations",
        "trust_evidence",
        "accept_quant",
        "accept_dtype",
        "speculative",
        "draft",
        "draft_tokens",
        "lookup_reuse",
    )
    _add(
        gen,
        "--prompt-file",
        kind=Path,
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
    _add(status, "--json", kind=bool, help="print one JSON object instead of text")
    _add(
        status, "--num-blocks", kind=int, help="blocks of the model (default: asked from a server)"
    )

    api = sub.add_parser(
        "api",
        help="serve an OpenAI-compatible HTTP API and a live swarm map",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (OpenAI's "
        "shapes, streaming as server-sent events) over the swarm, and a live swarm map at / "
        "(JSON at /api/v1/state). Point any OpenAI client at http://HOST:PORT/v1.",
    )
    common(api)
    _add(
        api,
        "--also-model",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="more models to serve besides --model (bundled names or folders)",
    )
    api_flags(api)

    keygen = sub.add_parser("keygen", help="make a swarm key file for a private swarm")
    _add(
        keygen,
        "--swarm-key",
        kind=Path,
        required=True,
        metavar="FILE",
        help="where to write the key",
    )

    demo = sub.add_parser(
        "demo",
        help="start a local swarm of servers and answer a prompt",
        description="Start a local swarm on 127.0.0.1 with the model split between servers, "
        "answer a prompt, and show which peer served which blocks.",
    )
    _fields(demo, ServerConfig, "model", "dtype", "device")
    _add(demo, "--servers", kind=int, default=2, help="number of server peers")
    _add(demo, "--prompt", default="The capital of France is", help="the text to continue")
    _add(demo, "--max-new-tokens", kind=int, default=24, help="tokens to generate")
    _add(demo, "--chat", kind=bool, help="wrap the prompt in the model's chat template")
    _add(
        demo,
        "--api",
        kind=bool,
        help="after answering, keep the swarm up and serve the OpenAI-compatible API and map",
    )
    api_flags(demo)
    return parser


def api_flags(p: argparse.ArgumentParser) -> None:
    _fields(
        p,
        ApiConfig,
        "host",
        "port",
        "max_context",
        "max_concurrent",
        "max_waiting",
        "max_body_size",
        "allowed_hosts",
        "api_key",
        "refresh_interval",
        "speculative",
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
    try:
        if args.command == "keygen":
            return commands.keygen(args)
        return trio.run(getattr(commands, args.command), args)  # serve, generate, demo, status, api
    except SwarmError as exc:
        print(f"swarm-node {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """The ``swarm-node`` program: ``main``, then an exit that skips the interpreter's teardown of
    torch and libp2p (~0.6 s on these machines, a cold client's last cost: issue 21) once every
    output is flushed; nothing is left to finish by then (the command's nurseries have closed)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
