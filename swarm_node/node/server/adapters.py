"""Named LoRA adapters: the ``NAME=PATH`` flags of ``serve --adapters``, loading a server's adapters
for its span, and what a client's ``--adapter`` means (a name some servers hold, or a file of its own).

Knows nothing of sessions or the wire: the server looks a session's adapter up in the dict this
module loads; routing filters servers by the names their records announce.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from swarm_node.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

MAX_SERVER_ADAPTERS = 64  # dht.records.MAX_ADAPTERS: a record lists at most this many names
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_adapter_name(name: Any, field: str = "adapter") -> str:
    """A name announced in the DHT and sent in requests: 1-64 of letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ConfigError(
            f"{field!r} names must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or "
            f"digit, got {str(name)[:80]!r}"
        )
    return name


def parse_adapter_flags(texts: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``["chat=/ad/chat", "sql=~/sql"]`` -> ``(("chat", "/ad/chat"), ("sql", "~/sql"))``, checked."""
    out: list[tuple[str, str]] = []
    for text in texts:
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise ConfigError(
                f"'--adapters' entries must look like NAME=PATH (e.g. chat=./my-lora), got {text!r}"
            )
        out.append((name, path))
    return check_server_adapters(tuple(out))


def check_server_adapters(adapters: Any) -> tuple[tuple[str, str], ...]:
    """ServerConfig.adapters: at most 64 (name, folder) pairs with distinct, valid names."""
    if not isinstance(adapters, tuple) or not all(
        isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) for x in p)
        for p in adapters
    ):
        raise ConfigError(
            f"'adapters' must be a tuple of (name, path) string pairs, got {adapters!r}"
        )
    if len(adapters) > MAX_SERVER_ADAPTERS:
        raise ConfigError(
            f"'adapters' must list at most {MAX_SERVER_ADAPTERS} adapters, got {len(adapters)}"
        )
    seen: set[str] = set()
    for name, _ in adapters:
        check_adapter_name(name, "adapters")
        if name in seen:
            raise ConfigError(f"'adapters' names must be distinct, got {name!r} twice")
        seen.add(name)
    return adapters


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


def is_adapter_file(value: str) -> bool:
    """A client's ``--adapter`` is a file of its own when it names an existing file, else a name."""
    return Path(value).expanduser().is_file()
