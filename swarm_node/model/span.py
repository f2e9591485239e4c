"""A contiguous span of decoder blocks run with transformers' own layer classes.

Decode steps of one position (or a speculative step's few after others) take fast_decode.py where it
replays those layers exactly (same bits, less Python); everything else (prefill, LoRA, prompts,
autograd) goes through the layers themselves.

`BlockSpan(hidden, cache) -> hidden`: hidden states of new positions in, of the same positions out,
the cache (one per session) grows. Knows nothing of tokens, sessions, peers or the wire.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from tqdm import tqdm

from swarm_node.errors import ConfigError, ModelError, check_int
from swarm_node.model import fast_decode
from swarm_node.model.checkpoint import Checkpoint
from swarm_node.model.families import Family, cache_heads, check_config, family_for, layer_types
from swarm_node.model.kv_cache import SpanCache
from swarm_node.model.layer_calls import layer_inputs, run_layer
from swarm_node.model.lora import LoraWeights, active_lora, check_lora, linear_shapes, lora_applied
from swarm_node.model.prompts import add_prompt
from swarm_node.model.quantization import check_quant, quantize_linears, weight_bytes
from swarm_node.model.skeleton import converted_tensors, materialize, meta_skeleton, submodule

MAX_CACHE_LENGTH = 1 << 20  # sanity bound for new_cache arguments
# A cached step of up to this many positions after others (a speculative step's drafts) may take
# fast_decode too; a prompt, or its chunks, takes transformers' path (its mask, or none at position 0)
FAST_TOKENS = 32


class BlockSpan(torch.nn.Module):
    """Decoder blocks `start..end-1` of one model, plus a rotary embedding; load with `.load`."""

    def __init__(
        self,
        *,
        config: Any,
        start: int,
        end: int,
        layers: torch.nn.ModuleList,
        rotary: torch.nn.Module | None,
        dtype: torch.dtype,
        quant: str | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.device = device or torch.device("cpu")  # weights, caches and outputs live here
        self.config = config
        self.start = start
        self.end = end
        self.hidden_size = int(config.hidden_size)
        self.dtype = dtype
        self.quant = quant  # None, "int8" or "nf4": how the layers' linear weights are held
        self.layers = layers
        self.rotary = rotary  # None for alibi families (BLOOM)
        self.family: Family = family_for(config)
        self.layer_types = layer_types(config)[start:end]
        self._lora_shapes: dict[str, tuple[int, int]] | None = None
        self._fast_decode: bool | None = None  # fast_decode.supports(...), asked on first use

    @classmethod
    def load(
        cls,
        checkpoint: Checkpoint,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        quant: str | None = None,
        device: torch.device | str = "cpu",
    ) -> BlockSpan:
        """Blocks `start..end-1` from the checkpoint; `quant` "int8"/"nf4" quantizes their linears.

        Tensors stream one at a time from the files to `device` (the host holds one in flight; a
        bar counts the bytes on a terminal). Quantizing imports bitsandbytes (seconds) and
        replaces each layer's nn.Linear weights one layer at a time, on the host, quantized as
        they move to `device` (bitsandbytes' CUDA kernels on a GPU), so the float weights of only
        one layer are ever held at once.
        """
        device = torch.device(device)
        total = checkpoint.num_blocks
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= total):
            raise ConfigError(
                f"span must satisfy 0 <= start < end <= {total} (the model has {total} blocks), "
                f"got {start}:{end}"
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"'dtype' must be a floating torch.dtype, got {dtype!r}")
        check_quant(quant)
        check_config(checkpoint.config)  # ModelError now for settings we cannot run
        skeleton = meta_skeleton(checkpoint.config)
        family = checkpoint.family
        all_layers = submodule(skeleton, family.layers)
        layers = torch.nn.ModuleList(all_layers[start:end])
        # a bar on a terminal only (tqdm turns itself off when stderr is not one): loading a big span,
        # or quantizing it, takes a while
        progress = tqdm(
            desc=f"loading blocks {start}:{end} to {device}",
            unit="B",
            unit_scale=True,
            disable=None,
            file=sys.stderr,
            leave=False,
        )
        host = torch.device("cpu")
        for local, layer in enumerate(layers):
            prefix = family.layer_prefix(start + local)
            on = host if quant is not None else device  # bitsandbytes quantizes host weights
            names = list(layer.state_dict())
            extra = converted_tensors(checkpoint, family, prefix, names, dtype=dtype)
            extra = {name: tensor.to(on) for name, tensor in extra.items()}
            materialize(
                layer,
                checkpoint,
                prefix,
                dtype=dtype,
                extra=extra,
                device=on,
                progress=progress.update,
            )
            if quant is not None:
                if not quantize_linears(layer, quant, compute_dtype=dtype, device=str(device)):
                    raise ConfigError(
                        f"'quant' must be None for {family.model_type} blocks, which hold no "
                        f"nn.Linear to quantize (their own linear classes), got {quant!r}"
                    )
                layer.to(device)  # what is not a Linear (norms)
            attn = getattr(layer, family.attention, None)
            if attn is None or not hasattr(attn, "layer_idx"):
                raise ModelError(
                    f"{type(layer).__name__} has no {family.attention}.layer_idx to re-index"
                )
            attn.layer_idx = local  # the span's cache holds only its own layers
        config = skeleton.config
        progress.close()
        rotary = None
        if family.rotary is not None:
            rotary_cls = type(submodule(skeleton, family.rotary))
            with device:  # real inv_freq buffers, not the skeleton's meta ones
                rotary = rotary_cls(config=config)
        return cls(
            config=config,
            start=start,
            end=end,
            layers=layers,
            rotary=rotary,
            dtype=dtype,
            quant=quant,
            device=device,
        )

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def new_cache(
        self,
        max_length: int,
        batch_size: int = 1,
        *,
        start: int | None = None,
        end: int | None = None,
    ) -> SpanCache:
        """A cache for blocks `start..end-1` (default: the whole span; a sub-span must lie inside it)."""
        start, end = self._sub_span(start, end)
        check_int("max_length", max_length, 1, MAX_CACHE_LENGTH)
        check_int("batch_size", batch_size, 1, 1 << 16)
        return SpanCache(
            config=self.config, start=start, end=end, max_length=max_length, batch_size=batch_size
        )

    def _sub_span(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ConfigError(
                f"sub-span must lie within blocks {self.start}:{self.end}, got {start}:{end}"
            )
        return start, end

    @property
    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """The Linears a LoRA may adapt in each block: name -> (in_features, out_features)."""
        if self._lora_shapes is None:
            self._lora_shapes = linear_shapes(self.layers[0])
        return self._lora_shapes

    def memory_bytes(self) -> int:
        """Bytes the span's block weights occupy (quantization statistics included)."""
        return weight_bytes(self.layers)

    def cache_bytes_per_token(self, batch_size: int = 1) -> int:
        """Bytes of keys + values one position costs in this span's cache."""
        config = self.config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        kv_heads = cache_heads(config)
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * batch_size * kv_heads * head_dim * element

    def forward(
        self,
        hidden: torch.Tensor,
        cache: SpanCache | None = None,
        *,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        lora: LoraWeights | None = None,
    ) -> torch.Tensor:
        """Hidden states `# (B, T, H)` of new positions -> the output of blocks `start..end-1`.

        `prompts` `# (end - start, P, H)`: deep prompt tuning, prompts[j] is added before the j-th
        block to the positions p < P among the new ones (see model/prompts.py).

        `start`/`end` default to the whole span; a sub-span runs only its layers (a cache must have
        been made for the same sub-span). With a cache, positions continue from `cache.length` and
        the cache grows by T; without one, a plain causal forward from position 0 (keeps autograd
        when asked). Calls on one BlockSpan must not run concurrently (a server's compute limiter
        serialises them): a sub-span renumbers its layers' cache indices while it runs.

        `lora` (blocks of this span; see lora.py) adds a LoRA to the blocks' Linears for this call
        only, without touching the frozen weights; its tensors may require grad.
        """
        start, end = self.check_step(
            hidden, cache, start=start, end=end, prompts=prompts, lora=lora
        )
        new_tokens = hidden.shape[1]
        past = 0 if cache is None else cache.length
        needs_grad = torch.is_grad_enabled() and (
            hidden.requires_grad
            or (prompts is not None and prompts.requires_grad)
            or any(p.requires_grad for p in self.parameters())
            or (lora is not None and lora.requires_grad)
        )
        mode = contextlib.nullcontext() if needs_grad else torch.inference_mode()
        if prompts is not None:
            prompts = prompts.to(self.device)
        if lora is not None and self.device.type != "cpu":
            lora = lora.to(self.device)
        with mode, lora_applied(self.layers, self.start, lora):
            hidden = hidden.to(device=self.device, dtype=self.dtype)
            out = self._run(hidden, cache, past, start - self.start, end - self.start, prompts)
        if cache is not None:
            cache.advance(new_tokens)
        return out

    def check_step(
        self,
        hidden: Any,
        cache: SpanCache | None,
        *,
        start: int | None,
        end: int | None,
        prompts: torch.Tensor | None = None,
        lora: LoraWeights | None = None,
    ) -> tuple[int, int]:
        """ConfigError / SessionError unless `forward` can take these; the sub-span's blocks."""
        self._check_hidden(hidden)
        start, end = self._sub_span(start, end)
        if lora is not None:
            check_lora(lora, shapes=self.lora_shapes, start=self.start, end=self.end)
        if cache is not None:
            batch, new_tokens, _ = hidden.shape
            cache.check_step(start=start, end=end, batch_size=batch, new_tokens=new_tokens)
        if prompts is not None and (prompts.dim() != 3 or prompts.shape[0] != end - start):
            raise ConfigError(
                f"'prompts' must have shape ({end - start}, P, H), got {tuple(prompts.shape)}"
            )
        return start, end

    def forward_batch(
        self,
        hiddens: list[torch.Tensor],
        caches: list[SpanCache],
        *,
        start: int | None = None,
        end: int | None = None,
    ) -> list[torch.Tensor]:
        """One new position of several sessions `# (B_i, 1, H)`, each with its own cache (of any
        length, all for blocks `start..end-1`), in one pass over the weights; the outputs in order.

        Where `fast_decode` replays the layers (see `uses_fast_decode`) the rows run together
        (`fast_decode.decode_batch`, each session's attention over its own cache); elsewhere each
        session runs `forward` in turn. Inference only: no autograd, prompts or LoRA.
        """
        if len(hiddens) != len(caches) or not hiddens:
            raise ConfigError(
                f"'hiddens' and 'caches' must be equally long and not empty, got "
                f"{len(hiddens)} and {len(caches)}"
            )
        start, end = self._sub_span(start, end)
        for hidden, cache in zip(hiddens, caches, strict=True):
            self._check_hidden(hidden)
            cache.check_step(start=start, end=end, batch_size=hidden.shape[0], new_tokens=1)
        with torch.inference_mode():
            if len(hiddens) == 1 or not self.uses_fast_decode(1):
                return [
                    self.forward(h, c, start=start, end=end)
                    for h, c in zip(hiddens, caches, strict=True)
                ]
            rows = [h.shape[0] for h in hiddens]
            hidden = torch.cat([h.to(self.device, self.dtype) for h in hiddens])  # (N, 1, H)
            position_ids = torch.cat(
                [torch.full((n, 1), c.length) for n, c in zip(rows, caches, strict=True)]
            ).to(self.device)  # (N, 1)
            position_embeddings = self.rotary(hidden, position_ids=position_ids)  # (N, 1, D) x2
            first, stop = start - self.start, end - self.start
            out = fast_decode.decode_batch(
                self.layers[first:stop],
                hidden,
                [c.dynamic for c in caches],
                rows,
                position_embeddings,
            )
        for cache in caches:
            cache.advance(1)
        return list(out.split(rows))

    def _run(
        self,
        hidden: torch.Tensor,
        cache: SpanCache | None,
        past: int,
        first: int,
        stop: int,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        new_tokens = hidden.shape[1]
        dynamic = cache.dynamic if cache is not None else None
        position_ids = torch.arange(past, past + new_tokens, device=hidden.device)[None]  # (1, T)
        fast = self.uses_fast_decode(new_tokens) and (new_tokens == 1 or past > 0)
        if dynamic is not None and prompts is None and fast:
            position_embeddings = self.rotary(hidden, position_ids=position_ids)  # (cos, sin)
            return fast_decode.decode_step(
                self.layers[first:stop], hidden, dynamic, position_embeddings, past
            )
        inputs = self.layer_inputs(hidden, dynamic, position_ids, past, first, stop)
        return self.run_layers(hidden, dynamic, inputs, position_ids, past, first, stop, prompts)

    def layer_inputs(
        self,
        hidden: torch.Tensor,
        dynamic: Any,
        position_ids: torch.Tensor,
        past: int,
        first: int,
        stop: int,
    ) -> dict[str, Any]:
        """Masks and positions, per attention kind, of layers `first..stop-1` (indices in the span)
        for new positions `position_ids` `# (1, T)` after `past` cached ones: made before any
        layer's cache grows."""
        return layer_inputs(
            self.family,
            self.config,
            self.rotary,
            hidden,
            dynamic,
            position_ids,
            past,
            self.layer_types[first:stop],
        )

    def run_layers(
        self,
        hidden: torch.Tensor,
        dynamic: Any,
        inputs: dict[str, Any],
        position_ids: torch.Tensor,
        past: int,
        first: int,
        stop: int,
        prompts: torch.Tensor | None = None,
        *,
        base: int | None = None,
    ) -> torch.Tensor:
        """Layers `first..stop-1` (indices in the span) of a step whose cache holds the layers from
        `base` on (default `first`), indexed from 0 there; `prompts[j]` goes before layer `base + j`."""
        base = first if base is None else base
        layers = self.layers[first:stop]
        kinds = self.layer_types[first:stop]
        attention = self.family.attention
        if base:  # a sub-span: its cache holds only its own layers, indexed from 0
            for local, layer in enumerate(layers, start=first - base):
                getattr(layer, attention).layer_idx = local
        try:
            for j, (layer, kind) in enumerate(zip(layers, kinds, strict=True), start=first - base):
                if prompts is not None:
                    hidden = add_prompt(hidden, prompts[j], past)
                hidden = run_layer(self.family, layer, hidden, inputs[kind], position_ids, dynamic)
        finally:
            if base:
                for local, layer in enumerate(layers, start=first):
                    getattr(layer, attention).layer_idx = local
        return hidden  # (B, T, H)

    def uses_fast_decode(self, new_tokens: int) -> bool:
        """Whether a cached step of `new_tokens` positions after others, no prompts, runs
        `fast_decode.decode_step` (same bits as transformers' layers, a sixth less time for one
        position): 1 to FAST_TOKENS positions, no autograd, no LoRA, and layers it replays exactly."""
        if not 1 <= new_tokens <= FAST_TOKENS:
            return False
        if not torch.is_inference_mode_enabled() or active_lora() is not None:
            return False
        if self._fast_decode is None:
            self._fast_decode = fast_decode.supports(self.layers, self.config, self.layer_types)
        return self._fast_decode

    def _check_hidden(self, hidden: Any) -> None:
        if not isinstance(hidden, torch.Tensor):
            raise ConfigError(f"'hidden' must be a torch.Tensor, got {type(hidden).__name__}")
        if hidden.dim() != 3 or hidden.shape[2] != self.hidden_size or 0 in hidden.shape[:2]:
            raise ConfigError(
                f"'hidden' must have shape (B, T, {self.hidden_size}) with B, T >= 1, "
                f"got {tuple(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise ConfigError(f"'hidden' must be a floating tensor, got {hidden.dtype}")

    def extra_repr(self) -> str:
        quant = f", {self.quant} weights" if self.quant else ""
        blocks = f"blocks {self.start}:{self.end} of {self.config.num_hidden_layers}"
        return f"{blocks}, {self.dtype}{quant} on {self.device}"
