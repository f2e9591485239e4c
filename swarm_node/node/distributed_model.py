"""A transformers-style client: ``DistributedModelForCausalLM.from_pretrained(model, initial_peers=[...])``.

For plain (non-trio) Python: a client peer runs in a background thread with its own trio loop, and
``generate`` hands work to it. Inside a trio application use ``open_peer`` directly instead.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
import trio

from swarm_node.errors import ConfigError
from swarm_node.node.config import ClientConfig, PeerConfig
from swarm_node.node.generation import GenerationStats, SamplingConfig, generate_tokens
from swarm_node.node.peer import model_id_of, open_peer
from swarm_node.node.server import TORCH_DTYPES


class DistributedModelForCausalLM:
    """Embeddings, final norm and LM head here; the transformer blocks on the swarm."""

    def __init__(self, *, path: Any, model_id: str, head: Any, config: Any, dtype: str, peer_config: PeerConfig, client_config: ClientConfig) -> None:
        self.path = path
        self.model_id = model_id
        self.head = head
        self.config = config
        self.dtype = dtype
        self.last_stats: GenerationStats | None = None
        self._peer: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._thread_main, args=(peer_config, client_config), name="swarm-node-client", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        initial_peers: Sequence[str],
        dtype: str = "float32",
        client_config: ClientConfig | None = None,
    ) -> DistributedModelForCausalLM:
        from swarm_node.model import Checkpoint, ClientHead, resolve_model

        if dtype not in TORCH_DTYPES:
            raise ConfigError(f"'dtype' must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
        if not initial_peers:
            raise ConfigError("'initial_peers' must name at least one peer of the swarm, got none")
        path = resolve_model(model)
        checkpoint = Checkpoint.open(path)
        head = ClientHead.load(checkpoint, dtype=TORCH_DTYPES[dtype])
        return cls(
            path=path,
            model_id=model_id_of(model),
            head=head,
            config=checkpoint.config,
            dtype=dtype,
            peer_config=PeerConfig(initial_peers=tuple(initial_peers)),
            client_config=client_config or ClientConfig(),
        )

    def _thread_main(self, peer_config: PeerConfig, client_config: ClientConfig) -> None:
        async def main() -> None:
            try:
                async with open_peer(peer_config, client=client_config) as peer:
                    self._peer = peer
                    self._token = trio.lowlevel.current_trio_token()
                    self._stop = trio.Event()
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                if not isinstance(exc, Exception):
                    raise

        trio.run(main)

    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
    ) -> torch.Tensor:
        """Like transformers' generate: returns the prompt followed by the new tokens ``# (B, T + new)``."""
        if self._token is None:
            raise ConfigError("the model is closed")
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        if eos_token_id is None:
            eos_ids: tuple[int, ...] = ()
        elif isinstance(eos_token_id, int):
            eos_ids = (eos_token_id,)
        else:
            eos_ids = tuple(eos_token_id)
        if pad_token_id is None:
            pad_token_id = getattr(self.config, "pad_token_id", None)
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p,
            seed=seed,
            eos_token_ids=eos_ids,
            pad_token_id=pad_token_id,
        )
        if streamer is not None:
            streamer.put(input_ids.cpu())
        on_tokens = (lambda t: streamer.put(t.cpu())) if streamer is not None else None

        async def run() -> torch.Tensor:
            ids, stats = await generate_tokens(
                self._peer, self.head, input_ids, model=self.model_id,
                num_blocks=self.config.num_hidden_layers, dtype=self.dtype,
                sampling=sampling, on_tokens=on_tokens,
            )
            self.last_stats = stats
            return ids

        try:
            return trio.from_thread.run(run, trio_token=self._token)
        finally:
            if streamer is not None:
                streamer.end()

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._token = None
            self._thread.join(timeout=10)

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
