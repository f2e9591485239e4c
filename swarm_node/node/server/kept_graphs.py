"""Autograd graphs a server keeps between a training client's forward and its backward.

A forward that asks for it (``ForwardRequest.keep_graph``) is computed with grad enabled and its
graph stays here under a random id; the backward naming that id runs ``torch.autograd.grad`` on it
instead of recomputing the forward (about one forward-equivalent less per training step). The store
is a cache, never a source of truth: a backward still carries its inputs, and whatever is missing,
expired, owned by another peer or does not match falls back to the recompute.

Bounds: at most ``per_peer`` graphs per peer and ``budget_bytes`` server-wide (oldest evicted
first), each for at most ``ttl`` seconds (trio clock); a peer's graphs go when its last stream to
this server closes. A graph's size is measured, not guessed: the bytes of the tensors autograd saves
for backward during the forward (``saved_tensors_hooks``), each storage counted once and the
server's own weights, which stay resident anyway, left out. Measured on the tiny test llama
(hidden 64, intermediate 128, float32, SDPA attention): 11.1-11.2 x tokens*hidden*4 bytes per block, for
1x16 to 2x256 tokens; so with an intermediate of ~2.7x hidden count on roughly 15x tokens*hidden*dtype
bytes per block, e.g. ~120 KB per token per block for hidden 4096 in float16: the 1 GiB default holds
about 8,700 token-blocks (e.g. 540 tokens through 16 blocks). Past it, the oldest graphs go and those
backwards recompute. Knows no streams and no messages.
"""

from __future__ import annotations

import contextlib
import secrets
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from swarm_node.errors import ConfigError, check_int

KEPT_PER_PEER = 4  # graphs one peer may keep here at once (the client's concurrent pieces)
KEPT_TTL = 60.0  # seconds a graph waits for its backward
KEPT_BUDGET_BYTES = 1 << 30  # saved activations of all kept graphs together


@dataclass(eq=False)
class KeptGraph:
    """One forward's graph: ``out`` computed from the leaves ``inputs`` (hidden[, prompts][, flat LoRA])."""

    peer: str
    start: int
    end: int
    out: torch.Tensor  # (B, T, H), with a grad_fn
    inputs: list[torch.Tensor]  # leaves with requires_grad, in the order _backward returns them
    has_prompts: bool
    owned_lora: bool
    adapter: str  # the named adapter the forward applied ("": none)
    nbytes: int
    created: float = field(default=0.0)


class SavedBytes:
    """Counts the bytes autograd saves for backward while active (``with counter.counting():``)."""

    def __init__(self, exclude: Any = ()) -> None:  # tensors never counted (the weights)
        self._seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.nbytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._seen:
            self._seen.add(ptr)
            self.nbytes += storage.nbytes()
        return t

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield


class KeptGraphs:
    """The graphs kept on one server, oldest first."""

    def __init__(
        self,
        *,
        per_peer: int = KEPT_PER_PEER,
        ttl: float = KEPT_TTL,
        budget_bytes: int = KEPT_BUDGET_BYTES,
    ) -> None:
        check_int("per_peer", per_peer, 0)
        check_int("budget_bytes", budget_bytes, 0)
        if not ttl > 0:
            raise ConfigError(f"'ttl' must be > 0, got {ttl!r}")
        self.per_peer = per_peer
        self.ttl = ttl
        self.budget_bytes = budget_bytes
        self._graphs: OrderedDict[str, KeptGraph] = OrderedDict()
        self._per_peer: Counter[str] = Counter()
        self._streams: Counter[str] = Counter()  # open streams per peer
        self.nbytes = 0
        self.hits = 0  # backwards that used a kept graph
        self.misses = 0  # backwards that named a graph and recomputed instead
        # graphs dropped before their backward (limit, budget, expiry, closed stream)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def count(self, peer: str) -> int:
        return self._per_peer[peer]

    def put(self, graph: KeptGraph, *, now: float | None = None) -> str:
        """Keep ``graph``; its id, or "" when it alone is over the budget (nothing kept)."""
        now = trio.current_time() if now is None else now
        self.purge(now)
        if self.per_peer == 0 or graph.nbytes > self.budget_bytes:
            return ""
        while self._per_peer[graph.peer] >= self.per_peer:
            self._drop(next(k for k, g in self._graphs.items() if g.peer == graph.peer))
        while self.nbytes + graph.nbytes > self.budget_bytes:
            self._drop(next(iter(self._graphs)))
        graph.created = now
        graph_id = secrets.token_hex(16)
        self._graphs[graph_id] = graph
        self._per_peer[graph.peer] += 1
        self.nbytes += graph.nbytes
        return graph_id

    def take(self, graph_id: str, peer: str, *, now: float | None = None) -> KeptGraph | None:
        """The graph ``graph_id`` of ``peer``, removed from the store; None if unknown, expired or
        another peer's (which keeps it: a guessed id takes nothing from its owner)."""
        self.purge(trio.current_time() if now is None else now)
        graph = self._graphs.get(graph_id)
        if graph is None or graph.peer != peer:
            return None
        self._remove(graph_id)
        return graph

    def purge(self, now: float) -> int:
        """Drop the graphs older than the TTL at time ``now``; how many went."""
        old = [k for k, g in self._graphs.items() if now - g.created >= self.ttl]
        for graph_id in old:
            self._drop(graph_id)
        return len(old)

    def stream_opened(self, peer: str) -> None:
        self._streams[peer] += 1

    def stream_closed(self, peer: str) -> None:
        """A stream of ``peer`` closed: its graphs go with its last one."""
        self._streams[peer] -= 1
        if self._streams[peer] > 0:
            return
        del self._streams[peer]
        for graph_id in [k for k, g in self._graphs.items() if g.peer == peer]:
            self._drop(graph_id)

    def _drop(self, graph_id: str) -> None:
        self._remove(graph_id)
        self.evicted += 1

    def _remove(self, graph_id: str) -> None:
        graph = self._graphs.pop(graph_id)
        self.nbytes -= graph.nbytes
        self._per_peer[graph.peer] -= 1
        if self._per_peer[graph.peer] <= 0:
            del self._per_peer[graph.peer]
