"""The server side of a peer: holds one span of blocks and runs sessions and forwards for others.

One stream from a client is one connection; the sessions opened on it live as long as the stream (the
stream's handler task is their scope, so leaving it frees their caches; an answer not read within
--send-timeout ends the stream too). What a message may do and what a refusal says are
protocol/server_session.py's rules; this is their trio loop. Heavy torch work goes to the one
compute thread through ``compute_limiter``.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import torch
import trio

from swarm_node import __version__, compression
from swarm_node.dht.receipts import Receipt, sign_receipt, wire_digest
from swarm_node.errors import (
    ConfigError,
    ProtocolError,
    RemoteProtocolError,
    RequestError,
    SessionError,
)
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.model.lora_pack import manifest_entries
from swarm_node.model.partial_steps import PartialStep
from swarm_node.node.config import COMPRESSIONS, SERVER_DEFAULT, ServerConfig
from swarm_node.node.net.message_stream import (
    ConnectionLost,
    MessageStream,
    ReceiveBudget,
    ReceiveRefused,
)
from swarm_node.node.quick_jobs import SERVER_MAX_INLINE_S, QuickJobs, off_loop
from swarm_node.node.server import training as server_training
from swarm_node.node.server.batching import DecodeBatcher
from swarm_node.node.server.compute_admission import (
    ComputeLimits,
    ComputeQueue,
    check_compute,
    tensor_bytes,
)
from swarm_node.node.server.kept_graphs import KeptGraphs
from swarm_node.node.server.memory import out_of_memory_refusal, out_of_memory_refused
from swarm_node.node.server.push import open_push_link
from swarm_node.node.server.sessions import Gauge, ServerSession
from swarm_node.protocol import messages as m
from swarm_node.protocol.messages import MAX_FORWARD_BATCH
from swarm_node.protocol.server_session import (
    PushRefused,
    ServedSpan,
    SessionRules,
    check_open,
    find_session,
    refusal,
)

log = logging.getLogger(__name__)


class BlockServer:
    """Serves blocks ``span.start..span.end-1`` of ``model_id``."""

    def __init__(
        self,
        *,
        span: Any,  # model.BlockSpan
        model_id: str,
        config: ServerConfig,
        model_digest: str = "",  # model/identity.py's digest of the weights served
        max_frame_size: int,
        compute_limiter: trio.CapacityLimiter,
        throughput: float,
        host: Any = None,  # libp2p host, to open push streams to next servers
        # a peer id's valid signed record (SwarmDHT.server_record): push targets are checked on it
        push_targets: Callable[[str], Awaitable[Any]] | None = None,
        adapters: dict[str, Any] | None = None,  # name -> model.LoraWeights of this span's blocks
    ) -> None:
        self.host = host
        self.push_targets = push_targets
        self.adapters = adapters or {}
        self.sessions: dict[str, ServerSession] = {}  # every open session, for pushed steps
        self.span = span
        self.model_id = model_id
        self.model_digest = model_digest
        self.config = config
        self.max_frame_size = max_frame_size
        self.compute_limiter = compute_limiter
        # decode steps (one new position) run on the loop's thread while they take <= 0.1 s
        self.quick_jobs = QuickJobs(SERVER_MAX_INLINE_S, compute_limiter)
        # decode steps of sessions without prompts or LoRA: together when they wait together
        self.batcher = DecodeBatcher(
            span,
            compute_limiter,
            max_inline_s=SERVER_MAX_INLINE_S,
            enabled=not config.no_batching,
            alone=lambda hidden, cache, start, end: self._run_span(hidden, cache, start, end),
            users=lambda: len(self.sessions),
        )
        # one long step's chunk at a time competes for the compute limiter: a chunk that gives
        # way hands it to the decode steps waiting, not to other long steps' chunks (they take
        # turns here, a chunk each)
        self.prefill_lane = trio.Lock()
        self.throughput = throughput
        self.reserved_tokens = 0
        self.sessions_per_peer: Counter[str] = Counter()
        self.tokens_per_peer: Counter[str] = Counter()  # the cache tokens each peer holds here
        self.active_sessions = 0
        self.closing = False  # shutting down or moving: new sessions are refused
        self.pushed_steps = 0  # steps that arrived from the previous server and were computed
        self.steps = Gauge()  # requests being computed and answered right now
        self.open_sessions = Gauge()  # sessions open on this server
        self.kept_graphs = KeptGraphs()  # training forwards' graphs awaiting their backward
        self.limits = ComputeLimits.of(config)
        self.compute_queue = ComputeQueue(self.limits)  # requests waiting for compute
        receiving = config.max_receiving_mb * 2**20  # request frames arriving on every stream
        self.receiving = ReceiveBudget(total=receiving, per_peer=receiving // 2)
        self.served = ServedSpan(
            model=model_id,
            start=config.start,
            end=config.end,
            dtype=config.dtype,
            compressions=(*COMPRESSIONS, SERVER_DEFAULT),
            max_session_length=config.max_session_length,
            max_sessions_per_peer=config.max_sessions_per_peer,
            cache_budget_tokens=config.cache_budget_tokens,
            max_peer_share=config.max_peer_cache_share,
            hidden_size=span.hidden_size,
            element_bytes=torch.empty((), dtype=span.dtype).element_size(),
            token_bytes=span.cache_bytes_per_token(),
        )

    @property
    def steps_in_flight(self) -> int:
        return self.steps.value

    async def drain(self, grace: float) -> bool:
        """Refuse new sessions and wait, at most ``grace`` s, until no step is being computed or
        answered; True if none is. Admitted sessions keep being served meanwhile."""
        self.closing = True
        return await self.steps.wait_zero(grace)

    async def hand_over(self, grace: float) -> bool:
        """Refuse new sessions, give the open ones ``grace`` s to end, then cut those left (their
        clients recover elsewhere). True if every session ended by itself."""
        self.closing = True
        ended = await self.open_sessions.wait_zero(grace)
        with trio.CancelScope(shield=True):
            for session in list(self.sessions.values()):
                with trio.move_on_after(1.0):
                    await session.conn.reset()
        return ended

    @property
    def start(self) -> int:
        return self.config.start

    @property
    def end(self) -> int:
        return self.config.end

    @property
    def cache_tokens_left(self) -> int:
        return max(0, self.config.cache_budget_tokens - self.reserved_tokens)

    # -- the connection loop ----------------------------------------------------------------------
    async def handle_stream(self, stream: Any) -> None:
        conn = MessageStream(stream, max_frame_size=self.max_frame_size, budget=self.receiving)
        peer = conn.peer_id
        sessions: dict[str, ServerSession] = {}
        carries_pushes = False
        timeout = self.config.session_idle_timeout
        self.kept_graphs.stream_opened(peer)
        try:
            while True:
                # sessions idle out on steps alone: other messages (a ping every so often) must not
                # keep a peer's caches reserved forever; a stream without sessions, on any silence
                last_step = max((s.last_active for s in sessions.values()), default=None)
                wait = timeout if last_step is None else last_step + timeout - trio.current_time()
                with trio.move_on_after(max(wait, 0.0)) as idle:
                    message = await conn.receive()
                if idle.cancelled_caught:
                    now = trio.current_time()
                    busy = any(now - s.last_active < timeout for s in sessions.values())
                    if carries_pushes or busy:
                        continue  # steps arrive by push; the sessions are busy
                    if sessions:
                        log.info("closing %d idle session(s) of %s", len(sessions), peer)
                        for session in sessions.values():
                            await self._end(session)
                        sessions.clear()
                        text = f"no step for {timeout} s; sessions closed"
                        await self._send(conn, m.ErrorResponse(code="idle_timeout", message=text))
                    break
                if message is None:
                    break
                if isinstance(message, m.PushStepRequest):
                    carries_pushes = True
                    with self.steps.held():
                        pushed = await self._pushed_step(message, peer)
                    if not pushed:
                        await conn.reset()  # the pushing server's next write fails: it stops
                        break
                    continue
                with self.steps.held():
                    try:
                        with self.compute_queue.admit(peer, message):
                            reply = await self._dispatch(message, sessions, conn)
                    except RequestError as exc:
                        log.debug("refused a %s from %s: %s", type(message).__name__, peer, exc)
                        reply = refusal(exc)
                    if not await self._send(conn, reply):
                        break
        except RemoteProtocolError as exc:
            refused = isinstance(exc, ReceiveRefused)
            log.log(logging.INFO if refused else logging.WARNING, "peer %s: %s", peer, exc)
            with trio.move_on_after(1.0):
                try:
                    code = "busy" if refused else "bad_request"
                    await conn.send(m.ErrorResponse(code=code, message=str(exc)))
                except ProtocolError:
                    pass
        except ConnectionLost as exc:
            log.debug("connection from %s lost: %s", peer, exc)
        except Exception:  # one catch-all per connection: keep serving everyone else
            log.warning("stream from %s failed; closing it", peer, exc_info=True)
        finally:
            conn.release()
            self.kept_graphs.stream_closed(peer)  # the peer's graphs go with its last stream
            with trio.CancelScope(shield=True):
                for session in sessions.values():
                    await self._end(session)
                with trio.move_on_after(1.0):
                    await conn.close()

    async def _send(self, conn: MessageStream, message: Any) -> bool:
        """Send ``message`` within --send-timeout; False when the peer did not take it in time (the
        stream is reset: its reader's sessions end and free what they held)."""
        timeout = self.config.send_timeout
        with trio.move_on_after(timeout):
            await conn.send(message)
            return True
        log.info(
            "%s did not read an answer within %s s: resetting its stream", conn.peer_id, timeout
        )
        with trio.move_on_after(1.0):
            await conn.reset()
        return False

    async def _dispatch(
        self, message: Any, sessions: dict[str, ServerSession], conn: MessageStream
    ) -> Any:
        if isinstance(message, m.StepRequest):
            return await self._step(message, sessions)
        if isinstance(message, m.InfoRequest):
            return self.info()
        if isinstance(message, m.OpenSessionRequest):
            return await self._open(message, sessions, conn)
        if isinstance(message, m.CloseSessionRequest):
            session = find_session(sessions, message.session_id)
            del sessions[message.session_id]
            await self._end(session)
            return session.rules.close()
        if isinstance(message, m.ForwardRequest):
            with out_of_memory_refused(self.span.device, "a forward"):
                return await server_training.forward(self, message, conn.peer_id)
        if isinstance(message, m.BackwardRequest):
            with out_of_memory_refused(self.span.device, "a backward"):
                return await server_training.backward(self, message, conn.peer_id)
        raise RequestError("bad_request", f"a server does not accept {type(message).__name__}")

    def info(self) -> m.InfoResponse:
        return m.InfoResponse(
            model=self.model_id,
            start=self.start,
            end=self.end,
            num_blocks=self.span.config.num_hidden_layers,
            hidden_size=self.span.hidden_size,
            dtype=self.config.dtype,
            throughput=float(self.throughput),
            cache_tokens_left=self.cache_tokens_left,
            version=__version__,
        )

    # -- checks shared by requests ----------------------------------------------------------------
    async def decode_hidden(
        self, wire: Any, *, batch: int | None, max_tokens: int, dtype: str
    ) -> torch.Tensor:
        hidden_size = self.span.hidden_size
        max_numel = (batch or MAX_FORWARD_BATCH) * max_tokens * hidden_size
        decode = functools.partial(compression.decode, wire, max_numel=max_numel)
        try:
            hidden = await off_loop(decode, tensor_bytes(wire))
        except RemoteProtocolError as exc:
            raise RequestError("bad_request", f"hidden states: {exc}") from None
        if hidden.ndim != 3 or hidden.shape[2] != hidden_size or hidden.shape[1] < 1:
            raise RequestError(
                "bad_request",
                f"hidden states must have shape (batch, tokens >= 1, {hidden_size}), "
                f"got {tuple(hidden.shape)}",
            )
        if batch is not None and hidden.shape[0] != batch:
            raise RequestError(
                "bad_request", f"hidden states must have batch {batch}, got {hidden.shape[0]}"
            )
        if hidden.dtype != TORCH_DTYPES[dtype]:
            raise RequestError(
                "bad_request",
                f"hidden states must be {dtype}, got {str(hidden.dtype).removeprefix('torch.')}",
            )
        if not bool(torch.isfinite(hidden).all()):
            raise RequestError("bad_request", "hidden states must be finite, got inf or nan")
        return hidden

    # -- sessions -----------------------------------------------------------------------------
    async def _open(
        self, req: m.OpenSessionRequest, sessions: dict[str, ServerSession], conn: MessageStream
    ) -> Any:
        peer = conn.peer_id
        tokens = check_open(
            req,
            self.served,
            peer_sessions=self.sessions_per_peer[peer],
            peer_tokens=self.tokens_per_peer[peer],
            cache_tokens_left=self.cache_tokens_left,
            closing=self.closing,
            lora_numel=self._lora_numel(req),
        )
        prompts = await server_training.decode_prompts(
            self, req.prompts, start=req.start, end=req.end
        )
        lora = await server_training.request_lora(self, req)
        session_id = secrets.token_hex(8)
        cache = self.span.new_cache(
            req.max_length, batch_size=req.batch_size, start=req.start, end=req.end
        )
        rules = SessionRules(
            session_id=session_id,
            max_length=req.max_length,
            prev_peer=req.prev_peer,
            keeps=cache.can_truncate,
            batch_size=req.batch_size,
        )
        codec = self.config.compression if req.compression == SERVER_DEFAULT else req.compression
        session = sessions[session_id] = self.sessions[session_id] = ServerSession(
            rules=rules,
            peer_id=peer,
            start=req.start,
            end=req.end,
            batch_size=req.batch_size,
            dtype=req.dtype,
            compression=codec,
            cache=cache,
            reserved_tokens=tokens,
            conn=conn,
            prompts=prompts,
            last_active=trio.current_time(),
            lora=lora,
        )
        self.reserved_tokens += tokens
        self.tokens_per_peer[peer] += tokens
        self.sessions_per_peer[peer] += 1
        self.active_sessions += 1
        self.open_sessions.add(1)
        # the room is reserved before this await
        if req.next_peer and self.host is not None and self.push_targets is not None:
            session.push = await open_push_link(
                self.host,
                peer_id=req.next_peer,
                next_session=req.next_session,
                max_frame_size=self.max_frame_size,
                model=self.model_id,
                digest=self.model_digest,
                block=req.end,
                find_record=self.push_targets,
            )
        log.debug("opened session %s for %s (blocks %d:%d)", session_id, peer, req.start, req.end)
        return m.OpenSessionResponse(
            session_id=session_id,
            max_length=req.max_length,
            push=session.push is not None,
            keep=rules.keeps,
        )

    def _lora_numel(self, req: m.OpenSessionRequest) -> int:
        """The numbers of the client-owned LoRA a request's manifest declares, before any decode."""
        if not req.lora_manifest:
            return 0
        shapes = self.span.lora_shapes
        try:
            _, numel = manifest_entries(
                req.lora_manifest, shapes=shapes, start=req.start, end=req.end
            )
        except ConfigError as exc:
            raise RequestError("bad_request", f"lora: {exc}") from None
        return numel

    async def _end(self, session: ServerSession) -> None:
        session.rules.close()
        self._release(session)
        if session.push is not None:
            await session.push.aclose()

    def _release(self, session: ServerSession) -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return  # released already
        self.reserved_tokens -= session.reserved_tokens
        self.tokens_per_peer[session.peer_id] -= session.reserved_tokens
        self.sessions_per_peer[session.peer_id] -= 1
        if self.sessions_per_peer[session.peer_id] <= 0:
            del self.sessions_per_peer[session.peer_id]
            del self.tokens_per_peer[session.peer_id]
        self.active_sessions -= 1
        self.open_sessions.add(-1)
        session.cache = None

    async def _step(self, req: m.StepRequest, sessions: dict[str, ServerSession]) -> m.StepResponse:
        session = find_session(sessions, req.session_id)
        async with session.lock:
            done = session.rules.step(req, session.cache_length)
            return done or await self._run_step(
                session, req.step_id, req.position, req.hidden, req.keep, req.reorder
            )

    async def _pushed_step(self, req: m.PushStepRequest, sender: str) -> bool:
        """A step the previous server pushed: compute it and answer the session's client (a step
        that fails: ``push_failed``, so the client sends it itself). False when the pushing stream
        should go (the session is unknown or takes no pushes from ``sender``)."""
        session = self.sessions.get(req.session_id)
        if session is None:
            log.info("dropping a push for unknown session %r", req.session_id)
            return False
        async with session.lock:
            try:
                if not session.rules.push(req, sender, session.cache_length):
                    return True  # the client sent it first
                reply: Any = await self._run_step(
                    session, req.step_id, req.position, req.hidden, req.keep, req.reorder
                )
                self.pushed_steps += 1
            except PushRefused as exc:
                log.warning("%s", exc)
                return False
            except RequestError as exc:
                reply = session.rules.push_failed(req.step_id, exc)
            try:
                await self._send(session.conn, reply)
            except ProtocolError as exc:
                log.debug("could not answer the client of %s: %s", req.session_id, exc)
        return True

    async def _run_step(
        self,
        session: ServerSession,
        step_id: int,
        position: int,
        wire: Any,
        keep: int = -1,
        reorder: tuple[int, ...] = (),
    ) -> m.StepResponse:
        """Compute one step the rules admitted (first rolling the cache back to ``keep`` positions,
        when >= 0, once the step is known good), push it on (if asked) and make the answer."""
        length = session.cache.length if keep < 0 else keep
        check_compute(
            self.limits, wire, model_config=self.span.config, dtype=session.dtype, past=length
        )
        hidden = await self.decode_hidden(
            wire,
            batch=session.batch_size,
            max_tokens=session.rules.max_length - length,
            dtype=session.dtype,
        )
        if keep >= 0:
            session.cache.truncate(keep)
        if reorder:
            session.cache.reorder(reorder)
        try:
            out = await self._compute_step(session, hidden)
        except SessionError as exc:
            raise RequestError("too_long", str(exc)) from None
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            refusal = out_of_memory_refusal(exc, self.span.device, "a step")
            if refusal is None:
                raise
            await self._end(session)  # its cache may hold part of the step: freed, not kept
            raise refusal from None
        session.steps += 1
        session.last_active = trio.current_time()
        encode = functools.partial(compression.encode, out, session.compression)
        out_wire = await off_loop(encode, out.nbytes)
        pushed = session.push is not None and await session.push.push(
            step_id, position, out_wire, keep, reorder
        )
        receipt = self._receipt(session, step_id, position, wire, out_wire)
        return session.rules.answered(step_id, out_wire, pushed=pushed, receipt=receipt)

    def _receipt(
        self, session: ServerSession, step_id: int, position: int, wire: Any, out: Any
    ) -> str:
        """This server's signature of the step's receipt (dht/receipts.py); "" without a key."""
        if self.host is None:
            return ""
        receipt = Receipt(
            model=self.model_digest,
            start=session.start,
            end=session.end,
            session_id=session.session_id,
            step_id=step_id,
            position=position,
            input_digest=wire_digest(wire.codec, wire.dtype, wire.shape, wire.data),
            output_digest=wire_digest(out.codec, out.dtype, out.shape, out.data),
        )
        return sign_receipt(receipt, self.host.get_private_key())

    async def _compute_step(self, session: ServerSession, hidden: torch.Tensor) -> torch.Tensor:
        """A session's step through its span: a decode step through the batcher (unless prompts or
        a LoRA make it the session's own); a step shorter than --prefill-chunk tokens whole, in
        its turn at the compute limiter (a burst of new sessions' short prompts all go before the
        decode steps that come after them, so those sessions start decoding together); a step of
        a chunk or more (a long prompt, which a client sends a chunk a step) in chunks, each
        computed block by block, giving the compute limiter up after a block while decode steps
        wait for it (``_chunk_part``; FIFO: they run before the chunk's next blocks; other long
        steps' chunks wait in the prefill lane, taking turns a chunk each)."""
        cache, start, end = session.cache, session.start, session.end
        tokens = hidden.shape[1]
        cache.check_step(start=start, end=end, batch_size=hidden.shape[0], new_tokens=tokens)
        prompts, lora = session.prompts, session.lora
        if tokens == 1 and prompts is None and lora is None:
            return await self.batcher.step(
                hidden, cache, start=start, end=end, user=session.session_id
            )
        chunk = self.config.prefill_chunk
        if tokens < chunk:
            run = functools.partial(self._run_span, hidden, cache, start, end, prompts, lora)
            return await self.quick_jobs.run(run, small=tokens == 1)
        outs = []
        for a in range(0, tokens, chunk):
            step = PartialStep.begin(
                self.span,
                hidden[:, a : a + chunk],
                cache,
                start=start,
                end=end,
                prompts=prompts,
                lora=lora,
            )
            part = functools.partial(self._chunk_part, step)
            async with self.prefill_lane:
                while not await self.quick_jobs.run(part, small=False):
                    pass  # decode steps took the limiter between two blocks
            outs.append(step.hidden)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _chunk_part(self, step: PartialStep) -> bool:
        """Blocks of a long step's chunk (in a worker thread) until it is done (True) or decode
        steps wait and this part has computed as long as a decode batch takes lately (equal turns:
        a prefill under a steady stream of decode steps still gets half the compute)."""
        began = time.perf_counter()

        def give_way() -> bool:
            return (
                self.batcher.waiting > 0 and time.perf_counter() - began >= self.batcher.compute_s
            )

        return step.run(give_way)

    def _run_span(
        self,
        hidden: torch.Tensor,
        cache: Any,
        start: int,
        end: int,
        prompts: torch.Tensor | None = None,
        lora: Any = None,
    ) -> torch.Tensor:
        with torch.inference_mode():
            return self.span.forward(
                hidden, cache, start=start, end=end, prompts=prompts, lora=lora
            )
