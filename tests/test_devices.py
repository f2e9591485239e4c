"""Devices, dtypes and memory: the rules of "auto", what a block costs, how many blocks fit, and an
out-of-memory during a step refused to that request while the server keeps serving.

Everything here runs on the CPU; scripts/gpu_check.py is the run that needs a GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import trio

from swarm_node import compression
from swarm_node.compression import codecs
from swarm_node.errors import ConfigError, RemoteError
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.model.devices import is_out_of_memory, resolve_device, resolve_dtype
from swarm_node.node.apps.cli import build_parser, main
from swarm_node.node.apps.commands import resolve_client_device
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import PeerConfig, ServerConfig
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import MessageStream, request
from swarm_node.node.peer import open_peer
from swarm_node.node.server.memory import (
    AUTO_CACHE_TOKENS,
    HOST_HEADROOM,
    block_bytes,
    plan_blocks,
    resolve_server,
    token_bytes,
)
from swarm_node.protocol import messages as m
from tests.model_fixtures import reference_model
from tests.swarm_helpers import LOOPBACK, local_swarm

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_the_first_cuda_device_else_the_cpu_and_dtypes_follow() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == "float32"  # what every CPU server computed before
    assert resolve_dtype("auto", torch.device("mps")) == "float16"
    for name in ("float32", "float16", "bfloat16"):
        assert resolve_dtype(name, cpu) == name
    with pytest.raises(
        ConfigError, match=r"'device' must be one of auto, cpu, cuda, cuda:N or mps"
    ):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="'device' must be one of"):
        ServerConfig(model="m", start=0, end=1, device="tpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_says_what_is_missing(tiny_llama: Path, capsys) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_device("cuda:1")
    text = str(caught.value)
    assert "'device' is 'cuda:1'" in text and "needs a CUDA device" in text
    assert "torch sees none" in text and "--device cpu" in text
    code = main(["serve", "--model", str(tiny_llama), "--blocks", "0:2", "--device", "cuda"])
    assert code == 2
    assert "'device' is 'cuda', which needs a CUDA device" in capsys.readouterr().err


def test_a_client_command_resolves_auto_on_this_machine() -> None:
    args = argparse.Namespace(device="auto", dtype="auto")
    resolve_client_device(args)
    if NO_CUDA:
        assert (args.device, args.dtype) == ("cpu", "float32")
    args = argparse.Namespace(device="cpu", dtype="bfloat16")
    resolve_client_device(args)
    assert (args.device, args.dtype) == ("cpu", "bfloat16")


def test_the_serve_command_line_takes_auto_and_a_device() -> None:
    args = build_parser().parse_args(
        ["serve", "--num-blocks", "auto", "--cache-tokens", "auto", "--device", "cuda:1"]
    )
    assert (args.num_blocks, args.cache_budget_tokens, args.device) == ("auto", "auto", "cuda:1")
    assert (args.dtype, args.max_memory_mb) == ("auto", None)
    args = build_parser().parse_args(["serve", "--num-blocks", "3", "--max-memory-mb", "900"])
    assert (args.num_blocks, args.cache_budget_tokens, args.max_memory_mb) == (3, 65536, 900)
    args = build_parser().parse_args(["generate", "hi", "--device", "cpu", "--dtype", "float16"])
    assert (args.device, args.dtype) == ("cpu", "float16")


def test_auto_fields_of_a_server_config() -> None:
    config = ServerConfig(model="m", num_blocks="auto", cache_budget_tokens="auto")
    assert (config.device, config.dtype) == ("auto", "auto")
    with pytest.raises(ConfigError, match="'num_blocks' must be an int >= 1, got 'many'"):
        ServerConfig(model="m", num_blocks="many")
    with pytest.raises(ConfigError, match="'cache_budget_tokens' must be a number"):
        ServerConfig(model="m", start=0, end=1, cache_budget_tokens="lots")
    with pytest.raises(ConfigError, match="'max_memory_mb' must be an int >= 1, got 0"):
        ServerConfig(model="m", start=0, end=1, max_memory_mb=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_memory_accounting_matches_the_loaded_span(tiny_llama: Path, dtype: torch.dtype) -> None:
    """The plan's figures, from the files' headers alone, are what a loaded span holds."""
    checkpoint = Checkpoint.open(tiny_llama)
    span = BlockSpan.load(checkpoint, 1, 4, dtype=dtype, device="cpu")
    assert block_bytes(checkpoint, 1, dtype, None) * 3 == span.memory_bytes()
    assert token_bytes(checkpoint, dtype) * 3 == span.cache_bytes_per_token()
    assert token_bytes(checkpoint, dtype) == 2 * 2 * 16 * dtype.itemsize  # 2 kv heads of 16


def test_quantized_block_bytes_are_estimated_within_a_tenth(tiny_llama: Path) -> None:
    checkpoint = Checkpoint.open(tiny_llama)
    for quant in ("int8", "nf4"):
        span = BlockSpan.load(checkpoint, 0, 2, dtype=torch.float32, quant=quant)
        estimate = block_bytes(checkpoint, 0, torch.float32, quant) * 2
        assert abs(estimate - span.memory_bytes()) <= 0.1 * span.memory_bytes(), quant


def test_plan_blocks_fits_blocks_beside_the_cache() -> None:
    block, token = 1000, 10
    plan = dict(block=block, token=token, total_blocks=32, min_tokens=64)
    # 5 blocks of 1000 + 100 tokens x 10 bytes: 10000 bytes hold 5
    assert plan_blocks(budget=10_000, num_blocks="auto", cache_tokens=100, **plan) == (5, 100)
    assert plan_blocks(budget=10**9, num_blocks="auto", cache_tokens=100, **plan) == (32, 100)
    # an auto cache takes what 4 blocks leave: (10000 - 4000) / (4 x 10)
    assert plan_blocks(budget=10_000, num_blocks=4, cache_tokens="auto", **plan) == (4, 150)
    budget = 2 * 10**6
    both = plan_blocks(budget=budget, num_blocks="auto", cache_tokens="auto", **plan)
    assert both[0] == budget // (block + AUTO_CACHE_TOKENS * token) == 12
    assert both[1] == (budget - 12 * block) // (12 * token) >= AUTO_CACHE_TOKENS
    with pytest.raises(ConfigError, match="'num_blocks' auto: one block takes"):
        plan_blocks(budget=1500, num_blocks="auto", cache_tokens=100, **plan)
    with pytest.raises(ConfigError, match="room for 12 tokens; a session may take 64"):
        plan_blocks(budget=4500, num_blocks=4, cache_tokens="auto", **plan)


def test_num_blocks_auto_from_a_stated_free_memory(tiny_llama: Path) -> None:
    checkpoint = Checkpoint.open(tiny_llama)
    block = block_bytes(checkpoint, 0, torch.float32, None)
    token = token_bytes(checkpoint, torch.float32)
    base = ServerConfig(model=str(tiny_llama), num_blocks="auto", cache_budget_tokens=1024)
    free = HOST_HEADROOM + 4 * (block + 1024 * token) + 7
    config, plan = resolve_server(base, free_bytes=free)
    assert (config.device, config.dtype) == (str(resolve_device("auto")), config.dtype)
    if NO_CUDA:
        assert (config.num_blocks, config.cache_budget_tokens, config.dtype) == (4, 1024, "float32")
        assert plan is not None and (plan.block_bytes, plan.token_bytes) == (block, token)
        assert "4 blocks with a cache of 1024 tokens" in plan.describe()
        stated = ServerConfig(model=str(tiny_llama), start=0, end=6, cache_budget_tokens="auto")
        config, _ = resolve_server(stated, free_bytes=HOST_HEADROOM + 6 * block + 6 * token * 5000)
        assert config.cache_budget_tokens == 5000
    mb = ServerConfig(
        model=str(tiny_llama), num_blocks="auto", cache_budget_tokens=1024, max_memory_mb=1
    )
    config, _ = resolve_server(mb, free_bytes=0)  # --max-memory-mb is the budget, not free memory
    assert config.num_blocks == min(6, 2**20 // (block + 1024 * token))
    plain, plan = resolve_server(ServerConfig(model="anything", start=0, end=1, device="cpu"))
    assert plan is None and (plain.device, plain.dtype) == ("cpu", "float32")


async def test_a_server_sized_by_its_memory_reports_it_in_its_record(tiny_llama: Path) -> None:
    checkpoint = Checkpoint.open(tiny_llama)
    block = block_bytes(checkpoint, 0, torch.float32, None)
    token = token_bytes(checkpoint, torch.float32)
    tokens = 2048
    fits = min(6, 2**20 // (block + tokens * token))
    assert 1 <= fits < 6  # the test's point: fewer blocks than the model has
    config = ServerConfig(
        model=str(tiny_llama),
        num_blocks="auto",
        cache_budget_tokens=tokens,
        max_memory_mb=1,
        device="cpu",
        start_delay=0.0,
        throughput=100.0,
    )
    with trio.fail_after(90):
        async with open_peer(PeerConfig(listen=LOOPBACK), server=config) as peer:
            server = peer.server
            assert server.end - server.start == fits
            records = await peer.dht.find_servers(tiny_llama.name, range(6))
            (record,) = {r.peer_id: r for r in records}.values()
            assert (record.end - record.start, record.device) == (fits, "cpu")
            assert (record.bytes_per_block, record.cache_bytes_per_token) == (block, token)
            assert record.cache_tokens_left == tokens


def mapped_ranges(folder: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapping a file of ``folder`` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(str(folder.resolve())):
            a, b = fields[0].split("-")
            ranges.append((int(a, 16), int(b, 16)))
    return ranges


@pytest.mark.parametrize("mmap_weights", [False, True])
async def test_an_explicit_cpu_device_serves_the_same_tokens(
    tiny_llama: Path, mmap_weights: bool
) -> None:
    """Also with --mmap-weights: the weights are then views of a map of the model's file."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 256, (1, 7))
    expected = reference_model(tiny_llama).generate(
        input_ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    head = ClientHead.load(Checkpoint.open(tiny_llama), device="cpu")
    with trio.fail_after(60):
        async with local_swarm(
            tiny_llama, [(0, 3), (3, 6)], device="cpu", mmap_weights=mmap_weights
        ) as (peers, client):
            assert all(p.server.span.device == torch.device("cpu") for p in peers)
            weights = [w for p in peers for w in p.server.span.layers.parameters()]
            ranges = mapped_ranges(tiny_llama)
            in_file = {any(a <= w.data_ptr() < b for a, b in ranges) for w in weights}
            assert in_file == {mmap_weights}
            ids, _ = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                SamplingConfig(max_new_tokens=8),
            )
    assert ids.tolist() == expected.tolist()


