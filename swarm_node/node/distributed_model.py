"""Transformers-style clients: ``DistributedModelForCausalLM.from_pretrained(model, initial_peers=[...])``.

A torch module holding what a client holds (embeddings, final norm, LM head, all frozen) and, with
``tuning_mode="ptune"`` or ``"deep_ptune"``, trainable prompts (``model.ptune``), with
``tuning_mode="lora"`` a trainable client-owned LoRA (``model.lora``, sent with every request); the transformer
blocks run on the swarm through ``model.transformer`` (a RemoteSequential), so ``loss.backward()``
reaches the prompts through remote blocks and a normal torch optimizer trains them. The peer runs in a
background thread with its own trio loop (``ClientLoop``); inside a trio application use ``open_peer``
and ``RemoteSequential`` directly. Batches are right-padded: positions after a sequence's last token
do not change its earlier ones (causal attention), so ``attention_mask`` only marks them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel

from swarm_node.errors import ConfigError, check_int
from swarm_node.model.bundled import model_id_of
from swarm_node.model.client_lora import DEFAULT_TARGETS, ClientLora
from swarm_node.model.dtypes import TORCH_DTYPES
from swarm_node.model.prompts import TUNING_MODES as PROMPT_MODES
from swarm_node.node.client.generation import GenerationStats, continue_tokens, generate_tokens
from swarm_node.node.client.generation_options import (
    SUPPORTED,
    sampling_from,
    speculation_from,
    stop_string_checker,
)
from swarm_node.node.client.model_session import ModelSession
from swarm_node.node.client.remote_cache import NO_ROLLBACK, RemoteCache, can_crop
from swarm_node.node.client.remote_sequential import RemoteSequential
from swarm_node.node.client.settings import HopTuning, SessionSettings
from swarm_node.node.client_loop import ClientLoop
from swarm_node.node.config import ClientConfig, PeerConfig

TUNING_MODES = (*PROMPT_MODES, "lora")


class DistributedModelBase(PreTrainedModel):
    """Embeddings, norm and head here (frozen), optional prompts (trainable), blocks on the swarm.
    A transformers ``PreTrainedModel`` of the family's config (``.config``, ``.device``, ``.dtype``:
    the head's), built from the checkpoint's client part: ``from_pretrained`` is ours."""

    main_input_name = "input_ids"

    def __init__(
        self,
        *,
        path: Any,
        model_id: str,
        head: Any,
        config: Any,
        dtype: str,
        loop: ClientLoop,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        compression: str | None = None,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_targets: Sequence[str] = DEFAULT_TARGETS,
        min_pieces: int = 1,
        model_digest: str = "",  # model/identity.py's digest of the weights (tuned files carry it)
    ) -> None:
        from swarm_node.model.lora import config_linear_shapes
        from swarm_node.model.prompts import PromptTuning

        super().__init__(config)
        self.path = path
        self.model_id = model_id
        self.model_digest = model_digest
        self.dtype_name = dtype  # of the swarm's sessions ("float32", ...); ``.dtype`` is torch's
        self.head = head
        self.loop = loop
        self.tuning_mode = tuning_mode
        self.ptune = None
        self.lora = None
        if tuning_mode == "lora":  # client-owned: servers apply it per request and it trains here
            self.lora = ClientLora(
                shapes=config_linear_shapes(config),
                blocks=range(config.num_hidden_layers),
                targets=lora_targets,
                rank=lora_rank,
                alpha=lora_alpha,
                dtype=TORCH_DTYPES[dtype],
            )
        elif tuning_mode is not None:
            std = float(head.embed_tokens.weight.float().std())
            self.ptune = PromptTuning(
                mode=tuning_mode,
                pre_seq_len=pre_seq_len,
                hidden_size=head.hidden_size,
                num_blocks=config.num_hidden_layers,
                init_std=std,
                dtype=TORCH_DTYPES[dtype],
            )
        self.settings = SessionSettings(  # of inference sessions (the client config's codec)
            model=model_id, num_blocks=config.num_hidden_layers, dtype=dtype
        )
        self.transformer = RemoteSequential(
            loop.peer,
            model=model_id,
            num_blocks=config.num_hidden_layers,
            dtype=dtype,
            compression=compression,
            trio_token=loop.token,
            min_pieces=min_pieces,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        initial_peers: Sequence[str],
        dtype: str = "float32",
        device: str = "cpu",
        tuning_mode: str | None = None,
        pre_seq_len: int = 16,
        client_config: ClientConfig | None = None,
        compression: str | None = None,
        **fields: Any,
    ) -> Any:
        """Load the client's part of ``model`` and join the swarm at ``initial_peers``.

        ``tuning_mode``: None (nothing to train), ``"ptune"`` / ``"deep_ptune"`` (``pre_seq_len``
        prompt vectors) or ``"lora"`` (client-owned LoRA; ``lora_rank``, ``lora_alpha``,
        ``lora_targets`` among ``fields``). ``device``: where the head (embeddings, norm, LM head)
        and what trains here live ("cpu", "cuda", "cuda:N", "mps" or "auto"); ``dtype`` "auto"
        is the device's (model/devices.py), to match servers on the same kind of device."""
        from swarm_node.model import Checkpoint, ClientHead, resolve_model
        from swarm_node.model.devices import resolve_device, resolve_dtype

        torch_device = resolve_device(device)
        dtype = resolve_dtype(dtype, torch_device)
        if dtype not in TORCH_DTYPES:
            raise ConfigError(f"'dtype' must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
        if tuning_mode not in TUNING_MODES:
            raise ConfigError(f"'tuning_mode' must be one of {TUNING_MODES}, got {tuning_mode!r}")
        if not initial_peers:
            raise ConfigError("'initial_peers' must name at least one peer of the swarm, got none")
        path = resolve_model(model)
        checkpoint = Checkpoint.open(path)
        head = ClientHead.load(checkpoint, dtype=TORCH_DTYPES[dtype], device=torch_device)
        loop = ClientLoop(
            PeerConfig(initial_peers=tuple(initial_peers)), client_config or ClientConfig()
        )
        try:
            identity = loop.run(loop.peer.pin_model, str(path))
            model = cls(
                path=path,
                model_id=model_id_of(str(path)) if identity is None else identity.name,
                model_digest="" if identity is None else identity.digest,
                head=head,
                config=checkpoint.config,
                dtype=dtype,
                loop=loop,
                tuning_mode=tuning_mode,
                pre_seq_len=pre_seq_len,
                compression=compression,
                **fields,
            )
            on_host = torch_device.type == "cpu"
            return model if on_host else model.to(torch_device)  # prompts or LoRA trained here
        except BaseException:
            loop.close()
            raise

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.head.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head.lm_head

    @property
    def pre_seq_len(self) -> int:
        return 0 if self.ptune is None else self.ptune.pre_seq_len

    def body(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids ``# (B, T)`` (or their embeddings ``# (B, T, H)``, e.g. PEFT's prompt tuning
        puts its virtual tokens first) -> the last block's output ``# (B, P + T, H)`` (soft prompt
        first)."""
        if inputs_embeds is None:
            if (
                not isinstance(input_ids, torch.Tensor)
                or input_ids.ndim != 2
                or input_ids.shape[1] < 1
            ):
                raise ConfigError(
                    f"'input_ids' must be a (batch, tokens >= 1) tensor, got {getattr(input_ids, 'shape', input_ids)!r}"
                )
            with torch.no_grad():
                hidden = self.head.embed(input_ids).clone()  # (B, T, H), not an inference tensor
        else:
            width = self.head.hidden_size
            shape = getattr(inputs_embeds, "shape", inputs_embeds)
            if (
                not isinstance(inputs_embeds, torch.Tensor)
                or len(shape) != 3
                or shape[1] < 1
                or shape[2] != width
            ):
                raise ConfigError(
                    f"'inputs_embeds' must be a (batch, tokens >= 1, {width}) tensor, got {shape!r}"
                )
            hidden = self.head.block_input(inputs_embeds.to(self.head.embed_tokens.weight.dtype))
        if attention_mask is not None:
            _check_right_padded(attention_mask, hidden[..., 0])
        prompts = None
        if self.ptune is not None:
            hidden = self.ptune.prepend(hidden)  # (B, P + T, H)
            prompts = self.ptune.deep_prompts
        return self.transformer(hidden, prompts, None if self.lora is None else self.lora.weights())

    def save_tuned(self, path: Any) -> Any:
        """Save what this model trains (prompts or its own LoRA) as a tuned file (model/tuned_files.py)."""
        from swarm_node.model.tuned_files import save_tuned, tuned_of

        lora = None if self.lora is None else self.lora.weights()
        tuned = tuned_of(
            self.model_id,
            self.tuning_mode,
            num_blocks=self.config.num_hidden_layers,
            ptune=self.ptune,
            lora=lora,
            model_digest=self.model_digest,
        )
        return save_tuned(path, tuned, config=self.config)

    def load_tuned(self, path: Any) -> None:
        """Load a tuned file saved for this model and tuning mode into the trainable tensors."""
        from swarm_node.model.tuned_files import copy_tuned, load_tuned

        tuned = load_tuned(
            path,
            model=self.model_id,
            config=self.config,
            dtype=TORCH_DTYPES[self.dtype_name],
            model_digest=self.model_digest,
        )
        copy_tuned(tuned, ptune=self.ptune, lora=None if self.lora is None else self.lora.weights())

    def close(self) -> None:
        self.loop.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_right_padded(mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
        raise ConfigError(
            f"'attention_mask' must have the shape of 'input_ids' {tuple(input_ids.shape)}, got {getattr(mask, 'shape', mask)!r}"
        )
    ones = mask.long()
    if bool((ones[:, 1:] > ones[:, :-1]).any()) or bool((ones[:, 0] == 0).any()):
        raise ConfigError(
            "'attention_mask' must mark right padding (1s then 0s, at least one 1): pad on the right"
        )


class DistributedModelForCausalLM(DistributedModelBase, GenerationMixin):
    """``forward(input_ids, labels=...)`` -> loss and logits; ``generate`` is transformers' own
    (every strategy, logits processor, stopping criterion, streamer; beam search reorders the
    servers' caches), with our decode loop as the fast path for the calls it covers (see ``generate``)."""

    last_stats: GenerationStats | None = None
    active_session: ModelSession | None = None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> Any:
        """Logits ``# (B, T, V)`` of the input positions (not the prompt's), and with ``labels``
        (-100: ignored) the mean next-token cross-entropy, as transformers computes it. With a
        ``cache`` (generate() makes one) the new positions go through the servers' caches."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        asked = [k for k in ("output_attentions", "output_hidden_states") if kwargs.get(k)]
        if asked:
            raise ConfigError(f"{asked} cannot be returned: the blocks run on the swarm")
        if cache is not None and not isinstance(cache, RemoteCache):
            raise ConfigError(
                f"'cache' must be the RemoteCache generate() makes (the servers hold the attention "
                f"caches), got {type(cache).__name__}"
            )
        if isinstance(cache, RemoteCache):
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ConfigError(
                    "'attention_mask' must be all ones in generation: the servers' caches hold "
                    "every position (give rows of one length, without padding)"
                )
            if inputs_embeds is None:
                with torch.no_grad():
                    inputs_embeds = self.head.embed(input_ids)  # (B, T, H)
            else:
                inputs_embeds = self.head.block_input(inputs_embeds)
            out = cache.step(inputs_embeds)  # (B, T, H)
            logits = self.head.logits(out[:, -logits_to_keep:] if logits_to_keep else out)
            return CausalLMOutputWithPast(logits=logits, cache=cache)
        hidden = self.body(input_ids, attention_mask, inputs_embeds)[:, self.pre_seq_len :]
        logits = self.head.logits(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ConfigError(
                    f"'labels' must have the shape of the inputs {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}"
                )
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def tuned_inputs(self) -> tuple[torch.Tensor | None, HopTuning]:
        """What training made that generation uses too: (soft prompt, deep prompts and client LoRA)."""
        prefix = deep = None
        if self.ptune is not None:
            prefix = self.ptune.prompts.detach()
            deep = None if self.ptune.deep_prompts is None else self.ptune.deep_prompts.detach()
        lora = None if self.lora is None else self.lora.weights()
        return prefix, HopTuning(prompts=deep, lora=lora)

    def inference_session(self, *, max_length: int | None = None) -> ModelSession:
        """A session kept open across ``generate`` calls (a chat): each call inside
        ``with model.inference_session(max_length=512):`` continues the text so far, and only the new
        tokens travel; the servers keep the rest in their attention caches."""
        return ModelSession(self, max_length or self.loop.client_config.max_length)

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: Any = None,
        *,
        streamer: Any = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        session: ModelSession | None = None,
        seed: int | None = None,
        decode_loop: str = "auto",
        **kwargs: Any,
    ) -> Any:
        """transformers' generate over the swarm: returns ``input_ids`` followed by the new tokens
        ``# (B, T + new)`` (or transformers' output object with ``return_dict_in_generate``).

        ``decode_loop``: "transformers" (transformers' loop; every setting), "swarm" (ours:
        greedy and sampling with max_new_tokens, do_sample, temperature, top_p, top_k,
        repetition_penalty, eos_token_id, pad_token_id; a ``seed`` of its own generator) or "auto":
        ours for greedy with those settings only and for calls with ``seed``, transformers' for
        everything else (sampling draws from torch's global generator, as transformers does).
        Inside ``inference_session()`` (or with ``session=``) the call continues that session:
        ``inputs`` are the new tokens only, and the answer starts with them.
        Speculative decoding as transformers spells it: ``prompt_lookup_num_tokens=N`` (drafts
        from the text so far) or ``assistant_model=`` (a small local model with the same
        tokenizer); greedy output stays the same, sampling keeps its distribution (our loop runs
        it for greedy and with ``seed``; transformers' assisted generation otherwise, cropping
        the servers' caches).
        """
        if self.loop.closed:
            raise ConfigError("the model is closed")
        if decode_loop not in DECODE_LOOPS:
            raise ConfigError(f"'decode_loop' must be one of {DECODE_LOOPS}, got {decode_loop!r}")
        session = session or self.active_session
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        ours = decode_loop == "swarm" or (
            decode_loop == "auto" and swarm_loop_covers(generation_config, kwargs, seed)
        )
        if ours:
            return self._swarm_generate(
                input_ids,
                generation_config,
                streamer,
                stop_strings,
                tokenizer,
                session,
                seed,
                kwargs,
            )
        if stop_strings is not None:
            kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
        assisted = kwargs.get("assistant_model") is not None or kwargs.get(
            "prompt_lookup_num_tokens", getattr(generation_config, "prompt_lookup_num_tokens", None)
        )
        if assisted and not can_crop():  # e.g. decode_loop="transformers" on an older build
            raise NotImplementedError(NO_ROLLBACK)
        if session is not None:
            return self._continue_session(input_ids, generation_config, session, streamer, kwargs)
        t0 = time.perf_counter()
        self._caches: list[RemoteCache] = []
        self._prompt_tokens = 0 if input_ids is None else input_ids.shape[1]
        try:
            out = GenerationMixin.generate(
                self, input_ids, generation_config, streamer=streamer, **kwargs
            )
        finally:
            for cache in self._caches:
                cache.close()
        opened = [c.token_session for c in self._caches if c.token_session is not None]
        if opened:
            self._note_stats(opened[-1], input_ids, out, t0)
        return out

    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict[str, Any],
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """transformers' hook: the cache of one generate() call is a session over the swarm."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
            return
        cache = RemoteCache(
            run=self.loop.run,
            max_length=max_cache_length,
            opener=self._open,
            prompt_tokens=self._prompt_tokens,
        )
        self._caches.append(cache)
        model_kwargs["cache"] = cache

    def _open(self, batch_size: int, max_length: int) -> tuple[Any, Callable[[], None]]:
        session = ModelSession(self, max_length + self.pre_seq_len, batch_size=batch_size)
        session.open()
        return session.token_session, session.close

    def _continue_session(
        self,
        input_ids: torch.Tensor | None,
        generation_config: Any,
        session: ModelSession,
        streamer: Any,
        kwargs: dict[str, Any],
    ) -> Any:
        """transformers' loop on an open session: the whole text so far goes in (transformers
        sends only what the servers' caches lack), the answer is cut back to ``input_ids`` + new."""
        ts = session.token_session
        before = ts.ids.shape[1]
        new = torch.zeros(ts.batch_size, 0, dtype=torch.int64) if input_ids is None else input_ids
        whole = torch.cat([ts.ids, new.to(torch.int64)], dim=1)
        if whole.shape[1] < 1:
            raise ConfigError(
                "'input_ids' must have at least one token when the session holds none"
            )
        kwargs.setdefault("attention_mask", torch.ones_like(whole))
        cache = RemoteCache(
            run=self.loop.run, max_length=ts.max_length - ts.prefix_len, token_session=ts
        )
        t0 = time.perf_counter()
        out = GenerationMixin.generate(
            self, whole, generation_config, streamer=streamer, cache=cache, **kwargs
        )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        if sequences.shape[0] == ts.batch_size:
            ts.ids = sequences
        self._note_stats(ts, new, sequences[:, before:], t0)
        if isinstance(out, torch.Tensor):
            return sequences[:, before:]
        out.sequences = sequences[:, before:]
        return out

    def _note_stats(self, ts: Any, input_ids: Any, out: Any, t0: float) -> None:
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = 0 if input_ids is None else input_ids.shape[1]
        recovery = getattr(ts.session, "recovery", None)
        self.last_stats = GenerationStats(
            chain=list(ts.chain),
            prompt_tokens=prompt,
            new_tokens=sequences.shape[1] - prompt,
            total_time=time.perf_counter() - t0,
            recoveries=[] if recovery is None else list(recovery.events),
            hedges=[] if recovery is None else list(recovery.hedges),
        )

    def _swarm_generate(
        self,
        input_ids: torch.Tensor | None,
        generation_config: Any,
        streamer: Any,
        stop_strings: str | Sequence[str] | None,
        tokenizer: Any,
        session: ModelSession | None,
        seed: int | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Our decode loop (generation.py): the fast path for greedy and seeded sampling."""
        if input_ids is None:
            if session is None:
                raise ConfigError("'input_ids' are needed outside an inference session")
            input_ids = torch.zeros(1, 0, dtype=torch.int64)
        speculation, kwargs = speculation_from(generation_config, kwargs)
        sampling = sampling_from(generation_config, kwargs, self.config, seed=seed)
        stopping = stop_string_checker(stop_strings, tokenizer, input_ids.shape[1])
        if streamer is not None:
            streamer.put(input_ids.cpu())
        on_tokens = (lambda t: streamer.put(t.cpu())) if streamer is not None else None

        async def run() -> torch.Tensor:
            if session is not None:  # an open session carries its own tuning (set when it opened)
                ids, stats = await continue_tokens(
                    self.head,
                    session.token_session,
                    input_ids,
                    sampling,
                    on_tokens,
                    stopping,
                    speculation,
                )
            else:
                prefix, tuning = self.tuned_inputs()
                ids, stats = await generate_tokens(
                    self.loop.peer,
                    self.head,
                    input_ids,
                    self.settings,
                    sampling,
                    tuning=tuning,
                    prefix=prefix,
                    on_tokens=on_tokens,
                    stopping=stopping,
                    speculation=speculation,
                )
            self.last_stats = stats
            return ids

        try:
            return self.loop.run(run)
        finally:
            if streamer is not None:
                streamer.end()


DECODE_LOOPS = ("auto", "swarm", "transformers")


def swarm_loop_covers(generation_config: Any, kwargs: dict[str, Any], seed: int | None) -> bool:
    """Does our decode loop give what transformers' would (greedy with the settings it knows), or
    was it asked for (``seed``, its own generator's)?"""
    if seed is not None:
        return True
    values = dict(kwargs)
    if generation_config is not None:
        diff = getattr(generation_config, "to_diff_dict", None)  # a GenerationConfig's set fields
        values = {**(diff() if diff else vars(generation_config)), **values}
    speculative = {"assistant_model", "prompt_lookup_num_tokens"}  # our loop speculates too
    extra = set(values) - set(SUPPORTED) - {"transformers_version", "bos_token_id"} - speculative
    return not extra and not values.get("do_sample")


class DistributedModelForSequenceClassification(DistributedModelBase):
    """A trainable linear ``score`` head on the last real token's final hidden state (as
    transformers' LlamaForSequenceClassification), over the remote blocks."""

    def __init__(self, *, num_labels: int = 2, **fields: Any) -> None:
        super().__init__(**fields)
        check_int("num_labels", num_labels, 1)
        self.num_labels = num_labels
        self.score = torch.nn.Linear(
            self.head.hidden_size, num_labels, bias=False, dtype=TORCH_DTYPES[self.dtype_name]
        )
        torch.nn.init.normal_(self.score.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """Logits ``# (B, num_labels)``; with ``labels``, cross-entropy (or MSE for one label)."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.body(input_ids, attention_mask)  # (B, P + T, H)
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1])  # (B,)
        if attention_mask is not None:
            lengths = attention_mask.long().sum(dim=1)
        last = hidden[torch.arange(hidden.shape[0]), self.pre_seq_len + lengths - 1]  # (B, H)
        logits = self.score(self.head.norm(last.to(self.score.weight.dtype)))  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits)
