"""Spot checks of training hops (node/client/verify_training.py): a server whose forward and
backward are wrong is caught by another server of its blocks, confirmed by a third and banned, and
the pass goes on with the honest answers (outputs and gradients equal the model run locally)."""

from __future__ import annotations

from pathlib import Path

import torch
import trio

from swarm_node.node.client.remote_sequential import RemoteSequential
from swarm_node.node.config import ClientConfig
from tests.model_fixtures import reference_model
from tests.swarm_helpers import local_swarm
from tests.test_verification import skip_last_block
from tests.training_reference import blocks_output

ALWAYS = ClientConfig(step_timeout=10.0, retry_delay=0.05, max_attempts=3, verify_rate=1.0)
TOL = dict(atol=1e-5, rtol=1e-6)  # as tests/test_remote_training.py: float32 rounding


def local_pass(ref, hidden, weight, prompts=None) -> tuple[torch.Tensor, ...]:
    h = hidden.detach().clone().requires_grad_(True)
    p = None if prompts is None else prompts.detach().clone().requires_grad_(True)
    out = blocks_output(ref, h, p)
    (out * weight).sum().backward()
    return (out.detach(), h.grad) + (() if p is None else (p.grad,))


def remote_pass(remote, hidden, weight, prompts=None) -> tuple[torch.Tensor, ...]:
    h = hidden.detach().clone().requires_grad_(True)
    p = None if prompts is None else prompts.detach().clone().requires_grad_(True)
    out = remote(h, p)
    (out * weight).sum().backward()
    return (out.detach(), h.grad) + (() if p is None else (p.grad,))


async def test_a_lying_training_server_is_caught_and_its_answers_not_used(
    tiny_llama: Path,
) -> None:
    # blocks 0-2 on three servers (the first one lies: its last block adds nothing), 3-5 on one;
    # every hop checked: whichever server answers, a second one of its blocks answers the same
    # request, so every pass uses honest numbers, and the liar is banned once it meets a check
    ref = reference_model(tiny_llama)
    torch.manual_seed(3)
    hidden, weight = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    expected = local_pass(ref, hidden, weight)
    spans = [(0, 3), (0, 3), (0, 3), (3, 6)]
    with trio.fail_after(240):
        async with local_swarm(tiny_llama, spans, client=ALWAYS) as (servers, client):
            liar = servers[0]
            skip_last_block(liar)
            remote = RemoteSequential(client, model=tiny_llama.name, num_blocks=6, seed=0)
            passes = 0
            while liar.peer_id not in remote.checks.stats.liars:
                got = await trio.to_thread.run_sync(remote_pass, remote, hidden, weight)
                for a, b in zip(got, expected, strict=True):
                    torch.testing.assert_close(a, b, **TOL)
                passes += 1
            now = trio.current_time()
            assert client.bans.is_banned(liar.peer_id, now + ALWAYS.verify_ban - 60)
            assert client.bans.banned(now) == {liar.peer_id}
            assert remote.checks.stats.liars == [liar.peer_id]
            got = await trio.to_thread.run_sync(remote_pass, remote, hidden, weight)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, **TOL)
            await remote.aclose()


async def test_honest_training_hops_are_checked_and_never_accused(tiny_llama: Path) -> None:
    ref = reference_model(tiny_llama)
    # with deep prompts: the backward's gradients for them are compared too
    torch.manual_seed(4)
    hidden, weight = torch.randn(3, 6, 64), torch.randn(3, 6, 64)
    prompts = torch.randn(6, 2, 64) * 0.1
    expected = local_pass(ref, hidden, weight, prompts)
    with trio.fail_after(180):
        # two servers for each hop: whichever the pass draws, another of its blocks checks it
        spans = [(0, 3), (3, 6), (0, 3), (3, 6)]
        async with local_swarm(tiny_llama, spans, client=ALWAYS) as (_, client):
            remote = RemoteSequential(client, model=tiny_llama.name, num_blocks=6, seed=1)
            for _ in range(3):
                got = await trio.to_thread.run_sync(remote_pass, remote, hidden, weight, prompts)
                for a, b in zip(got, expected, strict=True):
                    torch.testing.assert_close(a, b, **TOL)
            stats = remote.checks.stats
            assert stats.checks >= 6 and stats.mismatches == 0 and not stats.liars
            assert not client.bans.banned(trio.current_time())
            await remote.aclose()
