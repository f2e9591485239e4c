"""Settings of a peer, one frozen dataclass per role, validated on construction.

Defaults < environment (``SWARM_*``, read by the CLI) < flags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from swarm_node.compression import CODECS
from swarm_node.errors import ConfigError
from swarm_node.node.server.adapters import check_adapter_name, check_server_adapters

DTYPES = ("float32", "bfloat16")
COMPRESSIONS = CODECS  # wire codecs a session may name
SERVER_DEFAULT = "default"  # a session asking for this gets the server's own --compression
QUANTS = (None, "int8", "nf4")
_BLOCKS_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_blocks(text: str) -> tuple[int, int]:
    """'20:40' -> (20, 40): blocks 20..39."""
    match = _BLOCKS_RE.match(text)
    if not match:
        raise ConfigError(f"'--blocks' must look like START:END (e.g. 0:15), got {text!r}")
    start, end = int(match.group(1)), int(match.group(2))
    if start >= end:
        raise ConfigError(f"'--blocks' must have START < END, got {text!r}")
    return start, end


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name!r} must be a number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name!r} must be in {bound}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """What every peer has: a libp2p host and a seat in the DHT."""

    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)  # multiaddrs to listen on
    initial_peers: tuple[
        str, ...
    ] = ()  # full multiaddrs (with /p2p/) of peers already in the swarm
    announce_addrs: tuple[str, ...] = ()  # multiaddrs to advertise instead of the listening ones
    identity: Path | None = None  # key file; created on first use, so the peer id stays stable
    swarm_key: Path | None = None  # pre-shared key file of a private swarm; None: a public swarm
    max_frame_size: int = 64 * 2**20  # bytes; bigger frames are refused before allocation
    dht_ttl: float = 120.0  # seconds a server record stays valid; re-announced every third of it
    connect_timeout: float = 10.0  # seconds to reach each initial peer

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("'listen' must name at least one multiaddr, got none")
        _check_range("max_frame_size", self.max_frame_size, 1024)
        _check_range("dht_ttl", self.dht_ttl, 3.0)
        _check_range("connect_timeout", self.connect_timeout, 0.01)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """A server holds blocks ``start..end-1`` of one model, or ``num_blocks`` blocks it chooses itself."""

    model: str  # bundled model name or a local Hugging Face folder
    start: int = 0
    end: int = 0
    # Choose the span: this many blocks where the swarm needs them most (start/end are then set by
    # the server), re-checked every ~rebalance_interval s; a move needs a gain over min_gain.
    num_blocks: int | None = None
    start_delay: float = (
        3.0  # at most this many random seconds before choosing, so joiners do not race
    )
    rebalance_interval: float = 60.0  # mean seconds between re-checks of the chosen span
    min_gain: float = 0.2  # a move must raise the weakest block's coverage by this fraction
    move_grace: float = (
        60.0  # seconds sessions on the old span may take to finish before a move cuts them
    )
    dtype: str = "float32"
    max_session_length: int = 4096  # tokens one session may hold
    cache_budget_tokens: int = 64 * 1024  # tokens of attention cache across all sessions
    max_sessions_per_peer: int = 16
    session_idle_timeout: float = 120.0  # seconds without a message before a session is closed
    torch_threads: int | None = None  # None: torch's default
    throughput: float | None = None  # tokens/s to announce; None: measured at start
    compression: str = "none"  # codec for replies when a client asks for "default", and for pushes
    quant: str | None = (
        None  # None (weights in `dtype`), "int8" (LLM.int8) or "nf4" (4-bit NormalFloat)
    )
    adapters: tuple[tuple[str, str], ...] = ()  # (name, PEFT LoRA folder) pairs, loaded at start
    shutdown_grace: float = (
        5.0  # seconds a stopping server gives the steps it is computing to finish
    )

    def __post_init__(self) -> None:
        check_server_adapters(self.adapters)
        if self.dtype not in DTYPES:
            raise ConfigError(f"'dtype' must be one of {DTYPES}, got {self.dtype!r}")
        if self.num_blocks is None or (self.start, self.end) != (0, 0):
            if not 0 <= self.start < self.end:
                raise ConfigError(
                    f"'blocks' must satisfy 0 <= START < END, got {self.start}:{self.end}"
                )
        if self.num_blocks is not None:
            if (
                isinstance(self.num_blocks, bool)
                or not isinstance(self.num_blocks, int)
                or self.num_blocks < 1
            ):
                raise ConfigError(f"'num_blocks' must be an int >= 1, got {self.num_blocks!r}")
            if (self.start, self.end) != (0, 0) and self.end - self.start != self.num_blocks:
                raise ConfigError(
                    f"'blocks' {self.start}:{self.end} must hold 'num_blocks' = {self.num_blocks} blocks"
                )
        _check_range("start_delay", self.start_delay, 0.0, 3600.0)
        _check_range("rebalance_interval", self.rebalance_interval, 0.01)
        _check_range("min_gain", self.min_gain, 0.0)
        _check_range("move_grace", self.move_grace, 0.0)
        _check_range("max_session_length", self.max_session_length, 1, 1 << 20)
        _check_range("cache_budget_tokens", self.cache_budget_tokens, 1)
        _check_range("max_sessions_per_peer", self.max_sessions_per_peer, 1)
        _check_range("session_idle_timeout", self.session_idle_timeout, 0.01)
        if self.torch_threads is not None:
            _check_range("torch_threads", self.torch_threads, 1, 256)
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"'compression' must be one of {COMPRESSIONS}, got {self.compression!r}"
            )
        _check_range("shutdown_grace", self.shutdown_grace, 0.0, 600.0)
        if self.quant not in QUANTS:
            raise ConfigError(f"'quant' must be one of {QUANTS}, got {self.quant!r}")


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How a client runs inference sessions over the swarm."""

    # Seconds one server may take to answer one step (a prefill chunk included); a server that
    # misses it counts as failed: the client bans it and moves its blocks to other servers.
    step_timeout: float = 60.0
    lookup_timeout: float = 30.0  # seconds to find every block's servers
    # Codec of hidden states on the wire, both ways. None: send uncompressed, and let each server
    # answer in its own default (its --compression).
    compression: str | None = None
    max_length: int = 2048  # default session length (prompt + new tokens)
    push: bool = False  # servers send each step's output straight to the next server
    adapter: str | None = None  # a LoRA adapter servers hold, by name: only they are chosen
    max_attempts: int = (
        5  # attempts to replace a failed server's blocks; 0: a failure ends the session
    )
    retry_delay: float = 0.5  # seconds before retrying when no server was found; doubles each time
    ban_time: float = 15.0  # seconds a failed server is avoided; doubles with each failure in a row

    def __post_init__(self) -> None:
        if self.adapter is not None:
            check_adapter_name(self.adapter)
        _check_range("step_timeout", self.step_timeout, 0.001)
        _check_range("lookup_timeout", self.lookup_timeout, 0.001)
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"'compression' must be one of {COMPRESSIONS}, got {self.compression!r}"
            )
        _check_range("max_length", self.max_length, 1, 1 << 20)
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigError(
                f"'max_attempts' must be an int in [0, 100], got {self.max_attempts!r}"
            )
        _check_range("max_attempts", self.max_attempts, 0, 100)
        _check_range("retry_delay", self.retry_delay, 0.0, 60.0)
        _check_range("ban_time", self.ban_time, 0.0)
