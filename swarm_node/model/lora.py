"""LoRA adapters on a span's blocks: PEFT-format loading, checks, and application.

A ``LoraWeights`` maps an (absolute) block index and a Linear's name inside that block
(``"self_attn.q_proj"``) to ``(A, B, scale)``; a Linear then computes ``W x + scale * B (A x)``
exactly as PEFT's ``lora.Linear`` does (in eval mode: no dropout). The frozen weights never change:
forward hooks on the span's Linear modules read the adapter of the running call from a context
variable, so two threads running one span with different adapters (or none) do not see each
other's. The tensors may require grad: a client-owned adapter gets its gradients from autograd.

Knows nothing of peers, sessions, the wire or which adapter a request named.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import re
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarm_node.errors import ConfigError, ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PEFT puts before the base model's own tensor names
MAX_RANK = 1024
MAX_CONFIG_BYTES = 1 << 20
MAX_ADAPTER_BYTES = 4 << 30  # an adapter file larger than this is refused before reading it

Shapes = Mapping[str, tuple[int, int]]  # Linear name inside a block -> (in_features, out_features)


@dataclass(frozen=True, slots=True)
class LoraModule:
    """One adapted Linear: ``out += scale * (x @ a.T) @ b.T``."""

    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)
    scale: float  # PEFT's scaling: lora_alpha / r (or / sqrt(r) with rsLoRA)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True, slots=True)
class LoraWeights:
    """block index -> Linear name inside the block -> LoraModule."""

    modules: Mapping[int, Mapping[str, LoraModule]]

    @property
    def blocks(self) -> list[int]:
        return sorted(self.modules)

    def for_blocks(self, start: int, end: int) -> LoraWeights:
        """Only the modules of blocks ``start..end-1``."""
        return LoraWeights({i: dict(m) for i, m in self.modules.items() if start <= i < end})

    def tensors(self) -> list[torch.Tensor]:
        """Every A and B, in block then name order (the order gradients come back in)."""
        return [t for _, mod in self.items() for t in (mod.a, mod.b)]

    def items(self) -> Iterator[tuple[str, LoraModule]]:
        """``("model.layers.{i}.{name}", module)`` in block then name order."""
        for block in self.blocks:
            for name in sorted(self.modules[block]):
                yield f"model.layers.{block}.{name}", self.modules[block][name]

    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in self.tensors())

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors())

    def to(self, dtype: torch.dtype | torch.device) -> LoraWeights:
        """The same modules cast to a dtype, or moved to a device (autograd flows back)."""
        return LoraWeights(
            {
                i: {n: LoraModule(m.a.to(dtype), m.b.to(dtype), m.scale) for n, m in mods.items()}
                for i, mods in self.modules.items()
            }
        )


def linear_shapes(layer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear inside one decoder block (real or on meta): name -> (in_features, out_features)."""
    return {
        name: (int(m.in_features), int(m.out_features))
        for name, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear) and name
    }


