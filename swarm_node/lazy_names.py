"""Names a package exports but loads only on first use (PEP 562), so that importing the package
stays cheap: a peer that only looks models up (``swarm-node status``) never imports torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, modules: Mapping[str, str], namespace: dict[str, Any]) -> Callable:
    """A module ``__getattr__`` for ``package``: ``modules`` maps each lazy name to the module
    (absolute) that defines it; a name once loaded is kept in ``namespace`` (the package's
    globals), so later uses are plain attribute reads."""

    def __getattr__(name: str) -> Any:
        if name in modules:
            value = getattr(importlib.import_module(modules[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
