"""A server's compute is bounded before it starts: tokens and estimated activation memory per request,
and the requests (and their decoded bytes) waiting for the compute thread, server-wide and per peer.

The attacks (tests/attacks/compute.py) run over real libp2p against a local swarm while an honest
client generates; its tokens stay exactly transformers'. The pure parts (the estimate, the waiting
room, the off-loop codec hand-off) are checked beside them.
"""

from __future__ import annotations

import resource
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from swarm_node import compression
from swarm_node.errors import ConfigError, RemoteError, RequestError
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.recovery import is_server_failure
from swarm_node.node.client.remote_sequential import RemoteSequential
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import MAX_REQUEST_TOKENS, ServerConfig
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import request
from swarm_node.node.quick_jobs import OFF_LOOP_BYTES, off_loop
from swarm_node.node.server.compute_admission import (
    MB,
    ComputeLimits,
    ComputeQueue,
    activation_bytes,
    check_compute,
    declared_bytes,
)
from swarm_node.node.server.kept_graphs import SavedBytes
from swarm_node.protocol import messages as m
from tests.attacks import AttackTarget
from tests.attacks.compute import (
    BIG_FRAME,
    attack_big_frames,
    attack_compute_flood,
    attack_huge_backward,
)
from tests.model_fixtures import reference_model, tiny_config
from tests.swarm_helpers import local_swarm

