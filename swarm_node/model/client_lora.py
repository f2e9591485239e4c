"""LoRA weights a client owns and trains: ``ClientLora(...).weights() -> LoraWeights`` of Parameters.

The client keeps A ``# (r, in)`` and B ``# (out, r)`` for chosen Linears of chosen blocks, initialised
as PEFT does (A Kaiming-uniform, B zeros, so an untrained adapter changes nothing), and sends them
with its requests; the servers apply them for that request only and send back their gradients.
Knows nothing of peers or the wire (model/lora_pack.py flattens a LoraWeights for it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from swarm_node.errors import ConfigError, check_int
from swarm_node.model.lora import MAX_RANK, LoraModule, LoraWeights, Shapes

DEFAULT_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")  # PEFT's default for Llama


class ClientLora(torch.nn.Module):
    """Trainable LoRA for ``targets`` (Linear names inside a block) of ``blocks``."""

    def __init__(
        self,
        *,
        shapes: Shapes,
        blocks: Sequence[int],
        targets: Sequence[str] = DEFAULT_TARGETS,
        rank: int = 8,
        alpha: float = 16.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_int("lora_rank", rank, 1, MAX_RANK)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not (math.isfinite(alpha) and alpha > 0)
        ):
            raise ConfigError(f"'lora_alpha' must be a number > 0, got {alpha!r}")
        unknown = [t for t in targets if t not in shapes]
        if not targets or unknown:
            raise ConfigError(
                f"'lora_targets' must name Linears of a block, some of {sorted(shapes)}, got {list(targets)!r}"
            )
        if not blocks or len(set(blocks)) != len(blocks):
            raise ConfigError(f"'blocks' must be distinct block indices, got {list(blocks)!r}")
        self.blocks = tuple(sorted(blocks))
        self.targets = tuple(sorted(targets))
        self.rank = rank
        self.scale = float(alpha) / rank
        self.a = torch.nn.ParameterDict()
        self.b = torch.nn.ParameterDict()
        for block in self.blocks:
            for name in self.targets:
                fan_in, fan_out = shapes[name]
                a = torch.empty(rank, fan_in, dtype=dtype)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT's lora_A
                self.a[self._key(block, name)] = torch.nn.Parameter(a)
                self.b[self._key(block, name)] = torch.nn.Parameter(
                    torch.zeros(fan_out, rank, dtype=dtype)
                )

    @staticmethod
    def _key(block: int, name: str) -> str:
        return f"{block}:{name}".replace(".", "/")  # ParameterDict keys may not hold dots

    def weights(self) -> LoraWeights:
        """The adapter as the model/ API takes it; its tensors are this module's Parameters."""
        return LoraWeights(
            {
                block: {
                    name: LoraModule(
                        self.a[self._key(block, name)], self.b[self._key(block, name)], self.scale
                    )
                    for name in self.targets
                }
                for block in self.blocks
            }
        )

    def extra_repr(self) -> str:
        return f"blocks={len(self.blocks)}, targets={list(self.targets)}, rank={self.rank}, scale={self.scale:g}"
