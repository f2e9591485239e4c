"""Remote forward/backward (RemoteSequential) on a real 2-server swarm vs the model run locally."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import trio

from swarm_node import compression
from swarm_node.errors import RemoteError
from swarm_node.model.client_lora import ClientLora
from swarm_node.node.client.remote_sequential import RemoteSequential
from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import request
from swarm_node.node.peer import open_peer
from swarm_node.protocol import messages as m
from tests.model_fixtures import reference_model
from tests.swarm_helpers import LOOPBACK, local_swarm
from tests.training_reference import blocks_output, lora_hooks

# within 1e-5, and float32 rounding (1e-6 relative) on values of magnitude ~100 that batch-size
# dependent kernels sum in another order
TOL = dict(atol=1e-5, rtol=1e-6)


def _local_grads(ref, hidden, prompts, weight):
    h = hidden.detach().clone().requires_grad_(True)
    p = prompts.detach().clone().requires_grad_(True)
    out = blocks_output(ref, h, p)
    (out * weight).sum().backward()
    return out.detach(), h.grad, p.grad


def _local_grads_in_pieces(ref, hidden, prompts, weight, rows):
    """The same as _local_grads, computed in pieces of ``rows`` sequences as RemoteSequential sends
    them: each piece's matrix products have the shapes the servers compute, so the float rounding of
    the reference is that of the remote computation, not that of one whole-batch product."""
    h = hidden.detach().clone().requires_grad_(True)
    p = prompts.detach().clone().requires_grad_(True)
    out = torch.cat([blocks_output(ref, piece, p) for piece in h.split(rows)])
    (out * weight).sum().backward()
    return out.detach(), h.grad, p.grad


def _remote_grads(remote, hidden, prompts, weight):
    h = hidden.detach().clone().requires_grad_(True)
    p = prompts.detach().clone().requires_grad_(True)
    out = remote(h, p)
    (out * weight).sum().backward()
    return out.detach(), h.grad, p.grad


async def test_gradients_for_inputs_and_deep_prompts_match_local(tiny_llama: Path) -> None:
    ref = reference_model(tiny_llama)
    torch.manual_seed(1)
    hidden, prompts, weight = (
        torch.randn(3, 7, 64),
        torch.randn(6, 4, 64) * 0.1,
        torch.randn(3, 7, 64),
    )
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, client):
            remote = RemoteSequential(client, model=tiny_llama.name, num_blocks=6)
            got = await trio.to_thread.run_sync(_remote_grads, remote, hidden, prompts, weight)
            spans = [s.server.span for s in servers]
    expected = _local_grads(ref, hidden, prompts, weight)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert got[2].abs().max() > 1e-3  # the prompts' gradient is not trivially zero
    for span in spans:  # the servers' weights got no gradient
        assert all(p.grad is None and not p.requires_grad for p in span.parameters())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())


def _client_lora(seed: int) -> ClientLora:
    shapes = {
        "self_attn.q_proj": (64, 64),
        "self_attn.v_proj": (64, 32),
        "mlp.down_proj": (128, 64),
    }
    torch.manual_seed(seed)
    lora = ClientLora(shapes=shapes, blocks=[1, 2, 4], targets=sorted(shapes), rank=4, alpha=8.0)
    with torch.no_grad():
        for b in lora.b.values():
            b.normal_(std=0.1)  # a trained-looking adapter: B is zeros only before training
    return lora


async def test_gradients_for_client_owned_lora_match_local(tiny_llama: Path) -> None:
    ref = reference_model(tiny_llama)
    torch.manual_seed(5)
    hidden, prompts, weight = (
        torch.randn(2, 6, 64),
        torch.randn(6, 2, 64) * 0.1,
        torch.randn(2, 6, 64),
    )
    remote_lora, local_lora = _client_lora(0), _client_lora(0)

    def remote_pass(remote):
        h = hidden.clone().requires_grad_(True)
        out = remote(h, prompts, remote_lora.weights())
        (out * weight).sum().backward()
        return out.detach(), h.grad

    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, client):
            remote = RemoteSequential(client, model=tiny_llama.name, num_blocks=6)
            out, grad_hidden = await trio.to_thread.run_sync(remote_pass, remote)
            spans = [s.server.span for s in servers]
    h = hidden.clone().requires_grad_(True)
    with lora_hooks(ref, local_lora.weights()):
        expected = blocks_output(ref, h, prompts)
    (expected * weight).sum().backward()
    torch.testing.assert_close(out, expected.detach(), **TOL)
    torch.testing.assert_close(grad_hidden, h.grad, **TOL)
    for (name, got), (_, want) in zip(
        remote_lora.named_parameters(), local_lora.named_parameters(), strict=True
    ):
        torch.testing.assert_close(got.grad, want.grad, **TOL, msg=name)
        assert want.grad.abs().max() > 1e-4, name
    for span in spans:  # the servers keep nothing of the client's adapter and no gradient
        assert all(p.grad is None for p in span.parameters())
    # the adapter took part: without it the blocks give another output
    assert not torch.allclose(out, blocks_output(ref, hidden, prompts).detach(), atol=1e-3)


async def test_a_big_batch_travels_in_concurrent_pieces(tiny_llama: Path) -> None:
    ref = reference_model(tiny_llama)
    torch.manual_seed(2)
    hidden, prompts, weight = (
        torch.randn(5, 7, 64),
        torch.randn(6, 3, 64) * 0.1,
        torch.randn(5, 7, 64),
    )
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 2), (2, 6)], max_frame_size=16 * 1024) as (
            _,
            client,
        ):
            remote = RemoteSequential(client, model=tiny_llama.name, num_blocks=6)
            assert remote.piece_rows(hidden) == 2  # 3 pieces: 2 + 2 + 1 sequences
            assert (
                RemoteSequential(
                    client, model=tiny_llama.name, num_blocks=6, min_pieces=5
                ).piece_rows(hidden)
                == 1
            )
            got = await trio.to_thread.run_sync(_remote_grads, remote, hidden, prompts, weight)
    expected = _local_grads_in_pieces(ref, hidden, prompts, weight, rows=2)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)


async def _serve(
    config: ServerConfig, initial: tuple[str, ...], *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    async with open_peer(PeerConfig(listen=LOOPBACK, initial_peers=initial), server=config) as peer:
        task_status.started(peer)
        await trio.sleep_forever()


async def test_a_server_that_dies_between_forward_and_backward_is_rerouted(
    tiny_llama: Path,
) -> None:
    ref = reference_model(tiny_llama)
    torch.manual_seed(3)
    hidden, prompts, weight = (
        torch.randn(2, 6, 64),
        torch.randn(6, 2, 64) * 0.1,
        torch.randn(2, 6, 64),
    )
    expected = _local_grads(ref, hidden, prompts, weight)
    config = {"model": str(tiny_llama), "throughput": 100.0}
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            first = await nursery.start(_serve, ServerConfig(start=0, end=3, **config), ())
            entry = tuple(first.addrs[:1])
            scopes, peers = [], []
            for _ in range(2):  # two servers for blocks 3:6; one of them will die
                scope = trio.CancelScope()
                scopes.append(scope)

                async def run(scope=scope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
                    with scope:
                        await _serve(
                            ServerConfig(start=3, end=6, **config), entry, task_status=task_status
                        )

                peers.append(await nursery.start(run))
            async with open_peer(PeerConfig(listen=LOOPBACK, initial_peers=entry)) as client:
                remote = RemoteSequential(client, model=tiny_llama.name, num_blocks=6, seed=0)
                h = hidden.clone().requires_grad_(True)
                p = prompts.clone().requires_grad_(True)
                out = await trio.to_thread.run_sync(remote, h, p)
                used = {hop.server.peer_id for trace in out.grad_fn.traces for hop, *_ in trace}
                victim = next(i for i, peer in enumerate(peers) if peer.peer_id in used)
                scopes[victim].cancel()  # the server of blocks 3:6 that ran the forward leaves
                await trio.to_thread.run_sync(lambda: (out * weight).sum().backward())
                assert remote.failures == 1
                # banned like a server that failed an inference session: later passes avoid it
                assert client.bans.is_banned(peers[victim].peer_id, trio.current_time())
                again = await trio.to_thread.run_sync(remote, hidden)
            nursery.cancel_scope.cancel()
    torch.testing.assert_close(out.detach(), expected[0], **TOL)
    torch.testing.assert_close(h.grad, expected[1], **TOL)
    torch.testing.assert_close(p.grad, expected[2], **TOL)
    torch.testing.assert_close(again, blocks_output(ref, hidden).detach(), **TOL)
    assert remote.failures == 1


def _wire(t: torch.Tensor) -> m.WireTensor:
    return compression.encode(t, "none")


BAD_BACKWARDS = [
    (
        {"grad_output": torch.zeros(2, 4, 64)},
        "'grad_output' must have the shape of 'hidden' (2, 5, 64)",
    ),
    ({"prompts": torch.zeros(2, 3, 64)}, r"prompts must have shape (3, P, 64), got (2, 3, 64)"),
    ({"prompts": torch.full((3, 2, 64), float("nan"))}, "prompts must be finite"),
    ({"prompts": torch.zeros(3, 6, 64)}, "prompts must cover at most the 5 positions sent, got 6"),
    (
        {"prompts": torch.zeros(3, 2, 64, dtype=torch.float16)},
        "prompts must be float32, got float16",
    ),
    (
        {"hidden": torch.zeros(65, 1, 64), "grad_output": torch.zeros(65, 1, 64)},
        "at most 64 sequences, got 65",
    ),
    (
        {"hidden": torch.zeros(2, 5, 32), "grad_output": torch.zeros(2, 5, 32)},
        "shape (batch, tokens >= 1, 64)",
    ),
    ({"compression": "zip"}, "'compression' must be one of"),
    ({"start": 4, "end": 7}, "not within the served blocks 0:6"),
]


@pytest.mark.parametrize(
    ("change", "match"), [pytest.param(*case, id=case[1][:30]) for case in BAD_BACKWARDS]
)
async def test_backward_refuses_bad_requests_and_keeps_serving(
    tiny_llama: Path, change, match
) -> None:
    fields = {
        "model": tiny_llama.name,
        "start": 1,
        "end": 4,
        "compression": "none",
        "hidden": torch.randn(2, 5, 64),
        "grad_output": torch.randn(2, 5, 64),
        "prompts": None,
    }
    fields.update(change)
    wired = {k: _wire(v) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
    good = m.BackwardRequest(
        model=tiny_llama.name,
        start=1,
        end=4,
        compression="none",
        hidden=_wire(torch.randn(1, 3, 64)),
        grad_output=_wire(torch.randn(1, 3, 64)),
        prompts=_wire(torch.zeros(3, 2, 64)),
    )
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, client):
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            with pytest.raises(RemoteError, match=re.escape(match)) as info:
                await request(conn, m.BackwardRequest(**wired), m.BackwardResponse, timeout=10)
            assert info.value.code in ("bad_request", "out_of_range")
            reply = await request(
                conn, good, m.BackwardResponse, timeout=10
            )  # the same stream goes on
            await conn.close()
    assert reply.grad_input.shape == (1, 3, 64) and reply.grad_prompts.shape == (3, 2, 64)


async def test_a_session_refuses_deep_prompts_of_the_wrong_shape(tiny_llama: Path) -> None:
    fields = dict(
        model=tiny_llama.name, start=0, end=3, max_length=8, dtype="float32", compression="none"
    )
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, client):
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            for prompts, match in (
                (torch.zeros(2, 2, 64), "prompts must have shape (3, P, 64), got (2, 2, 64)"),
                (torch.zeros(3, 2000, 64), "prompts: tensor must have at most 196608 elements"),
            ):
                with pytest.raises(RemoteError, match=re.escape(match)):
                    await request(
                        conn,
                        m.OpenSessionRequest(**fields, prompts=_wire(prompts)),
                        m.OpenSessionResponse,
                        timeout=10,
                    )
            reply = await request(
                conn,
                m.OpenSessionRequest(**fields, prompts=_wire(torch.zeros(3, 2, 64))),
                m.OpenSessionResponse,
                timeout=10,
            )
            await conn.close()
    assert reply.session_id
