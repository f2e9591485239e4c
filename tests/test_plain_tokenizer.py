"""The fast client's tokenizer (`tokenizers` alone) encodes and decodes exactly as transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from swarm_node.model import load_tokenizer
from swarm_node.model.plain_tokenizer import PlainTokenizer, plain_settings

TEXTS = [
    "The capital of France is",
    "",
    " leading and trailing spaces  ",
    "Ünïcödé, emoji 🙂 and 中文 mixed with code: def f(x):\n\treturn x ** 2\n",
    "<|im_start|>user\nhello<|im_end|>\n",  # special tokens written out in the text
    "a" * 300,
]


def same_as_transformers(path: Path) -> None:
    plain = load_tokenizer(path, plain=True)
    assert isinstance(plain, PlainTokenizer)
    full = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    for text in TEXTS:
        ids = plain(text, return_tensors="pt").input_ids
        assert ids.tolist() == full(text, return_tensors="pt").input_ids.tolist(), text
        for skip in (True, False):
            assert plain.decode(ids[0], skip_special_tokens=skip) == full.decode(
                ids[0], skip_special_tokens=skip
            )
    assert plain.eos_token_id == full.eos_token_id
    assert plain.pad_token_id == full.pad_token_id


@pytest.mark.slow
def test_smollm2_tokenizes_as_transformers(smollm2_path: Path) -> None:
    same_as_transformers(smollm2_path)


def test_a_byte_tokenizer_tokenizes_as_transformers(tiny_chat_llama: Path) -> None:
    same_as_transformers(tiny_chat_llama)
    plain = load_tokenizer(tiny_chat_llama, plain=True)
    messages = [{"role": "user", "content": "hi"}]
    full = AutoTokenizer.from_pretrained(str(tiny_chat_llama), local_files_only=True)
    assert plain.apply_chat_template(messages, tokenize=False) == full.apply_chat_template(
        messages, tokenize=False
    )  # anything else comes from transformers' own tokenizer


def test_options_transformers_applies_on_top_keep_its_tokenizer(
    tiny_chat_llama: Path, tmp_path: Path
) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_chat_llama / name).read_bytes())
    assert plain_settings(tmp_path) is not None
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings | {"add_bos_token": True}))
    assert plain_settings(tmp_path) is None
    assert not isinstance(load_tokenizer(tmp_path, plain=True), PlainTokenizer)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(settings | {"tokenizer_class": "LlamaTokenizer"})
    )
    assert plain_settings(tmp_path) is None
