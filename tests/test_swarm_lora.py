"""Server-held LoRA adapters through a real loopback swarm: announced, routed to, applied exactly."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import trio

from swarm_node import compression
from swarm_node.dht.records import ServerRecord
from swarm_node.dht.routing import choose_chain, choose_inference_chain, choose_training_chain
from swarm_node.errors import ConfigError, MissingBlocksError, RemoteError
from swarm_node.model import BlockSpan, Checkpoint, ClientHead
from swarm_node.model.lora import load_peft_adapter
from swarm_node.node.apps.cli import main
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import HopTuning, SessionSettings
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig, parse_adapter_flags
from swarm_node.node.net.dialing import open_stream
from swarm_node.node.net.message_stream import request
from swarm_node.node.peer import open_peer
from swarm_node.protocol import messages as m
from tests.lora_fixtures import merged_reference, save_peft_adapter
from tests.model_fixtures import reference_model
from tests.swarm_helpers import LOOPBACK, local_swarm


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_peft_adapter(tiny_llama, tmp_path_factory.mktemp("lora") / "chat", seed=7)


def _greedy(model: object, input_ids: torch.Tensor, new: int) -> list[list[int]]:
    out = model.generate(
        input_ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out.tolist()


async def test_adapter_swarm_equals_merged_model_and_skips_servers_without_it(
    tiny_llama: Path, adapter: Path
) -> None:
    input_ids = torch.randint(0, 256, (1, 6))
    expected = _greedy(merged_reference(tiny_llama, adapter), input_ids, 12)
    base = _greedy(reference_model(tiny_llama), input_ids, 12)
    assert expected != base  # the adapter changes the greedy tokens
    head = ClientHead.load(Checkpoint.open(tiny_llama))
    held = {"adapters": (("chat", str(adapter)),)}
    sampling = SamplingConfig(max_new_tokens=12)
    with trio.fail_after(90):
        # the one-hop server of every block is the cheapest chain, but it does not hold "chat"
        async with local_swarm(
            tiny_llama, [(0, 3), (3, 6), (0, 6)], per_server=[held, held, {}]
        ) as (servers, client):
            from swarm_node.node.apps.swarm_status import format_report, gather_status

            report = await gather_status(client, tiny_llama.name, num_blocks=6)
            assert {s["peer_id"]: s["adapters"] for s in report["servers"]}[servers[0].peer_id] == [
                "chat"
            ]
            assert (
                format_report(report).count("adapters: chat") == 2
            )  # `swarm-node status` shows them
            records = await client.find_servers(tiny_llama.name, 6)
            assert {r.peer_id: r.adapters for r in records} == {
                servers[0].peer_id: ("chat",),
                servers[1].peer_id: ("chat",),
                servers[2].peer_id: (),
            }
            ids, stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                sampling,
                tuning=HopTuning(adapter="chat"),
            )
            assert ids.tolist() == expected
            assert [(h.server.peer_id, h.start, h.end) for h in stats.chain] == [
                (servers[0].peer_id, 0, 3),
                (servers[1].peer_id, 3, 6),
            ]
            plain, plain_stats = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                sampling,
            )
            assert plain.tolist() == base
            assert [h.server.peer_id for h in plain_stats.chain] == [servers[2].peer_id]
            with pytest.raises(
                MissingBlocksError, match="no server holding adapter 'sql' for blocks 0-5"
            ):
                await client.find_chain(tiny_llama.name, 6, adapter="sql")


async def test_unknown_adapter_and_forward_with_adapter(tiny_llama: Path, adapter: Path) -> None:
    checkpoint = Checkpoint.open(tiny_llama)
    span = BlockSpan.load(checkpoint, 1, 4)
    lora = load_peft_adapter(adapter, checkpoint.config, start=1, end=4)
    hidden = torch.randn(2, 5, 64)
    with trio.fail_after(60):
        async with local_swarm(
            tiny_llama,
            [(0, 6)],
            adapters=(("chat", str(adapter)),),
            client=ClientConfig(adapter="chat"),
        ) as (servers, client):
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            opening = m.OpenSessionRequest(
                model=tiny_llama.name,
                start=0,
                end=6,
                max_length=8,
                dtype="float32",
                compression="none",
                adapter="sql",
            )
            with pytest.raises(
                RemoteError,
                match=r"unknown_adapter: 'adapter' must be one this server holds \(\['chat'\]\), got 'sql'",
            ):
                await request(conn, opening, m.OpenSessionResponse, timeout=5)
            forward = m.ForwardRequest(
                model=tiny_llama.name,
                start=1,
                end=4,
                compression="none",
                hidden=compression.encode(hidden, "none"),
                adapter="chat",
            )
            reply = await request(conn, forward, m.ForwardResponse, timeout=10)
            torch.testing.assert_close(
                compression.decode(reply.hidden, max_numel=hidden.numel()),
                span(hidden, lora=lora),
                atol=1e-6,
                rtol=0,
            )
            with pytest.raises(RemoteError, match="unknown_adapter"):
                await request(
                    conn,
                    m.ForwardRequest(**{**_fields(forward), "adapter": "nope"}),
                    m.ForwardResponse,
                    timeout=5,
                )
            # the stream still serves; the client config's adapter picks the chain by default
            chain = await client.find_chain(tiny_llama.name, 6)
            async with client.inference_session(
                chain, SessionSettings(model=tiny_llama.name, max_length=8)
            ) as session:
                assert session.tuning.adapter == "chat"
            client.client_config = replace(client.client_config, adapter="sql")
            with pytest.raises(
                MissingBlocksError, match="no server holding adapter 'sql' for blocks 0-5"
            ):
                await client.find_chain(tiny_llama.name, 6)
            assert await client.find_chain(tiny_llama.name, 6, adapter="")  # "": any server
            await conn.close()


def _fields(msg: object) -> dict:
    return {name: getattr(msg, name) for name in msg.__dataclass_fields__}


async def test_server_with_a_bad_adapter_does_not_start(tiny_llama: Path, tmp_path: Path) -> None:
    config = ServerConfig(
        model=str(tiny_llama), start=0, end=3, throughput=1.0, adapters=(("x", str(tmp_path)),)
    )
    with trio.fail_after(30):
        with pytest.raises(
            ConfigError, match=r"'--adapters' x=.*: adapter folder .* must hold adapter_config.json"
        ):
            async with open_peer(PeerConfig(listen=LOOPBACK), server=config):
                pass  # pragma: no cover


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["chat"], "'--adapters' entries must look like NAME=PATH"),
        (["chat="], "'--adapters' entries must look like NAME=PATH"),
        (["a b=/x"], "'adapters' names must be 1-64 letters"),
        (["a=/x", "a=/y"], "'adapters' names must be distinct, got 'a' twice"),
    ],
)
def test_bad_adapter_flags(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_adapter_flags(flags)


def test_cli_reports_bad_adapters(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", str(tiny_llama), "--blocks", "0:3", "--adapters", "chat"]) == 2
    assert "error: '--adapters' entries must look like NAME=PATH" in capsys.readouterr().err
    args = [
        "serve",
        "--model",
        str(tiny_llama),
        "--blocks",
        "0:3",
        "--throughput",
        "1",
        "--adapters",
        f"x={tmp_path}/none",
    ]
    assert main(args) == 2
    assert "error: '--adapters' x=" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'adapter' names must be 1-64"):
        ClientConfig(adapter="../etc")


def _record(peer: str, start: int, end: int, adapters: tuple[str, ...] = ()) -> ServerRecord:
    return ServerRecord(
        peer_id=peer,
        addrs=(),
        model="m",
        start=start,
        end=end,
        throughput=10.0,
        cache_tokens_left=1000,
        dtype="float32",
        version="0",
        adapters=adapters,
        expires_at=time.time() + 60,
    )


def test_routing_picks_only_servers_holding_the_adapter() -> None:
    import random

    servers = [
        _record("whole", 0, 4),
        _record("a", 0, 2, ("chat",)),
        _record("b", 2, 4, ("chat", "sql")),
    ]
    common = dict(model="m", start=0, end=4, now=time.time())
    assert [h.server.peer_id for h in choose_chain(servers, model="m", start=0, end=4)] == ["whole"]
    assert [
        h.server.peer_id for h in choose_chain(servers, model="m", start=0, end=4, adapter="chat")
    ] == ["a", "b"]
    chain = choose_inference_chain(
        servers, rtt={}, push=False, max_length=8, adapter="chat", **common
    )
    assert [h.server.peer_id for h in chain] == ["a", "b"]
    chain = choose_training_chain(servers, rng=random.Random(0), adapter="chat", **common)
    assert [h.server.peer_id for h in chain] == ["a", "b"]
    with pytest.raises(
        MissingBlocksError, match="no server holding adapter 'sql' for blocks 0-1 of m"
    ):
        choose_inference_chain(servers, rtt={}, push=False, max_length=8, adapter="sql", **common)


async def test_client_owned_lora_file_and_prompt_file(
    tiny_llama: Path, adapter: Path, tmp_path: Path
) -> None:
    """generate's --adapter FILE and --prompt-file FILE, through servers that hold no adapter."""
    import argparse

    from swarm_node.model.tuned_files import TunedFile, save_tuned
    from swarm_node.node.apps.commands import tuned_inputs

    checkpoint = Checkpoint.open(tiny_llama)
    config = checkpoint.config
    lora = load_peft_adapter(adapter, config, start=0, end=6)
    lora_file = save_tuned(
        tmp_path / "mine.safetensors",
        TunedFile(model=tiny_llama.name, method="lora", start=0, end=6, lora=lora),
        config=config,
    )
    prefix = torch.randn(3, 64) * 0.5
    prompt_file = save_tuned(
        tmp_path / "p.safetensors",
        TunedFile(model=tiny_llama.name, method="ptune", start=0, end=6, prompts=prefix),
        config=config,
    )
    args = argparse.Namespace(
        model=str(tiny_llama), dtype="float32", adapter=str(lora_file), prompt_file=prompt_file
    )
    tuned = tuned_inputs(args, config)
    assert torch.equal(tuned["prefix"], prefix) and tuned["tuning"].prompts is None
    input_ids = torch.randint(0, 256, (1, 5))
    head = ClientHead.load(checkpoint)
    merged = merged_reference(tiny_llama, adapter)
    expected = _greedy(merged, input_ids, 8)
    embeds = torch.cat([prefix[None], head.embed(input_ids)], dim=1)  # (1, P + T, H)
    expected_prompted = []
    with torch.no_grad():  # greedy by hand: the merged model after the soft prompt
        for _ in range(8):
            token = merged(inputs_embeds=embeds).logits[:, -1].argmax(-1)  # (1,)
            expected_prompted.append(int(token))
            embeds = torch.cat([embeds, head.embed(token[:, None])], dim=1)
    sampling = SamplingConfig(max_new_tokens=8)
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 2), (2, 6)]) as (servers, client):
            ids, _ = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                sampling,
                tuning=HopTuning(lora=tuned["tuning"].lora),
            )
            assert ids.tolist() == expected
            ids, _ = await generate_tokens(
                client,
                head,
                input_ids,
                SessionSettings(model=tiny_llama.name, num_blocks=6, dtype="float32"),
                sampling,
                **tuned,
            )
            assert ids[0, 5:].tolist() == expected_prompted


