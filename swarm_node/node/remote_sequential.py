"""The swarm's blocks as one differentiable torch module: ``RemoteSequential(peer, ...)(hidden)``.

Forward sends whole sequences through a chain of servers (no cache) and keeps, for every hop, the
input it sent; backward walks the chain in reverse, sending each hop that input and the gradient of
its output, and receives the gradient of its input (and of the deep prompts of its blocks). Servers
recompute their forward and never change their weights. A batch too big for one frame is cut into
pieces along the batch that travel concurrently. A hop that fails (error, lost stream, deadline) is
left out for a while and its blocks re-routed: a forward goes on from there over the replacement; a
backward first recomputes the forward of the failed hop's blocks on the replacement.

The torch side is synchronous: the autograd function hands the network work to the peer's trio loop
with ``trio.from_thread.run`` (give ``trio_token`` when torch runs in a thread trio did not start).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import torch
import trio

from swarm_node import compression
from swarm_node.dht.routing import Hop, choose_training_chain
from swarm_node.errors import ConfigError, LocalProtocolError, RemoteProtocolError, SwarmError
from swarm_node.node.inference_session import open_stream, request
from swarm_node.node.message_stream import ConnectionLost, MessageStream
from swarm_node.node.server import TORCH_DTYPES
from swarm_node.node.server_training import MAX_FORWARD_BATCH
from swarm_node.protocol import messages as m

log = logging.getLogger(__name__)

BAN_SECONDS = 60.0  # a server that failed is left out of routes this long
SERVERS_MAX_AGE = 30.0  # seconds a DHT lookup of the servers is reused


class _HopFailed(SwarmError):
    def __init__(self, hop: Hop, cause: BaseException) -> None:
        super().__init__(f"blocks {hop.start}:{hop.end} on {hop.server.peer_id} failed: {cause!r}")
        self.hop = hop
        self.cause = cause


Trace = list[tuple[Hop, torch.Tensor]]  # (hop, the input sent to it), in chain order


class RemoteSequential(torch.nn.Module):
    """Blocks ``start..end-1`` of ``model`` on the swarm: ``hidden # (B, T, H) -> # (B, T, H)``."""

    def __init__(
        self,
        peer: Any,  # node.peer.Peer
        *,
        model: str,
        num_blocks: int,
        start: int = 0,
        end: int | None = None,
        dtype: str = "float32",
        compression: str | None = None,
        trio_token: trio.lowlevel.TrioToken | None = None,
        max_retries: int = 3,
        max_concurrent_pieces: int = 4,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        end = num_blocks if end is None else end
        if not 0 <= start < end <= num_blocks:
            raise ConfigError(f"blocks must satisfy 0 <= start < end <= {num_blocks}, got {start}:{end}")
        if dtype not in TORCH_DTYPES:
            raise ConfigError(f"'dtype' must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
        self.peer = peer
        self.model = model
        self.num_blocks = num_blocks
        self.start = start
        self.end = end
        self.dtype = dtype
        self.codec = compression or "none"
        self.trio_token = trio_token
        self.max_retries = max_retries
        self.timeout = peer.client_config.step_timeout
        self.max_frame_size = peer.config.max_frame_size
        self._pieces = trio.CapacityLimiter(max_concurrent_pieces)
        self._rng = random.Random(seed)
        self._banned: dict[str, float] = {}  # peer id -> trio time until which it is left out
        self._servers: list[Any] = []
        self._servers_at = -float("inf")
        self._idle: dict[str, list[MessageStream]] = {}  # open streams per server, for reuse
        self.failures = 0  # hops that failed and were re-routed, over this module's life
        self._call_failures = 0  # ... in the current forward or backward pass

    def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden # (B, T, H)``, deep ``prompts # (end - start, P, H)`` -> the blocks' output."""
        if hidden.ndim != 3 or 0 in hidden.shape:
            raise ConfigError(f"'hidden' must have shape (B >= 1, T >= 1, H), got {tuple(hidden.shape)}")
        if prompts is not None and (prompts.ndim != 3 or prompts.shape[0] != self.end - self.start):
            raise ConfigError(
                f"'prompts' must have shape ({self.end - self.start}, P, H), got {tuple(prompts.shape)}"
            )
        return _RemoteBlocks.apply(hidden, prompts, self)

    def run(self, fn: Any, *args: Any) -> Any:
        """Run ``await fn(*args)`` in the peer's trio loop from this (non-trio) thread."""
        return trio.from_thread.run(fn, *args, trio_token=self.trio_token)

    # -- pieces ----------------------------------------------------------------------------------
    def piece_rows(self, hidden: torch.Tensor) -> int:
        """Sequences per piece: a backward frame (input, gradient, prompts) well under the limit."""
        per_row = hidden.shape[1] * hidden.shape[2] * 4  # bytes of one sequence in float32
        rows = (self.max_frame_size // 4) // per_row
        if rows < 1:
            raise ConfigError(
                f"one sequence of {hidden.shape[1]} tokens takes {per_row} bytes; a backward needs "
                f"frames of about 4x that, over 'max_frame_size' {self.max_frame_size}: send shorter ones"
            )
        return min(rows, MAX_FORWARD_BATCH)

    async def forward_async(
        self, hidden: torch.Tensor, prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[Trace]]:
        rows = self.piece_rows(hidden)
        self._call_failures = 0
        pieces = list(hidden.to(TORCH_DTYPES[self.dtype]).split(rows))
        outs: list[Any] = [None] * len(pieces)
        traces: list[Trace] = [[] for _ in pieces]

        async def one(i: int) -> None:
            async with self._pieces:
                outs[i], traces[i] = await self._forward_range(pieces[i], self.start, self.end, prompts)

        async with trio.open_nursery() as nursery:
            for i in range(len(pieces)):
                nursery.start_soon(one, i)
        return torch.cat(outs).to(hidden.dtype), traces

    async def backward_async(
        self, grad: torch.Tensor, traces: list[Trace], prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self.piece_rows(grad)  # as the forward cut the batch
        self._call_failures = 0
        grads = list(grad.to(TORCH_DTYPES[self.dtype]).split(rows))
        outs: list[Any] = [None] * len(grads)
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)

        async def one(i: int) -> None:
            async with self._pieces:
                outs[i] = await self._backward_trace(grads[i], traces[i], prompts, grad_prompts)

        async with trio.open_nursery() as nursery:
            for i in range(len(grads)):
                nursery.start_soon(one, i)
        return torch.cat(outs).to(grad.dtype), grad_prompts

    # -- one piece through the chain ---------------------------------------------------------
    async def _forward_range(
        self, x: torch.Tensor, start: int, end: int, prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, Trace]:
        chain = await self._route(start, end)
        trace: Trace = []
        i = 0
        while i < len(chain):
            hop = chain[i]
            try:
                y = await self._remote_forward(hop, x, prompts)
            except _HopFailed as failure:
                self._fail(failure)
                chain = chain[:i] + await self._route(hop.start, end)
                continue
            trace.append((hop, x))
            x = y
            i += 1
        return x, trace

    async def _backward_trace(
        self, grad: torch.Tensor, trace: Trace, prompts: torch.Tensor | None, grad_prompts: torch.Tensor | None
    ) -> torch.Tensor:
        for hop, x in reversed(trace):
            try:
                grad, part = await self._remote_backward(hop, x, grad, prompts)
            except _HopFailed as failure:
                self._fail(failure)  # recompute the forward of these blocks on their new servers
                _, again = await self._forward_range(x, hop.start, hop.end, prompts)
                grad = await self._backward_trace(grad, again, prompts, grad_prompts)
                continue
            if grad_prompts is not None and part is not None:
                grad_prompts[hop.start - self.start : hop.end - self.start] += part.to(grad_prompts.dtype)
        return grad

    def _fail(self, failure: _HopFailed) -> None:
        self.failures += 1
        self._call_failures += 1
        if self._call_failures > self.max_retries:
            raise SwarmError(
                f"{self._call_failures} hops failed in one pass ('max_retries' is {self.max_retries}); "
                f"the last: {failure}"
            ) from failure.cause
        log.warning("re-routing: %s", failure)
        self._banned[failure.hop.server.peer_id] = trio.current_time() + BAN_SECONDS
        self._servers_at = -float("inf")  # look the servers up again

    async def _route(self, start: int, end: int) -> list[Hop]:
        now = trio.current_time()
        if now - self._servers_at > SERVERS_MAX_AGE:
            self._servers = await self.peer.find_servers(self.model, self.num_blocks)
            self._servers_at = now
        banned = frozenset(p for p, until in self._banned.items() if until > now)
        return choose_training_chain(
            self._servers, model=self.model, start=start, end=end, rng=self._rng, now=time.time(), exclude=banned
        )

    # -- one hop -------------------------------------------------------------------------------
    def _prompts_of(self, hop: Hop, prompts: torch.Tensor | None) -> m.WireTensor | None:
        if prompts is None:
            return None
        part = prompts[hop.start - self.start : hop.end - self.start].to(TORCH_DTYPES[self.dtype])
        return compression.encode(part.contiguous(), "none")  # prompts travel exactly

    async def _remote_forward(self, hop: Hop, x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        req = m.ForwardRequest(
            model=self.model, start=hop.start, end=hop.end, compression=self.codec,
            hidden=compression.encode(x, self.codec), prompts=self._prompts_of(hop, prompts),
        )
        reply = await self._call(hop, req, m.ForwardResponse)
        return self._tensor(hop, reply.hidden, x.shape, "hidden")

    async def _remote_backward(
        self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        wire_prompts = self._prompts_of(hop, prompts)
        req = m.BackwardRequest(
            model=self.model, start=hop.start, end=hop.end, compression=self.codec,
            hidden=compression.encode(x, self.codec), grad_output=compression.encode(grad, self.codec),
            prompts=wire_prompts,
        )
        reply = await self._call(hop, req, m.BackwardResponse)
        grad_input = self._tensor(hop, reply.grad_input, x.shape, "grad_input")
        if wire_prompts is None:
            return grad_input, None
        if reply.grad_prompts is None:
            raise _HopFailed(hop, RemoteProtocolError("the answer has no 'grad_prompts' for the prompts sent"))
        return grad_input, self._tensor(hop, reply.grad_prompts, wire_prompts.shape, "grad_prompts")

    def _tensor(self, hop: Hop, wire: m.WireTensor, shape: Any, name: str) -> torch.Tensor:
        """A tensor a server answered, which must have ``shape`` and be finite."""
        try:
            out = compression.decode(wire, max_numel=int(torch.Size(shape).numel()))
        except RemoteProtocolError as exc:
            raise _HopFailed(hop, exc) from None
        if tuple(out.shape) != tuple(shape) or not out.is_floating_point():
            raise _HopFailed(hop, RemoteProtocolError(f"{name!r} must have shape {tuple(shape)}, got {tuple(out.shape)}"))
        if not bool(torch.isfinite(out).all()):
            raise _HopFailed(hop, RemoteProtocolError(f"{name!r} must be finite, got inf or nan"))
        return out

    async def _call(self, hop: Hop, message: Any, expect: type) -> Any:
        """One request on a pooled stream (a stale one is replaced once); failures -> _HopFailed."""
        peer_id = hop.server.peer_id
        for attempt in range(2):
            pool = self._idle.setdefault(peer_id, [])
            reused = bool(pool) and attempt == 0
            try:
                conn = pool.pop() if reused else await open_stream(
                    self.peer.host, peer_id, max_frame_size=self.max_frame_size, timeout=self.timeout
                )
            except (LocalProtocolError, ConfigError):
                raise
            except Exception as exc:  # any failure to reach the server: re-route
                raise _HopFailed(hop, exc) from exc
            try:
                reply = await request(conn, message, expect, timeout=self.timeout)
            except (LocalProtocolError, ConfigError):
                await conn.close()
                raise
            except (ConnectionLost, RemoteProtocolError) as exc:
                await conn.close()
                if reused:  # the server may have closed an idle stream: try a fresh one
                    log.debug("pooled stream to %s is gone (%r); opening another", peer_id, exc)
                    continue
                raise _HopFailed(hop, exc) from exc
            except Exception as exc:  # an error answer, a deadline, a broken stream: re-route
                await conn.close()
                raise _HopFailed(hop, exc) from exc
            pool.append(conn)
            return reply
        raise AssertionError("unreachable: the second attempt opens a fresh stream")

    async def aclose(self) -> None:
        """Close the pooled streams (the module stays usable: later calls open new ones)."""
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for conn in streams:
                await conn.close()


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor | None, blocks: RemoteSequential) -> torch.Tensor:
        detached = None if prompts is None else prompts.detach()
        out, traces = blocks.run(blocks.forward_async, hidden.detach(), detached)
        ctx.blocks = blocks
        ctx.traces = traces
        ctx.prompts = detached
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        blocks: RemoteSequential = ctx.blocks
        grad_hidden, grad_prompts = blocks.run(blocks.backward_async, grad.contiguous(), ctx.traces, ctx.prompts)
        return grad_hidden, grad_prompts, None
