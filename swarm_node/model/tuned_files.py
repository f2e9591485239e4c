"""Files of what a client trained: soft prompts (``ptune``), deep prompts (``deep_ptune``) and LoRA
adapters (``lora``), as safetensors with a small metadata header.

The header (safetensors' string metadata) says which model the file is for (its name and, since
model digests, ``model_digest``: the weights it was trained on, model/identity.py), its block range,
the method and every tensor's shape; loading checks all of it (a file trained on other weights is
refused), and the file's size and header length,
before any tensor is read. Tensors: ``prompts`` ``# (P, H)``; ``deep_prompts`` ``# (end - start, P,
H)``; a LoRA's ``model.layers.{i}.{module}.lora_A.weight`` / ``lora_B.weight`` with its scales in the
header. Knows nothing of peers or of how prompts and adapters are applied (prompts.py, lora.py).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarm_node.errors import ConfigError, ModelError
from swarm_node.model.lora import (
    LoraWeights,
    check_lora,
    config_linear_shapes,
    lora_from_state,
    lora_state,
)
from swarm_node.model.prompts import MAX_PRE_SEQ_LEN

FORMAT = "swarm-node-tuned"
VERSION = "1"
METHODS = ("ptune", "deep_ptune", "lora")
MAX_TUNED_BYTES = 1 << 30  # a file larger than this is refused before reading
MAX_HEADER_BYTES = 1 << 20  # safetensors JSON header: names, shapes, metadata
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True, slots=True, kw_only=True)
class TunedFile:
    """What one file holds: trained prompts or a LoRA for blocks ``start..end-1`` of ``model``."""

    model: str  # the name of the model it was trained on, e.g. "smollm2-135m"
    method: str  # "ptune", "deep_ptune" or "lora"
    start: int
    end: int
    prompts: torch.Tensor | None = None  # (P, H): soft prompt before the input embeddings
    deep_prompts: torch.Tensor | None = None  # (end - start, P, H): added before each block
    lora: LoraWeights | None = None
    model_digest: str = ""  # the digest of the weights it was trained on ("": not recorded)

    def deep_prompts_for(self, num_blocks: int) -> torch.Tensor | None:
        """The deep prompts of every block ``# (num_blocks, P, H)``: zeros outside start..end-1."""
        if self.deep_prompts is None:
            return None
        full = self.deep_prompts.new_zeros(num_blocks, *self.deep_prompts.shape[1:])
        full[self.start : self.end] = self.deep_prompts
        return full


def _tensors_of(tuned: TunedFile) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    if tuned.method == "lora":
        if tuned.lora is None or tuned.prompts is not None or tuned.deep_prompts is not None:
            raise ConfigError("a 'lora' tuned file must hold 'lora' and no prompts")
        return lora_state(tuned.lora)
    if tuned.prompts is None or tuned.lora is not None:
        raise ConfigError(f"a {tuned.method!r} tuned file must hold 'prompts' and no 'lora'")
    if (tuned.deep_prompts is not None) != (tuned.method == "deep_ptune"):
        raise ConfigError("'deep_prompts' must be given exactly when the method is 'deep_ptune'")
    tensors = {"prompts": tuned.prompts}
    if tuned.deep_prompts is not None:
        tensors["deep_prompts"] = tuned.deep_prompts
    return tensors, {}


