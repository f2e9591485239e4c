"""What each ``swarm-node`` subcommand does, over the library's front door ``open_peer``.

Imports no torch at module level: ``status`` never loads it, and ``generate`` loads it (with the
client's side of the model) in a worker thread while its peer starts and looks the swarm up.
"""

from __future__ import annotations

import argparse
import glob
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import trio

from swarm_node.errors import ConfigError, MissingBlocksError
from swarm_node.model.bundled import local_identity, model_id_of
from swarm_node.node.client.early_spans import EarlySpans, early_spans, open_plain_sessions
from swarm_node.node.config import (
    ApiConfig,
    ClientConfig,
    PeerConfig,
    ServerConfig,
    is_adapter_file,
    parse_adapter_flags,
    parse_blocks,
)
from swarm_node.node.peer import ChainWants, Peer, open_peer

if TYPE_CHECKING:
    import torch

    from swarm_node.dht.routing import Hop
    from swarm_node.node.client.generation import GenerationStats

log = logging.getLogger(__name__)

CLIENT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of config dataclass ``cls`` that ``args`` holds flags for (lists as tuples)."""
    names = [f.name for f in fields(cls) if "flag" in f.metadata and hasattr(args, f.name)]
    values = {name: getattr(args, name) for name in names}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}


def resolve_client_device(args: argparse.Namespace) -> None:
    """``--device``/``--dtype`` of a client command made concrete ("auto": model/devices.py): the
    head computes there, and sessions ask servers for that dtype."""
    from swarm_node.model.devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    args.device, args.dtype = str(device), resolve_dtype(args.dtype, device)


def _client_peer(args: argparse.Namespace) -> PeerConfig:
    """A client's peer: it only dials out (servers answer on its own connections), so it is not
    checked for reachability (AutoNAT's dial-back: a connection handshake before the first
    lookup) and offers no relay."""
    values = {"reachability": "public", "no_relay": True} | flag_values(PeerConfig, args)
    return PeerConfig(listen=CLIENT_LISTEN, **values)


async def serve(args: argparse.Namespace) -> int:
    start, end = parse_blocks(args.blocks) if args.blocks is not None else (0, 0)
    values = flag_values(ServerConfig, args) | {"adapters": parse_adapter_flags(args.adapters)}
    server = ServerConfig(**values, start=start, end=end)
    peer_values = flag_values(PeerConfig, args)
    if tuple(peer_values["listen"]) == ("none",):  # reached through relays only
        peer_values["listen"] = ()
    config = PeerConfig(**peer_values)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_peer(config, server=server) as peer:
            for addr in peer.addrs:
                print(addr, flush=True)
            if not args.initial_peers and peer.addrs:
                log.info("started a new swarm; others join with --initial-peers %s", peer.addrs[0])
            async for signum in signals:
                log.info("got %s: withdrawing and shutting down", signal.Signals(signum).name)
                break
    log.info("stopped cleanly")
    return 0


class TextStream:
    """Prints decoded text as tokens arrive, correct across multi-byte characters."""

    def __init__(self, tokenizer: Any, out: Any = sys.stdout) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half a character; wait for the rest
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text

    def retract(self, n: int) -> None:
        """The last ``n`` tokens are taken back (a server was caught lying): say so, and print
        the new text generated so far again from its start."""
        del self.ids[len(self.ids) - n :]
        self.printed = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(
            f"\n[a server was caught lying: {n} token(s) taken back; the new text so far:]\n"
            f"{self.printed}"
        )
        self.out.flush()


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool) -> torch.Tensor:
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def has_tuned_files(args: argparse.Namespace) -> bool:
    """Whether ``generate`` was given ``--prompt-file`` or an ``--adapter`` file."""
    adapter = getattr(args, "adapter", None)
    return getattr(args, "prompt_file", None) is not None or bool(
        adapter and is_adapter_file(adapter)
    )


def tuned_inputs(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """``generate``'s ``--prompt-file FILE`` and ``--adapter FILE`` as ``generate_tokens`` arguments
    (``prefix`` and ``tuning``: deep prompts, client LoRA), each file checked against the model."""
    from swarm_node.model.dtypes import TORCH_DTYPES
    from swarm_node.model.tuned_files import load_tuned
    from swarm_node.node.client.settings import HopTuning

    prefix = deep = lora = None
    dtype = TORCH_DTYPES[args.dtype]
    identity = local_identity(args.model)  # None: a folder that cannot be identified
    model = model_id_of(args.model) if identity is None else identity.name
    digest = "" if identity is None else identity.digest
    if getattr(args, "prompt_file", None) is not None:
        methods = ("ptune", "deep_ptune")
        tuned = load_tuned(
            args.prompt_file,
            model=model,
            config=config,
            methods=methods,
            dtype=dtype,
            model_digest=digest,
        )
        prefix = tuned.prompts  # (P, H)
        deep = tuned.deep_prompts_for(int(config.num_hidden_layers))  # (L, P, H) or None
    adapter = getattr(args, "adapter", None)
    if adapter and is_adapter_file(adapter):
        lora = load_tuned(
            adapter, model=model, config=config, methods=("lora",), dtype=dtype, model_digest=digest
        ).lora
    return {"prefix": prefix, "tuning": HopTuning(prompts=deep, lora=lora)}


def _client_side(
    args: argparse.Namespace, path: Any, tokenizer: Any = None
) -> tuple[Any, Any, Any, torch.Tensor, dict[str, Any]]:
    """What the client holds of the model at ``path``, loaded: checkpoint, tokenizer (``tokenizer``
    when given), head, the prompt's ids and the tuned inputs (blocking: imports torch, reads the
    weights)."""
    from swarm_node.model import Checkpoint, ClientHead, load_tokenizer
    from swarm_node.model.dtypes import TORCH_DTYPES
    from swarm_node.node.client.settings import HopTuning

    checkpoint = Checkpoint.open(path)
    if tokenizer is None:
        tokenizer = load_tokenizer(path, plain=not args.chat)  # a chat template needs transformers
    device = getattr(args, "device", "cpu")  # resolve_client_device made it concrete
    head = ClientHead.load(checkpoint, dtype=TORCH_DTYPES[args.dtype], device=device)
    input_ids = encode_prompt(tokenizer, args.prompt, chat=args.chat)
    tuned = (
        tuned_inputs(args, checkpoint.config)  # imports transformers: only for tuned files
        if has_tuned_files(args)
        else {"prefix": None, "tuning": HopTuning(prompts=None, lora=None)}
    )
    return checkpoint, tokenizer, head, input_ids, tuned


def _loaded_client_side(
    args: argparse.Namespace, path: Any, counted: Callable[[int], object] | None = None
) -> tuple[Any, Any, Any, torch.Tensor, dict[str, Any]]:
    """``_client_side`` on the device ``--device``/``--dtype`` resolve to, with the modules that
    generating needs imported (blocking: what a worker thread does while the peer starts).
    ``counted``: told the prompt's length in tokens first, before torch is imported (a plain
    prompt: the tokenizer needs no torch), so that sessions can open meanwhile."""
    started = time.perf_counter()
    tokenizer = None
    if counted is not None and not args.chat:
        from swarm_node.model import load_tokenizer

        tokenizer = load_tokenizer(path, plain=True)
        counted(len(tokenizer(args.prompt).input_ids))
    import swarm_node.node.client.generation  # noqa: F401 (imported here, off the event loop)

    imported = time.perf_counter()
    resolve_client_device(args)
    side = _client_side(args, path, tokenizer)
    log.debug(
        "client's side of the model ready in %.2f s (%.2f s of it torch and the client's modules)",
        time.perf_counter() - started,
        imported - started,
    )
    return side


class _ClientSide:
    """The client's side of the model at ``path`` (of ``num_blocks`` blocks), loading in a worker
    thread from ``run``'s start: torch's import and the weights' reading overlap with the peer's
    start and the lookup on the event loop (where either waits: module code holds the GIL)."""

    def __init__(self, path: Any, num_blocks: int) -> None:
        self.path = path
        self.num_blocks = num_blocks
        self._done = trio.Event()
        self._loaded: tuple[Any, Any, Any, torch.Tensor, dict[str, Any]] | None = None
        self._counted = trio.Event()
        self._prompt_tokens: int | None = None

    async def run(self, args: argparse.Namespace) -> None:
        token = trio.lowlevel.current_trio_token()

        def counted(tokens: int) -> None:  # in the worker thread
            trio.from_thread.run_sync(self._count, tokens, trio_token=token)

        try:
            # abandoned when cancelled: a peer that failed to start does not wait for the weights
            self._loaded = await trio.to_thread.run_sync(
                _loaded_client_side, args, self.path, counted, abandon_on_cancel=True
            )
        finally:
            self._counted.set()  # a load that failed, or a chat prompt: no count comes
        self._done.set()

    def _count(self, tokens: int) -> None:
        self._prompt_tokens = tokens
        self._counted.set()

    async def prompt_tokens(self) -> int | None:
        """The prompt's length in tokens, once the worker thread has counted them (before torch
        is loaded); None when it counts none (a chat prompt) or the load failed first."""
        await self._counted.wait()
        return self._prompt_tokens

    async def loaded(self) -> tuple[Any, Any, Any, torch.Tensor, dict[str, Any]]:
        await self._done.wait()
        assert self._loaded is not None
        return self._loaded


@asynccontextmanager
async def _loading_client_side(args: argparse.Namespace) -> AsyncIterator[_ClientSide]:
    """``args.model``'s client's side loading in the background inside the block (a bundled model
    converted first, once); a failure to load ends the block with that error."""
    path, checkpoint = await _checkpoint(args.model)
    side = _ClientSide(path, checkpoint.num_blocks)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side.run, args)
            yield side
    except BaseExceptionGroup as group:
        from swarm_node.node.client.recovery import sole_error

        raise sole_error(group) or group from None


async def _find_servers_early(peer: Peer, model: str, num_blocks: int) -> None:
    """Look the model's servers up while the client's side loads (stopping at the first that hold
    every block) and ping those a chain would take (a dial each, that the session reuses); routing
    then reuses both."""
    try:
        await peer.find_servers(model, num_blocks, leaving_out=frozenset())
        await peer.ping_a_chain(model, 0, num_blocks)
    except trio.TooSlowError:
        log.info("looking up the servers of %s timed out; routing will try again", model)
    except MissingBlocksError as exc:  # routing tries again, and says why if it fails too
        log.info("no chain of %s yet: %s", model, exc)


async def _generate_with(
    peer: Peer, args: argparse.Namespace, out: Any, side: _ClientSide | None = None
) -> GenerationStats:
    """Generate from ``args.prompt`` with ``args.model``, whose client's side ``side`` is loading
    (None: starts loading now): the swarm is looked up meanwhile, so neither waits for the other."""
    if side is None:
        async with _loading_client_side(args) as side:
            return await _generate_with(peer, args, out, side)
    path = str(side.path)
    identity = await peer.pin_model(path)  # servers found from now on hold these weights
    model = model_id_of(path) if identity is None else identity.name
    await _find_servers_early(peer, model, side.num_blocks)
    log.debug("servers of %s looked up", model)
    async with early_spans() as early:
        chain = await _open_sessions_early(peer, args, side, model, early)
        return await _generate_loaded(peer, args, out, side, model, chain, early)


def _early_dtype(args: argparse.Namespace) -> str | None:
    """The dtype ``generate``'s sessions will ask for, where it is known before torch is loaded:
    ``--dtype`` when named; float32 for "auto" on the CPU (``--device cpu``, or "auto" where this
    machine has no NVIDIA device); else None (torch's view of the device decides)."""
    device = getattr(args, "device", "cpu")  # as _client_side reads it
    if args.dtype != "auto":  # named, or resolved by now (resolve_client_device)
        return str(args.dtype)
    if device == "cpu" or (device == "auto" and not glob.glob("/dev/nvidia[0-9]*")):
        return "float32"
    return None


async def _open_sessions_early(
    peer: Peer, args: argparse.Namespace, side: _ClientSide, model: str, early: EarlySpans
) -> list[Hop] | None:
    """The chain ``generate`` takes, its sessions opening in ``early`` while torch and the client's
    side of the model load (the prompt counted, the chain chosen: early_spans.py); None where they
    open after the load, as before (a chat prompt, tuned files, a dtype that only torch can
    resolve, push or a named adapter, no chain found yet)."""
    dtype = _early_dtype(args)
    if dtype is None or args.chat or has_tuned_files(args):
        return None
    tokens = await side.prompt_tokens()
    if tokens is None:
        return None
    max_length = tokens + args.max_new_tokens  # as generate_tokens sizes the session
    try:
        chain = await peer.route(ChainWants(model=model, max_length=max_length), 0, side.num_blocks)
    except (MissingBlocksError, trio.TooSlowError) as exc:  # routing after the load says why
        log.info("no chain to open sessions on while loading: %s", exc)
        return None
    if not open_plain_sessions(early, peer, chain, model=model, max_length=max_length, dtype=dtype):
        return None
    log.debug("opening sessions on %d servers while the client's side loads", len(chain))
    return chain


async def _generate_loaded(
    peer: Peer,
    args: argparse.Namespace,
    out: Any,
    side: _ClientSide,
    model: str,
    chain: list[Hop] | None,
    early: EarlySpans,
) -> GenerationStats:
    """``_generate_with`` once the client's side is loaded, on ``chain`` (None: routed now) with
    the sessions opened in ``early``."""
    checkpoint, tokenizer, head, input_ids, tuned = await side.loaded()
    # torch is loaded by now (by the worker thread): these import no more than their own modules
    from swarm_node.node.client.drafting import DraftModel
    from swarm_node.node.client.generation import SamplingConfig, generate_tokens
    from swarm_node.node.client.generation_options import model_eos_ids
    from swarm_node.node.client.settings import SessionSettings
    from swarm_node.node.client.speculative import Speculation

    speculation = None
    if getattr(args, "speculative", False):
        draft = getattr(args, "draft", None)
        draft_model = (
            None if draft is None else await trio.to_thread.run_sync(DraftModel.load, draft)
        )
        speculation = Speculation.of(
            draft_model=draft_model, num_tokens=getattr(args, "draft_tokens", 10)
        )
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=getattr(args, "temperature", 0.0),
        top_p=getattr(args, "top_p", 1.0),
        seed=getattr(args, "seed", None),
        eos_token_ids=model_eos_ids(checkpoint.setting("eos_token_id"), tokenizer),
    )
    settings = SessionSettings(
        model=model,
        num_blocks=checkpoint.num_blocks,
        dtype=args.dtype,
    )
    if not args.chat:
        out.write(args.prompt)
    stream = TextStream(tokenizer, out)

    _, stats = await generate_tokens(
        peer,
        head,
        input_ids,
        settings,
        sampling,
        chain=chain,
        early=early,
        on_tokens=stream,
        speculation=speculation,
        on_retract=stream.retract,
        **tuned,
    )
    out.write("\n")
    out.flush()
    return stats


