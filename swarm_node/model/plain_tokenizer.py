"""A model folder's tokenizer through the `tokenizers` library alone, for a client that must start fast.

transformers' ``AutoTokenizer`` costs ~1.6 s on a cold start (importing transformers, then the
family's config class) where ``tokenizers`` reads tokenizer.json in ~0.07 s. For a folder whose
tokenizer transformers runs as tokenizer.json says (``tokenizer_class`` TokenizersBackend or
PreTrainedTokenizerFast, and none of the tokenizer_config.json options by which transformers changes
its behaviour), ``PlainTokenizer`` encodes and decodes exactly as ``AutoTokenizer`` would
(tests/test_plain_tokenizer.py compares them); anything else it is asked for (a chat template, say)
is answered by ``AutoTokenizer``, loaded then. Knows nothing of models or peers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# GemmaTokenizer (Gemma 3 270M's): a TokenizersBackend that keeps tokenizer.json's pipeline when
# loaded from one (tests/test_families_real.py compares them on the real vocabulary)
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast", "GemmaTokenizer")
# tokenizer_config.json options by which transformers departs from tokenizer.json
CHANGES_BEHAVIOUR = (
    "add_bos_token",
    "add_eos_token",
    "add_prefix_space",
    "clean_up_tokenization_spaces",
    "legacy",
    "do_lower_case",
    "strip_accents",
    "tokenizer_file",
    "post_processor",
)


def plain_settings(path: Path) -> dict[str, Any] | None:
    """tokenizer_config.json when ``PlainTokenizer`` reproduces ``AutoTokenizer`` for ``path``."""
    try:
        settings = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not (path / "tokenizer.json").is_file() or not isinstance(settings, dict):
        return None
    if settings.get("tokenizer_class") not in PLAIN_CLASSES:
        return None
    if any(settings.get(option) for option in CHANGES_BEHAVIOUR):
        return None
    return settings


class PlainTokenizer:
    """Encode and decode like ``AutoTokenizer``; everything else delegated to it (loaded on use)."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self.tokenizer = Tokenizer.from_file(os.fspath(path / "tokenizer.json"))
        self._full: Any = None
        for role in ("eos", "bos", "pad", "unk"):
            token = settings.get(f"{role}_token")
            if isinstance(token, dict):  # an AddedToken written out
                token = token.get("content")
            setattr(self, f"{role}_token", token)
            ids = None if token is None else self.tokenizer.token_to_id(token)
            setattr(self, f"{role}_token_id", ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def __call__(self, text: str, return_tensors: str | None = None) -> SimpleNamespace:
        ids = self.encode(text)
        if return_tensors == "pt":
            import torch  # here: counting a prompt's tokens before torch has loaded needs none

            return SimpleNamespace(input_ids=torch.tensor([ids], dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"'return_tensors' must be 'pt' or None, got {return_tensors!r}")
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # a tensor (or an array) of ids
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._full is None:
            from transformers import AutoTokenizer

            self._full = AutoTokenizer.from_pretrained(os.fspath(self.path), local_files_only=True)
        return getattr(self._full, name)
