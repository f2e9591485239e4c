"""Build a transformers `*ForCausalLM` on the meta device (no memory) and materialise parts of it.

Only the modules a caller takes out (a span's layers, the client's head) ever get real tensors,
loaded from a Checkpoint by name. Knows nothing of caches or peers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from swarm_node.errors import ModelError
from swarm_node.model.checkpoint import Checkpoint
from swarm_node.model.families import Family


def meta_skeleton(config: Any) -> torch.nn.Module:
    """The whole model with every parameter on the meta device; its config is a private copy."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)  # from_config mutates (attn implementation) and keeps it
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def submodule(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    try:
        return root.get_submodule(dotted)
    except AttributeError as exc:
        raise ModelError(f"model has no module {dotted!r}: the families table is wrong") from exc


def materialize(
    module: torch.nn.Module,
    checkpoint: Checkpoint,
    prefix: str,
    *,
    dtype: torch.dtype,
    extra: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], object] | None = None,
) -> None:
    """Give `module` (on meta) real weights on `device`: tensors `prefix + local_name` from the
    checkpoint, streamed one at a time to the device (the host holds one tensor in flight).

    Loads exactly the module's own parameter/buffer names (strict), frozen (requires_grad False).
    `extra` supplies local names that do not come from the file (e.g. a tied lm_head).
    `progress(nbytes)` is called after each tensor with the bytes it holds on the device.
    """
    extra = extra or {}
    local_names = [n for n in module.state_dict() if n not in extra]
    state = dict(extra)
    tensors = checkpoint.iter_tensors([prefix + n for n in local_names], dtype=dtype, device=device)
    for name, tensor in tensors:
        state[name.removeprefix(prefix)] = tensor
        if progress is not None:
            progress(tensor.nbytes)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatch between config and file
        raise ModelError(
            f"tensors under {prefix!r} in {str(checkpoint.path)!r} do not fit the config: {exc}"
        ) from exc
    # buffers outside the state dict, as to_empty leaves them; torch.empty, not to_empty or
    # empty_like: those of a meta tensor import sympy (~0.6 s, a cold client's head load)
    for sub in module.modules():
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                empty = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
                sub.register_buffer(name, empty, persistent=False)  # persistent: in state
    module.requires_grad_(False)


def converted_tensors(
    checkpoint: Checkpoint, family: Family, prefix: str, names: list[str], *, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors of a layer's module names `names` that the file keeps under other names: read
    under the family's file name (renames), or stacked from one tensor per expert
    (families.Stacked). Names the file holds as they are, or not at all, are left out (for
    `materialize`, which reads the first and names the second)."""
    stacked = {rule.target: rule for rule in family.stacked}
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if checkpoint.has_tensor(prefix + name):
            continue
        rule = stacked.get(name)
        if rule is None:
            renamed = prefix + family.file_name(name)
            if renamed != prefix + name and checkpoint.has_tensor(renamed):
                out[name] = checkpoint.load_tensors([renamed], dtype=dtype)[renamed]
            continue
        experts = int(checkpoint.setting(rule.count))
        parts = []
        for part in rule.parts:
            files = [prefix + part.format(e=e) for e in range(experts)]
            loaded = checkpoint.load_tensors(files, dtype=dtype)
            parts.append(torch.stack([loaded.pop(f) for f in files]))  # (E, out, in)
        out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out
