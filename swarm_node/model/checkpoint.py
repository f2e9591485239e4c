"""A local Hugging Face model folder: its config and lazy, per-tensor access to its safetensors.

Reads only the tensors asked for, each with plain reads into its own buffer (tensor_files.py), or,
opened with ``memory_map=True``, as views of a map of its file where they stay on the CPU in the
file's dtype.
Never torch.load, never pickle. Knows nothing of layers, spans or peers.

The config comes in two depths. ``setting(name)`` reads config.json's own value (plain JSON), which
is all a client's head and its generation need; ``config`` is transformers' config object, built on
first use (importing transformers and the family's config class costs ~1.5 s, a cold client's
largest cost: issue 21), and answers ``setting`` for a name config.json leaves to the family's
default.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from swarm_node.errors import ModelError
from swarm_node.model.families import Family, family_for

if TYPE_CHECKING:  # torch loads with the first tensor read: opening a folder, its config and its
    # index (a model's identity, `swarm-node status`) needs none
    import torch

    from swarm_node.model.tensor_files import TensorEntry

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

NameFilter = Iterable[str] | Callable[[str], bool]


class Checkpoint:
    """Config + tensor index of one model folder; open with `Checkpoint.open(path)`."""

    def __init__(
        self,
        path: Path,
        settings: dict[str, Any],
        family: Family,
        weight_map: dict[str, str],
        *,
        memory_map: bool = False,
    ) -> None:
        self.path = path
        self.settings = settings  # config.json as written
        self._config: Any = None  # transformers' config, built on first use
        self.family = family
        self._weight_map = weight_map  # tensor name -> file name inside `path`
        self.names_read: list[str] = []  # every tensor name load_tensors has read, in order
        self._headers: dict[str, dict[str, TensorEntry]] = {}  # file name -> its tensors
        self.memory_map = memory_map  # tensors that stay on the CPU as stored: views of a map
        self.names_mapped: list[str] = []  # the names read that are views of a map

    @classmethod
    def open(cls, path: str | Path, *, memory_map: bool = False) -> Checkpoint:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ModelError(f"model folder {str(path)!r} must be an existing directory, it is not")
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.iterdir())[:20]
            raise ModelError(f"model folder {str(path)!r} must hold config.json, found {found}")
        settings = _read_settings(path)
        family = family_for(SimpleNamespace(model_type=settings.get("model_type")))
        return cls(path, settings, family, _read_weight_map(path), memory_map=memory_map)

    @property
    def config(self) -> Any:
        """transformers' config of the model (imports transformers on first use)."""
        if self._config is None:
            self._config = _read_config(self.path)
        return self._config

    def setting(self, name: str) -> Any:
        """config.json's ``name`` (under the family's own name for it), else the family's default
        from transformers' config."""
        stored = self.family.setting_name(name)
        if stored in self.settings:
            return self.settings[stored]
        return getattr(self.config, name, None)

    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def num_blocks(self) -> int:
        return int(self.setting("num_hidden_layers"))

    def tensor_names(self) -> list[str]:
        return sorted(self._weight_map)

    def weight_file(self, name: str) -> str:
        """The file (inside ``path``) holding tensor ``name``."""
        return self._weight_map[name]

    def has_tensor(self, name: str) -> bool:
        return name in self._weight_map

    def load_tensors(
        self,
        names: NameFilter,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """The tensors named (or accepted by a predicate), read one by one, cast to `dtype` if set.

        An explicit name list must all exist (ModelError lists the missing ones).
        """
        return dict(self.iter_tensors(names, dtype=dtype, device=device))

    def iter_tensors(
        self,
        names: NameFilter,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time: each read with plain reads into its own buffer (only the
        bytes of the tensors asked for; model/tensor_files.py), moved to ``device`` and then cast
        to ``dtype``, before the next one is read: the host holds one tensor in flight."""
        if callable(names):
            wanted = [n for n in self._weight_map if names(n)]
        else:
            wanted = list(dict.fromkeys(names))
            missing = [n for n in wanted if n not in self._weight_map]
            if missing:
                raise ModelError(
                    f"checkpoint {str(self.path)!r} must hold tensors {missing[:5]}"
                    f"{' ...' if len(missing) > 5 else ''}, they are absent"
                )
        import torch

        from swarm_node.model.tensor_files import map_file, map_tensor, read_header, read_tensor

        stays_on_host = device is None or torch.device(device).type == "cpu"
        by_file: dict[str, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self._weight_map[name], []).append(name)
        for file_name, file_names in by_file.items():
            path = self.path / file_name
            entries = self._headers.get(file_name)
            if entries is None:
                entries = self._headers[file_name] = read_header(path)
            absent = [n for n in file_names if n not in entries]
            if absent:
                raise ModelError(f"{str(path)!r} must hold tensors {absent[:5]}, they are absent")
            with open(path, "rb") as f:
                mapped = map_file(f) if self.memory_map and stays_on_host else None
                for name in file_names:
                    entry = entries[name]
                    tensor = None
                    if mapped is not None and dtype in (None, entry.dtype):
                        tensor = map_tensor(mapped, entry)
                    if tensor is not None:
                        self.names_mapped.append(name)
                    else:
                        tensor = read_tensor(f, entry)
                    if device is not None:
                        tensor = tensor.to(device)
                    if dtype is not None:
                        tensor = tensor.to(dtype)
                    self.names_read.append(name)
                    yield name, tensor

    def tensor_entry(self, name: str) -> TensorEntry:
        """Dtype, shape and bytes of tensor ``name`` as stored (reads its file's header once)."""
        from swarm_node.model.tensor_files import read_header

        file_name = self._weight_map[name]
        entries = self._headers.get(file_name)
        if entries is None:
            entries = self._headers[file_name] = read_header(self.path / file_name)
        return entries[name]

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.model_type}, {self.num_blocks} blocks)"


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        settings = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"config.json in {str(path)!r} cannot be read: {exc}") from exc
    if not isinstance(settings, dict):
        raise ModelError(
            f"config.json in {str(path)!r} must be a JSON object, got {type(settings).__name__}"
        )
    return settings


def _read_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:  # transformers' ways of saying "unknown/bad"
        raise ModelError(f"config.json in {str(path)!r} cannot be read: {exc}") from exc


def _read_weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{str(index)!r} must be JSON with a 'weight_map', it is not") from exc
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ModelError(f"{str(index)!r}: 'weight_map' must map str to str")
        for shard in sorted(set(weight_map.values())):
            if "/" in shard or "\\" in shard or shard.startswith("."):
                raise ModelError(
                    f"{str(index)!r}: shard names must be plain file names, got {shard!r}"
                )
            if not (path / shard).is_file():
                raise ModelError(f"{str(index)!r} names shard {shard!r}, which is missing")
        return dict(weight_map)
    single = path / SINGLE_FILE
    if single.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(single), framework="numpy") as f:  # "pt" would import torch
                return {name: SINGLE_FILE for name in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{str(single)!r} is not a readable safetensors file: {exc}") from exc
    found = sorted(p.name for p in path.iterdir())[:20]
    raise ModelError(
        f"model folder {str(path)!r} must hold {SINGLE_FILE} or {INDEX_FILE}, found {found}"
    )
