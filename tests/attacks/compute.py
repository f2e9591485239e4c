"""Attacks on a server's compute: requests that would need huge memory, and a flood of big ones.

- huge_backward: backward and kept-graph forward requests whose tensors declare a huge activation
  (one that lies: shape (64, 2**20, H) with no data; one that is honestly encoded: 16,384 tokens,
  the default token limit, whose attention and kept graph would need gigabytes). Stopped: each is
  refused (an ErrorResponse) quickly, and the server answers afterwards.
- compute_flood: one peer opens many streams and fires a large forward on each at once. Stopped:
  past the server's bound on waiting requests they are refused ``busy``, no stream gets anything
  else, and the server answers an InfoRequest on a fresh stream while it works off the admitted
  ones (those still computing after FLOOD_WAIT are dropped: a slow CPU server is no failure).
- big_frames: one peer opens BIG_STREAMS streams and on each announces a BIG_FRAME-byte frame (its
  length prefix and a first MiB of its body, the rest never sent). Stopped: past the server's
  budget for large frames arriving from one peer (--max-receiving-mb, half of it a peer) the
  streams are refused ``busy`` before their bodies arrive, at most BIG_HELD_MAX of them are held,
  and the server answers meanwhile.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from swarm_node import compression
from swarm_node.errors import SwarmError
from swarm_node.node.config import MAX_REQUEST_TOKENS
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.host import build_host
from swarm_node.node.net.message_stream import TRANSPORT_ERRORS, MessageStream
from swarm_node.protocol import messages as m
from swarm_node.protocol.tensors import WireTensor
from tests.attacks import AttackTarget

MAX_FRAME = 64 << 20
ANSWER_TIMEOUT = 15.0  # seconds a refusal or an answer may take
ATTACK_TIME = 20.0  # seconds an attack may take in all
FLOOD_STREAMS = 96  # three times a server's default --max-queued-per-peer
FLOOD_REQUEST_BYTES = 1 << 17  # decoded bytes of one flooding request
FLOOD_WAIT = 8.0  # seconds the flood's answers are awaited (refusals come at once)
FAILURES = (SwarmError, trio.TooSlowError, *TRANSPORT_ERRORS)
BIG_FRAME = 48 << 20  # bytes each big_frames stream announces
BIG_STREAMS = 12  # 576 MiB announced in all
BIG_HELD_MAX = 2  # 96 MiB: what the default budget lets one peer have arriving at once
BIG_WAIT = 3.0  # seconds a held stream is watched for a refusal


@asynccontextmanager
async def attacker(target: AttackTarget, server: int = 0) -> AsyncIterator[Any]:
    """A fresh libp2p host (its own identity) connected to ``target.servers[server]``."""
    host = build_host(key_pair=create_new_key_pair(), announce=None, psk=None)
    async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        with trio.fail_after(10):
            await host.connect(info_from_p2p_addr(Multiaddr(target.servers[server])))
        yield host


async def stream(host: Any, target: AttackTarget, server: int = 0) -> MessageStream:
    return await open_stream(
        host, target.peer_id(server), max_frame_size=MAX_FRAME, timeout=ANSWER_TIMEOUT
    )


async def ask(conn: MessageStream, message: Any) -> Any:
    with trio.fail_after(ANSWER_TIMEOUT):
        await conn.send(message)
        return await conn.receive()


async def still_answers(host: Any, target: AttackTarget, timeout: float = ANSWER_TIMEOUT) -> bool:
    """Does the server answer an InfoRequest on a fresh stream within ``timeout`` seconds?"""
    try:
        with trio.fail_after(timeout):
            conn = await stream(host, target)
            reply = await ask(conn, m.InfoRequest())
            await conn.close()
    except FAILURES:
        return False
    return isinstance(reply, m.InfoResponse)


def hidden(batch: int, tokens: int, info: m.InfoResponse, codec: str = "blockwise8") -> Any:
    return compression.encode(torch.zeros(batch, tokens, info.hidden_size), codec)  # (B, T, H)


async def attack_huge_backward(target: AttackTarget) -> bool:
    return await bounded(huge_backward(target))


async def attack_compute_flood(target: AttackTarget) -> bool:
    return await bounded(compute_flood(target))


async def attack_big_frames(target: AttackTarget) -> bool:
    return await bounded(big_frames(target))


async def bounded(attack: Coroutine[Any, Any, bool]) -> bool:
    """The attack's verdict; False when the server hung past ATTACK_TIME or could not be reached."""
    with trio.move_on_after(ATTACK_TIME):
        try:
            return await attack
        except Exception:  # noqa: BLE001 (a dial libp2p refused, a broken stream: not stopped)
            return False
    return False