def save_tuned(path: str | Path, tuned: TunedFile, *, config: Any) -> Path:
    """Write ``tuned`` as safetensors with its header; checked first as ``load_tuned`` would."""
    from safetensors.torch import save_file

    if tuned.method not in METHODS:
        raise ConfigError(f"'method' must be one of {METHODS}, got {tuned.method!r}")
    tensors, scales = _tensors_of(tuned)
    if tuned.lora is not None:
        check_lora(
            tuned.lora, shapes=config_linear_shapes(config), start=tuned.start, end=tuned.end
        )
    tensors = {
        name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()
    }
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "model": tuned.model,
        "model_digest": tuned.model_digest,
        "method": tuned.method,
        "num_blocks": str(int(config.num_hidden_layers)),
        "hidden_size": str(int(config.hidden_size)),
        "start": str(tuned.start),
        "end": str(tuned.end),
        "shapes": json.dumps({name: list(t.shape) for name, t in tensors.items()}, sort_keys=True),
        "scales": json.dumps(scales, sort_keys=True),
    }
    try:
        _check_header(
            metadata,
            tensors_meta={n: (list(t.shape), "F32") for n, t in tensors.items()},
            model=tuned.model,
            config=config,
            methods=METHODS,
            where="tuned file to save",
            model_digest=tuned.model_digest,
        )
    except ModelError as exc:
        raise ConfigError(str(exc)) from None
    path = Path(path).expanduser()
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_tuned(
    path: str | Path,
    *,
    model: str | None,
    config: Any,
    methods: tuple[str, ...] = METHODS,
    dtype: torch.dtype = torch.float32,
    max_bytes: int = MAX_TUNED_BYTES,
    model_digest: str = "",
) -> TunedFile:
    """A tuned file for ``model`` (None: any name) with ``config``'s shapes, checked before reading;
    trained on the weights of ``model_digest`` when both it and the file name a digest.

    ModelError names the file, the field, what was expected and what the file holds.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    where = f"tuned file {str(path)!r}"
    if not path.is_file():
        raise ModelError(f"{where} must be an existing file, it is not")
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelError(f"{where} must be at most {max_bytes} bytes, got {size}")
    with path.open("rb") as f:
        prefix = f.read(8)
    header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
    if not 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8):
        raise ModelError(
            f"{where} must start with a safetensors header of 2 to {MAX_HEADER_BYTES} bytes within the "
            f"file ({size} bytes), got a length of {header_len}"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors_meta = {
                n: (list(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()
            }
            method, start, end, scales = _check_header(
                metadata,
                tensors_meta=tensors_meta,
                model=model,
                config=config,
                methods=methods,
                where=where,
                model_digest=model_digest,
            )
            tensors = {name: f.get_tensor(name).to(dtype) for name in tensors_meta}
    except SafetensorError as exc:
        raise ModelError(f"{where} is not a readable safetensors file: {exc}") from None
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{where}: tensor {name!r} must be finite, it holds inf or nan")
    common = dict(
        model=metadata["model"],
        method=method,
        start=start,
        end=end,
        model_digest=metadata.get("model_digest", ""),
    )
    if method == "lora":
        try:
            lora = lora_from_state(
                tensors, scales, shapes=config_linear_shapes(config), start=start, end=end
            )
        except ConfigError as exc:
            raise ModelError(f"{where}: {exc}") from None
        return TunedFile(**common, lora=lora)
    return TunedFile(**common, prompts=tensors["prompts"], deep_prompts=tensors.get("deep_prompts"))


def tuned_of(
    model: str,
    method: str | None,
    *,
    num_blocks: int,
    ptune: Any = None,
    lora: LoraWeights | None = None,
    model_digest: str = "",
) -> TunedFile:
    """What a client trained (a prompts.PromptTuning or a LoRA) as a TunedFile over every block."""
    if method == "lora" and lora is not None:
        return TunedFile(
            model=model,
            method="lora",
            start=0,
            end=num_blocks,
            lora=lora,
            model_digest=model_digest,
        )
    if method in ("ptune", "deep_ptune") and ptune is not None:
        deep = ptune.deep_prompts.detach() if ptune.deep_prompts is not None else None
        return TunedFile(
            model=model,
            method=method,
            start=0,
            end=num_blocks,
            prompts=ptune.prompts.detach(),
            deep_prompts=deep,
            model_digest=model_digest,
        )
    raise ConfigError(
        f"only a model with tuning_mode 'ptune', 'deep_ptune' or 'lora' has something to save, "
        f"got tuning_mode {method!r}"
    )


def copy_tuned(tuned: TunedFile, *, ptune: Any = None, lora: LoraWeights | None = None) -> None:
    """Put a loaded file's tensors into the trainable ones (same method, shapes and LoRA layout), in place."""
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    if tuned.method == "lora" and lora is not None and tuned.lora is not None:
        mine, theirs = dict(lora.items()), dict(tuned.lora.items())
        if mine.keys() != theirs.keys():
            raise ConfigError(
                f"the tuned file's LoRA must adapt the model's modules {sorted(mine)[:4]}..., "
                f"got {sorted(theirs)[:4]}..."
            )
        for key, mod in mine.items():
            if theirs[key].scale != mod.scale:
                raise ConfigError(
                    f"LoRA scale of {key!r} must be {mod.scale} (the model's), got {theirs[key].scale}"
                )
            pairs += [(f"{key} A", mod.a, theirs[key].a), (f"{key} B", mod.b, theirs[key].b)]
    elif tuned.method in ("ptune", "deep_ptune") and tuned.method == getattr(ptune, "mode", None):
        pairs.append(("prompts", ptune.prompts, tuned.prompts))
        deep = ptune.deep_prompts
        if deep is not None:
            pairs.append(("deep_prompts", deep, tuned.deep_prompts_for(deep.shape[0])))
    else:
        have = "lora" if lora is not None else getattr(ptune, "mode", None)
        raise ConfigError(
            f"the tuned file's method {tuned.method!r} must be the model's tuning_mode, got {have!r}"
        )
    for name, into, value in pairs:
        if value is None or into.shape != value.shape:
            got = None if value is None else tuple(value.shape)
            raise ConfigError(
                f"tuned {name} must have shape {tuple(into.shape)} (the model's), got {got}"
            )
    with torch.no_grad():
        for _, into, value in pairs:
            into.copy_(value)