def _describe(stats: GenerationStats) -> str:
    hops = ", ".join(f"blocks {h.start}:{h.end} on {h.server.peer_id[-8:]}" for h in stats.chain)
    text = (
        f"chain: {hops}\n{stats.new_tokens} new tokens, first after {stats.time_to_first_token:.2f} s, "
        f"{stats.tokens_per_second:.1f} tokens/s after that"
    )
    if stats.draft_tokens:
        text += (
            f"\nspeculative: {stats.new_tokens} tokens in {stats.steps} steps, "
            f"{stats.accepted_tokens} of {stats.draft_tokens} draft tokens accepted"
        )
    for event in stats.recoveries:
        text += (
            f"\nrecovered: blocks {event.start}:{event.end} moved from {event.failed[-8:]} to "
            f"{', '.join(p[-8:] for p in event.replacements)} in {event.seconds:.2f} s "
            f"({event.replayed_steps} steps replayed)"
        )
    for hedge in stats.hedges:
        text += (
            f"\nhedged: blocks {hedge.start}:{hedge.end} were late on "
            f"{', '.join(p[-8:] for p in hedge.late)} (past {hedge.late_after:.2f} s); "
            f"{', '.join(p[-8:] for p in hedge.replacements)} answered in {hedge.seconds:.2f} s"
        )
    return text


