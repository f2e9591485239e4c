"""The client's head batched across sessions (client/head_batching.py): the logits of sessions that
wait together come from one matmul over all their rows; each session samples its own token, and a
row's logits are its lone ones within float tolerance (tests/test_batching.py states the bound)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import trio

from swarm_node.model import Checkpoint, ClientHead
from swarm_node.node.client.head_batching import HeadBatcher, head_batcher
from tests.model_fixtures import TINY_FAMILIES, TINY_HIDDEN, make_tiny_model_dir

H = TINY_HIDDEN
TOL = {"atol": 1e-4, "rtol": 1e-4}


async def test_heads_that_wait_together_run_as_one_matmul(tiny_llama: Path) -> None:
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    batcher = HeadBatcher(head, max_inline_s=0.0)  # every compute in a worker thread
    gen = torch.Generator().manual_seed(4)
    hiddens = [torch.randn(b, 1, H, generator=gen) for b in (1, 2, 1, 1)]
    seen: dict[int, torch.Tensor] = {}
    computing, go = trio.Event(), threading.Event()

    def picker(i: int):
        def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen[i] = logits.clone()
            if i == 0:  # the first compute holds its thread until the others queue
                trio.from_thread.run_sync(computing.set)
                go.wait(60)
            if i == 2:
                raise ValueError("session 2's own sampling failed")
            token = logits.argmax(-1)  # (B,)
            return token, head.embed(token[:, None])

        return pick

    tokens: dict[int, torch.Tensor] = {}
    errors: dict[int, BaseException] = {}

    async def one(i: int) -> None:
        try:
            tokens[i], _ = await batcher.next_token(hiddens[i], picker(i))
        except ValueError as exc:
            errors[i] = exc

    with trio.fail_after(30):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0)
                await computing.wait()
                for i in (1, 2, 3):
                    nursery.start_soon(one, i)
                await batcher.wait_until_waiting(3)
                go.set()
        finally:
            go.set()
    assert batcher.batch_sizes == {1: 1, 3: 1} and not batcher.leading
    assert list(errors) == [2] and sorted(tokens) == [0, 1, 3]  # the others got their tokens
    with torch.inference_mode():
        for i, hidden in enumerate(hiddens):
            lone = head.logits(hidden)[:, -1, :].float()
            torch.testing.assert_close(seen[i], lone, **TOL)
            if i != 2:
                assert torch.equal(tokens[i], lone.argmax(-1))


async def test_a_lone_session_runs_its_head_at_once(tiny_llama: Path) -> None:
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    batcher = head_batcher(head)
    assert head_batcher(head) is batcher  # one per head, shared by the process's sessions
    with trio.fail_after(30), batcher.using():
        for _ in range(3):
            token, embedded = await batcher.next_token(
                torch.randn(1, 1, H), lambda logits: (logits.argmax(-1), logits[:, :1])
            )
            assert token.shape == (1,) and embedded.shape == (1, 1)
    assert batcher.batch_sizes == {1: 3} and batcher.decoding == 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_batch_logits_are_each_rows_lone_logits(tmp_path: Path, family: str, tie: bool) -> None:
    head = ClientHead.load(Checkpoint.open(make_tiny_model_dir(tmp_path, family, tie=tie)))
    rows = torch.randn(5, 1, H, generator=torch.Generator().manual_seed(2)) * 3
    with torch.inference_mode():
        lone = torch.cat([head.logits(rows[i : i + 1]) for i in range(5)])
        for n in (2, 3, 5):
            batched = head.batch_logits(rows[:n])
            assert batched.shape == lone[:n].shape
            torch.testing.assert_close(batched, lone[:n], **TOL)
            assert torch.equal(batched.argmax(-1), lone[:n].argmax(-1))
