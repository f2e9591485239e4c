"""Operators: a server may say who runs it (`serve --operator`, a bounded field of its signed
record), and spot checks prefer a checker of another operator than the checked server's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import trio

from swarm_node.dht.records import decode_record, encode_record
from swarm_node.dht.routing import Hop
from swarm_node.errors import ConfigError, RemoteProtocolError
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.config import ServerConfig
from tests.swarm_helpers import local_swarm
from tests.test_dht_live_records import record as make_record
from tests.test_verification import CHECKED, records_of


def test_the_operator_travels_in_the_record_and_is_bounded() -> None:
    record = replace(make_record(), operator="lab-7 (a@example.org)")
    assert decode_record(encode_record(record)).operator == "lab-7 (a@example.org)"
    assert decode_record(encode_record(replace(record, operator=""))).operator == ""
    for bad in ("x" * 65, "line\nbreak"):
        with pytest.raises(RemoteProtocolError, match="operator"):
            decode_record(encode_record(replace(record, operator=bad)))
    with pytest.raises(ConfigError, match="'operator' must be printable and at most 64"):
        ServerConfig(model="m", start=0, end=1, operator="y" * 65)


async def test_a_checker_of_another_operator_is_preferred(tiny_llama: Path) -> None:
    # blocks 0-5 on three servers: the checked one and one more of operator "a", one of "b"; the
    # checker of every session is "b"'s, whichever server the lookup offers first
    model = tiny_llama.name
    operators = [{"operator": "a"}, {"operator": "a"}, {"operator": "b"}]
    checked = replace(CHECKED, verify_rate=1.0)
    with trio.fail_after(120):
        async with local_swarm(tiny_llama, [(0, 6)] * 3, client=checked, per_server=operators) as (
            servers,
            client,
        ):
            records = await records_of(client, model, servers)
            assert records[servers[2].peer_id].operator == "b"
            chain = [Hop(records[servers[0].peer_id], 0, 6)]
            for _ in range(3):
                settings = SessionSettings(model=model, max_length=8)
                async with client.inference_session(chain, settings) as session:
                    await session.step(torch.randn(1, 3, 64))
                    await session.settle()
                    (span,) = session.live_spans()
                    spans = session.verifier.checkers[span].spans
                    assert [s.hop.server.peer_id for s in spans] == [servers[2].peer_id]
                    assert session.verifier.stats.positions >= 3
