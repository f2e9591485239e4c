"""Named LoRA adapters a server holds: loading each one's tensors for the server's span (the
``NAME=PATH`` flags and adapter names are checked in config.py).

Knows nothing of sessions or the wire: the server looks a session's adapter up in the dict this
module loads; routing filters servers by the names their records announce.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from swarm_node.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def load_server_adapters(
    adapters: Iterable[tuple[str, str]], config: Any, *, start: int, end: int, dtype: Any
) -> dict[str, Any]:
    """Each named PEFT adapter folder, its tensors for blocks ``start..end-1`` only (ConfigError
    naming the adapter when one cannot be used)."""
    from swarm_node.model.lora import load_peft_adapter

    loaded: dict[str, Any] = {}
    for name, path in adapters:
        try:
            lora = load_peft_adapter(Path(path), config, start=start, end=end, dtype=dtype)
        except (ModelError, ConfigError) as exc:
            raise ConfigError(f"'--adapters' {name}={path}: {exc}") from None
        loaded[name] = lora
        log.info(
            "adapter %r: LoRA on %d module(s) of blocks %d:%d (%d parameters)",
            name,
            sum(len(m) for m in lora.modules.values()),
            start,
            end,
            lora.numel(),
        )
    return loaded


def adapter_for(adapters: Mapping[str, Any], name: str) -> Any:
    """The LoRA a request names ("" = none), or KeyError's ConfigError twin with what is held."""
    if not name:
        return None
    lora = adapters.get(name)
    if lora is None:
        held = sorted(adapters)
        raise ConfigError(
            f"'adapter' must be one this server holds ({held or 'none'}), got {name[:80]!r}"
        )
    return lora