def _renamed(manifest: tuple, old: str, new: str) -> tuple:
    return tuple((key.replace(old, new), rank, scale) for key, rank, scale in manifest)


async def test_bad_client_owned_lora_is_refused(tiny_llama: Path, adapter: Path) -> None:
    from swarm_node.model.lora_pack import pack_lora

    lora = load_peft_adapter(adapter, Checkpoint.open(tiny_llama).config, start=0, end=3)
    flat, manifest = pack_lora(lora)
    base = dict(
        model=tiny_llama.name, start=0, end=3, max_length=8, dtype="float32", compression="none"
    )
    cases = [
        (
            dict(lora=compression.encode(flat, "none"), lora_manifest=manifest, adapter="chat"),
            "an 'adapter' name or a 'lora', not both",
        ),
        (dict(lora_manifest=manifest), "'lora_manifest' came without 'lora'"),
        (
            dict(lora=compression.encode(flat, "none"), lora_manifest=()),
            "lora: 'lora_manifest' must list 1 to",
        ),
        (
            dict(lora=compression.encode(flat[:-1].contiguous(), "none"), lora_manifest=manifest),
            f"lora: 'lora' must be a flat tensor of {flat.numel()} numbers",
        ),
        (
            dict(lora=compression.encode(torch.cat([flat, flat]), "none"), lora_manifest=manifest),
            "lora: ",
        ),
        (
            dict(
                lora=compression.encode(torch.full_like(flat, float("inf")), "none"),
                lora_manifest=manifest,
            ),
            "lora: the weights must be finite",
        ),
        (
            dict(
                lora=compression.encode(flat, "none"),
                lora_manifest=_renamed(manifest, "layers.0", "layers.4"),
            ),
            "must be a distinct Linear of blocks 0:3",
        ),
    ]
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)], adapters=(("chat", str(adapter)),)) as (
            servers,
            client,
        ):
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            for fields, message in cases:
                with pytest.raises(RemoteError) as info:
                    await request(
                        conn,
                        m.OpenSessionRequest(**base, **fields),
                        m.OpenSessionResponse,
                        timeout=5,
                    )
                assert info.value.code == "bad_request" and message in info.value.message
            good = m.OpenSessionRequest(
                **base, lora=compression.encode(flat, "none"), lora_manifest=manifest
            )
            assert (
                await request(conn, good, m.OpenSessionResponse, timeout=5)
            ).session_id  # still serving
            await conn.close()


