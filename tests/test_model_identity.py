"""Which model is this: digests of the weights, cached, announced, and pinned by clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import trio
from safetensors.torch import load_file, save_file

from swarm_node.dht.pinning import ModelPin, mixed_digests, pin_problem, pinned
from swarm_node.dht.records import (
    MODEL_KEY_SHARDS,
    ServerRecord,
    block_key,
    decode_record,
    encode_record,
    model_key,
    record_fields,
)
from swarm_node.errors import MissingBlocksError, ModelError, RemoteProtocolError
from swarm_node.model import Checkpoint, ClientHead
from swarm_node.model.bundled import identity_of, resolve_model
from swarm_node.model.identity import CACHE_FILE, model_identity
from swarm_node.node.client.generation import SamplingConfig, generate_tokens
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ClientConfig
from tests.model_fixtures import make_tiny_model_dir, reference_model
from tests.swarm_helpers import local_swarm


def _rewrite_block(path: Path, block: int, *, scale: float) -> None:
    """A new revision of the model in ``path``: one tensor of ``block`` changed, in place."""
    weights_file = path / "model.safetensors"
    tensors = load_file(str(weights_file))
    name = next(n for n in sorted(tensors) if n.startswith(f"model.layers.{block}."))
    tensors[name] = tensors[name] * scale
    save_file(tensors, str(weights_file), metadata={"format": "pt"})


def test_identity_is_stable_across_processes_and_cached_beside_the_model(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "tiny", num_layers=4)
    first = identity_of(str(model), cache_dir=tmp_path / "cache")
    assert (model / CACHE_FILE).is_file() and len(first.blocks) == 4
    assert first.name == "tiny" and len(first.digest) == 64
    # another process, no cache: the same digests from the files alone
    (model / CACHE_FILE).unlink()
    code = (
        "import sys; from pathlib import Path; from swarm_node.model.bundled import identity_of;"
        "i = identity_of(sys.argv[1], cache_dir=Path(sys.argv[2])); print(i.digest, *i.blocks)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model), str(tmp_path / "other-cache")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert out == [first.digest, *first.blocks]
    # the second time is the cache's: a digest planted in the cache entry comes back unhashed
    entry = json.loads((model / CACHE_FILE).read_text())
    entry["digest"] = "ab" * 32
    (model / CACHE_FILE).write_text(json.dumps(entry))
    assert identity_of(str(model), cache_dir=tmp_path / "cache").digest == "ab" * 32


def test_a_new_revision_is_a_new_model_and_changes_only_its_blocks(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "tiny", num_layers=4)
    old = identity_of(str(model), cache_dir=tmp_path / "cache")
    _rewrite_block(model, 2, scale=1.5)
    new = identity_of(str(model), cache_dir=tmp_path / "cache")  # the cache notices the rewrite
    assert new.digest != old.digest
    assert [a == b for a, b in zip(old.blocks, new.blocks, strict=True)] == [
        True,
        True,
        False,
        True,
    ]
    assert new.span_digest(0, 2) == old.span_digest(0, 2)
    assert new.span_digest(2, 4) != old.span_digest(2, 4)
    assert new.span_digest(0, 2) != new.span_digest(1, 3)  # a span's position is part of it


def test_config_and_dtype_are_part_of_the_identity(tmp_path: Path) -> None:
    a = make_tiny_model_dir(tmp_path / "a", num_layers=2)
    b = make_tiny_model_dir(tmp_path / "b", num_layers=2)  # same seed: same weights, same config
    cache = tmp_path / "cache"
    assert (
        identity_of(str(a), cache_dir=cache).digest == identity_of(str(b), cache_dir=cache).digest
    )
    config = json.loads((b / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (b / "config.json").write_text(json.dumps(config))
    assert (
        identity_of(str(a), cache_dir=cache).digest != identity_of(str(b), cache_dir=cache).digest
    )
    half = make_tiny_model_dir(tmp_path / "half", num_layers=2)
    tensors = load_file(str(half / "model.safetensors"))
    save_file({k: v.half() for k, v in tensors.items()}, str(half / "model.safetensors"))
    assert (
        identity_of(str(half), cache_dir=cache).digest
        != identity_of(str(a), cache_dir=cache).digest
    )


def test_the_digest_does_not_depend_on_how_the_weights_are_sharded(tmp_path: Path) -> None:
    single = make_tiny_model_dir(tmp_path / "single", num_layers=3)
    sharded = make_tiny_model_dir(tmp_path / "sharded", num_layers=3, sharded=True)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    cache = tmp_path / "cache"
    assert (
        identity_of(str(single), cache_dir=cache).digest
        == identity_of(str(sharded), cache_dir=cache).digest
    )


def test_a_read_only_model_folder_caches_under_the_cache_folder(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "ro", num_layers=2)
    (model / CACHE_FILE).mkdir()  # a cache entry that cannot be written beside the model
    first = model_identity(model, name="ro", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "identities").glob("*.json"))
    assert model_identity(model, name="ro", cache_dir=tmp_path / "cache") == first


def _rewrite_in_place_keeping_times(path: Path, block: int) -> None:
    """Change one value of ``block``'s first tensor in place: same size, inode and times."""
    weights_file = path / "model.safetensors"
    before = weights_file.stat()
    raw = weights_file.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    name = next(n for n in sorted(header) if n.startswith(f"model.layers.{block}."))
    offset = 8 + header_len + header[name]["data_offsets"][0]
    with weights_file.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in raw[offset : offset + 4]))
    os.utime(weights_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights_file.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


async def test_a_server_verifies_the_blocks_it_loads_against_the_cached_digests(
    tmp_path: Path,
) -> None:
    from swarm_node.model.identity import changed_blocks, compute_identity
    from swarm_node.node.config import ServerConfig
    from swarm_node.node.server.loading import prepare_span

    model = make_tiny_model_dir(tmp_path / "tiny", num_layers=4)
    cache = tmp_path / "cache"
    cached = identity_of(str(model), cache_dir=cache)
    _rewrite_in_place_keeping_times(model, 3)  # the cache cannot see it: size and times unchanged
    truth = compute_identity(Checkpoint.open(model), name="tiny")
    assert truth.digest != cached.digest
    assert identity_of(str(model), cache_dir=cache) == cached  # the cache alone trusts the stamp
    assert changed_blocks(Checkpoint.open(model), cached, 0, 4) == [3]
    assert changed_blocks(Checkpoint.open(model), cached, 0, 3) == []
    # a server of blocks 0:3 loads none of the changed bytes: the cache stands
    assert identity_of(str(model), cache_dir=cache, verify=(0, 3)) == cached
    # a server of blocks 2:4 hashes what it loads, finds block 3 changed, identifies the model anew
    with trio.fail_after(60):
        config = ServerConfig(model=str(model), start=2, end=4, throughput=1.0)
        await prepare_span(replace(config, no_verify_weights=True))
        assert identity_of(str(model)) == cached  # told not to verify: the cache stands
        await prepare_span(config)
    assert identity_of(str(model), cache_dir=cache, verify=(0, 4)) == truth
    assert identity_of(str(model)) == truth  # the cache was rewritten: later starts announce it


def test_a_broken_safetensors_header_is_a_model_error(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "bad", num_layers=2)
    checkpoint = Checkpoint.open(model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated after opening
    from swarm_node.model.identity import compute_identity

    with pytest.raises(ModelError, match="must lie within the file"):
        compute_identity(checkpoint, name="bad")


def test_digest_names_resolve_to_bundled_models_only(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model digest 'abcdef12' must be one of a bundled"):
        resolve_model("abcdef12", cache_dir=tmp_path)
    with pytest.raises(ModelError, match="or a model digest, got 'abc'"):
        resolve_model("abc", cache_dir=tmp_path)


# -- records and pins ------------------------------------------------------------------------------
def _record(**fields: object) -> ServerRecord:
    base = dict(
        peer_id="A",
        addrs=("/ip4/127.0.0.1/tcp/1",),
        model="tiny",
        start=0,
        end=2,
        throughput=1.0,
        cache_tokens_left=100,
        dtype="float32",
        version="x",
        expires_at=10.0,
    )
    return ServerRecord(**{**base, **fields})


def test_records_carry_digests_within_bounds() -> None:
    record = _record(model_digest="a" * 64, blocks_digest="b" * 64)
    assert decode_record(encode_record(record)) == record
    import msgpack

    for field, value in (
        ("model_digest", "A" * 64),
        ("blocks_digest", "a" * 65),
        ("model_digest", 3),
        ("adapter_ids", ["ab" * 17]),
        ("adapter_ids", ["AB" * 16]),
    ):
        data = record_fields(record) | {field: value}
        with pytest.raises(RemoteProtocolError, match=field):
            decode_record(msgpack.packb(data, use_bin_type=True))
    older = record_fields(record)
    del older["model_digest"], older["blocks_digest"]
    assert decode_record(msgpack.packb(older, use_bin_type=True)).model_digest == ""


def test_the_largest_record_an_honest_server_writes_fits() -> None:
    from libp2p import generate_new_ed25519_identity
    from libp2p.peer.id import ID

    from swarm_node.dht.records import MAX_ADAPTERS, MAX_ADDRS, MAX_NEXT_RTTS, MAX_RECORD_SIZE
    from swarm_node.dht.signing import sign_record, verify_record
    from swarm_node.model.identity import ADAPTER_ID_HEX

    keys = [generate_new_ed25519_identity() for _ in range(2)]
    me, relay = (ID.from_pubkey(k.public_key).to_base58() for k in keys)
    relayed = f"/ip6/2001:db8:ffff:ffff:ffff:ffff:ffff:ffff/tcp/65535/p2p/{relay}/p2p-circuit"
    record = _record(
        peer_id=me,
        addrs=tuple(f"{relayed}/p2p/{me}" for _ in range(MAX_ADDRS)),
        model="m" * 128,
        start=4000,
        end=4096,
        adapters=tuple(f"{i:02d}" + "a" * 62 for i in range(MAX_ADAPTERS)),  # names: 64 at most
        adapter_ids=tuple(f"{i:0{ADAPTER_ID_HEX}x}" for i in range(MAX_ADAPTERS)),
        next_rtts=tuple((relay[:-2] + f"{i:02d}", 0.125) for i in range(MAX_NEXT_RTTS)),
        model_digest="a" * 64,
        blocks_digest="b" * 64,
        version="0.1.0.dev123+gabcdef0",
        expires_at=1000.0,
    )
    value = sign_record(record, keys[0])
    assert 10 * 1024 < len(value) <= MAX_RECORD_SIZE
    assert verify_record(value, key=f"/swarmnode/{me}", now=500.0) == record


def test_pins_say_why_a_server_is_left_out(tmp_path: Path) -> None:
    identity = identity_of(
        str(make_tiny_model_dir(tmp_path / "tiny", num_layers=4)), cache_dir=tmp_path
    )
    pin = ModelPin(
        digest=identity.digest,
        span_digest=identity.span_digest,
        quants=("none",),
        dtypes=("float32",),
    )
    good = _record(
        peer_id="good", model_digest=identity.digest, blocks_digest=identity.span_digest(0, 2)
    )
    cases = {
        "old": (
            replace(good, peer_id="old", model_digest="", blocks_digest=""),
            "announces no model digest",
        ),
        "other": (replace(good, peer_id="other", model_digest="c" * 64), "serves other weights"),
        "lying": (
            replace(good, peer_id="lying", blocks_digest="d" * 64),
            "but blocks 0:2 with digest",
        ),
        "moved": (replace(good, peer_id="moved", start=1, end=3), "but blocks 1:3"),
        "beyond": (replace(good, peer_id="beyond", start=3, end=6), "announces blocks 3:6"),
        "int8": (replace(good, peer_id="int8", quant="int8"), "accepts only ['none']"),
        "bf16": (
            replace(good, peer_id="bf16", dtype="bfloat16"),
            "computes blocks 0:2 in 'bfloat16', and this client accepts only ['float32']",
        ),
    }
    assert pin_problem(good, pin) is None
    kept, left_out = pinned([good, *(r for r, _ in cases.values())], pin)
    assert kept == [good]
    for peer, (_, why) in cases.items():
        assert why in left_out[peer], left_out[peer]
    assert pin_problem(cases["int8"][0], replace(pin, quants=("none", "int8"))) is None
    assert pin_problem(cases["bf16"][0], replace(pin, dtypes=("float32", "bfloat16"))) is None
    two = [good, cases["other"][0], cases["old"][0]]
    assert "hold 2 different models" in (mixed_digests(two, "tiny") or "")
    assert mixed_digests([good, cases["old"][0]], "tiny") is None


# -- real swarms -----------------------------------------------------------------------------------
def _same_named_models(tmp_path: Path) -> tuple[Path, Path]:
    """Two different models in folders of the same name ("tiny")."""
    a = make_tiny_model_dir(tmp_path / "a" / "tiny", num_layers=6, seed=1)
    b = make_tiny_model_dir(tmp_path / "b" / "tiny", num_layers=6, seed=2)
    return a, b


async def test_same_named_models_are_never_chained_together(tmp_path: Path) -> None:
    a, b = _same_named_models(tmp_path)
    torch.manual_seed(3)
    input_ids = torch.randint(0, 256, (1, 5))
    expected = {
        path: reference_model(path).generate(
            input_ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        for path in (a, b)
    }
    assert expected[a].tolist() != expected[b].tolist()
    # each model whole on one server, and halves of both: a mixed chain is possible by name
    spans = [(0, 6), (0, 6), (0, 3), (3, 6), (0, 3), (3, 6)]
    models = [a, b, a, b, b, a]
    per_server = [{"model": str(m)} for m in models]
    with trio.fail_after(120):
        async with local_swarm(a, spans, per_server=per_server) as (servers, client):
            # a client naming the model only: the name is ambiguous, and it says so
            with pytest.raises(ModelError, match="'tiny' hold 2 different models"):
                await client.find_chain("tiny", 6)
            for path in (a, b):
                identity = await client.pin_model(str(path))
                mine = {s.peer_id for s, m in zip(servers, models, strict=True) if m == path}
                # the DHT keys are the digest's: only servers of these weights are found under them
                keys = [model_key(identity.digest, shard) for shard in range(MODEL_KEY_SHARDS)]
                keys += [block_key(identity.digest, b) for b in range(6)]
                under_digest: set[str] = set()
                for key in keys:
                    under_digest |= {p.to_base58() for p in await client.dht.find_providers(key)}
                assert under_digest == mine
                found = await client.dht.find_servers("tiny", range(6), digest=identity.digest)
                assert {s.peer_id for s in found} == mine
                for _ in range(3):  # chains differ by latency and spreading: each is pure
                    chain = await client.find_chain("tiny", 6)
                    assert {h.server.peer_id for h in chain} <= mine
                    assert all(h.server.model_digest == identity.digest for h in chain)
                assert not client.left_out.get("tiny")  # the others are not even found
                ids, stats = await generate_tokens(
                    client,
                    ClientHead.load(Checkpoint.open(path)),
                    input_ids,
                    SessionSettings(model="tiny", num_blocks=6),
                    SamplingConfig(max_new_tokens=8),
                )
                assert ids.tolist() == expected[path].tolist()
                assert {h.server.peer_id for h in stats.chain} <= mine


async def test_a_client_refuses_other_weights_with_a_clear_error(tmp_path: Path) -> None:
    a, b = _same_named_models(tmp_path)
    _rewrite_block(b, 4, scale=2.0)
    with trio.fail_after(120):
        async with local_swarm(
            a, [(0, 3), (3, 6)], per_server=[{"model": str(a)}, {"model": str(b)}]
        ) as (servers, client):
            await client.pin_model(str(a))
            with pytest.raises(MissingBlocksError) as caught:
                await client.find_chain("tiny", 6)
    message = str(caught.value)
    assert message.startswith("no server for blocks 3-5 of tiny; servers left out: ")
    assert f"{servers[1].peer_id} serves other weights of 'tiny'" in message


async def test_int8_servers_are_used_only_when_the_client_accepts_them(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "tiny", num_layers=4)
    exact_only = ClientConfig(accept_quant=("none",), accept_dtype=("float32",))
    with trio.fail_after(120):
        async with local_swarm(
            model,
            [(0, 4), (0, 4), (0, 4)],
            per_server=[{}, {"quant": "int8"}, {"dtype": "bfloat16"}],
            client=exact_only,
        ) as (servers, client):
            await client.pin_model(str(model))
            for _ in range(4):
                chain = await client.find_chain("tiny", 4)
                assert [h.server.peer_id for h in chain] == [servers[0].peer_id]
            assert "as 'int8'" in client.left_out["tiny"][servers[1].peer_id]
            assert "in 'bfloat16'" in client.left_out["tiny"][servers[2].peer_id]
            records = [s.announced for s in servers]
            assert all(r is not None for r in records)
            # variants of one digest: the same weights, declared as held
            assert [(r.quant, r.dtype) for r in records] == [  # type: ignore[union-attr]
                ("none", "float32"),
                ("int8", "float32"),
                ("none", "bfloat16"),
            ]
            assert len({r.model_digest for r in records}) == 1  # type: ignore[union-attr]
            # a client whose policy accepts int8 uses it
            client.pins["tiny"] = replace(client.pins["tiny"], quants=("int8",))
            chain = await client.find_chain("tiny", 4)
            assert [h.server.peer_id for h in chain] == [servers[1].peer_id]


# -- tuned files and adapters ----------------------------------------------------------------------
def test_a_tuned_file_trained_on_other_weights_is_refused(tmp_path: Path) -> None:
    from swarm_node.model.tuned_files import TunedFile, load_tuned, save_tuned, tuned_id

    a, b = _same_named_models(tmp_path)
    cache = tmp_path / "cache"
    mine, other = identity_of(str(a), cache_dir=cache), identity_of(str(b), cache_dir=cache)
    config = Checkpoint.open(a).config
    prompts = torch.randn(3, int(config.hidden_size))
    tuned = TunedFile(
        model="tiny", method="ptune", start=0, end=6, prompts=prompts, model_digest=mine.digest
    )
    path = save_tuned(tmp_path / "p.safetensors", tuned, config=config)
    back = load_tuned(path, model="tiny", config=config, model_digest=mine.digest)
    assert back.model_digest == mine.digest and torch.equal(back.prompts, prompts)
    with pytest.raises(ModelError, match="was trained on other weights of 'tiny'") as caught:
        load_tuned(path, model="tiny", config=config, model_digest=other.digest)
    assert mine.digest[:12] in str(caught.value) and other.digest[:12] in str(caught.value)
    # a file's own id is the digest of its bytes: the same tensors saved again, the same id
    again = save_tuned(tmp_path / "again.safetensors", tuned, config=config)
    assert tuned_id(path) == tuned_id(again) and len(tuned_id(path)) == 64
    changed = save_tuned(
        tmp_path / "changed.safetensors", replace(tuned, prompts=prompts + 1), config=config
    )
    assert tuned_id(changed) != tuned_id(path)


async def test_servers_announce_adapters_by_id_and_refuse_other_base_weights(
    tmp_path: Path,
) -> None:
    from swarm_node.errors import ConfigError
    from swarm_node.model.identity import adapter_id
    from swarm_node.node.client.settings import HopTuning
    from tests.lora_fixtures import merged_reference, save_peft_adapter

    model = make_tiny_model_dir(tmp_path / "tiny", num_layers=4)
    first = save_peft_adapter(model, tmp_path / "first", seed=3)
    second = save_peft_adapter(model, tmp_path / "second", seed=4)
    ids = {path: adapter_id(path) for path in (first, second)}
    assert ids[first] != ids[second] and adapter_id(first) == ids[first]
    torch.manual_seed(5)
    input_ids = torch.randint(0, 256, (1, 4))
    expected = merged_reference(model, second).generate(
        input_ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with trio.fail_after(120):
        # two servers holding different adapters under one name: the id tells them apart
        async with local_swarm(
            model,
            [(0, 4), (0, 4)],
            per_server=[
                {"adapters": (("chat", str(first)),)},
                {"adapters": (("chat", str(second)),)},
            ],
        ) as (servers, client):
            await client.pin_model(str(model))
            for server, path in zip(servers, (first, second), strict=True):
                assert server.announced is not None
                assert server.announced.adapters == ("chat",)
                assert server.announced.adapter_ids == (ids[path],)
            for _ in range(3):
                chain = await client.find_chain("tiny", 4, adapter=ids[second])
                assert [h.server.peer_id for h in chain] == [servers[1].peer_id]
            tokens, _ = await generate_tokens(
                client,
                ClientHead.load(Checkpoint.open(model)),
                input_ids,
                SessionSettings(model="tiny", num_blocks=4),
                SamplingConfig(max_new_tokens=6),
                tuning=HopTuning(adapter=ids[second]),
            )
    assert tokens.tolist() == expected.tolist()
    # an adapter whose config names other base weights is refused when the server loads it
    config = json.loads((first / "adapter_config.json").read_text())
    config["swarm_node_model_digest"] = "e" * 64
    (first / "adapter_config.json").write_text(json.dumps(config))
    from swarm_node.node.config import ServerConfig
    from swarm_node.node.server.loading import prepare_span

    server = ServerConfig(
        model=str(model), start=0, end=4, throughput=1.0, adapters=(("x", str(first)),)
    )
    with pytest.raises(ConfigError, match="'--adapters' x=.*trained on other weights"):
        await prepare_span(server)


def test_the_bundled_model_is_named_by_its_digest_too(smollm2_path: Path) -> None:
    from swarm_node.model.bundled import BUNDLED_MODELS, model_id_of

    identity = identity_of("smollm2-135m")
    assert identity.name == "smollm2-135m" and len(identity.blocks) == 30
    # the conversion with DESIGN.md's library versions is the reference one
    assert identity.digest == BUNDLED_MODELS["smollm2-135m"].digest
    assert resolve_model(identity.digest[:8]) == smollm2_path == resolve_model(identity.digest)
    assert model_id_of(identity.short) == "smollm2-135m"
    assert identity_of(identity.short) == identity


async def test_a_server_whose_blocks_digest_is_not_its_models_is_refused(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "tiny", num_layers=4)
    with trio.fail_after(120):
        async with local_swarm(model, [(0, 4), (0, 4)]) as (servers, client):
            liar = servers[1]
            assert liar.identity is not None
            # its record keeps the model's digest but announces blocks of other weights
            liar.identity = replace(liar.identity, blocks=("0" * 64,) * 4)
            await liar.announce()
            assert liar.announced is not None
            assert liar.announced.model_digest == servers[0].identity.digest
            await client.pin_model(str(model))
            for _ in range(3):
                chain = await client.find_chain("tiny", 4)
                assert [h.server.peer_id for h in chain] == [servers[0].peer_id]
            why = client.left_out["tiny"][liar.peer_id]
            assert why.startswith(f"{liar.peer_id} announces model ") and "but blocks 0:4" in why


async def test_a_client_folder_without_blocks_is_not_pinned_but_still_safe(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "tiny", num_layers=4)
    head_only = tmp_path / "client" / "tiny"
    head_only.mkdir(parents=True)
    (head_only / "config.json").write_text((model / "config.json").read_text())
    tensors = load_file(str(model / "model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if ".layers." not in k},
        str(head_only / "model.safetensors"),
    )
    with pytest.raises(ModelError, match="holds none of the model's blocks, so it must hold a"):
        identity_of(str(head_only), cache_dir=tmp_path / "cache")
    with trio.fail_after(120):
        async with local_swarm(model, [(0, 4)]) as (servers, client):
            assert await client.pin_model(str(head_only)) is None and client.pins == {}
            torch.manual_seed(4)
            input_ids = torch.randint(0, 256, (1, 4))
            ids, _ = await generate_tokens(
                client,
                ClientHead.load(Checkpoint.open(head_only)),
                input_ids,
                SessionSettings(model="tiny", num_blocks=4),
                SamplingConfig(max_new_tokens=5),
            )
    expected = reference_model(model).generate(
        input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert ids.tolist() == expected.tolist()


def _head_only(model: Path, folder: Path) -> Path:
    """What a client needs of ``model``: config.json and the tensors outside the blocks."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((model / "config.json").read_text())
    tensors = load_file(str(model / "model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if ".layers." not in k}, str(folder / "model.safetensors")
    )
    return folder


async def test_a_client_with_the_manifest_but_no_blocks_pins_the_weights(tmp_path: Path) -> None:
    from swarm_node.model.identity import MANIFEST_FILE

    a, b = _same_named_models(tmp_path)
    cache = tmp_path / "cache"
    expected_identity = identity_of(str(b), cache_dir=cache)
    client_folder = _head_only(b, tmp_path / "client" / "tiny")
    manifest = json.loads((b / CACHE_FILE).read_text())
    (client_folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert identity_of(str(client_folder), cache_dir=cache) == expected_identity
    # a manifest must add up and describe the folder it is in
    for field, value in (("blocks", ["0" * 64] * 6), ("config_digest", "1" * 64)):
        (client_folder / MANIFEST_FILE).write_text(json.dumps(manifest | {field: value}))
        with pytest.raises(ModelError, match="must describe this folder's model: .*manifest"):
            identity_of(str(client_folder), cache_dir=cache)
    identity_of(str(a), cache_dir=cache)
    other = json.loads((a / CACHE_FILE).read_text())
    (client_folder / MANIFEST_FILE).write_text(json.dumps(other))  # model a's, beside b's head
    with pytest.raises(ModelError, match="non-block tensors' digest"):
        identity_of(str(client_folder), cache_dir=cache)
    (client_folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    torch.manual_seed(6)
    input_ids = torch.randint(0, 256, (1, 4))
    expected = reference_model(b).generate(
        input_ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with trio.fail_after(120):
        async with local_swarm(
            a, [(0, 6), (0, 6)], per_server=[{"model": str(a)}, {"model": str(b)}]
        ) as (servers, client):
            pinned_identity = await client.pin_model(str(client_folder))
            assert pinned_identity is not None
            assert pinned_identity.digest == expected_identity.digest
            ids, stats = await generate_tokens(
                client,
                ClientHead.load(Checkpoint.open(client_folder)),
                input_ids,
                SessionSettings(model="tiny", num_blocks=6),
                SamplingConfig(max_new_tokens=6),
            )
    assert {h.server.peer_id for h in stats.chain} == {servers[1].peer_id}
    assert ids.tolist() == expected.tolist()


async def test_a_name_anyone_can_claim_does_not_hide_a_pinned_models_servers(
    tmp_path: Path,
) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo
    from multiaddr import Multiaddr

    from swarm_node.dht.finding import PROVIDERS_PER_KEY

    a, b = _same_named_models(tmp_path)
    with trio.fail_after(120):
        async with local_swarm(
            a, [(0, 6), (0, 6)], per_server=[{"model": str(a)}, {"model": str(b)}]
        ) as (servers, client):
            # strangers fill every key of the name "tiny", where the server of b announces too
            for shard in range(MODEL_KEY_SHARDS):
                key = bytes.fromhex(model_key("tiny", shard))
                for _ in range(PROVIDERS_PER_KEY):
                    stranger = ID.from_pubkey(create_new_key_pair().public_key)
                    info = PeerInfo(stranger, [Multiaddr("/ip4/127.0.0.1/tcp/9")])
                    for holder in (*servers, client):
                        holder.dht.kad.provider_store.add_provider(key, info)
            identity = await client.pin_model(str(a))
            assert identity is not None
            found = await client.find_servers("tiny", 6)
            assert [s.peer_id for s in found] == [servers[0].peer_id]
            chain = await client.find_chain("tiny", 6)
            assert [h.server.peer_id for h in chain] == [servers[0].peer_id]
