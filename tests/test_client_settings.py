"""SessionSettings and HopTuning: one session's settings, and each hop's part of the tuning."""

from __future__ import annotations

import pytest
import torch

from swarm_node import compression
from swarm_node.errors import ConfigError
from swarm_node.model.lora_pack import pack_lora
from swarm_node.node.client.settings import HopTuning, SessionSettings
from tests.test_remote_training import _client_lora


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"dtype": "float8"}, "'dtype' must be one of"),
        ({"max_length": -1}, "'max_length' must be an int >= 0, got -1"),
        ({"batch_size": 0}, "'batch_size' must be an int >= 1, got 0"),
        ({"num_blocks": True}, "'num_blocks' must be an int >= 0, got True"),
    ],
)
def test_bad_settings_are_refused(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SessionSettings(model="tiny", **fields)


def test_each_hop_gets_exactly_its_blocks_part() -> None:
    prompts = torch.randn(4, 2, 64, dtype=torch.float64)  # blocks 2..5
    lora = _client_lora(0).weights()  # blocks 1, 2, 4
    tuning = HopTuning(prompts=prompts, first=2, lora=lora, adapter="chat")
    fields = tuning.fields(3, 5, "float32")
    assert "adapter" in fields  # unresolved: what was given
    got = compression.decode(fields["prompts"], max_numel=10**6)
    assert got.dtype == torch.float32 and torch.equal(got, prompts[1:3].float())
    flat, manifest = pack_lora(lora.for_blocks(3, 5))
    assert fields["lora_manifest"] == manifest
    assert torch.equal(compression.decode(fields["lora"], max_numel=10**6), flat.detach())
    assert set(tuning.fields(5, 6, "float32")) == {"adapter", "prompts"}  # no LoRA in block 5


def test_a_client_owned_lora_replaces_the_named_adapter() -> None:
    assert HopTuning().resolved("chat").adapter == "chat"  # None: the client config's
    assert HopTuning(adapter="").resolved("chat").adapter == ""
    assert HopTuning(adapter="sql").resolved(None).adapter == "sql"
    owned = HopTuning(lora=_client_lora(0).weights()).resolved("chat")
    assert owned.adapter == "" and "adapter" not in owned.fields(0, 6, "float32")
