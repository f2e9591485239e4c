"""Clean shutdown: a stopping server refuses new sessions, withdraws its record and answers the step
it is computing before it goes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio

from swarm_node.errors import RemoteError
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig
from swarm_node.node.peer import Peer, open_peer
from tests.swarm_helpers import LOOPBACK

H = 64


async def test_stopping_server_answers_the_step_in_flight(tiny_llama: Path) -> None:
    model = tiny_llama.name
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()

            async def run_server(task_status: trio.TaskStatus[Peer]) -> None:
                config = ServerConfig(
                    model=str(tiny_llama), start=0, end=6, throughput=100.0, shutdown_grace=30.0
                )
                async with open_peer(PeerConfig(listen=LOOPBACK), server=config) as peer:
                    task_status.started(peer)
                    await stop.wait()

            server: Peer = await nursery.start(run_server)
            blocks = server.server
            assert blocks is not None
            no_recovery = ClientConfig(max_attempts=0)
            async with open_peer(
                PeerConfig(listen=LOOPBACK, initial_peers=tuple(server.addrs[:1])),
                client=no_recovery,
            ) as client:
                chain = await client.find_chain(model, 6)
                async with client.inference_session(
                    chain, SessionSettings(model=model, max_length=8)
                ) as s:
                    await s.step(torch.randn(1, 2, H))
                    # hold the server's compute thread: the next step waits inside the server
                    await server.compute_limiter.acquire_on_behalf_of("test")
                    answer: list[torch.Tensor] = []

                    async def step() -> None:
                        answer.append(await s.step(torch.randn(1, 1, H)))

                    async with trio.open_nursery() as steps:
                        steps.start_soon(step)
                        # the server counts steps in flight (a gauge, not an event): poll it
                        while blocks.steps_in_flight == 0:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                        stop.set()  # the server starts shutting down with the step in flight
                        while not blocks.closing:  # noqa: ASYNC110 (a flag, not an event)
                            await trio.sleep(0.01)
                        with pytest.raises(RemoteError, match="shutting_down"):
                            async with client.inference_session(
                                chain, SessionSettings(model=model, max_length=8)
                            ):
                                pass
                        server.compute_limiter.release_on_behalf_of("test")
                    assert answer[0].shape == (1, 1, H)