async def huge_backward(target: AttackTarget) -> bool:
    async with attacker(target) as host:
        try:
            conn = await stream(host, target)
            info = await ask(conn, m.InfoRequest())
            span = {"model": info.model, "start": info.start, "end": info.end}
            lie = WireTensor("none", info.dtype, (64, 1 << 20, info.hidden_size), b"")
            real = hidden(1, MAX_REQUEST_TOKENS, info)
            requests = [
                m.BackwardRequest(compression="none", hidden=lie, grad_output=lie, **span),
                m.ForwardRequest(compression="none", hidden=lie, keep_graph=True, **span),
                m.BackwardRequest(compression="none", hidden=real, grad_output=real, **span),
                m.ForwardRequest(compression="none", hidden=real, keep_graph=True, **span),
            ]
            replies = [await ask(conn, request) for request in requests]
            await conn.close()
        except FAILURES:
            return False
        refused = all(isinstance(r, m.ErrorResponse) for r in replies)
        return refused and await still_answers(host, target)


async def compute_flood(target: AttackTarget) -> bool:
    async with attacker(target) as host:
        try:
            conn = await stream(host, target)
            info = await ask(conn, m.InfoRequest())
            await conn.close()
            tokens = max(1, FLOOD_REQUEST_BYTES // (4 * info.hidden_size))
            request = m.ForwardRequest(
                model=info.model,
                start=info.start,
                end=info.end,
                compression="blockwise8",
                hidden=hidden(1, tokens, info),
            )
            conns = [await stream(host, target) for _ in range(FLOOD_STREAMS)]
        except FAILURES:
            return False
        answers: Counter[str] = Counter()  # by kind; those still computing at the end: none
        all_answered = trio.Event()

        async def fire(conn: MessageStream) -> None:
            try:
                await one(conn)
            finally:
                if sum(answers.values()) == FLOOD_STREAMS:
                    all_answered.set()

        async def one(conn: MessageStream) -> None:
            try:
                await conn.send(request)
                reply = await conn.receive()
            except FAILURES:
                answers["lost"] += 1
                return
            if isinstance(reply, m.ForwardResponse):
                ok = math.prod(reply.hidden.shape) == tokens * info.hidden_size
                answers["computed" if ok else "wrong"] += 1
            elif isinstance(reply, m.ErrorResponse):
                answers[reply.code] += 1
            else:
                answers["wrong"] += 1

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(fire, conn)
            with trio.move_on_after(FLOOD_WAIT):  # the admitted ones take their turns meanwhile
                await all_answered.wait()
            alive = await still_answers(host, target, timeout=5.0)  # while they are worked off
            nursery.cancel_scope.cancel()
        for conn in conns:
            with trio.move_on_after(1.0):
                await conn.reset()
        bounded = answers["busy"] > 0  # (unbounded, all would wait: the control in the tests)
        others = sum(answers.values()) - answers["computed"] - answers["busy"]
        return alive and bounded and others == 0


async def big_frames(target: AttackTarget) -> bool:
    async with attacker(target) as host:
        try:
            conns = [await stream(host, target) for _ in range(BIG_STREAMS)]
        except FAILURES:
            return False
        refused: list[bool] = []
        start = BIG_FRAME.to_bytes(4, "big") + bytes(1 << 20)

        async def write_start(conn: MessageStream) -> None:
            try:
                await conn.stream.write(start)
            except FAILURES:
                pass  # refused and reset: the verdict is the reply's

        async def announce(conn: MessageStream) -> None:
            # the reply is awaited while the frame's start is written: a refused stream's body is
            # not read, so yamux gives it no window for the rest of that MiB
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_start, conn)
                verdict = False  # held: the server waits for the rest of the frame
                with trio.move_on_after(BIG_WAIT):
                    try:
                        reply = await conn.receive()
                        verdict = isinstance(reply, m.ErrorResponse) and reply.code == "busy"
                    except FAILURES:
                        pass
                refused.append(verdict)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(announce, conn)
        alive = await still_answers(host, target)
        for conn in conns:
            with trio.move_on_after(1.0):
                await conn.reset()
        return alive and refused.count(False) <= BIG_HELD_MAX and any(refused)


ATTACKS = (
    ("huge_backward", attack_huge_backward),
    ("compute_flood", attack_compute_flood),
    ("big_frames", attack_big_frames),
)