def _field(metadata: dict[str, str], name: str, where: str) -> str:
    value = metadata.get(name)
    if not isinstance(value, str):
        raise ModelError(f"{where}: header field {name!r} must be present, it is missing")
    return value


def _int_field(metadata: dict[str, str], name: str, where: str) -> int:
    text = _field(metadata, name, where)
    if not text.isdigit() or len(text) > 9:
        raise ModelError(
            f"{where}: header field {name!r} must be a non-negative int, got {text[:40]!r}"
        )
    return int(text)


def _check_header(
    metadata: dict[str, str],
    *,
    tensors_meta: dict[str, tuple[list[int], str]],
    model: str | None,
    config: Any,
    methods: tuple[str, ...],
    where: str,
    model_digest: str = "",
) -> tuple[str, int, int, dict[str, float]]:
    """Check the header and every tensor's declared shape and dtype; (method, start, end, scales)."""
    err = ModelError
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise err(
            f"{where}: header 'format'/'version' must be {FORMAT!r}/{VERSION!r} (a file saved by "
            f"swarm-node), got {metadata.get('format')!r}/{metadata.get('version')!r}"
        )
    method = _field(metadata, "method", where)
    if method not in methods:
        raise err(f"{where}: 'method' must be one of {list(methods)} here, got {method!r}")
    found = _field(metadata, "model", where)
    if model is not None and found != model:
        raise err(f"{where} was trained for model {found!r}; it must be for {model!r}")
    trained_on = metadata.get("model_digest", "")
    if not isinstance(trained_on, str) or not (trained_on == "" or _is_digest(trained_on)):
        raise err(
            f"{where}: header 'model_digest' must be 64 hex digits, got {str(trained_on)[:80]!r}"
        )
    if model_digest and trained_on and trained_on != model_digest:
        raise err(
            f"{where} was trained on other weights of {found!r} (model digest {trained_on[:12]}); "
            f"this model's digest is {model_digest[:12]}"
        )
    num_blocks, hidden = int(config.num_hidden_layers), int(config.hidden_size)
    for name, want in (("num_blocks", num_blocks), ("hidden_size", hidden)):
        got = _int_field(metadata, name, where)
        if got != want:
            raise err(
                f"{where}: header {name!r} must be {want} (the model's), got {got}: a different model"
            )
    start, end = _int_field(metadata, "start", where), _int_field(metadata, "end", where)
    if not 0 <= start < end <= num_blocks:
        raise err(
            f"{where}: block range must satisfy 0 <= start < end <= {num_blocks}, got {start}:{end}"
        )
    try:
        declared = json.loads(_field(metadata, "shapes", where))
        scales = json.loads(metadata.get("scales", "{}"))
    except ValueError as exc:
        raise err(f"{where}: header 'shapes' and 'scales' must be JSON: {exc}") from None
    actual = {name: shape for name, (shape, _) in tensors_meta.items()}
    if declared != actual:
        raise err(
            f"{where}: header 'shapes' must list every tensor's shape, declared {_short(declared)}, "
            f"file holds {_short(actual)}"
        )
    for name, (_, dtype) in tensors_meta.items():
        if dtype not in _FLOAT_DTYPES:
            raise err(
                f"{where}: tensor {name!r} must be one of {sorted(_FLOAT_DTYPES)}, got {dtype}"
            )
    if not isinstance(scales, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in scales.values()
    ):
        raise err(
            f"{where}: header 'scales' must map module names to finite numbers, got {_short(scales)}"
        )
    if method != "lora":
        _check_prompt_shapes(actual, method, end - start, hidden, where)
    return method, start, end, scales


def _check_prompt_shapes(
    shapes: dict[str, list[int]], method: str, blocks: int, hidden: int, where: str
) -> None:
    want = {"prompts", "deep_prompts"} if method == "deep_ptune" else {"prompts"}
    if set(shapes) != want:
        raise ModelError(
            f"{where}: a {method!r} file must hold tensors {sorted(want)}, got {sorted(shapes)[:8]}"
        )
    prompts = shapes["prompts"]
    if len(prompts) != 2 or prompts[1] != hidden or not 1 <= prompts[0] <= MAX_PRE_SEQ_LEN:
        raise ModelError(
            f"{where}: 'prompts' must have shape (P, {hidden}) with 1 <= P <= {MAX_PRE_SEQ_LEN}, "
            f"got {tuple(prompts)}"
        )
    if "deep_prompts" in shapes and shapes["deep_prompts"] != [blocks, prompts[0], hidden]:
        raise ModelError(
            f"{where}: 'deep_prompts' must have shape ({blocks}, {prompts[0]}, {hidden}) "
            f"(blocks, P, H), got {tuple(shapes['deep_prompts'])}"
        )


def tuned_id(path: str | Path) -> str:
    """A tuned file's own id: the digest of its header and tensors (model/identity.py)."""
    from swarm_node.model.identity import safetensors_digest

    return safetensors_digest(Path(path).expanduser())


def _is_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
