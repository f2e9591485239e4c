"""``swarm-node status``: the coverage map of a live swarm, as text and as JSON."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import pytest
import trio

from swarm_node.errors import ConfigError
from swarm_node.node.apps import commands
from swarm_node.node.apps.cli import build_parser
from tests.swarm_helpers import local_swarm


def status_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["status", *argv])


async def run_status(args: argparse.Namespace) -> str:
    out = io.StringIO()
    assert await commands.status(args, out) == 0
    return out.getvalue()


async def test_status_text_and_json(tiny_llama: Path) -> None:
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 2), (0, 3), (4, 6)]) as (servers, _):
            entry = servers[0].addrs[0]  # a server: a client joined through one answers no DHT
            text = await run_status(
                status_args("--initial-peers", entry, "--model", str(tiny_llama))
            )
            report = json.loads(
                await run_status(
                    status_args("--initial-peers", entry, "--model", "tiny-llama", "--json")
                )
            )
    print(text)
    lines = text.splitlines()
    assert lines[0] == "tiny-llama: 6 blocks, 3 server(s), MISSING blocks 3"
    assert lines[1].startswith("  block 0  ##") and "2 server(s), 200.0 tok/s" in lines[1]
    assert lines[4] == "  block 3  !! MISSING: no server"
    assert lines[7] == "servers:" and len(lines) == 13
    digest = servers[0].identity.digest
    assert lines[11:] == [
        "models (by digest):",
        f"  {digest[:12]} (this client's): 3 server(s) (3 float32), missing blocks 3",
    ]
    for peer in servers:
        (row,) = [line for line in lines[8:] if peer.peer_id[-8:] in line]
        assert (
            f"blocks {peer.server.start}:{peer.server.end}  100.0 tok/s" in row and " ms  " in row
        )
        assert f"{peer.server.cache_tokens_left} cache tokens free" in row
        assert f"  model {digest[:12]}  " in row  # then its reachability

    assert (report["model"], report["num_blocks"], report["missing"]) == ("tiny-llama", 6, [3])
    by_block = {b["block"]: set(b["servers"]) for b in report["blocks"]}
    ids = [p.peer_id for p in servers]
    assert by_block == {
        0: {ids[0], ids[1]},
        1: {ids[0], ids[1]},
        2: {ids[1]},
        3: set(),
        4: {ids[2]},
        5: {ids[2]},
    }
    assert {s["peer_id"] for s in report["servers"]} == set(ids)
    assert {s["model_digest"] for s in report["servers"]} == {digest}
    # by name only: the digests the swarm serves, none of them marked as this client's
    assert report["expected_digest"] == "" and [
        (v["digest"], v["local"], v["missing"]) for v in report["variants"]
    ] == [(digest, False, [3])]
    for s in report["servers"]:
        assert s["throughput"] == 100.0 and 0 < s["rtt_ms"] < 5000 and s["cache_tokens_left"] > 0


STATUS_PROBE = """
import sys
from swarm_node.node.apps.cli import main
code = main(sys.argv[1:])
print(code, sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


async def test_status_imports_neither_torch_nor_transformers(tiny_llama: Path) -> None:
    """The whole `swarm-node status` command (parse, import, lookup, pings, report) in a fresh
    process: it reads records and pings servers, so it loads neither torch (~1.2 s of a cold
    start) nor transformers."""
    argv = ["status", "--initial-peers", "", "--model", str(tiny_llama), "--json"]
    with trio.fail_after(90):
        async with local_swarm(tiny_llama, [(0, 3), (3, 6)]) as (servers, _):
            argv[2] = servers[0].addrs[0]
            done = await trio.run_process(
                [sys.executable, "-c", STATUS_PROBE, *argv], capture_stdout=True, check=False
            )
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0 and lines[-1] == "0 []", lines
    report = json.loads(lines[0])
    assert (report["num_blocks"], report["missing"], len(report["servers"])) == (6, [], 2)


async def test_status_needs_initial_peers_and_a_known_model(tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match="'--initial-peers' must name at least one peer"):
        await commands.status(status_args())
    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (servers, _):
            args = status_args("--initial-peers", servers[0].addrs[0], "--model", "no-such-model")
            with pytest.raises(Exception, match="no server of 'no-such-model' answered"):
                await commands.status(args, io.StringIO())
            args = status_args(
                "--initial-peers",
                servers[0].addrs[0],
                "--model",
                "no-such-model",
                "--num-blocks",
                "3",
            )
            text = await run_status(args)
    assert text.splitlines()[0] == "no-such-model: 3 blocks, 0 server(s), MISSING blocks 0-2"


def test_status_shows_a_server_moving() -> None:
    from swarm_node.dht.records import ServerRecord
    from swarm_node.node.apps.swarm_status import coverage_report, format_report

    def rec(peer: str, start: int, end: int, **kw: object) -> ServerRecord:
        return ServerRecord(
            peer_id=peer,
            addrs=(),
            model="m",
            start=start,
            end=end,
            throughput=5.0,
            cache_tokens_left=10,
            dtype="float32",
            version="0",
            **kw,
        )  # type: ignore[arg-type]

    report = coverage_report(
        [rec("peer-aaaaaaaa", 0, 4, moving_to=2), rec("peer-bbbbbbbb", 0, 4)],
        model="m",
        num_blocks=6,
        rtt={},
    )
    assert [s["moving_to"] for s in report["servers"]] == [[2, 6], None]
    rows = format_report(report).splitlines()[-2:]
    assert rows[0].endswith("moving to blocks 2:6") and "moving" not in rows[1]


async def test_status_shows_two_revisions_of_a_model_apart(tmp_path: Path) -> None:
    from tests.model_fixtures import make_tiny_model_dir

    old = make_tiny_model_dir(tmp_path / "old" / "tiny", num_layers=4, seed=1)
    new = make_tiny_model_dir(tmp_path / "new" / "tiny", num_layers=4, seed=2)
    spans = [(0, 4), (0, 2), (2, 4), (0, 2)]
    models = [old, new, new, old]
    with trio.fail_after(90):
        async with local_swarm(old, spans, per_server=[{"model": str(m)} for m in models]) as (
            servers,
            _,
        ):
            args = status_args(
                "--initial-peers", servers[0].addrs[0], "--model", str(new), "--json"
            )
            report = json.loads(await run_status(args))
    digest = {path: servers[models.index(path)].identity.digest for path in (old, new)}
    assert report["expected_digest"] == digest[new]
    variants = {v["digest"]: v for v in report["variants"]}
    assert set(variants) == set(digest.values())
    for path in (old, new):
        mine = {s.peer_id for s, m in zip(servers, models, strict=True) if m == path}
        assert set(variants[digest[path]]["servers"]) == mine
        assert variants[digest[path]]["local"] == (path == new)
        assert variants[digest[path]]["missing"] == []
        assert variants[digest[path]]["held_as"] == {"float32": 2}


async def test_a_lookup_past_its_deadline_is_a_clear_error(tiny_llama: Path) -> None:
    from dataclasses import replace

    from swarm_node.errors import MissingBlocksError
    from swarm_node.node.apps.swarm_status import gather_status

    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 6)]) as (_, client):
            client.client_config = replace(client.client_config, lookup_timeout=0.001)
            with pytest.raises(MissingBlocksError, match="took longer than 0.001 s"):
                await gather_status(client, "tiny-llama")


async def test_status_pings_each_server_once(tiny_llama: Path) -> None:
    # the block count comes from the servers' answers to the pings the map shows: no probe first
    from swarm_node.node.apps.swarm_status import gather_status
    from tests.test_first_token import count_pings

    with trio.fail_after(60):
        async with local_swarm(tiny_llama, [(0, 2), (2, 6), (2, 6)]) as (servers, client):
            pinged = count_pings(client)
            report = await gather_status(client, tiny_llama.name)
            assert report["num_blocks"] == 6 and report["missing"] == []
            assert sorted(pinged) == sorted(p.peer_id for p in servers)
            assert all(0 < s["rtt_ms"] < 5000 for s in report["servers"])
