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
from swarm_node.node.generation import GenerationStats, generate_tokens, open_token_session
from swarm_node.node.generation_options import sampling_from, stop_string_checker
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
        self._client_config = client_config
        self._nursery: trio.Nursery | None = None
        self._active_session: ModelSession | None = None
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
                async with open_peer(peer_config, client=client_config) as peer, trio.open_nursery() as nursery:
                    self._peer = peer
                    self._nursery = nursery
                    self._token = trio.lowlevel.current_trio_token()
                    self._stop = trio.Event()
                    self._ready.set()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                if not isinstance(exc, Exception):
                    raise

        trio.run(main)

    def inference_session(self, *, max_length: int | None = None) -> ModelSession:
        """A session kept open across ``generate`` calls (a chat): each call inside
        ``with model.inference_session(max_length=512):`` continues the text so far, and only the new
        tokens travel; the servers keep the rest in their attention caches."""
        return ModelSession(self, max_length or self._client_config.max_length)

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        generation_config: Any = None,
        *,
        streamer: Any = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        session: ModelSession | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Like transformers' generate: returns ``input_ids`` followed by the new tokens ``# (B, T + new)``.

        Settings come from ``generation_config`` (a transformers ``GenerationConfig``) overridden by
        keyword arguments of the same names: max_new_tokens, do_sample, temperature, top_p, top_k,
        repetition_penalty, eos_token_id, pad_token_id. ``stop_strings`` need the ``tokenizer``.
        Inside ``inference_session()`` (or with ``session=``) the call continues that session.
        """
        if self._token is None:
            raise ConfigError("the model is closed")
        session = session or self._active_session
        if input_ids is None:
            if session is None:
                raise ConfigError("'input_ids' are needed outside an inference session")
            input_ids = torch.zeros(1, 0, dtype=torch.int64)
        sampling = sampling_from(generation_config, kwargs, self.config, seed=seed)
        stopping = stop_string_checker(stop_strings, tokenizer, input_ids.shape[1])
        if streamer is not None:
            streamer.put(input_ids.cpu())
        on_tokens = (lambda t: streamer.put(t.cpu())) if streamer is not None else None

        async def run() -> torch.Tensor:
            ids, stats = await generate_tokens(
                self._peer, self.head, input_ids, model=self.model_id,
                num_blocks=self.config.num_hidden_layers, dtype=self.dtype,
                sampling=sampling, on_tokens=on_tokens, stopping=stopping,
                session=session.token_session if session is not None else None,
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


class ModelSession:
    """``with model.inference_session(max_length=...) as session:``: one inference session over the
    swarm, open until the block ends, continued by every ``generate`` call inside it."""

    def __init__(self, model: DistributedModelForCausalLM, max_length: int) -> None:
        self.model = model
        self.max_length = max_length
        self.token_session: Any = None
        self._close: trio.Event | None = None
        self._closed: trio.Event | None = None

    @property
    def position(self) -> int:
        """Tokens the session holds (the servers' caches hold all but the last sampled one)."""
        return 0 if self.token_session is None else int(self.token_session.ids.shape[1])

    async def _hold(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        model = self.model
        self._close, self._closed = trio.Event(), trio.Event()
        try:
            async with open_token_session(
                model._peer, model=model.model_id, num_blocks=model.config.num_hidden_layers,
                max_length=self.max_length, dtype=model.dtype,
            ) as token_session:
                self.token_session = token_session
                task_status.started()
                await self._close.wait()
        finally:
            self._closed.set()

    def __enter__(self) -> ModelSession:
        model = self.model
        if model._token is None or model._nursery is None:
            raise ConfigError("the model is closed")
        if model._active_session is not None:
            raise ConfigError("an inference session is already open on this model; close it first")
        nursery = model._nursery
        trio.from_thread.run(nursery.start, self._hold, trio_token=model._token)
        model._active_session = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        model = self.model
        model._active_session = None
        if model._token is None or self._close is None or self._closed is None:
            return
        close, closed = self._close, self._closed

        async def finish() -> None:
            close.set()
            await closed.wait()

        trio.from_thread.run(finish, trio_token=model._token)
