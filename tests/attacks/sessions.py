"""Attacks on a server's sessions: holding caches without using them, hoarding the cache budget,
big things held by a 1-token session, and answers nobody reads.

Each dials ``target.servers[0]`` from a fresh libp2p identity of its own (a real Noise/yamux host)
and speaks the wire protocol directly. Two of them wait for a server's timeout, so the server they
attack must run with short ones: ``--session-idle-timeout`` under ``PINGS_WITHIN`` (pings_only)
and ``--send-timeout`` under ``NEVER_READS_WITHIN`` (never_reads).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
import trio
from multiaddr import Multiaddr

from swarm_node.errors import ProtocolError
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.model.lora import MAX_RANK, config_linear_shapes
from swarm_node.model.prompts import MAX_PRE_SEQ_LEN
from swarm_node.node.net.dialing import open_stream, remember_addrs
from swarm_node.node.net.host import build_host, close_connections
from swarm_node.node.net.identity import load_or_create_identity
from swarm_node.node.net.message_stream import MessageStream
from swarm_node.protocol import messages as m
from swarm_node.protocol.tensors import WireTensor
from tests.attacks import AttackTarget

PINGS_WITHIN = 15.0  # seconds of pings after which a session still open means the attack held
NEVER_READS_WITHIN = 10.0  # seconds after which an unread session still open means it held
MAX_FRAME = 1 << 27  # what the attacker accepts (the server's own limit is what matters)
PAYLOAD_BYTES = 24 << 20  # deep prompts + LoRA sent with one open (under a 64 MiB frame limit)
UNREAD_BYTES = 40 << 20  # answers left unread: more than a yamux window (16 MiB at most) holds


@asynccontextmanager
async def attacker(target: AttackTarget, i: int = 0) -> AsyncIterator[MessageStream]:
    """A stream to server ``i`` from a new peer identity; the peer leaves on exit."""
    host = build_host(key_pair=load_or_create_identity(None), announce=None, psk=None)
    async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        address, peer = target.servers[i].rsplit("/p2p/", 1)
        remember_addrs(host, peer, [address])
        conn = await open_stream(host, peer, max_frame_size=MAX_FRAME, timeout=10)
        try:
            yield conn
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await conn.reset()
                await close_connections(host)


async def ask(conn: MessageStream, request: Any) -> Any:
    await conn.send(request)
    return await conn.receive()


def element_bytes(dtype: str) -> int:
    return torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()


def zeros(info: m.InfoResponse, *shape: int, dtype: str | None = None) -> WireTensor:
    dtype = dtype or info.dtype
    return WireTensor("none", dtype, shape, bytes(math.prod(shape) * element_bytes(dtype)))


def open_request(info: m.InfoResponse, max_length: int, **fields: Any) -> m.OpenSessionRequest:
    spans = {"start": info.start, "end": info.end, **fields}
    return m.OpenSessionRequest(
        model=info.model, max_length=max_length, dtype=info.dtype, compression="none", **spans
    )


async def open_longest(
    conn: MessageStream, info: m.InfoResponse, lengths: tuple[int, ...]
) -> tuple[int, str] | None:
    """The first of ``lengths`` the server admits a session of: (length, session id)."""
    for length in lengths:
        reply = await ask(conn, open_request(info, length))
        if isinstance(reply, m.OpenSessionResponse):
            return length, reply.session_id
    return None


async def attack_pings_only(target: AttackTarget) -> bool:
    """Open a session, take one step, then only ping on its stream: pings must not keep the
    session (and its cache) alive. Stopped: the server ends it (idle_timeout or a closed stream)."""
    with trio.move_on_after(PINGS_WITHIN + 10):
        async with attacker(target) as conn:
            info = await ask(conn, m.InfoRequest())
            opened = await open_longest(conn, info, (8,))
            if opened is None:
                return True  # no session to hold
            step = m.StepRequest(opened[1], 1, 0, zeros(info, 1, 1, info.hidden_size))
            if not isinstance(await ask(conn, step), m.StepResponse):
                return False
            with trio.move_on_after(PINGS_WITHIN):
                while True:
                    try:
                        reply = await ask(conn, m.InfoRequest())
                    except ProtocolError:
                        return True  # the server closed the stream
                    if not isinstance(reply, m.InfoResponse):
                        return isinstance(reply, m.ErrorResponse) and reply.code == "idle_timeout"
                    await trio.sleep(0.05)
    return False


async def attack_session_hoard(target: AttackTarget) -> bool:
    """One peer opens as many of the longest sessions as the server admits. Stopped: it is refused
    before the budget is gone, and a second peer can still open a session of that length."""
    with trio.move_on_after(20):
        async with attacker(target) as conn:
            info = await ask(conn, m.InfoRequest())
            opened = await open_longest(conn, info, (4096, 2048, 1024, 512, 64))
            if opened is None:
                return True
            length = opened[0]
            for _ in range(256):
                if not isinstance(
                    await ask(conn, open_request(info, length)), m.OpenSessionResponse
                ):
                    break
            async with attacker(target) as other:
                reply = await ask(other, open_request(info, length))
                return isinstance(reply, m.OpenSessionResponse)
    return False


def oversized_open(info: m.InfoResponse, model_path: Any) -> tuple[m.OpenSessionRequest, int]:
    """A 1-token session with the biggest deep prompts and client-owned LoRA that fit
    ``PAYLOAD_BYTES`` (as many blocks as fit, every Linear at the largest rank that fits), and
    what they hold, in the server's cache tokens."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    shapes = config_linear_shapes(config)
    per_rank = sum(i + o for i, o in shapes.values())  # numbers per block and unit of rank
    prompt_block = MAX_PRE_SEQ_LEN * info.hidden_size * element_bytes(info.dtype)
    lora_block = MAX_RANK * per_rank * 4  # sent as float32
    blocks = max(1, min(info.end - info.start, PAYLOAD_BYTES // (prompt_block + lora_block)))
    rank = max(1, min(MAX_RANK, (PAYLOAD_BYTES - blocks * prompt_block) // (4 * per_rank * blocks)))
    start = info.start
    manifest = tuple(
        (f"model.layers.{b}.{name}", rank, 1.0)
        for b in range(start, start + blocks)
        for name in shapes
    )
    lora_numel = rank * per_rank * blocks
    request = open_request(
        info,
        1,
        end=start + blocks,
        prompts=zeros(info, blocks, MAX_PRE_SEQ_LEN, info.hidden_size),
        lora=zeros(info, lora_numel, dtype="float32"),
        lora_manifest=manifest,
    )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    token = 2 * (info.end - info.start) * kv * head_dim * element_bytes(info.dtype)
    held = (blocks * MAX_PRE_SEQ_LEN * info.hidden_size + lora_numel) * element_bytes(info.dtype)
    return request, held // token


async def attack_oversized_prompt(target: AttackTarget) -> bool:
    """1-token sessions, each with maximal deep prompts and a maximal client-owned LoRA, opened
    until refused. Stopped: what the admitted ones hold fits the cache budget that was free
    (uncounted, the per-peer session limit alone let one peer hold many times the budget)."""
    with trio.move_on_after(20):
        async with attacker(target) as conn:
            info = await ask(conn, m.InfoRequest())
            request, held = oversized_open(info, target.model_path)
            admitted = 0
            for _ in range(64):
                if not isinstance(await ask(conn, request), m.OpenSessionResponse):
                    break
                admitted += 1
            return admitted * held <= info.cache_tokens_left
    return False


async def attack_never_reads(target: AttackTarget) -> bool:
    """Open a long session, take its prompt, then repeat that step (the server answers a repeat
    with its kept answer, no compute) far more often than the stream's window holds, never reading:
    the server's writes wait on a full stream. Stopped: within ``NEVER_READS_WITHIN`` the server
    gave up on the stream (reading then ends before every answer came)."""
    return await never_reads(target, within=NEVER_READS_WITHIN)


async def never_reads(target: AttackTarget, *, within: float) -> bool:
    with trio.move_on_after(within + 30):
        async with attacker(target) as conn:
            info = await ask(conn, m.InfoRequest())
            opened = await open_longest(conn, info, (2048, 1024, 512))
            if opened is None:
                return True
            length, session = opened
            prompt = m.StepRequest(session, 1, 0, zeros(info, 1, length, info.hidden_size))
            if not isinstance(await ask(conn, prompt), m.StepResponse):
                return False
            repeat = m.StepRequest(session, 1, 0, zeros(info, 1, 1, info.hidden_size))
            answer = length * info.hidden_size * element_bytes(info.dtype)
            sent = 0
            with trio.move_on_after(5):  # the server stops reading once its writes block
                while sent * answer < UNREAD_BYTES:
                    await conn.send(repeat)
                    sent += 1
            await trio.sleep(within)  # the server's --send-timeout runs out meanwhile
            with trio.move_on_after(20):  # a server still serving sends every answer now
                for _ in range(sent):
                    try:
                        if await conn.receive() is None:
                            return True
                    except ProtocolError:
                        return True  # reset
    return False


async def attack_bad_keep(target: AttackTarget) -> bool:
    """Steps whose roll back ('keep', speculative decoding) is past the cache, not the step's
    position, or forward: each must be refused on a stream that keeps working, and an honest roll
    back must still work. Stopped: all refused as bad_request and the session still steps."""
    with trio.move_on_after(20):
        async with attacker(target) as conn:
            info = await ask(conn, m.InfoRequest())
            opened = await open_longest(conn, info, (16,))
            if opened is None:
                return True
            session = opened[1]
            hidden = info.hidden_size
            first = m.StepRequest(session, 1, 0, zeros(info, 1, 3, hidden))
            if not isinstance(await ask(conn, first), m.StepResponse):
                return False
            for step_id, (position, keep) in enumerate(((5, 5), (2, 1), (3, 4), (0, 2)), 2):
                bad = m.StepRequest(session, step_id, position, zeros(info, 1, 1, hidden), keep)
                reply = await ask(conn, bad)
                if not (isinstance(reply, m.ErrorResponse) and reply.code == "bad_request"):
                    return False
            honest = m.StepRequest(session, 9, 1, zeros(info, 1, 2, hidden), keep=1)
            after = m.StepRequest(session, 10, 3, zeros(info, 1, 1, hidden))
            return isinstance(await ask(conn, honest), m.StepResponse) and isinstance(
                await ask(conn, after), m.StepResponse
            )


async def attack_bad_reorder(target: AttackTarget) -> bool:
    """Steps whose 'reorder' (beam search's row indices) name rows the session does not have, or
    too few of them: each must be refused (bad_request) without touching the cache, and the
    session must go on from where it was. A list longer than the wire allows is refused at the
    frame (the stream closes). Stopped: every bad step refused, and the next good step answered."""
    with trio.move_on_after(30):
        async with attacker(target) as conn:
            info = await ask(conn, m.InfoRequest())
            reply = await ask(conn, open_request(info, 8, batch_size=2))
            if not isinstance(reply, m.OpenSessionResponse):
                return True  # no session to attack
            session, hidden = reply.session_id, zeros(info, 2, 1, info.hidden_size)
            if not isinstance(
                await ask(conn, m.StepRequest(session, 1, 0, hidden)), m.StepResponse
            ):
                return False
            for step_id, rows in enumerate([(0, 2), (1,), (0, 1, 1), (5, 5)], start=2):
                bad = await ask(conn, m.StepRequest(session, step_id, 1, hidden, reorder=rows))
                if not (isinstance(bad, m.ErrorResponse) and bad.code == "bad_request"):
                    return False
            good = await ask(conn, m.StepRequest(session, 9, 1, hidden, reorder=(1, 0)))
            return isinstance(good, m.StepResponse)
    return False


ATTACKS = (
    ("pings_only", attack_pings_only),
    ("session_hoard", attack_session_hoard),
    ("oversized_prompt", attack_oversized_prompt),
    ("never_reads", attack_never_reads),
    ("bad_keep", attack_bad_keep),
    ("bad_reorder", attack_bad_reorder),
)