async def generate(args: argparse.Namespace) -> int:
    config = _client_peer(args)
    _need_initial_peers(args)
    if has_tuned_files(args):  # bad files fail before any networking
        await trio.to_thread.run_sync(resolve_client_device, args)
        _, checkpoint = await _checkpoint(args.model)
        await trio.to_thread.run_sync(tuned_inputs, args, checkpoint.config)
    adapter = args.adapter if args.adapter and not is_adapter_file(args.adapter) else None
    client = ClientConfig(**flag_values(ClientConfig, args) | {"adapter": adapter})
    async with _loading_client_side(args) as side, open_peer(config, client=client) as peer:
        stats = await _generate_with(peer, args, sys.stdout, side)
    print(_describe(stats), file=sys.stderr)
    return 0


async def _checkpoint(model: str) -> tuple[Any, Any]:
    """The model's folder and Checkpoint (a bundled one is converted once, then cached)."""
    from swarm_node.model import Checkpoint, resolve_model

    path = await trio.to_thread.run_sync(resolve_model, model)
    return path, await trio.to_thread.run_sync(Checkpoint.open, path)


def _need_initial_peers(args: argparse.Namespace) -> None:
    if not args.initial_peers:
        raise ConfigError(
            "'--initial-peers' must name at least one peer of the swarm (or set SWARM_INITIAL_PEERS)"
        )