SMOLLM2_SIZES = dict(
    hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def attacked_generation(path: Path, attack: Any, **server_fields: Any) -> dict[str, Any]:
    """Run ``attack`` on the first server of a 2-server swarm while an honest client generates;
    the verdict, the generated ids, transformers' ids, the servers and the attack's seconds."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    expected = reference_model(path).generate(
        input_ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(path))
    out: dict[str, Any] = {"expected": expected.tolist()}
    async with local_swarm(path, [(0, 3), (3, 6)], **server_fields) as (servers, client):
        target = AttackTarget(
            model=path.name, model_path=path, servers=tuple(s.addrs[0] for s in servers)
        )
        out["servers"] = [s.server for s in servers]

        async def attack_it() -> None:
            t0 = trio.current_time()
            out["stopped"] = await attack(target)
            out["seconds"] = trio.current_time() - t0

        async def generate() -> None:
            ids, _ = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=path.name, num_blocks=6),
                SamplingConfig(max_new_tokens=10),
            )
            out["ids"] = ids.tolist()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attack_it)
            nursery.start_soon(generate)
    return out


async def test_a_huge_backward_is_refused_before_compute(tiny_llama: Path) -> None:
    with trio.fail_after(120):
        before = peak_rss_mb()
        out = await attacked_generation(tiny_llama, attack_huge_backward)
    assert out["stopped"] is True
    assert out["seconds"] < 10  # refused at once (a computed one would take minutes, and GBs)
    assert peak_rss_mb() - before < 200  # the 16,384-token backward would need ~9 GB
    server = out["servers"][0]
    assert len(server.kept_graphs) == 0 and server.compute_queue.count == 0
    assert out["ids"] == out["expected"]


async def test_a_flood_of_forwards_is_bounded_and_the_rest_refused_busy(tiny_llama: Path) -> None:
    with trio.fail_after(120):
        out = await attacked_generation(tiny_llama, attack_compute_flood, max_queued_per_peer=4)
    assert out["stopped"] is True
    queue = out["servers"][0].compute_queue
    assert 1 <= queue.peak_per_peer <= 4  # never more than the bound waited
    assert queue.refused > 0  # the rest were refused busy
    assert (queue.count, queue.nbytes) == (0, 0)
    assert out["ids"] == out["expected"]


async def test_big_frames_arriving_are_bounded_per_peer_and_refused_busy(tiny_llama: Path) -> None:
    with trio.fail_after(120):
        out = await attacked_generation(tiny_llama, attack_big_frames)
    assert out["stopped"] is True
    budget = out["servers"][0].receiving
    assert BIG_FRAME <= budget.peak <= budget.per_peer  # held up to one peer's half, no more
    assert budget.held == 0  # given back with the streams
    assert out["ids"] == out["expected"]  # an honest session's small frames are never counted


async def test_a_prefill_over_the_token_limit_is_refused_and_the_session_goes_on_and_clients_cut_pieces(
    tiny_llama: Path,
) -> None:
    opening = m.OpenSessionRequest(
        model=tiny_llama.name,
        start=0,
        end=6,
        max_length=64,
        batch_size=2,
        dtype="float32",
        compression="none",
    )
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)], max_request_tokens=16) as (servers, client):
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            session = (await request(conn, opening, m.OpenSessionResponse, timeout=5)).session_id

            def step(step_id: int, tokens: int) -> m.StepRequest:
                hidden = compression.encode(torch.randn(2, tokens, 64), "none")  # (B, T, H)
                return m.StepRequest(session_id=session, step_id=step_id, position=0, hidden=hidden)

            with pytest.raises(RemoteError, match=r"too_large: .* at most 16 tokens .* got 2 x 9"):
                await request(conn, step(1, 9), m.StepResponse, timeout=5)
            reply = await request(conn, step(2, 8), m.StepResponse, timeout=5)
            # a training client cuts its pieces to the servers' default token limit
            remote = RemoteSequential(client, model=tiny_llama.name, num_blocks=6)
            assert remote.piece_rows(torch.zeros(64, 512, 64)) == MAX_REQUEST_TOKENS // 512
    assert reply.hidden.shape == (2, 8, 64)


def test_clients_take_busy_and_too_large_as_a_server_failure_to_route_around() -> None:
    for code in ("busy", "too_large"):
        assert is_server_failure(RemoteError(code, "...")), code


# -- the pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [{}, SMOLLM2_SIZES], ids=["tiny", "smollm2-sizes"])
@pytest.mark.parametrize(("batch", "tokens"), [(1, 16), (4, 64), (1, 256)])
def test_the_estimate_bounds_the_saved_activations_measured(
    tmp_path: Path, sizes: dict[str, int], batch: int, tokens: int
) -> None:
    from tests.model_fixtures import make_tiny_model_dir

    checkpoint = Checkpoint.open(make_tiny_model_dir(tmp_path / "m", num_layers=2, **sizes))
    span = BlockSpan.load(checkpoint, 0, 2, dtype=torch.float32)
    saved = SavedBytes(exclude=[*span.parameters(), *span.buffers()])
    hidden = torch.randn(batch, tokens, span.hidden_size).requires_grad_(True)  # (B, T, H)
    with torch.enable_grad(), saved.counting():
        span.forward(hidden, None, start=0, end=2)
    estimate = activation_bytes(
        batch=batch,
        tokens=tokens,
        context=tokens,
        kept_blocks=2,
        model_config=checkpoint.config,
        itemsize=4,
    )
    assert 0 < saved.nbytes <= estimate <= 3 * saved.nbytes + 2 * 9 * tokens * batch * tokens * 4


def test_the_default_budget_takes_a_normal_smollm2_fine_tuning_batch() -> None:
    limits = ComputeLimits.of(ServerConfig(model="x", start=0, end=30))
    smollm2 = tiny_config(**SMOLLM2_SIZES)
    batch = compression.encode(torch.zeros(8, 512, 576), "none")  # (B, T, H)
    check_compute(limits, batch, model_config=smollm2, dtype="float32", kept_blocks=30)
    twice = compression.encode(torch.zeros(16, 512, 576), "none")
    with pytest.raises(RequestError, match=r"at most 6144 MB of activations .* 16 x 512 tokens"):
        check_compute(limits, twice, model_config=smollm2, dtype="float32", kept_blocks=30)
    too_many = m.WireTensor("none", "float32", (2, 8193, 576), b"")  # declared only: never decoded
    with pytest.raises(RequestError, match=r"at most 16384 tokens .* got 2 x 8193") as info:
        check_compute(limits, too_many, model_config=smollm2, dtype="float32")
    assert info.value.code == "too_large"


def queue(**limits: int) -> ComputeQueue:
    defaults = dict(
        max_request_tokens=100,
        max_activation_bytes=MB,
        max_queued=3,
        max_queued_per_peer=2,
        max_queued_bytes=10 * MB,
        max_queued_bytes_per_peer=4 * MB,
    )
    return ComputeQueue(ComputeLimits(**{**defaults, **limits}))


def forward(mib: int) -> m.ForwardRequest:
    wire = m.WireTensor("blockwise8", "float32", (1, mib * MB // 4), b"")  # declared, never decoded
    return m.ForwardRequest(model="x", start=0, end=1, compression="none", hidden=wire)


def test_the_waiting_room_bounds_requests_and_bytes_per_peer_and_in_all() -> None:
    room = queue()
    assert declared_bytes(forward(1)) == MB
    with room.admit("a", forward(1)), room.admit("a", forward(1)):
        with pytest.raises(RequestError, match="this peer's requests must stay at most 2") as info:
            with room.admit("a", forward(1)):
                pass
        assert info.value.code == "busy"
        with room.admit("b", forward(1)):
            with pytest.raises(RequestError, match="requests must stay at most 3"):
                with room.admit("c", forward(1)):
                    pass
            with room.admit("c", m.InfoRequest()):  # no tensors: never waits, never refused
                pass
        assert (room.count, room.nbytes, room.per_peer["a"]) == (2, 2 * MB, 2)
    with room.admit("a", forward(3)):
        with pytest.raises(RequestError, match="this peer's bytes must stay at most 4194304"):
            with room.admit("a", forward(2)):
                pass
    with pytest.raises(RequestError, match="at most 4 MB decoded here, got 5 MB") as info:
        with room.admit("a", forward(5)):
            pass
    assert info.value.code == "too_large"
    assert (room.count, room.nbytes, dict(room.per_peer), room.refused) == (0, 0, {}, 3)
    assert room.peak_per_peer == 2


def test_queue_limits_are_flags_of_at_least_one() -> None:
    with pytest.raises(ConfigError, match="'max_queued_per_peer' must be an int >= 1, got 0"):
        ServerConfig(model="x", start=0, end=1, max_queued_per_peer=0)


async def test_big_codec_work_leaves_the_loop_and_small_work_stays() -> None:
    loop = threading.get_ident()
    with trio.fail_after(10):
        assert await off_loop(threading.get_ident, OFF_LOOP_BYTES - 1) == loop
        assert await off_loop(threading.get_ident, OFF_LOOP_BYTES) != loop