def _open(model: str) -> m.OpenSessionRequest:
    return m.OpenSessionRequest(
        model=model, start=0, end=6, max_length=16, dtype="float32", compression="none"
    )


async def test_out_of_memory_in_a_step_is_refused_and_the_server_goes_on(tiny_llama: Path) -> None:
    """The allocator really fails (a block asks the CPU for 4 EiB, once): the step is refused with
    out_of_memory, its session is closed, and every other request is served as before."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64)
    failures = {"left": 1}

    def greedy_allocation(module: torch.nn.Module, args: tuple) -> None:
        if failures["left"]:
            failures["left"] -= 1
            torch.empty(2**62, dtype=torch.uint8)

    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)], max_session_length=32) as (servers, client):
            span = servers[0].server.span
            expected = span(x, span.new_cache(8))  # (1, 3, 64) before anything fails
            handle = span.layers[2].register_forward_pre_hook(greedy_allocation)
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            opened = await request(conn, _open(tiny_llama.name), m.OpenSessionResponse, timeout=5)
            step = m.StepRequest(
                session_id=opened.session_id,
                step_id=1,
                position=0,
                hidden=compression.encode(x, "none"),
            )
            with pytest.raises(RemoteError, match="out_of_memory: a step: the server's cpu ran"):
                await request(conn, step, m.StepResponse, timeout=5)
            assert servers[0].server.reserved_tokens == 0  # the session's cache was freed
            with pytest.raises(RemoteError, match="unknown_session"):
                await request(conn, step, m.StepResponse, timeout=5)
            again = await request(conn, _open(tiny_llama.name), m.OpenSessionResponse, timeout=5)
            step = m.StepRequest(
                session_id=again.session_id,
                step_id=1,
                position=0,
                hidden=compression.encode(x, "none"),
            )
            answer = await request(conn, step, m.StepResponse, timeout=5)
            failures["left"] = 1  # a forward (training) has no state to lose: refused alike
            forward = m.ForwardRequest(
                model=tiny_llama.name,
                start=0,
                end=6,
                compression="none",
                hidden=compression.encode(x, "none"),
            )
            with pytest.raises(RemoteError, match="out_of_memory: a forward: the server's cpu"):
                await request(conn, forward, m.ForwardResponse, timeout=5)
            again = await request(conn, forward, m.ForwardResponse, timeout=5)
            handle.remove()
    assert torch.equal(compression.decode(answer.hidden, max_numel=10**6), expected)
    assert torch.equal(compression.decode(again.hidden, max_numel=10**6), expected)


async def test_out_of_memory_in_a_decode_batch_refuses_each_member_and_the_server_goes_on(
    tiny_llama: Path,
) -> None:
    """Three sessions' decode steps wait together (the compute limiter held) and run as one
    forward; inside it the allocator really fails (the second session's cache asks the CPU for
    4 EiB as it grows, after the first's has grown). Each of the three is refused with
    out_of_memory and closed, its cache freed; a session outside the batch goes on exactly, and new
    sessions are served exactly, batched again with it."""
    gen = torch.Generator().manual_seed(3)
    tol = {"atol": 1e-4, "rtol": 1e-4}  # a batched linear may round unlike a lone one

    def greedy_update(*args: object, **kwargs: object) -> None:
        torch.empty(2**62, dtype=torch.uint8)

    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 6)], max_session_length=32) as (servers, client):
            server, limiter = servers[0].server, servers[0].compute_limiter
            span, batcher = server.span, server.batcher
            local: dict[str, object] = {}  # session -> its cache in a local run of the same span

            async def open_session(name: str) -> tuple[MessageStream, str]:
                conn = await open_stream(
                    client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
                )
                opened = await request(
                    conn, _open(tiny_llama.name), m.OpenSessionResponse, timeout=5
                )
                local[name] = span.new_cache(16)
                return conn, opened.session_id

            async def step(conn: MessageStream, session_id: str, name: str, x: torch.Tensor):
                req = m.StepRequest(
                    session_id=session_id,
                    step_id=local[name].length + 1,
                    position=local[name].length,
                    hidden=compression.encode(x, "none"),
                )
                answer = await request(conn, req, m.StepResponse, timeout=10)
                return compression.decode(answer.hidden, max_numel=10**6)

            async def batched(members: dict[str, tuple], outs: dict, errors: dict) -> dict:
                xs = {name: torch.randn(1, 1, 64, generator=gen) for name in members}

                async def one(name: str) -> None:
                    try:
                        outs[name] = await step(*members[name], name, xs[name])
                    except RemoteError as exc:
                        errors[name] = str(exc)

                before = batcher.batch_sizes[len(members)]
                async with trio.open_nursery() as nursery:
                    async with limiter:  # the server is busy: the steps queue together
                        for name in members:
                            nursery.start_soon(one, name)
                        await batcher.wait_until_waiting(len(members))
                assert batcher.batch_sizes[len(members)] == before + 1  # one forward
                return xs

            sessions = {name: await open_session(name) for name in "abcd"}
            for i, (name, (conn, sid)) in enumerate(sessions.items()):
                x = torch.randn(1, 2 + i, 64, generator=gen)  # caches of different lengths
                got = await step(conn, sid, name, x)
                with torch.inference_mode():
                    assert torch.equal(got, span(x, local[name]))
            reserved = server.reserved_tokens
            server.sessions[sessions["b"][1]].cache.dynamic.update = greedy_update
            outs: dict = {}
            errors: dict = {}
            members = {name: sessions[name] for name in "abc"}
            await batched(members, outs, errors)
            assert outs == {} and sorted(errors) == ["a", "b", "c"]
            for text in errors.values():
                assert "out_of_memory: a step: the server's cpu ran out of memory" in text
            assert set(server.sessions) == {sessions["d"][1]}  # a, b, c closed, caches freed
            assert server.reserved_tokens == reserved // 4
            with pytest.raises(RemoteError, match="unknown_session"):
                await step(*sessions["a"], "a", torch.randn(1, 1, 64, generator=gen))

            x = torch.randn(1, 1, 64, generator=gen)  # d, outside the batch, goes on exactly
            got = await step(*sessions["d"], "d", x)
            with torch.inference_mode():
                assert torch.equal(got, span(x, local["d"]))
            fresh = {name: await open_session(name) for name in "ef"}
            for name, (conn, sid) in fresh.items():
                x = torch.randn(1, 4, 64, generator=gen)
                got = await step(conn, sid, name, x)
                with torch.inference_mode():
                    assert torch.equal(got, span(x, local[name]))
            members = {"d": sessions["d"], **fresh}
            errors.clear()
            xs = await batched(members, outs, errors)
            assert errors == {}
            with torch.inference_mode():
                for name in members:
                    torch.testing.assert_close(outs[name], span(xs[name], local[name]), **tol)


def test_out_of_memory_errors_are_recognised() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_device_path_of_each_codec_gives_the_hosts_bytes(
    codec: str, dtype: torch.dtype
) -> None:
    """What a GPU's tensor is encoded with (cast or quantized where it lives, then copied) is byte
    for byte the host path's; run here on CPU tensors, which that path takes too."""
    torch.manual_seed(3)
    for shape in [(1, 1, 64), (2, 7, 96), (3, 4097), (0, 5)]:
        x = (torch.randn(shape) * 4).to(dtype)
        if x.numel() > 10:
            x.view(-1)[3] = 0
            x.view(-1)[7] = 300  # an outlier, and past float16's range for none of them
        for tensor in (x, x.transpose(0, -1)):  # a strided view too
            host = bytes(codecs._CODECS[codec].encode(tensor.contiguous()))
            on_device = bytes(codecs._CODECS[codec].encode_on_device(tensor))
            assert host == on_device, (codec, dtype, shape)