async def status(args: argparse.Namespace, out: Any = None) -> int:
    """Print the block coverage map of ``args.model`` (text, or one JSON object with --json)."""
    import json

    from swarm_node.node.apps.swarm_status import format_report, gather_status

    out = out or sys.stdout
    _need_initial_peers(args)
    local = await trio.to_thread.run_sync(local_identity, args.model)
    name = model_id_of(args.model) if local is None else local.name
    async with open_peer(_client_peer(args)) as peer:
        report = await gather_status(
            peer,
            name,
            num_blocks=args.num_blocks,
            expected_digest="" if local is None else local.digest,
        )
    out.write((json.dumps(report) if args.json else format_report(report)) + "\n")
    out.flush()
    return 0


def _api_config(args: argparse.Namespace, models: tuple[str, ...]) -> ApiConfig:
    values = flag_values(ApiConfig, args)
    return ApiConfig(models=models, dtype=args.dtype, device=args.device, **values)


async def _serve_api_until_signal(peer: Peer, config: Any) -> None:
    from swarm_node.node.apps.api import open_api

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_api(peer, config) as api:
            print(
                f"OpenAI-compatible API at {api.url}/v1 (models: {', '.join(api.runtimes)}); "
                f"swarm map at {api.url}/; chat at {api.url}/chat",
                file=sys.stderr,
            )
            print(api.url, flush=True)
            async for signum in signals:
                log.info("got %s: stopping the API", signal.Signals(signum).name)
                break


