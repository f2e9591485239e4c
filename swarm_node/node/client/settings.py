"""What a client's session is (``SessionSettings``) and what each of its hops carries for fine-tuning
(``HopTuning``): one object each, shared by inference sessions and training passes.

Knows nothing of the network: ``HopTuning.fields`` only encodes a hop's part into request fields.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from swarm_node import compression
from swarm_node.errors import ConfigError, check_int
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.model.lora_pack import pack_lora


@dataclass(frozen=True, kw_only=True)
class SessionSettings:
    """A session of ``model``'s blocks; ``None``: the client config's choice."""

    model: str
    num_blocks: int = 0  # the model's blocks, to find a chain (0: the chain is given)
    dtype: str = "float32"
    compression: str | None = None  # codec on the wire
    push: bool | None = None  # servers send each step's output straight to the next server
    max_length: int = 0  # positions the servers' caches hold (0: generate_tokens sizes them)
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ConfigError(f"'dtype' must be one of {tuple(TORCH_DTYPES)}, got {self.dtype!r}")
        for name, low in (("num_blocks", 0), ("max_length", 0), ("batch_size", 1)):
            check_int(name, getattr(self, name), low)


@dataclass(frozen=True, kw_only=True, eq=False)
class HopTuning:
    """What fine-tuning adds to every hop, each hop getting its blocks' part: deep ``prompts``
    ``# (L, P, H)`` of blocks ``first..first+L-1``, a LoRA ``adapter`` the servers hold, by name
    (None: the client config's; "": none), or a client-owned ``lora`` (model.LoraWeights) instead."""

    prompts: torch.Tensor | None = None
    first: int = 0
    adapter: str | None = None
    lora: Any = None

    def resolved(self, default_adapter: str | None) -> HopTuning:
        """With the adapter decided: ``default_adapter`` for None, "" beside a client-owned LoRA."""
        adapter = self.adapter if self.adapter is not None else default_adapter
        return replace(self, adapter="" if self.lora is not None else adapter or "")

    def fields(self, start: int, end: int, dtype: str) -> dict[str, Any]:
        """The request fields for blocks ``start..end-1`` (prompts and LoRA travel exactly)."""
        out: dict[str, Any] = {}
        if self.adapter:
            out["adapter"] = self.adapter
        if self.prompts is not None:
            part = self.prompts[start - self.first : end - self.first]
            out["prompts"] = compression.encode(_exact(part, dtype), "none")
        part = None if self.lora is None else self.lora.for_blocks(start, end)
        if part is not None and part.modules:
            flat, out["lora_manifest"] = pack_lora(part)
            out["lora"] = compression.encode(_exact(flat, dtype), "none")
        return out


def _exact(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    return tensor.detach().to(TORCH_DTYPES[dtype]).contiguous()
