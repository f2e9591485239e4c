"""A client's inference session over a chain of servers: one stream and one remote session per hop.

Client-star (the default): each step sends the hidden states of the new positions to every hop in
order and returns the last hop's output (2N one-way delays a token). Push: the client sends a step
to the first hop only; each server sends its output straight to the next one and to the client (N + 1
delays). The client reads every hop's answer in order and, where a hop says it could not push
(``pushed=0``) or the next server says the push failed, sends that step on itself. The session is an
async context manager: leaving it closes every remote session and stream.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import trio
from libp2p.peer.id import ID

from swarm_node import compression
from swarm_node.dht.routing import Hop
from swarm_node.errors import RemoteError, RemoteProtocolError, SessionError
from swarm_node.node.config import SERVER_DEFAULT
from swarm_node.node.message_stream import MessageStream
from swarm_node.protocol import PROTOCOL_ID
from swarm_node.protocol import messages as m

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # tokens per step frame when a long prompt streams through the chain


async def request(conn: MessageStream, message: Any, expect: type, *, timeout: float) -> Any:
    """Send one request and wait for its answer under a deadline; ErrorResponse -> RemoteError."""
    with trio.fail_after(timeout):
        await conn.send(message)
        reply = await conn.receive()
    if reply is None:
        raise RemoteProtocolError(f"{conn.peer_id} closed the stream instead of answering")
    if isinstance(reply, m.ErrorResponse):
        raise RemoteError(reply.code, f"{reply.message} (from {conn.peer_id})")
    if not isinstance(reply, expect):
        raise RemoteProtocolError(
            f"{conn.peer_id} answered {type(message).__name__} with {type(reply).__name__}"
        )
    return reply


async def open_stream(host: Any, peer_id: str, *, max_frame_size: int, timeout: float) -> MessageStream:
    with trio.fail_after(timeout):
        stream = await host.new_stream(ID.from_base58(peer_id), [PROTOCOL_ID])
    return MessageStream(stream, max_frame_size=max_frame_size)


class _RemoteSpan:
    def __init__(self, hop: Hop, conn: MessageStream, session_id: str, pushes: bool = False) -> None:
        self.hop = hop
        self.conn = conn
        self.session_id = session_id
        self.pushes = pushes  # this server pushes its output to the next span's server


class InferenceSession:
    """Runs hidden states through ``chain`` with a KV cache kept on every server."""

    def __init__(
        self,
        host: Any,
        chain: list[Hop],
        *,
        model: str,
        max_length: int,
        dtype: str,
        compression: str | None,
        step_timeout: float,
        max_frame_size: int,
        batch_size: int = 1,
        push: bool = False,
        adapter: str = "",
        prompts: torch.Tensor | None = None,
        lora: Any = None,
    ) -> None:
        self.push = push
        self.adapter = adapter  # a LoRA adapter every server of the chain holds ("" = none)
        self.prompts = prompts  # deep prompts (num_blocks, P, H); each hop gets its blocks' at open
        self.lora = lora  # a client-owned model.LoraWeights; each hop gets its blocks' at open
        self.host = host
        self.chain = chain
        self.model = model
        self.max_length = max_length
        self.dtype = dtype
        self.uplink = compression or "none"  # codec of what we send
        self.downlink = compression or SERVER_DEFAULT  # codec we ask the servers to answer in
        self.step_timeout = step_timeout
        self.max_frame_size = max_frame_size
        self.batch_size = batch_size
        self.position = 0
        self._step_id = 0
        self._spans: list[_RemoteSpan] = []

    async def __aenter__(self) -> InferenceSession:
        try:
            following: _RemoteSpan | None = None
            # push: open from the last hop back, so each server learns the next one's session id
            for i in reversed(range(len(self.chain))) if self.push else range(len(self.chain)):
                hop = self.chain[i]
                previous = self.chain[i - 1].server.peer_id if i > 0 else ""
                conn = await open_stream(
                    self.host, hop.server.peer_id, max_frame_size=self.max_frame_size, timeout=self.step_timeout
                )
                reply = await request(
                    conn,
                    m.OpenSessionRequest(
                        model=self.model,
                        start=hop.start,
                        end=hop.end,
                        max_length=self.max_length,
                        dtype=self.dtype,
                        compression=self.downlink,
                        batch_size=self.batch_size,
                        adapter=self.adapter,
                        prompts=self._hop_prompts(hop),
                        **self._hop_lora(hop),
                        **self._push_fields(following, previous),
                    ),
                    m.OpenSessionResponse,
                    timeout=self.step_timeout,
                )
                following = _RemoteSpan(hop, conn, reply.session_id, pushes=bool(reply.push))
                self._spans.append(following)
            if self.push:
                self._spans.reverse()
        except BaseException:
            await self.aclose()
            raise
        return self

    def _hop_lora(self, hop: Hop) -> dict[str, Any]:
        """The ``lora`` and ``lora_manifest`` fields of this hop's blocks (none: no fields)."""
        part = self.lora.for_blocks(hop.start, hop.end) if self.lora is not None else None
        if part is None or not part.modules:
            return {}
        from swarm_node.model.lora_pack import pack_lora

        flat, manifest = pack_lora(part)
        flat = flat.detach().to(getattr(torch, self.dtype)).contiguous()
        return {"lora": compression.encode(flat, "none"), "lora_manifest": manifest}  # travels exactly

    def _hop_prompts(self, hop: Hop) -> m.WireTensor | None:
        if self.prompts is None:
            return None
        part = self.prompts[hop.start : hop.end].to(getattr(torch, self.dtype)).contiguous()
        return compression.encode(part, "none")  # prompts travel exactly

    def _push_fields(self, following: _RemoteSpan | None, previous: str) -> dict[str, str]:
        """Where this hop pushes to (the session opened on the next hop) and whom it takes pushes from."""
        if not self.push:
            return {}
        fields = {"prev_peer": previous}
        if following is not None:
            fields.update(
                next_peer=following.hop.server.peer_id,
                next_addrs=" ".join(following.hop.server.addrs),
                next_session=following.session_id,
            )
        return fields

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        spans, self._spans = self._spans, []
        with trio.CancelScope(shield=True):
            for span in spans:
                with trio.move_on_after(2.0):
                    try:
                        await request(
                            span.conn,
                            m.CloseSessionRequest(session_id=span.session_id),
                            m.CloseSessionResponse,
                            timeout=2.0,
                        )
                    except (RemoteError, RemoteProtocolError, trio.TooSlowError) as exc:
                        log.debug("closing session on %s: %s", span.conn.peer_id, exc)
                    except Exception as exc:  # the server may be gone; the close is best effort
                        log.debug("closing session on %s failed: %r", span.conn.peer_id, exc)
                    await span.conn.close()

    @property
    def hops(self) -> list[Hop]:
        return [span.hop for span in self._spans]

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the new positions ``# (B, T, H)`` -> the chain's output ``# (B, T, H)``.

        A long step (a prefill) is cut into chunks that stream through the chain: while hop i runs
        chunk k, hop i-1 already runs chunk k+1, and no frame outgrows the frame-size limit.
        """
        if not self._spans:
            raise SessionError("the inference session is not open")
        tokens = hidden.shape[1]
        if self.position + tokens > self.max_length:
            raise SessionError(
                f"session max_length is {self.max_length}: {self.position} tokens so far + {tokens} "
                "new would exceed it"
            )
        chunk = self.chunk_tokens(hidden)
        if self.push:  # chunks one after another: each travels the whole chain by itself
            outs = []
            for a in range(0, tokens, chunk):
                piece = hidden[:, a : a + chunk]
                outs.append(await self._push_step(piece, self._next_step_id(), self.position + a))
            out = torch.cat(outs, dim=1)
        elif tokens <= chunk:
            out = await self._through_chain(hidden, self.position)
        else:
            out = await self._pipelined(hidden, chunk)
        self.position += tokens
        return out

    def chunk_tokens(self, hidden: torch.Tensor) -> int:
        """Tokens per chunk: at most PREFILL_CHUNK, and a frame of them well under the size limit."""
        batch, _, width = hidden.shape
        per_token = batch * width * 4  # bytes of one position in float32, the widest wire dtype
        return max(1, min(PREFILL_CHUNK, (self.max_frame_size // 2) // per_token))

    def _next_step_id(self) -> int:
        self._step_id += 1
        return self._step_id

    async def _through_chain(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        step_id = self._next_step_id()  # one id per step, the same on every hop
        for span in self._spans:
            hidden = await self._hop(span, hidden, position, step_id)
        return hidden

    async def _hop(
        self, span: _RemoteSpan, hidden: torch.Tensor, position: int, step_id: int
    ) -> torch.Tensor:
        await self._send_step(span, hidden, step_id, position)
        reply = await self._receive_step(span, step_id)
        if reply is None:
            raise RemoteProtocolError(f"{span.conn.peer_id} reported a failed push for a step we sent")
        return self._output(span, reply, hidden)

    def _output(self, span: _RemoteSpan, reply: m.StepResponse, sent: torch.Tensor) -> torch.Tensor:
        """The hidden states of a step's answer, which must have the shape of what was sent."""
        out = compression.decode(reply.hidden, max_numel=sent.numel())
        if out.shape != sent.shape:
            raise RemoteProtocolError(
                f"{span.conn.peer_id} returned shape {tuple(out.shape)}, expected {tuple(sent.shape)}"
            )
        return out

    async def _pipelined(self, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
        """Chunks flow hop to hop through memory channels; one task per hop keeps each stream serial."""
        pieces = [
            (self._next_step_id(), self.position + a, hidden[:, a : a + chunk])
            for a in range(0, hidden.shape[1], chunk)
        ]
        outputs: list[torch.Tensor] = []
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[tuple[int, int, torch.Tensor]](len(pieces))
            for piece in pieces:
                send.send_nowait(piece)
            send.close()
            for span in self._spans:
                next_send, next_receive = trio.open_memory_channel[tuple[int, int, torch.Tensor]](len(pieces))
                nursery.start_soon(self._hop_worker, span, receive, next_send)
                receive = next_receive
            async with receive:
                async for _, _, out in receive:
                    outputs.append(out)
        return torch.cat(outputs, dim=1)

    async def _hop_worker(
        self,
        span: _RemoteSpan,
        inbox: trio.MemoryReceiveChannel[tuple[int, int, torch.Tensor]],
        outbox: trio.MemorySendChannel[tuple[int, int, torch.Tensor]],
    ) -> None:
        async with inbox, outbox:
            async for step_id, position, piece in inbox:
                out = await self._hop(span, piece, position, step_id)
                await outbox.send((step_id, position, out))

    async def _push_step(self, hidden: torch.Tensor, step_id: int, position: int) -> torch.Tensor:
        """One step with server-to-server push; any hop that did not get the step is sent it."""
        send = True  # the first hop always hears from us
        for span in self._spans:
            if send:
                await self._send_step(span, hidden, step_id, position)
            reply = await self._receive_step(span, step_id)
            if reply is None:  # the previous server's push failed here: send it ourselves
                if send:
                    raise RemoteProtocolError(f"{span.conn.peer_id} reported a failed push for a step we sent")
                await self._send_step(span, hidden, step_id, position)
                reply = await self._receive_step(span, step_id)
                if reply is None:
                    raise RemoteProtocolError(f"{span.conn.peer_id} reported a failed push twice")
            hidden = self._output(span, reply, hidden)
            send = not (span.pushes and reply.pushed)
        return hidden

    async def _send_step(self, span: _RemoteSpan, hidden: torch.Tensor, step_id: int, position: int) -> None:
        with trio.fail_after(self.step_timeout):
            await span.conn.send(
                m.StepRequest(
                    session_id=span.session_id,
                    step_id=step_id,
                    position=position,
                    hidden=compression.encode(hidden, self.uplink),
                )
            )

    async def _receive_step(self, span: _RemoteSpan, step_id: int) -> m.StepResponse | None:
        """The hop's answer to the current step (older duplicates skipped); None: push failed."""
        with trio.fail_after(self.step_timeout):
            while True:
                reply = await span.conn.receive()
                if reply is None:
                    raise RemoteProtocolError(f"{span.conn.peer_id} closed the stream instead of answering")
                if isinstance(reply, m.ErrorResponse):
                    if reply.code == "push_failed":
                        log.info("push to %s failed: %s", span.conn.peer_id, reply.message)
                        return None
                    raise RemoteError(reply.code, f"{reply.message} (from {span.conn.peer_id})")
                if not isinstance(reply, m.StepResponse):
                    raise RemoteProtocolError(
                        f"{span.conn.peer_id} answered a step with {type(reply).__name__}"
                    )
                if reply.step_id == step_id:
                    return reply
                if reply.step_id > step_id:
                    raise RemoteProtocolError(
                        f"{span.conn.peer_id} answered step {reply.step_id}, expected {step_id}"
                    )
                log.debug("dropping a duplicate answer to step %d from %s", reply.step_id, span.conn.peer_id)
