"""Servers with ``num_blocks`` and no blocks given place themselves over a real local swarm."""

from __future__ import annotations

from pathlib import Path

import torch
import trio

from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.model_fixtures import reference_model
from tests.swarm_helpers import LOOPBACK


def spans(peers: list[Peer]) -> list[tuple[int, int]]:
    """The spans the peers have announced (the announcements completed), which is what clients find."""
    return sorted((p.announced.start, p.announced.end) for p in peers if p.announced is not None)


def covered(peers: list[Peer], num_blocks: int = 6) -> bool:
    return all(any(a <= b < e for a, e in spans(peers)) for b in range(num_blocks))


async def any_announcement(peers: list[Peer]) -> None:
    """Return once any of ``peers`` completes an announcement after this call."""
    seen = [p.announcements for p in peers]  # read before waiting: none can be missed
    async with trio.open_nursery() as nursery:

        async def wait(peer: Peer, after: int) -> None:
            await peer.wait_announcement(after)
            nursery.cancel_scope.cancel()

        for peer, after in zip(peers, seen, strict=True):
            nursery.start_soon(wait, peer, after)


async def test_three_placed_servers_cover_every_block_and_re_cover_after_one_leaves(
    tiny_llama: Path,
) -> None:
    config = ServerConfig(
        model=str(tiny_llama),
        num_blocks=4,
        start_delay=0.0,
        rebalance_interval=1.0,
        throughput=100.0,
        move_grace=5.0,
    )
    # ~10 s normally; a move makes two announcements (its claim, then the new span), each at most
    # (LOOKUP_ROUNDS + 1) query deadlines, 15 s, past a peer that does not answer
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            stops: list[trio.Event] = []

            async def run_server(
                initial: tuple[str, ...], *, task_status: trio.TaskStatus[Peer]
            ) -> None:
                stop = trio.Event()
                stops.append(stop)
                async with open_peer(
                    PeerConfig(listen=LOOPBACK, initial_peers=initial), server=config
                ) as peer:
                    task_status.started(peer)
                    await stop.wait()

            first: Peer = await nursery.start(run_server, ())
            peers = [first]
            for _ in range(2):  # one after another, each seeing those before it
                peers.append(await nursery.start(run_server, tuple(first.addrs[:1])))
            # 0:4, then 2:6 fills the gap, then the third doubles the first one's blocks
            assert spans(peers) == [(0, 4), (0, 4), (2, 6)]
            leaver = next(p for p in peers if p.server.start == 2)
            stops[peers.index(leaver)].set()  # leaves: withdraws its record; 4-5 are uncovered
            staying = [p for p in peers if p is not leaver]
            while not covered(staying):  # one of the two on 0:4 moves to 2:6 at its next re-check
                await any_announcement(staying)
            assert spans(staying) == [(0, 4), (2, 6)]
            # and the swarm answers exactly like transformers
            async with open_peer(
                PeerConfig(listen=LOOPBACK, initial_peers=tuple(first.addrs[:1]))
            ) as client:
                input_ids = torch.randint(0, 256, (1, 4))
                ids, stats = await generate_tokens(
                    client,
                    ClientHead.load(Checkpoint.open(tiny_llama)),
                    input_ids,
                    SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                    SamplingConfig(max_new_tokens=5),
                )
            expected = reference_model(tiny_llama).generate(
                input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            assert ids.tolist() == expected.tolist()
            nursery.cancel_scope.cancel()
