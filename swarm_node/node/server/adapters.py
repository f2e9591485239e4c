"""Named LoRA adapters a server holds: loading each one's tensors for the server's span (the
``NAME=PATH`` flags and adapter names are checked in config.py).

Knows nothing of sessions or the wire: the server looks a session's adapter up in the dict this
module loads; routing filters servers by the names their records announce.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from swarm_node.errors import ConfigError, ModelError
from swarm_node.model.identity import ADAPTER_ID_HEX

log = logging.getLogger(__name__)

BASE_DIGEST_KEY = "swarm_node_model_digest"  # in adapter_config.json: the base weights' digest


def load_server_adapters(
    adapters: Iterable[tuple[str, str]],
    config: Any,
    *,
    start: int,
    end: int,
    dtype: Any,
    model_digest: str = "",
) -> dict[str, Any]:
    """Each named PEFT adapter folder, its tensors for blocks ``start..end-1`` only, under its name
    and under its id (model/identity.py's ``adapter_id``: a digest of its files); ConfigError naming
    the adapter when one cannot be used, or when its ``adapter_config.json`` names the digest of
    other base weights (``swarm_node_model_digest``) than ``model_digest``."""
    from swarm_node.model.identity import adapter_id
    from swarm_node.model.lora import load_peft_adapter

    loaded: dict[str, Any] = {}
    for name, path in adapters:
        try:
            _check_base(Path(path), model_digest)
            lora = load_peft_adapter(Path(path), config, start=start, end=end, dtype=dtype)
            identity = adapter_id(path)
        except (ModelError, ConfigError) as exc:
            raise ConfigError(f"'--adapters' {name}={path}: {exc}") from None
        loaded[name] = loaded[identity] = lora
        log.info(
            "adapter %r (id %s): LoRA on %d module(s) of blocks %d:%d (%d parameters)",
            name,
            identity,
            sum(len(m) for m in lora.modules.values()),
            start,
            end,
            lora.numel(),
        )
    return loaded


def _check_base(folder: Path, model_digest: str) -> None:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return  # load_peft_adapter says what is wrong with the folder
    trained_on = config.get(BASE_DIGEST_KEY, "") if isinstance(config, dict) else ""
    if model_digest and trained_on and trained_on != model_digest:
        raise ConfigError(
            f"adapter was trained on other weights ({BASE_DIGEST_KEY} {str(trained_on)[:12]}); "
            f"this server's model digest is {model_digest[:12]}"
        )


def is_adapter_id(key: str) -> bool:
    """Whether ``key`` of a server's adapters is an id (the others are names)."""
    return len(key) == ADAPTER_ID_HEX and all(c in "0123456789abcdef" for c in key)


def adapter_for(adapters: Mapping[str, Any], name: str) -> Any:
    """The LoRA a request names ("" = none) by name or id, or KeyError's ConfigError twin with the
    names held."""
    if not name:
        return None
    lora = adapters.get(name)
    if lora is None:
        held = sorted(k for k in adapters if not is_adapter_id(k))
        raise ConfigError(
            f"'adapter' must be one this server holds ({held or 'none'}), got {name[:80]!r}"
        )
    return lora