def test_cli_generate_checks_tuned_files_before_networking(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    for flag in ("--prompt-file", "--adapter"):
        assert (
            main(
                [
                    "generate",
                    "hi",
                    "--model",
                    str(tiny_llama),
                    "--initial-peers",
                    peer,
                    flag,
                    str(bad),
                ]
            )
            == 2
        )
        assert "must start with a safetensors header" in capsys.readouterr().err


async def test_forward_and_backward_with_client_owned_lora(tiny_llama: Path, adapter: Path) -> None:
    """The wire contract of a training client's own LoRA: its gradient comes back in its flat layout."""
    from swarm_node.model.lora_pack import pack_lora, unpack_lora

    checkpoint = Checkpoint.open(tiny_llama)
    span = BlockSpan.load(checkpoint, 1, 4)
    flat, manifest = pack_lora(load_peft_adapter(adapter, checkpoint.config, start=1, end=4))
    hidden = torch.randn(2, 5, 64)
    grad_output = torch.randn(2, 5, 64)
    leaf, x = flat.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    local = span(x, lora=unpack_lora(leaf, manifest, shapes=span.lora_shapes, start=1, end=4))
    local_grad_x, local_grad_lora = torch.autograd.grad(local, [x, leaf], grad_output)
    wire = dict(
        model=tiny_llama.name,
        start=1,
        end=4,
        compression="none",
        hidden=compression.encode(hidden, "none"),
        lora=compression.encode(flat, "none"),
        lora_manifest=manifest,
    )
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, client):
            conn = await open_stream(
                client.host, servers[0].peer_id, max_frame_size=2**26, timeout=5
            )
            reply = await request(conn, m.ForwardRequest(**wire), m.ForwardResponse, timeout=10)
            out = compression.decode(reply.hidden, max_numel=hidden.numel())
            torch.testing.assert_close(out, local.detach(), atol=1e-6, rtol=0)
            back = m.BackwardRequest(**wire, grad_output=compression.encode(grad_output, "none"))
            reply = await request(conn, back, m.BackwardResponse, timeout=10)
            assert reply.grad_prompts is None
            grad_x = compression.decode(reply.grad_input, max_numel=hidden.numel())
            grad_lora = compression.decode(reply.grad_lora, max_numel=flat.numel())
            torch.testing.assert_close(grad_x, local_grad_x, atol=1e-5, rtol=0)
            torch.testing.assert_close(grad_lora, local_grad_lora, atol=1e-5, rtol=0)
            plain = await request(
                conn,
                m.BackwardRequest(
                    **{**wire, "lora": None, "lora_manifest": ()}, grad_output=back.grad_output
                ),
                m.BackwardResponse,
                timeout=10,
            )
            assert plain.grad_lora is None
            with pytest.raises(RemoteError, match="bad_request: lora: 'lora_manifest' module"):
                bad = {**wire, "lora_manifest": _renamed(manifest, "layers.1", "layers.5")}
                await request(conn, m.ForwardRequest(**bad), m.ForwardResponse, timeout=10)
            await conn.close()
