"""Tiny random models on disk for tests, and the Hugging Face reference to compare against.

Plain functions (not fixtures) so any test module can use them: `make_tiny_model_dir(tmp_path)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
TINY_VOCAB = 256
TINY_HIDDEN = 64


def tiny_config(family: str = "llama", *, num_layers: int = 6, tie: bool = False, **overrides: Any):
    """A transformers config of the given family: hidden 64, 4 heads / 2 KV heads, vocab 256."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = dict(
        hidden_size=TINY_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        initializer_range=0.2,  # larger than real models: tokens vary, bugs show
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if family == "mistral":
        kwargs["sliding_window"] = None
    if family == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def make_tiny_model_dir(
    path: Path,
    family: str = "llama",
    num_layers: int = 6,
    seed: int = 0,
    tie: bool = False,
    sharded: bool = False,
    **config_overrides: Any,
) -> Path:
    """Save a tiny random float32 model (safetensors; several shards when `sharded`) into `path`."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, num_layers=num_layers, tie=tie, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "10GB")
    return path


def reference_model(path: Path, *, dtype: torch.dtype = torch.float32):
    """The same folder loaded whole by transformers, in eval mode: the ground truth."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Path(path), dtype=dtype).eval()


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def add_byte_tokenizer(path: Path) -> Path:
    """Give a tiny model (vocab 256) a byte-level tokenizer with a chat template: one token per byte,
    so any text round-trips, and API tests can run on the tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == TINY_VOCAB
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path