def config_linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``linear_shapes`` of block 0 of a model config, built on the meta device (no memory)."""
    from swarm_node.model.families import family_for
    from swarm_node.model.skeleton import meta_skeleton, submodule

    skeleton = meta_skeleton(config)
    return linear_shapes(submodule(skeleton, family_for(config).layers)[0])


def check_lora(
    lora: Any, *, shapes: Shapes, start: int, end: int, max_rank: int = MAX_RANK, what: str = "LoRA"
) -> None:
    """ConfigError unless ``lora`` is a LoraWeights whose blocks lie in ``start..end-1`` and whose
    every A ``(r, in)`` / B ``(out, r)`` fits the named Linear, with 1 <= r <= max_rank."""
    if not isinstance(lora, LoraWeights):
        raise ConfigError(f"{what!r} must be a LoraWeights, got {type(lora).__name__}")
    for block, mods in lora.modules.items():
        if type(block) is not int or not start <= block < end:
            raise ConfigError(f"{what} block indices must lie in {start}:{end}, got {block!r}")
        for name, mod in mods.items():
            where = f"{what} block {block} {name!r}"
            if name not in shapes:
                raise ConfigError(
                    f"{where}: the module must be a Linear of the block, one of {sorted(shapes)}"
                )
            if not isinstance(mod, LoraModule):
                raise ConfigError(f"{where} must be a LoraModule, got {type(mod).__name__}")
            fan_in, fan_out = shapes[name]
            check_pair(where, tuple(mod.a.shape), tuple(mod.b.shape), fan_in, fan_out, max_rank)
            for label, t in (("A", mod.a), ("B", mod.b)):
                if not t.is_floating_point():
                    raise ConfigError(f"{where} {label} must be a floating tensor, got {t.dtype}")
            if type(mod.scale) not in (int, float) or not math.isfinite(mod.scale):
                raise ConfigError(f"{where} 'scale' must be a finite number, got {mod.scale!r}")


def check_pair(
    where: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    max_rank: int,
    rank: int | None = None,
) -> None:
    """ConfigError unless A is ``(r, fan_in)`` and B ``(fan_out, r)`` with r in [1, max_rank]."""
    r = a_shape[0] if rank is None and a_shape else rank
    if not (isinstance(r, int) and 1 <= r <= max_rank):
        raise ConfigError(
            f"{where}: rank must be an int in [1, {max_rank}], got {r!r} (A shape {a_shape})"
        )
    if a_shape != (r, fan_in) or b_shape != (fan_out, r):
        raise ConfigError(
            f"{where}: A must have shape ({r}, {fan_in}) and B ({fan_out}, {r}), got A {a_shape} and B {b_shape}"
        )


# -- PEFT's on-disk format ---------------------------------------------------------------------------
def _adapter_file(folder: Path, name: str, max_bytes: int) -> Path:
    file = folder / name
    if not file.is_file():
        raise ModelError(f"adapter folder {str(folder)!r} must hold {name}, it does not")
    if file.stat().st_size > max_bytes:
        raise ModelError(
            f"{str(file)!r} must be at most {max_bytes} bytes, got {file.stat().st_size}"
        )
    return file


def _read_adapter_config(path: Path) -> dict[str, Any]:
    file = _adapter_file(path, ADAPTER_CONFIG, MAX_CONFIG_BYTES)
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{str(file)!r} must be JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{str(file)!r} must hold a JSON object, got {type(data).__name__}")
    refuse = {
        "peft_type": ("LORA",),
        "use_dora": (False, None),
        "lora_bias": (False, None),
        "bias": ("none", None),
        "fan_in_fan_out": (False, None),
        "use_qalora": (False, None),
    }
    for key, allowed in refuse.items():
        value = data.get(key, allowed[-1])
        if value not in allowed:
            raise ModelError(
                f"{str(file)!r}: {key!r} must be one of {list(allowed)}, got {value!r}"
            )
    for key in ("r", "lora_alpha"):
        value = data.get(key)
        if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
            raise ModelError(f"{str(file)!r}: {key!r} must be a number > 0, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = data.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and type(v) in (int, float) and v > 0 for k, v in value.items()
        ):
            raise ModelError(
                f"{str(file)!r}: {key!r} must map patterns to numbers > 0, got {value!r}"
            )
        data[key] = value
    return data


def _pattern_value(patterns: Mapping[str, float], key: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: the first pattern that matches the end of the module key."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _targeted(targets: Any, key: str) -> bool:
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if isinstance(targets, list):
        return key in targets or any(key.endswith(f".{t}") for t in targets if isinstance(t, str))
    return False


def load_peft_adapter(
    path: str | Path,
    config: Any,
    *,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    max_rank: int = MAX_RANK,
    max_bytes: int = MAX_ADAPTER_BYTES,
) -> LoraWeights:
    """The LoRA of blocks ``start..end-1`` from a PEFT adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``), checked against the model ``config``.

    Every tensor's name, shape and dtype is checked from the safetensors header before any is read,
    and only the span's tensors are read. ModelError says which file, tensor and expectation.
    """
    from safetensors import SafetensorError, safe_open

    from swarm_node.model.families import family_for

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"adapter {str(path)!r} must be a folder in PEFT's format, it is not one")
    cfg = _read_adapter_config(path)
    weights = _adapter_file(path, ADAPTER_WEIGHTS, max_bytes)
    num_blocks = int(config.num_hidden_layers)
    layers = family_for(config).layers
    key_re = re.compile(
        rf"{re.escape(PEFT_PREFIX + layers)}\.(\d+)\.([A-Za-z0-9_.]+)\.lora_([AB])\.weight"
    )
    shapes = config_linear_shapes(config)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            found: dict[tuple[int, str], dict[str, str]] = {}
            for tensor_name in f.keys():
                match = key_re.fullmatch(tensor_name)
                if match is None:
                    raise ModelError(
                        f"{str(weights)!r}: tensor {tensor_name!r} must be a LoRA A/B weight of a decoder "
                        f"block, named '{PEFT_PREFIX}{layers}.<i>.<module>.lora_A.weight' (LoRA on "
                        "embeddings, the LM head, biases or DoRA is not supported)"
                    )
                block, module, side = int(match.group(1)), match.group(2), match.group(3)
                if block >= num_blocks:
                    raise ModelError(
                        f"{str(weights)!r}: tensor {tensor_name!r} names block {block}, "
                        f"the model has blocks 0:{num_blocks}"
                    )
                if module not in shapes:
                    raise ModelError(
                        f"{str(weights)!r}: tensor {tensor_name!r} names module {module!r}, "
                        f"which must be a Linear of the block, one of {sorted(shapes)}"
                    )
                found.setdefault((block, module), {})[side] = tensor_name
            out: dict[int, dict[str, LoraModule]] = {}
            for (block, module), pair in sorted(found.items()):
                key = f"{layers}.{block}.{module}"
                if set(pair) != {"A", "B"}:
                    raise ModelError(
                        f"{str(weights)!r}: {key!r} must have both lora_A and lora_B, got {sorted(pair)}"
                    )
                if not _targeted(cfg.get("target_modules"), key):
                    raise ModelError(
                        f"{str(weights)!r} holds LoRA for {key!r}, which 'target_modules' "
                        f"{cfg.get('target_modules')!r} does not name"
                    )
                rank = _pattern_value(cfg["rank_pattern"], key, cfg["r"])
                alpha = _pattern_value(cfg["alpha_pattern"], key, cfg["lora_alpha"])
                a_slice, b_slice = f.get_slice(pair["A"]), f.get_slice(pair["B"])
                fan_in, fan_out = shapes[module]
                try:
                    check_pair(
                        f"{str(weights)!r} {key!r}",
                        tuple(a_slice.get_shape()),
                        tuple(b_slice.get_shape()),
                        fan_in,
                        fan_out,
                        max_rank,
                        rank=rank,
                    )
                except ConfigError as exc:
                    raise ModelError(
                        f"{exc} (adapter_config 'r' or 'rank_pattern' gives rank {rank})"
                    ) from None
                for s, name in ((a_slice, pair["A"]), (b_slice, pair["B"])):
                    if s.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                        raise ModelError(
                            f"{str(weights)!r}: {name!r} must be a float tensor, got {s.get_dtype()}"
                        )
                if not start <= block < end:
                    continue  # checked, not read
                scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
                a = f.get_tensor(pair["A"]).to(dtype)
                b = f.get_tensor(pair["B"]).to(dtype)
                out.setdefault(block, {})[module] = LoraModule(a, b, float(scale))
    except SafetensorError as exc:
        raise ModelError(f"{str(weights)!r} is not a readable safetensors file: {exc}") from None
    if not found:
        raise ModelError(f"{str(weights)!r} holds no LoRA tensors")
    return LoraWeights(out)


# -- application ---------------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[LoraWeights | None] = contextvars.ContextVar(
    "swarm_node_lora", default=None
)
_HOOK_LOCK = threading.Lock()
_HOOKED: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()


def _hook_for(block: int, name: str) -> Any:
    def hook(
        module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        lora = _ACTIVE.get()
        mod = lora.modules.get(block, {}).get(name) if lora is not None else None
        if mod is None:
            return None
        x = args[0].to(mod.a.dtype)  # as PEFT: compute in the adapter's dtype, add in the output's
        delta = torch.nn.functional.linear(torch.nn.functional.linear(x, mod.a), mod.b) * mod.scale
        return output + delta.to(output.dtype)

    return hook


def _install_hooks(layers: torch.nn.ModuleList, first_block: int) -> None:
    """Once per layer: a forward hook on each of its Linears (a no-op while no adapter is active).

    Installed on first use, so a span that never sees a LoRA keeps torch's hook-free fast path.
    Registering adds to a module's hook dict, which a concurrent call reads in one C-level copy
    under the GIL; the lock only keeps two first uses from installing twice.
    """
    with _HOOK_LOCK:
        for local, layer in enumerate(layers):
            if _HOOKED.get(layer) is not None:
                continue
            for name, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear) and name:
                    module.register_forward_hook(_hook_for(first_block + local, name))
            _HOOKED[layer] = first_block + local


def active_lora() -> LoraWeights | None:
    """The LoRA this thread's calls of hooked layers use now (None: the frozen weights)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def lora_applied(
    layers: torch.nn.ModuleList, first_block: int, lora: LoraWeights | None
) -> Iterator[None]:
    """Within the block, this thread's calls of ``layers`` (blocks ``first_block..``) use ``lora``."""
    if lora is None and _ACTIVE.get() is None:
        yield
        return
    if lora is not None:
        _install_hooks(layers, first_block)
    token = _ACTIVE.set(lora)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def lora_state(lora: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Flat form for files and the wire: ``{"model.layers.{i}.{name}.lora_A.weight": A, ...lora_B...}``
    and ``{"model.layers.{i}.{name}": scale}``."""
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for key, mod in lora.items():
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = mod.a, mod.b
        scales[key] = mod.scale
    return tensors, scales


_STATE_KEY = re.compile(r"model\.layers\.(\d{1,6})\.([A-Za-z0-9_.]{1,128})\.lora_([AB])\.weight")


def lora_from_state(
    tensors: Mapping[str, torch.Tensor],
    scales: Mapping[str, float],
    *,
    shapes: Shapes,
    start: int,
    end: int,
    max_rank: int = MAX_RANK,
) -> LoraWeights:
    """The inverse of ``lora_state``, checked with ``check_lora`` (ConfigError on any mismatch)."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _STATE_KEY.fullmatch(name) if isinstance(name, str) else None
        if match is None or not isinstance(tensor, torch.Tensor):
            raise ConfigError(
                f"LoRA tensor names must look like 'model.layers.<i>.<module>.lora_A.weight' with tensor "
                f"values, got {str(name)[:100]!r}: {type(tensor).__name__}"
            )
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    keys = {f"model.layers.{block}.{module}" for block, module in pairs}
    if set(scales) != keys:
        raise ConfigError(
            f"LoRA scales must name exactly the adapted modules {sorted(keys)[:8]}, "
            f"got {sorted(map(str, scales))[:8]}"
        )
    modules: dict[int, dict[str, LoraModule]] = {}
    for (block, module), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ConfigError(
                f"LoRA block {block} {module!r} must have both A and B, got {sorted(pair)}"
            )
        scale = scales[f"model.layers.{block}.{module}"]
        modules.setdefault(block, {})[module] = LoraModule(pair["A"], pair["B"], scale)
    lora = LoraWeights(modules)
    check_lora(lora, shapes=shapes, start=start, end=end, max_rank=max_rank)
    return lora
