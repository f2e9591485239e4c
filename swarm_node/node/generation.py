"""The client's decode loop: embed locally, run the chain remotely, norm + LM head + sampling locally."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from swarm_node.dht.routing import Hop
from swarm_node.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"'max_new_tokens' must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"'temperature' must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"'top_p' must be in (0, 1], got {self.top_p!r}")


@dataclass(kw_only=True)
class GenerationStats:
    chain: list[Hop] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    remote_time: float = 0.0  # seconds spent waiting for the chain (steps)

    @property
    def tokens_per_second(self) -> float:
        """Steady decode rate: tokens after the first over the time after the first."""
        steady = self.total_time - self.time_to_first_token
        return (self.new_tokens - 1) / steady if self.new_tokens > 1 and steady > 0 else 0.0


async def generate_tokens(
    peer: Any,
    head: Any,
    input_ids: torch.Tensor,
    *,
    model: str,
    num_blocks: int,
    dtype: str,
    sampling: SamplingConfig,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
    chain: Sequence[Hop] | None = None,
    compression: str | None = None,
    push: bool | None = None,
    adapter: str | None = None,
    prefix: torch.Tensor | None = None,
    deep_prompts: torch.Tensor | None = None,
    lora: Any = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """input_ids ``# (B, T)`` -> all ids ``# (B, T + new)``, like transformers' generate.

    ``adapter``: a LoRA adapter servers hold, by name (default: the client config's).
    Prompt tuning: ``prefix`` ``# (P, H)`` goes before the prompt's embeddings, and the servers add
    ``deep_prompts`` ``# (L, P, H)`` to those P positions before each block (model/prompts.py).
    ``lora``: a client-owned model.LoraWeights the servers apply (instead of a named ``adapter``).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ConfigError(f"'input_ids' must have shape (batch, tokens >= 1), got {tuple(input_ids.shape)}")
    from swarm_node.model import sample_next_token

    if lora is not None:
        adapter = ""  # a client-owned LoRA replaces any named adapter of the client config
    t0 = time.perf_counter()
    batch, prompt_len = input_ids.shape
    stats = GenerationStats(prompt_tokens=prompt_len)
    max_length = prompt_len + sampling.max_new_tokens + (0 if prefix is None else prefix.shape[0])
    if chain is None:
        chain = await peer.find_chain(
            model, num_blocks, max_length=max_length, batch_size=batch, push=push, adapter=adapter
        )
    stats.chain = list(chain)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    eos = torch.tensor(sampling.eos_token_ids or [-1])
    pad = sampling.pad_token_id if sampling.pad_token_id is not None else (sampling.eos_token_ids or (0,))[0]
    finished = torch.zeros(batch, dtype=torch.bool)
    ids = input_ids
    async with peer.inference_session(
        list(chain), model=model, max_length=max_length, dtype=dtype, batch_size=batch,
        compression=compression, push=push, adapter=adapter, prompts=deep_prompts, lora=lora,
    ) as session:
        hidden = await trio.to_thread.run_sync(head.embed, input_ids)  # (B, T, H)
        if prefix is not None:
            hidden = torch.cat([prefix.to(hidden.dtype).expand(batch, -1, -1), hidden], dim=1)  # (B, P + T, H)
        for i in range(sampling.max_new_tokens):
            t_step = time.perf_counter()
            out = await session.step(hidden)  # (B, T, H)
            stats.remote_time += time.perf_counter() - t_step

            def pick(out: torch.Tensor = out) -> torch.Tensor:
                logits = head.logits(out[:, -1:, :])[:, -1, :].float()  # (B, V)
                return sample_next_token(
                    logits, temperature=sampling.temperature, top_p=sampling.top_p, generator=generator
                )

            token = await trio.to_thread.run_sync(pick)  # (B,)
            token = torch.where(finished, torch.full_like(token, pad), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            if i == 0:
                stats.time_to_first_token = time.perf_counter() - t0
            stats.new_tokens += 1
            if on_tokens is not None:
                on_tokens(token)
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or i + 1 == sampling.max_new_tokens:
                break
            hidden = await trio.to_thread.run_sync(head.embed, token[:, None])
    stats.total_time = time.perf_counter() - t0
    return ids, stats
