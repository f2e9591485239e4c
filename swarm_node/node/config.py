"""Settings of a peer, one frozen dataclass per role, validated on construction.

Defaults < environment (``SWARM_*``, read by the CLI) < flags. A field that is a CLI flag says so in
its metadata (``flag(help, ...)``): the CLI builds the flag, its default and its help from the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from swarm_node.choices import AUTO, CODECS, DTYPES, check_device
from swarm_node.dht.pinning import QUANTS as WEIGHT_VARIANTS
from swarm_node.dht.records import MAX_OPERATOR, MAX_TTL
from swarm_node.errors import ConfigError, check_int

COMPRESSIONS = CODECS  # wire codecs a session may name
SERVER_DEFAULT = "default"  # a session asking for this gets the server's own --compression
QUANTS = (None, "int8", "nf4")
DEFAULT_MODEL = "smollm2-135m"
# a server's default --max-request-tokens, and what clients put in one forward or backward at most
MAX_REQUEST_TOKENS = 16384
_BLOCKS_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_SERVER_ADAPTERS = 64  # dht.records.MAX_ADAPTERS: a record lists at most this many names
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def flag(default: Any, help: str, name: str = "", **extras: Any) -> Any:
    """A field that is also a CLI flag (``--field-name`` unless ``name``): its default, help and
    argparse extras (metavar, choices), ``env`` where it is not SWARM_<FLAG>, ``cli_default``
    where the command line's default differs from the library's."""
    return field(default=default, metadata={"help": help, "flag": name, **extras})


def check_adapter_name(name: Any, field: str = "adapter") -> str:
    """A name announced in the DHT and sent in requests: 1-64 of letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ConfigError(
            f"{field!r} names must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or "
            f"digit, got {str(name)[:80]!r}"
        )
    return name


