"""The swarm's blocks as one differentiable torch module: ``RemoteSequential(peer, ...)(hidden)``.

Forward sends whole sequences through a chain of servers (no cache) and keeps, for every hop, the
input it sent; backward walks the chain in reverse, sending each hop that input and the gradient of
its output, and receives the gradient of its input (and of the deep prompts and the client-owned LoRA
of its blocks, which travel with every request). Each forward asks its server to keep the graph
(``keep_graphs``); the backward names it, and the server runs on it instead of recomputing the forward
(it recomputes when it no longer holds it). Servers never change their weights. A batch too big
for one frame is cut into pieces along the batch that travel concurrently. A hop that fails (error,
lost stream, deadline) is banned as in inference (the peer's BanList) and its blocks re-routed
(``Peer.route``): a forward goes on from there over the replacement; a backward first recomputes the
forward of the failed hop's blocks on the replacement (which keeps that graph in turn). A hop that is
late (step_deadlines.py: past 4x the recent time of the same request on those blocks) is hedged
(hedging.py): the same request goes to another server of its blocks (a backward recomputes its forward
there) and the first answer is used; a late server is not banned.

The torch side is synchronous: the autograd function hands the network work to the peer's trio loop
with ``trio.from_thread.run`` (give ``trio_token`` when torch runs in a thread trio did not start).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import torch
import trio

from swarm_node import compression
from swarm_node.dht.routing import Hop
from swarm_node.errors import (
    ConfigError,
    MissingBlocksError,
    RemoteProtocolError,
    SwarmError,
    check_int,
)
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.model.lora import LoraWeights
from swarm_node.model.lora_pack import pack_lora
from swarm_node.node.client.hedging import hedged
from swarm_node.node.client.recovery import HopFailed, UnopenedSpan, ban
from swarm_node.node.client.settings import HopTuning, SessionSettings
from swarm_node.node.client.step_deadlines import HedgeBudget, StepTimes
from swarm_node.node.client.verify_training import CheckedCall, TrainingChecks
from swarm_node.node.config import MAX_REQUEST_TOKENS
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import ConnectionLost, MessageStream, request
from swarm_node.protocol import messages as m
from swarm_node.protocol.messages import MAX_FORWARD_BATCH

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVERS_MAX_AGE = 30.0  # seconds a lookup of the servers is reused (after a failure: none)

# (hop, the input sent to it, its kept graph's id or ""), in chain order
Trace = list[tuple[Hop, torch.Tensor, str]]


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
        max_concurrent_pieces: int = 4,
        min_pieces: int = 1,
        seed: int | None = None,
        keep_graphs: bool = True,
    ) -> None:
        super().__init__()
        end = num_blocks if end is None else end
        if not 0 <= start < end <= num_blocks:
            raise ConfigError(
                f"blocks must satisfy 0 <= start < end <= {num_blocks}, got {start}:{end}"
            )
        check_int("max_concurrent_pieces", max_concurrent_pieces, 1)
        check_int("min_pieces", min_pieces, 1)
        self.peer = peer
        self.settings = SessionSettings(
            model=model, num_blocks=num_blocks, dtype=dtype, compression=compression or "none"
        )
        self.start = start
        self.end = end
        self.trio_token = trio_token
        self.timeout = peer.client_config.step_timeout
        self.max_frame_size = peer.config.max_frame_size
        self._pieces = trio.CapacityLimiter(max_concurrent_pieces)
        self.min_pieces = min_pieces  # cut every batch into at least this many, worked on at once
        self._rng = random.Random(seed)
        self._idle: dict[str, list[MessageStream]] = {}  # open streams per server, for reuse
        self.failures = 0  # hops that failed and were re-routed, over this module's life
        self._call_failures = 0  # ... in the current forward or backward pass
        self.keep_graphs = bool(keep_graphs)  # ask servers to keep forward graphs for the backward
        # (forward|backward, start, end) -> recent seconds of such requests, by rows x tokens
        self._times: dict[tuple[str, int, int], StepTimes] = {}
        self._hedges = HedgeBudget()
        self.hedged = 0  # requests a spare server answered first, over this module's life
        config = peer.client_config
        self.checks = TrainingChecks(  # spot checks of hops (verify_training.py)
            rate=config.verify_rate,
            bans=peer.bans,
            ban_seconds=config.verify_ban,
            rng=random.Random(None if seed is None else seed + 1),
        )

    def forward(
        self, hidden: torch.Tensor, prompts: torch.Tensor | None = None, lora: Any = None
    ) -> torch.Tensor:
        """``hidden # (B, T, H)``, deep ``prompts # (end - start, P, H)`` and a client-owned ``lora``
        (model.LoraWeights of some of these blocks) -> the blocks' output; differentiable in all three."""
        if hidden.ndim != 3 or 0 in hidden.shape:
            raise ConfigError(
                f"'hidden' must have shape (B >= 1, T >= 1, H), got {tuple(hidden.shape)}"
            )
        if prompts is not None and (prompts.ndim != 3 or prompts.shape[0] != self.end - self.start):
            raise ConfigError(
                f"'prompts' must have shape ({self.end - self.start}, P, H), got {tuple(prompts.shape)}"
            )
        flat = None
        if lora is not None:
            if not isinstance(lora, LoraWeights) or not lora.modules:
                raise ConfigError(
                    f"'lora' must be a non-empty LoraWeights, got {type(lora).__name__}"
                )
            if not all(self.start <= b < self.end for b in lora.blocks):
                raise ConfigError(
                    f"'lora' blocks must lie in {self.start}:{self.end}, got {lora.blocks}"
                )
            flat, _ = pack_lora(lora)  # (N,), differentiable: gradients reach every A and B
        # keep graphs only for a pass that will have a backward (not under no_grad, not for constants)
        keep = (
            self.keep_graphs
            and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (hidden, prompts, flat))
        )
        return _RemoteBlocks.apply(hidden, prompts, flat, lora, self, keep)

    def run(self, fn: Any, *args: Any) -> Any:
        """Run ``await fn(*args)`` in the peer's trio loop from this (non-trio) thread: call the module
        from a worker thread (``trio.to_thread.run_sync``) or give ``trio_token``, never from the
        trio loop's own thread, which the network work needs."""
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
        rows = min(rows, max(1, MAX_REQUEST_TOKENS // hidden.shape[1]))  # servers' default limit
        return min(rows, MAX_FORWARD_BATCH, -(-hidden.shape[0] // self.min_pieces))

    async def forward_async(
        self, hidden: torch.Tensor, tuned: _Tuned
    ) -> tuple[torch.Tensor, list[Trace]]:
        rows = self.piece_rows(hidden)
        self._call_failures = 0
        pieces = list(hidden.to(TORCH_DTYPES[self.settings.dtype]).split(rows))
        done = await self._each(
            lambda x: self._forward_range(x, self.start, self.end, tuned), pieces
        )
        out = torch.cat([out for out, _ in done]).to(hidden.device, hidden.dtype)
        return out, [trace for _, trace in done]

    async def backward_async(
        self, grad: torch.Tensor, traces: list[Trace], tuned: _Tuned
    ) -> torch.Tensor:
        """The gradient for the input; those of the prompts and LoRA accumulate in ``tuned``."""
        rows = self.piece_rows(grad)  # as the forward cut the batch
        self._call_failures = 0
        tuned.zero_grads()  # a second backward of the same graph starts over
        grads = list(grad.to(TORCH_DTYPES[self.settings.dtype]).split(rows))
        outs = await self._each(lambda g, t: self._backward_trace(g, t, tuned), grads, traces)
        return torch.cat(outs).to(grad.device, grad.dtype)  # the wire's answers come to the host

    async def _each(self, fn: Any, *columns: list[Any]) -> list[Any]:
        """``[await fn(*row) for row in zip(*columns)]``, concurrently, at most
        ``max_concurrent_pieces`` at once."""
        outs: list[Any] = [None] * len(columns[0])

        async def one(i: int) -> None:
            async with self._pieces:
                outs[i] = await fn(*(column[i] for column in columns))

        async with trio.open_nursery() as nursery:
            for i in range(len(outs)):
                nursery.start_soon(one, i)
        return outs

    # -- one piece through the chain ---------------------------------------------------------
    async def _forward_range(
        self, x: torch.Tensor, start: int, end: int, tuned: _Tuned
    ) -> tuple[torch.Tensor, Trace]:
        chain = await self._route(start, end, tuned)
        trace: Trace = []
        i = 0
        while i < len(chain):
            hop = chain[i]
            try:
                hop, (y, graph_id) = await self._checked(
                    "forward",
                    hop,
                    x,
                    tuned,
                    lambda h, x=x: self._remote_forward(h, x, tuned),
                    lambda h, x=x: self._remote_forward(h, x, tuned, keep=False),
                )
            except HopFailed as failure:
                self._fail(failure)
                chain = chain[:i] + await self._route(hop.start, end, tuned)
                continue
            trace.append((hop, x, graph_id))
            x = y
            i += 1
        return x, trace

    async def _backward_trace(
        self, grad: torch.Tensor, trace: Trace, tuned: _Tuned
    ) -> torch.Tensor:
        for hop, x, graph_id in reversed(trace):
            try:
                used, (grad_input, parts) = await self._checked(
                    "backward",
                    hop,
                    x,
                    tuned,
                    lambda h, x=x, g=grad, kept=hop, gid=graph_id: self._remote_backward(
                        h,
                        x,
                        g,
                        tuned,
                        gid if h is kept else "",  # a spare recomputes the forward
                    ),
                    lambda h, x=x, g=grad: self._remote_backward(h, x, g, tuned),
                )
            except HopFailed as failure:
                self._fail(failure)  # recompute the forward of these blocks on their new servers
                _, again = await self._forward_range(x, hop.start, hop.end, tuned)
                grad = await self._backward_trace(grad, again, tuned)
                continue
            tuned.accumulate(used, *parts)  # only the answer used counts: no double gradients
            grad = grad_input
        return grad

    async def _checked(
        self,
        kind: str,
        hop: Hop,
        x: torch.Tensor,
        tuned: _Tuned,
        call: Callable[[Hop], Awaitable[T]],
        again: Callable[[Hop], Awaitable[T]],
    ) -> tuple[Hop, T]:
        """``_hedged``, and sometimes the same request to another server of ``hop``'s blocks at
        once (``again``: keeping no graph), the answers compared (verify_training.py)."""
        if not self.checks.due():
            return await self._hedged(kind, hop, x, tuned, call)

        async def other(avoid: frozenset[str]) -> Hop | None:
            chain = await self._route(hop.start, hop.end, tuned, avoid | {hop.server.peer_id})
            return chain[0] if len(chain) == 1 else None

        return await self.checks.run(
            CheckedCall(
                hop=hop,
                primary=lambda: self._hedged(kind, hop, x, tuned, call),
                again=again,
                other=other,
                tensors=_compared,
                codec=self.settings.compression,
            ),
        )

    async def _hedged(
        self,
        kind: str,
        hop: Hop,
        x: torch.Tensor,
        tuned: _Tuned,
        call: Callable[[Hop], Awaitable[T]],
    ) -> tuple[Hop, T]:
        """``call(hop)``, also sent to another server of ``hop``'s blocks once it is late; the hop
        that answered first and its answer."""
        times = self._times.setdefault((kind, hop.start, hop.end), StepTimes())
        size = x.shape[0] * x.shape[1]
        late_after = times.late_after(size, self.timeout)
        self._hedges.steps += 1
        t0 = trio.current_time()
        if late_after >= self.timeout:
            answer = hop, await call(hop)
        else:

            async def primary() -> tuple[Hop, T]:
                return hop, await call(hop)

            async def spare() -> tuple[Hop, T] | None:
                if not self._hedges.allows():
                    return None
                self._hedges.spend()
                log.warning(
                    "%s of blocks %d:%d late on %s (no answer in %.2f s): hedging on a spare",
                    *(kind, hop.start, hop.end, hop.server.peer_id[-8:], late_after),
                )
                late = frozenset({hop.server.peer_id})
                try:
                    chain = await self._route(hop.start, hop.end, tuned, late)
                    if len(chain) != 1:
                        return None
                    return chain[0], await call(chain[0])
                except (MissingBlocksError, trio.TooSlowError) as exc:
                    log.info("no spare for blocks %d:%d: %s", hop.start, hop.end, exc)
                except HopFailed as failure:
                    ban(self.peer.bans, failure, trio.current_time())
                return None

            result = await hedged(primary, spare, late_after, (HopFailed,))
            if result.failure is not None:
                ban(self.peer.bans, result.failure, trio.current_time())
            answer = result.value
        if answer[0] is hop:
            times.observe(size, trio.current_time() - t0)
        else:
            self.hedged += 1
        return answer

    def _fail(self, failure: HopFailed) -> None:
        self.failures += 1
        self._call_failures += 1
        attempts = self.peer.client_config.max_attempts
        if self._call_failures > attempts:
            raise SwarmError(
                f"{self._call_failures} hops failed in one pass (the client's 'max_attempts' is "
                f"{attempts}); the last: {failure}"
            ) from failure.cause
        ban(self.peer.bans, failure, trio.current_time())

    async def _route(
        self, start: int, end: int, tuned: _Tuned, avoid: frozenset[str] = frozenset()
    ) -> list[Hop]:
        return await self.peer.route(
            self.settings,
            start,
            end,
            adapter=tuned.hop.adapter,
            max_age=0.0 if self._call_failures else SERVERS_MAX_AGE,
            rng=self._rng,
            avoid=avoid,
        )

    # -- one hop -------------------------------------------------------------------------------
    async def _remote_forward(
        self, hop: Hop, x: torch.Tensor, tuned: _Tuned, keep: bool = True
    ) -> tuple[torch.Tensor, str]:
        """The hop's output and the id of the graph its server kept ("": none)."""
        req = m.ForwardRequest(
            keep_graph=tuned.keep and keep, **self._common(hop, x, tuned.fields(hop))
        )
        with HopFailed.on_failure(UnopenedSpan(hop)):
            reply = await self._call(hop.server.peer_id, req, m.ForwardResponse)
            return _tensor(reply.hidden, x.shape, "hidden", dtype=x.dtype), reply.graph_id

    async def _remote_backward(
        self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, tuned: _Tuned, graph_id: str = ""
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """The gradient for the hop's input, and those of its prompts and LoRA (for ``tuned``)."""
        fields = tuned.fields(hop)
        req = m.BackwardRequest(
            grad_output=compression.encode(grad, self.settings.compression),
            graph_id=graph_id,
            **self._common(hop, x, fields),
        )
        with HopFailed.on_failure(UnopenedSpan(hop)):
            reply = await self._call(hop.server.peer_id, req, m.BackwardResponse)
            grad_input = _tensor(reply.grad_input, x.shape, "grad_input")
            parts = {}
            asked = {"grad_prompts": fields.get("prompts"), "grad_lora": fields.get("lora")}
            for name, sent in asked.items():
                wire = getattr(reply, name)
                if (wire is None) != (sent is None):
                    raise RemoteProtocolError(f"{name!r} must come back exactly when sent")
                if sent is not None:
                    parts[name] = _tensor(wire, sent.shape, name)
        return grad_input, (parts.get("grad_prompts"), parts.get("grad_lora"))

    def _common(self, hop: Hop, x: torch.Tensor, fields: dict[str, Any]) -> dict[str, Any]:
        """The fields a forward and a backward request of ``hop`` share."""
        codec = self.settings.compression
        hidden = compression.encode(x, codec)
        return dict(
            model=self.settings.model,
            start=hop.start,
            end=hop.end,
            compression=codec,
            hidden=hidden,
            **fields,
        )

    async def _call(self, peer_id: str, message: Any, expect: type) -> Any:
        """One request on a pooled stream; a stale one (closed by the server) is replaced once."""
        pool = self._idle.setdefault(peer_id, [])
        if pool:
            try:
                return await _ask(pool, pool.pop(), message, expect, self.timeout)
            except (ConnectionLost, RemoteProtocolError) as exc:
                log.debug("pooled stream to %s is gone (%r); opening another", peer_id, exc)
        conn = await open_stream(
            self.peer.host, peer_id, max_frame_size=self.max_frame_size, timeout=self.timeout
        )
        return await _ask(pool, conn, message, expect, self.timeout)

    async def aclose(self) -> None:
        """Close the pooled streams (the module stays usable: later calls open new ones)."""
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for conn in streams:
                await conn.close()


def _compared(answer: Any) -> list[torch.Tensor | None]:
    """What a training check compares: a forward's output (and graph id, not compared), or a
    backward's gradients for the input, the prompts and the LoRA."""
    first, rest = answer
    return [first] if isinstance(rest, str) else [first, *rest]


async def _ask(
    pool: list[MessageStream], conn: MessageStream, message: Any, expect: type, seconds: float
) -> Any:
    """``request`` on ``conn``, which goes back to ``pool`` after an answer and is closed otherwise."""
    try:
        reply = await request(conn, message, expect, timeout=seconds)
    except Exception:
        await conn.close()
        raise
    pool.append(conn)
    return reply


def _tensor(
    wire: m.WireTensor, shape: Any, name: str, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A tensor a server answered, which must have ``shape`` (and ``dtype``, when named: what the
    next hop is sent must be what it takes, or it would be blamed for refusing) and be finite."""
    out = compression.decode(wire, max_numel=int(torch.Size(shape).numel()))
    if tuple(out.shape) != tuple(shape) or not out.is_floating_point():
        raise RemoteProtocolError(
            f"{name!r} must have shape {tuple(shape)}, got {tuple(out.shape)}"
        )
    if dtype is not None and out.dtype != dtype:
        raise RemoteProtocolError(f"{name!r} must be {dtype}, got {out.dtype}")
    if not bool(torch.isfinite(out).all()):
        raise RemoteProtocolError(f"{name!r} must be finite, got inf or nan")
    return out


class _Tuned:
    """A pass's HopTuning, and where the gradients the hops send back for its prompts and LoRA add up."""

    def __init__(
        self,
        blocks: RemoteSequential,
        prompts: torch.Tensor | None,
        lora: Any,
        flat: Any,
        keep: bool,
    ) -> None:
        self.hop = HopTuning(
            prompts=None if prompts is None else prompts.detach(), first=blocks.start, lora=lora
        ).resolved(blocks.peer.client_config.adapter)
        self.dtype = blocks.settings.dtype
        self.keep = keep  # ask the servers to keep the forward graphs for this pass's backward
        dtype = TORCH_DTYPES[self.dtype]
        self.grad_prompts = None if prompts is None else torch.zeros(prompts.shape, dtype=dtype)
        self.grad_lora = None if flat is None else torch.zeros(flat.shape, dtype=dtype)
        self._offsets: dict[int, tuple[int, int]] = {}  # block -> its range in the flat LoRA
        offset = 0
        for block in [] if lora is None else lora.blocks:
            size = sum(mod.a.numel() + mod.b.numel() for mod in lora.modules[block].values())
            self._offsets[block] = (offset, offset + size)
            offset += size

    def fields(self, hop: Hop) -> dict[str, Any]:
        return self.hop.fields(hop.start, hop.end, self.dtype)

    def zero_grads(self) -> None:
        for grad in (self.grad_prompts, self.grad_lora):
            if grad is not None:
                grad.zero_()

    def accumulate(
        self, hop: Hop, grad_prompts: torch.Tensor | None, grad_lora: torch.Tensor | None
    ) -> None:
        first = self.hop.first
        if grad_prompts is not None and self.grad_prompts is not None:
            rows = slice(hop.start - first, hop.end - first)
            self.grad_prompts[rows] += grad_prompts.to(self.grad_prompts.dtype)
        ranges = [r for b, r in self._offsets.items() if hop.start <= b < hop.end]
        if grad_lora is not None and self.grad_lora is not None and ranges:
            self.grad_lora[ranges[0][0] : ranges[-1][1]] += grad_lora.to(self.grad_lora.dtype)


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        flat: torch.Tensor | None,
        lora: Any,
        blocks: RemoteSequential,
        keep: bool,
    ) -> torch.Tensor:
        tuned = _Tuned(blocks, prompts, lora, flat, keep)
        out, traces = blocks.run(blocks.forward_async, hidden.detach(), tuned)
        ctx.blocks, ctx.traces, ctx.tuned = blocks, traces, tuned
        ctx.kinds = tuple(None if t is None else (t.device, t.dtype) for t in (prompts, flat))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        blocks: RemoteSequential = ctx.blocks
        tuned: _Tuned = ctx.tuned
        grad_hidden = blocks.run(blocks.backward_async, grad.contiguous(), ctx.traces, tuned)
        prompts_kind, flat_kind = ctx.kinds  # (device, dtype) of each input
        grad_prompts = None if tuned.grad_prompts is None else tuned.grad_prompts.to(*prompts_kind)
        grad_flat = None if tuned.grad_lora is None else tuned.grad_lora.to(*flat_kind)
        return grad_hidden, grad_prompts, grad_flat, None, None, None