async def api(args: argparse.Namespace) -> int:
    """Serve the OpenAI-compatible API and the swarm map over the swarm until SIGINT/SIGTERM."""
    _need_initial_peers(args)
    resolve_client_device(args)
    config = _api_config(args, (args.model, *args.also_model))
    async with open_peer(_client_peer(args)) as peer:
        await _serve_api_until_signal(peer, config)
    return 0


def keygen(args: argparse.Namespace) -> int:
    from swarm_node.node.net.swarm_key import write_swarm_key

    write_swarm_key(args.swarm_key)
    print(f"wrote a new swarm key to {args.swarm_key}; give it to every peer of the private swarm")
    return 0


def split_blocks(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


async def demo(args: argparse.Namespace) -> int:
    if not 1 <= args.servers <= 8:
        raise ConfigError(f"'--servers' must be in [1, 8], got {args.servers}")
    resolve_client_device(args)  # the servers and the client agree on one dtype
    t0 = time.perf_counter()
    print(f"preparing {args.model} (converted once, then cached)...", file=sys.stderr, flush=True)
    _, checkpoint = await _checkpoint(args.model)
    num_blocks = checkpoint.num_blocks
    spans = split_blocks(num_blocks, args.servers)
    async with AsyncExitStack() as stack:
        servers: list[Peer] = []
        for start, end in spans:
            initial = tuple(servers[0].addrs[:1]) if servers else ()
            peer = await stack.enter_async_context(
                open_peer(
                    PeerConfig(listen=CLIENT_LISTEN, initial_peers=initial),
                    server=ServerConfig(
                        model=args.model,
                        start=start,
                        end=end,
                        dtype=args.dtype,
                        device=args.device,
                    ),
                )
            )
            servers.append(peer)
            print(
                f"server {peer.peer_id[-8:]} serves blocks {start}:{end} at {peer.addrs[0]}",
                file=sys.stderr,
            )
        client = await stack.enter_async_context(
            open_peer(PeerConfig(listen=CLIENT_LISTEN, initial_peers=tuple(servers[0].addrs[:1])))
        )
        print(
            f"swarm ready in {time.perf_counter() - t0:.1f} s; asking: {args.prompt!r}\n",
            file=sys.stderr,
            flush=True,
        )
        args.temperature, args.top_p, args.seed = 0.0, 1.0, None
        stats = await _generate_with(client, args, sys.stdout)
        print("\n" + _describe(stats), file=sys.stderr, flush=True)
        if args.api:
            await _serve_api_until_signal(client, _api_config(args, (args.model,)))
    return 0