def parse_adapter_flags(texts: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``["chat=/ad/chat", "sql=~/sql"]`` -> ``(("chat", "/ad/chat"), ("sql", "~/sql"))``, checked."""
    out: list[tuple[str, str]] = []
    for text in texts:
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise ConfigError(
                f"'--adapters' entries must look like NAME=PATH (e.g. chat=./my-lora), got {text!r}"
            )
        out.append((name, path))
    return check_server_adapters(tuple(out))


def check_server_adapters(adapters: Any) -> tuple[tuple[str, str], ...]:
    """ServerConfig.adapters: at most 64 (name, folder) pairs with distinct, valid names."""
    if not isinstance(adapters, tuple) or not all(
        isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) for x in p)
        for p in adapters
    ):
        raise ConfigError(
            f"'adapters' must be a tuple of (name, path) string pairs, got {adapters!r}"
        )
    if len(adapters) > MAX_SERVER_ADAPTERS:
        raise ConfigError(
            f"'adapters' must list at most {MAX_SERVER_ADAPTERS} adapters, got {len(adapters)}"
        )
    seen: set[str] = set()
    for name, _ in adapters:
        check_adapter_name(name, "adapters")
        if name in seen:
            raise ConfigError(f"'adapters' names must be distinct, got {name!r} twice")
        seen.add(name)
    return adapters


def is_adapter_file(value: str) -> bool:
    """A client's ``--adapter`` is a file of its own when it names an existing file, else a name."""
    return Path(value).expanduser().is_file()


def parse_blocks(text: str) -> tuple[int, int]:
    """'20:40' -> (20, 40): blocks 20..39."""
    match = _BLOCKS_RE.match(text)
    if not match:
        raise ConfigError(f"'--blocks' must look like START:END (e.g. 0:15), got {text!r}")
    start, end = int(match.group(1)), int(match.group(2))
    if start >= end:
        raise ConfigError(f"'--blocks' must have START < END, got {text!r}")
    return start, end


def count_or_auto(text: str) -> int | str:
    """A command line's ``--num-blocks``/``--cache-tokens``: an int, or 'auto'."""
    return AUTO if text.strip() == AUTO else int(text)


def _check_choice(name: str, value: object, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name!r} must be one of {choices}, got {value!r}")


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name!r} must be a number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name!r} must be in {bound}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """What every peer has: a libp2p host and a seat in the DHT."""

    listen: tuple[str, ...] = flag(
        ("/ip4/127.0.0.1/tcp/0",),
        "where to listen (tcp/0: any free port; 'none' with --reachability private: nowhere, "
        "reached through relays only)",
        metavar="MULTIADDR",
        cli_default=("/ip4/0.0.0.0/tcp/0",),
    )
    initial_peers: tuple[str, ...] = flag(
        (),
        "full multiaddrs (/ip4/HOST/tcp/PORT/p2p/ID) of peers already in the swarm",
        metavar="MULTIADDR",
    )
    announce_addrs: tuple[str, ...] = flag(
        (),
        "addresses to advertise instead of the listening ones (e.g. behind NAT or a proxy)",
        "--announce",
        metavar="MULTIADDR",
    )
    identity: Path | None = flag(
        None, "key file keeping this peer's id across restarts (created if missing)", metavar="FILE"
    )
    swarm_key: Path | None = flag(
        None,
        "pre-shared key of a private swarm (make one with `swarm-node keygen`)",
        metavar="FILE",
    )
    reachability: str = flag(
        "auto",
        "whether other peers can dial this one: public, private (behind a NAT: reached through "
        "relays) or auto (ask connected peers with AutoNAT)",
        choices=("auto", "public", "private"),
    )
    no_relay: bool = flag(False, "offer no relay service to private peers, even when public")
    no_hole_punch: bool = flag(
        False,
        "keep relayed connections relayed: no direct connection tried (DCUtR hole punching)",
    )
    relay_max_reservations: int = flag(
        16, "private peers this peer relays for at most (when public)", metavar="N"
    )
    relay_max_circuits: int = flag(
        8, "concurrent relayed connections to one private peer", metavar="N"
    )
    relay_max_circuit_mb: int = flag(
        256, "megabytes one relayed connection may carry (both ways)", metavar="MB"
    )
    relay_max_circuit_seconds: int = flag(
        3600, "seconds one relayed connection may last", metavar="S"
    )
    relays: int = flag(2, "relays a private peer keeps a reservation at", metavar="N")
    relay_reservation_ttl: int = 900  # seconds a reservation lasts at this relay unless renewed
    relay_renew_every: float = 120.0  # seconds between a private peer's renewals
    autonat_every: float = 300.0  # seconds between two reachability checks (auto)
    max_frame_size: int = 64 * 2**20  # bytes; bigger frames are refused before allocation
    dht_ttl: float = 120.0  # seconds a server record stays valid; re-announced every third of it
    connect_timeout: float = 10.0  # seconds to reach each initial peer
    # server: answer others' DHT queries and hold records for them; client: ask only (Kademlia's
    # client mode: no server's routing table hands this peer out once it has gone); auto: server
    # when it serves blocks or starts a swarm (no initial peers: others join through it)
    dht_mode: str = "auto"

    def __post_init__(self) -> None:
        if not self.listen and self.reachability != "private":
            raise ConfigError(
                "'listen' must name at least one multiaddr (or reachability must be 'private': "
                "reached through relays only), got none"
            )
        _check_choice("reachability", self.reachability, ("auto", "public", "private"))
        _check_choice("dht_mode", self.dht_mode, ("auto", "server", "client"))
        check_int("relay_max_reservations", self.relay_max_reservations, 1, 1024)
        check_int("relay_max_circuits", self.relay_max_circuits, 1, 1024)
        check_int("relay_max_circuit_mb", self.relay_max_circuit_mb, 1, 2**20)
        check_int("relay_max_circuit_seconds", self.relay_max_circuit_seconds, 1, 7 * 24 * 3600)
        check_int("relays", self.relays, 1, 16)
        check_int("relay_reservation_ttl", self.relay_reservation_ttl, 10, 24 * 3600)
        _check_range("relay_renew_every", self.relay_renew_every, 1.0)
        _check_range("autonat_every", self.autonat_every, 1.0)
        _check_range("max_frame_size", self.max_frame_size, 1024)
        _check_range("dht_ttl", self.dht_ttl, 3.0, MAX_TTL)
        _check_range("connect_timeout", self.connect_timeout, 0.01)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """A server holds blocks ``start..end-1`` of one model, or ``num_blocks`` blocks it chooses itself."""

    model: str = flag(
        MISSING,
        "bundled model name, a local Hugging Face folder, or the digest (8+ hex digits, as "
        "`status` shows it) of a bundled model converted here; servers are told apart by the "
        "digest of their weights, never by the name alone",
        cli_default=DEFAULT_MODEL,
    )
    start: int = 0
    end: int = 0
    num_blocks: int | str | None = flag(
        None,
        "serve N blocks chosen from the DHT records: where the weakest coverage (by "
        "throughput) rises most; re-checked every --rebalance-interval s, moving only when "
        "the gain passes --min-gain and no block is left uncovered; 'auto': as many as fit in "
        "the device's free memory (or --max-memory-mb) beside the attention cache (--cache-tokens)",
        metavar="N|auto",
        kind=count_or_auto,
    )
    start_delay: float = flag(
        3.0,
        "with --num-blocks: wait a random time up to this before choosing, so servers "
        "starting together do not pile onto the same blocks",
        metavar="SECONDS",
    )
    rebalance_interval: float = flag(
        60.0,
        "with --num-blocks: mean seconds between re-checks of the chosen blocks",
        metavar="SECONDS",
    )
    min_gain: float = flag(
        0.2, "with --num-blocks: move only if the weakest block's coverage rises by this fraction"
    )
    # seconds sessions on the old span may take to finish before a move cuts them
    move_grace: float = 60.0
    device: str = flag(
        AUTO,
        "where the blocks (weights, attention caches, kept graphs, adapters) live and compute: "
        "auto (the first CUDA device, else the CPU), cpu, cuda, cuda:N or mps",
        metavar="DEVICE",
    )
    dtype: str = flag(
        AUTO,
        "weights and hidden-state dtype; auto: bfloat16 on a GPU that has it (float16 on older "
        "ones and on mps), float32 on the CPU (peers of one swarm must agree: a session's "
        "dtype is its servers')",
        choices=(AUTO, *DTYPES),
    )
    max_memory_mb: int | None = flag(
        None,
        "device memory this server may take for its blocks and attention cache, for "
        "--num-blocks auto and --cache-tokens auto (default: what the device has free at "
        "start, less a margin for activations)",
        metavar="MB",
    )
    max_session_length: int = flag(4096, "tokens one session may hold")
    cache_budget_tokens: int | str = flag(
        64 * 1024,
        "attention-cache budget in tokens across all sessions; 'auto': what the device's free "
        "memory (or --max-memory-mb) holds once the blocks are loaded",
        "--cache-tokens",
        metavar="TOKENS|auto",
        kind=count_or_auto,
    )
    max_sessions_per_peer: int = flag(
        16, "sessions one client may hold here at once; more are refused"
    )
    max_peer_cache_share: float = flag(
        0.5,
        "fraction of --cache-tokens one client may hold here (at least one session of "
        "--max-session-length), counting its sessions' caches and, in cache tokens of the same "
        "bytes, their deep prompts, own LoRA weights and kept answers; more is refused",
        metavar="FRACTION",
    )
    session_idle_timeout: float = flag(
        120.0, "close a client's sessions after this long without a step", metavar="SECONDS"
    )
    send_timeout: float = flag(
        30.0,
        "seconds one answer may take to reach a client; a client that does not read it in "
        "time loses its sessions on that stream (and the cache they held)",
        metavar="SECONDS",
    )
    max_request_tokens: int = flag(
        MAX_REQUEST_TOKENS,
        "tokens (batch x positions) one forward, backward or step may carry; more are "
        "refused before compute (a client's prefill chunks carry at most 64 x 256)",
    )
    max_activation_mb: int = flag(
        6144,
        "estimated activation memory one request may need (a backward's or kept graph's "
        "saved tensors through the span, attention scores); more is refused before "
        "compute (SmolLM2 in float32: a batch of 8 x 512 tokens through all 30 blocks is "
        "estimated at ~4.8 GB)",
        metavar="MB",
    )
    max_queued: int = flag(
        128, "requests with tensors waiting for (or in) compute, server-wide; more get 'busy'"
    )
    max_queued_per_peer: int = flag(
        32, "requests with tensors one peer may have waiting for (or in) compute here"
    )
    max_queued_mb: int = flag(
        1024, "decoded tensors of the waiting requests, server-wide", metavar="MB"
    )
    max_queued_mb_per_peer: int = flag(
        256, "decoded tensors of one peer's waiting requests", metavar="MB"
    )
    max_receiving_mb: int = flag(
        256,
        "request frames being received at once, all peers (one peer: half of it); a frame "
        "past it is refused 'busy' and its stream closed",
        metavar="MB",
    )
    no_batching: bool = flag(
        False,
        "compute every session's decode step alone (default: steps of sessions that wait "
        "while the server computes run together in its next forward)",
    )
    no_verify_weights: bool = flag(
        False,
        "trust the cached digests of the blocks served (default: the blocks' weights are hashed "
        "again at load, about as long as reading them once, and checked against the digests "
        "this server announces)",
    )
    prefill_chunk: int = flag(
        256,
        "tokens of a long step (a prefill) computed at a time; a step of a chunk or more gives "
        "way to other sessions' decode steps after any of its blocks",
        metavar="TOKENS",
    )
    torch_threads: int | None = flag(None, "torch threads (default: torch's)")
    throughput: float | None = flag(
        None,
        "tokens/s to announce (default: measured at start, cached per model, dtype and "
        "device in the cache folder: $SWARM_CACHE_DIR or ~/.cache/swarm-node)",
    )
    compression: str = flag(
        "none",
        "codec of hidden states this server sends when a client leaves it the choice, and "
        "of pushes (blockwise8-64 sends ~3.8x fewer bytes with ~1% error per token; "
        "blockwise8's 4096-value blocks share one scale between ~7 prompt tokens)",
        choices=CODECS,
    )
    quant: str | None = flag(
        None,
        "hold the weights in 8-bit (LLM.int8) or 4-bit (NF4) via bitsandbytes: ~4x / ~8x "
        "less memory per block, slower on CPU (default: --dtype weights)",
        choices=QUANTS[1:],
    )
    mmap_weights: bool = flag(
        False,
        "on a CPU, serve the weights stored in the served dtype from a private memory map of the "
        "checkpoint's files: untouched pages cost nothing and servers of one file on one host "
        "share its pages, but a file rewritten under the server changes what it serves (default: "
        "each span reads its own copy)",
    )
    adapters: tuple[tuple[str, str], ...] = flag(
        (),
        "LoRA adapters to hold, each a folder in PEFT's format (adapter_config.json + "
        "adapter_model.safetensors); announced by NAME, applied to the sessions that name it",
        metavar="NAME=PATH",
    )
    shutdown_grace: float = flag(
        5.0,
        "on Ctrl-C or SIGTERM: refuse new sessions, withdraw the record, and give the "
        "steps being computed this long to finish",
        metavar="SECONDS",
    )
    operator: str = flag(
        "",
        "who runs this server (a name, at most 64 characters), announced in its signed record: "
        "clients' spot checks prefer a checker of another operator (default: unsaid)",
        metavar="NAME",
    )

    def __post_init__(self) -> None:
        check_server_adapters(self.adapters)
        if len(self.operator) > MAX_OPERATOR or not self.operator.isprintable():
            raise ConfigError(
                f"'operator' must be printable and at most {MAX_OPERATOR} characters, "
                f"got {self.operator[:80]!r} ({len(self.operator)} characters)"
            )
        check_device(self.device)
        _check_choice("dtype", self.dtype, (AUTO, *DTYPES))
        if self.max_memory_mb is not None:
            check_int("max_memory_mb", self.max_memory_mb, 1)
        if self.num_blocks is None or (self.start, self.end) != (0, 0):
            if not 0 <= self.start < self.end:
                raise ConfigError(
                    f"'blocks' must satisfy 0 <= START < END, got {self.start}:{self.end}"
                )
        if self.num_blocks is not None and self.num_blocks != AUTO:
            check_int("num_blocks", self.num_blocks, 1)
            if (self.start, self.end) != (0, 0) and self.end - self.start != self.num_blocks:
                raise ConfigError(
                    f"'blocks' {self.start}:{self.end} must hold 'num_blocks' = {self.num_blocks} blocks"
                )
        _check_range("start_delay", self.start_delay, 0.0, 3600.0)
        _check_range("rebalance_interval", self.rebalance_interval, 0.01)
        _check_range("min_gain", self.min_gain, 0.0)
        _check_range("move_grace", self.move_grace, 0.0)
        _check_range("max_session_length", self.max_session_length, 1, 1 << 20)
        if self.cache_budget_tokens != AUTO:
            _check_range("cache_budget_tokens", self.cache_budget_tokens, 1)
        _check_range("max_sessions_per_peer", self.max_sessions_per_peer, 1)
        _check_range("max_peer_cache_share", self.max_peer_cache_share, 0.0, 1.0)
        _check_range("session_idle_timeout", self.session_idle_timeout, 0.01)
        _check_range("send_timeout", self.send_timeout, 0.01)
        for name in (
            "max_request_tokens",
            "max_activation_mb",
            "max_queued",
            "max_queued_per_peer",
            "max_queued_mb",
            "max_queued_mb_per_peer",
            "max_receiving_mb",
            "prefill_chunk",
        ):
            check_int(name, getattr(self, name), 1)
        if self.torch_threads is not None:
            _check_range("torch_threads", self.torch_threads, 1, 256)
        _check_choice("compression", self.compression, COMPRESSIONS)
        _check_range("shutdown_grace", self.shutdown_grace, 0.0, 600.0)
        _check_choice("quant", self.quant, QUANTS)


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How a client runs inference sessions over the swarm."""

    step_timeout: float = flag(
        60.0,
        "seconds one server may take to answer a step at most (a prefill chunk included); one "
        "that misses it (or fails) is banned for a while and its blocks move to other servers. "
        "A step late past 4x its usual time is also tried on a spare server (not a ban)",
        "--timeout",
    )
    idle_ping: float = flag(
        10.0,
        "seconds a session may sit idle before the client pings its servers, so that a dead "
        "or frozen one is replaced before the next step needs it (0: never)",
        metavar="SECONDS",
    )
    lookup_timeout: float = 30.0  # seconds to find every block's servers
    lookup_reuse: float = flag(
        60.0,
        "seconds the servers a lookup found serve new sessions without another lookup (pinged "
        "again each time, and looked up anew in the background after 5 s): a long-lived "
        "client's next request costs no lookup (0: look up before every session)",
        metavar="SECONDS",
    )
    compression: str | None = flag(
        None,
        "codec of hidden states on the wire, both ways (default: send uncompressed "
        "and let each server answer in its own --compression)",
        choices=CODECS,
    )
    max_length: int = 2048  # default session length (prompt + new tokens)
    push: bool = flag(
        False, "servers pass hidden states straight to the next server (N+1 delays a token, not 2N)"
    )
    adapter: str | None = flag(
        None,
        "a LoRA adapter: the NAME servers announce (only they are chosen), or on the command "
        "line a FILE saved by swarm-node (a client-owned LoRA, sent with the requests)",
        metavar="NAME|FILE",
    )
    max_attempts: int = flag(
        5,
        "attempts to find new servers for a failed server's blocks before giving up "
        "with the blocks named (0: fail at once)",
    )
    retry_delay: float = 0.5  # seconds before retrying when no server was found; doubles each time
    ban_time: float = 15.0  # seconds a failed server is avoided; doubles with each failure in a row
    max_server_share: float = flag(
        0.5,
        "the most of this client's chains (of any 20 in a row, in blocks run) one server may "
        "carry when other servers hold its blocks (1: no bound)",
    )
    verify_rate: float = flag(
        0.05,
        "chance that a step makes each server of a session due a spot check: another server "
        "with the same blocks recomputes, in the background, every position it answered since "
        "its last check; a lie a third server confirms bans it and rolls the session back to "
        "the last position that agreed (docs/verification.md; 0: off)",
        metavar="FRACTION",
    )
    verify_ban: float = 24 * 3600.0  # seconds a server caught lying is avoided
    publish_evidence: bool = flag(
        False,
        "publish signed evidence against each server a spot check catches lying to the DHT "
        "(its signed receipts; the activations only with --publish-activations)",
    )
    publish_activations: bool = flag(
        False,
        "with --publish-evidence: publish the lying steps' inputs and answers too, so others "
        "can re-run them (they reveal something of the prompt)",
    )
    trust_evidence: bool = flag(
        False,
        "look up published evidence against the servers found, re-run it on another server of "
        "the blocks, and ban the accused when it holds (evidence without activations is not "
        "acted on)",
    )

    speculative: bool = flag(
        True,
        "speculative decoding: each step also carries draft tokens (prompt lookup, or --draft) "
        "that the chain verifies in the same trip; drafting turns itself off while it does not "
        "pay; the same tokens greedy, the same distribution sampling (measured 2.02x on text "
        "that repeats its prompt, 0.98x on open chat: docs/speculative.md)",
    )
    draft: str | None = flag(
        None,
        "a small local draft model with the swarm model's tokenizer (a bundled name or a "
        "folder) for --speculative, instead of prompt lookup",
        metavar="MODEL",
    )
    draft_tokens: int = flag(10, "the most draft tokens one speculative step carries")

    accept_quant: tuple[str, ...] = flag(
        WEIGHT_VARIANTS,
        "how servers may hold the weights this client pinned (its model folder's): 'none' "
        "(the folder's exact weights), 'int8', 'nf4'; '--accept-quant none' for exact weights only",
        choices=WEIGHT_VARIANTS,
    )
    accept_dtype: tuple[str, ...] = flag(
        DTYPES,
        "dtypes servers may compute the weights this client pinned in (a server converting "
        "float32 weights to bfloat16 holds them rounded); '--accept-dtype float32' for full "
        "precision only",
        choices=DTYPES,
    )

    def __post_init__(self) -> None:
        if self.adapter is not None:
            check_adapter_name(self.adapter)
        if not self.accept_quant or not set(self.accept_quant) <= set(WEIGHT_VARIANTS):
            raise ConfigError(
                f"'accept_quant' must be a non-empty subset of {WEIGHT_VARIANTS}, "
                f"got {self.accept_quant!r}"
            )
        if not self.accept_dtype or not set(self.accept_dtype) <= set(DTYPES):
            raise ConfigError(
                f"'accept_dtype' must be a non-empty subset of {DTYPES}, got {self.accept_dtype!r}"
            )
        _check_range("step_timeout", self.step_timeout, 0.001)
        _check_range("lookup_timeout", self.lookup_timeout, 0.001)
        _check_range("lookup_reuse", self.lookup_reuse, 0.0)
        _check_range("idle_ping", self.idle_ping, 0.0)
        if self.compression is not None:
            _check_choice("compression", self.compression, COMPRESSIONS)
        _check_range("max_length", self.max_length, 1, 1 << 20)
        check_int("max_attempts", self.max_attempts, 0, 100)
        check_int("draft_tokens", self.draft_tokens, 1, 64)
        _check_range("retry_delay", self.retry_delay, 0.0, 60.0)
        _check_range("ban_time", self.ban_time, 0.0)
        _check_range("max_server_share", self.max_server_share, 0.05, 1.0)
        _check_range("verify_rate", self.verify_rate, 0.0, 1.0)
        _check_range("verify_ban", self.verify_ban, 0.0)


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """The OpenAI-compatible API and swarm map a peer serves (node/apps/api/)."""

    models: tuple[str, ...] = (DEFAULT_MODEL,)  # bundled names or model folders served by the swarm
    host: str = flag(
        "127.0.0.1",
        "address the HTTP API listens on (0.0.0.0 for every interface)",
        env="SWARM_API_HOST",
    )
    port: int = flag(8000, "HTTP port (0 picks a free one)", env="SWARM_API_PORT")
    dtype: str = "float32"  # of the client head and hidden states
    device: str = "cpu"  # of the client head (the commands resolve --device auto)
    max_context: int = flag(
        2048, "prompt + completion tokens of a request (at most the model's own limit)"
    )
    default_max_tokens: int = 256  # completion tokens when a request names no max_tokens
    max_concurrent: int = flag(
        16, "requests generating at once, more wait their turn (servers allow 16 sessions a peer)"
    )
    max_waiting: int = flag(
        64,
        "requests waiting for their turn beyond --max-concurrent; more are answered 429 "
        "with Retry-After",
    )
    max_body_size: int = flag(
        2**20, "bytes of a request body; a bigger one is answered 413", metavar="BYTES"
    )
    allowed_hosts: tuple[str, ...] = flag(
        (),
        "names (or addresses) clients may reach the API by, besides its --host, localhost, "
        "127.0.0.1 and ::1: other Host headers are refused (DNS rebinding); with --host "
        "0.0.0.0 list the names other machines use, or * to accept any",
        "--api-allowed-hosts",
        metavar="HOST",
    )
    api_key: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "a secret every request must send as 'Authorization: Bearer KEY' (the "
            "map page at / stays open: open it as /#key=KEY); prefer the environment "
            "variable, which `ps` does not show",
            "flag": "",
            "metavar": "KEY",
        },
    )
    refresh_interval: float = flag(5.0, "seconds between DHT reads for the swarm map", "--refresh")
    speculative: bool = flag(
        False,
        "speculative decoding with prompt lookup for every request (drafts the chain verifies "
        "in one trip; off by itself while it does not pay; the same output distribution)",
    )
    chain_ttl: float = 10.0  # seconds a chain found for one request serves the next ones

    def __post_init__(self) -> None:
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ConfigError(f"'models' must name at least one model, got {self.models!r}")
        _check_choice("dtype", self.dtype, DTYPES)
        check_device(self.device)
        for name, low, high in (
            ("port", 0, 65535),
            ("max_context", 2, 1 << 20),
            ("default_max_tokens", 1, 1 << 20),
            ("max_concurrent", 1, 4096),
            ("max_waiting", 0, 1 << 16),
            ("max_body_size", 1024, 1 << 34),
        ):
            check_int(name, getattr(self, name), low, high)
        if not all(isinstance(h, str) and h and h.isascii() for h in self.allowed_hosts):
            raise ConfigError(
                f"'allowed_hosts' must be host names or addresses, got {self.allowed_hosts!r}"
            )
        if self.api_key is not None and not (
            isinstance(self.api_key, str)
            and self.api_key
            and self.api_key.isascii()
            and self.api_key.isprintable()
        ):
            raise ConfigError("'api_key' must be non-empty printable ASCII text")
        if not self.chain_ttl >= 0:
            raise ConfigError(f"'chain_ttl' must be >= 0 seconds, got {self.chain_ttl!r}")
        if not self.refresh_interval >= 0.1:
            raise ConfigError(
                f"'refresh_interval' must be >= 0.1 seconds, got {self.refresh_interval!r}"
            )
