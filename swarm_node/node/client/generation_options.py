"""transformers-style generation settings -> our ``SamplingConfig`` (and ``Speculation``), and stop
strings -> a stopping check.

Pure: a ``GenerationConfig`` (or anything with its attribute names) and keyword overrides in, a
validated ``SamplingConfig`` out. Knows nothing of peers or sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from swarm_node.errors import ConfigError
from swarm_node.node.client.generation import SamplingConfig
from swarm_node.node.client.speculative import Speculation

# keyword arguments of transformers' generate that we honour
SUPPORTED = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "eos_token_id",
    "pad_token_id",
)
# settings we cannot honour: refused unless left at the value that means "off"
UNSUPPORTED_OFF = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "penalty_alpha": None,
    "num_beam_groups": 1,
}


def model_eos_ids(eos: Any, tokenizer: Any) -> tuple[int, ...]:
    """The model's end-of-sequence token ids: its config's ``eos`` (an id, ids or None), else its
    tokenizer's."""
    return _eos_tuple(tokenizer.eos_token_id if eos is None else eos)


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten().tolist())
    return tuple(int(v) for v in value)


def sampling_from(
    generation_config: Any,
    overrides: Mapping[str, Any],
    model_config: Any,
    *,
    seed: int | None = None,
) -> SamplingConfig:
    """Settings of one ``generate`` call: the config's, then keyword ``overrides``; eos and pad
    default to the model's. Unknown keywords and unsupported modes (beam search) are refused."""
    unknown = sorted(set(overrides) - set(SUPPORTED) - set(UNSUPPORTED_OFF))
    if unknown:
        raise ConfigError(
            f"generate() got unsupported arguments {unknown}; supported: {list(SUPPORTED)}"
        )
    values: dict[str, Any] = {}
    for name in (*SUPPORTED, *UNSUPPORTED_OFF):
        if generation_config is not None and hasattr(generation_config, name):
            values[name] = getattr(generation_config, name)
    values.update(overrides)
    for name, off in UNSUPPORTED_OFF.items():
        if values.get(name, off) not in (off, None):
            raise ConfigError(
                f"{name!r} must be {off!r} (only greedy and sampling are supported), got {values[name]!r}"
            )
    do_sample = bool(values.get("do_sample") or False)
    eos = values.get("eos_token_id")
    pad = values.get("pad_token_id")

    def get(name: str, default: Any) -> Any:
        value = values.get(name)
        return default if value is None else value

    return SamplingConfig(
        max_new_tokens=get("max_new_tokens", 20),
        temperature=float(get("temperature", 1.0)) if do_sample else 0.0,
        top_p=float(get("top_p", 1.0)) if do_sample else 1.0,
        top_k=int(get("top_k", 0)) if do_sample else 0,
        repetition_penalty=float(get("repetition_penalty", 1.0)),
        seed=seed,
        eos_token_ids=_eos_tuple(
            eos if eos is not None else getattr(model_config, "eos_token_id", None)
        ),
        pad_token_id=pad if pad is not None else getattr(model_config, "pad_token_id", None),
    )


def speculation_from(
    generation_config: Any, overrides: Mapping[str, Any]
) -> tuple[Speculation | None, dict[str, Any]]:
    """transformers' ``assistant_model=`` (a draft model with the same tokenizer) or
    ``prompt_lookup_num_tokens=`` (also read from the config) -> a ``Speculation`` (None: plain
    decoding), and the other keyword arguments."""
    rest = dict(overrides)
    assistant = rest.pop("assistant_model", None)
    lookup = rest.pop("prompt_lookup_num_tokens", None)
    if lookup is None and generation_config is not None:
        lookup = getattr(generation_config, "prompt_lookup_num_tokens", None)
    if assistant is None and lookup is None:
        return None, rest
    if assistant is not None and lookup is not None:
        raise ConfigError(
            "pass either 'assistant_model' or 'prompt_lookup_num_tokens', not both "
            f"(got a {type(assistant).__name__} and {lookup!r})"
        )
    if lookup is not None and (type(lookup) is not int or not 1 <= lookup <= 64):
        raise ConfigError(f"'prompt_lookup_num_tokens' must be an int in [1, 64], got {lookup!r}")
    if assistant is not None and not callable(assistant):
        raise ConfigError(
            f"'assistant_model' must be a causal LM (a torch module), got {type(assistant).__name__}"
        )
    return Speculation.of(draft_model=assistant, num_tokens=lookup or 10), rest


def normalize_stops(
    stop: str | Sequence[str] | None, *, field: str = "stop_strings", limit: int = 16
) -> tuple[str, ...]:
    """None, one string or a list of non-empty strings -> a tuple."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > limit or not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(
            f"{field!r} must be a non-empty string or a list of at most {limit} of them, got {stop!r}"
        )
    return stops


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def stop_string_checker(
    stop_strings: str | Sequence[str] | None, tokenizer: Any, prompt_len: int
) -> Callable[[torch.Tensor], bool] | None:
    """A ``stopping`` callback for ``generate_tokens``: True once every row's new text holds a stop
    string (the output keeps the token that completed it, as transformers does)."""
    stops = normalize_stops(stop_strings)
    if not stops:
        return None
    if tokenizer is None:
        raise ConfigError("'stop_strings' need the 'tokenizer' argument to decode the new tokens")

    def check(ids: torch.Tensor) -> bool:
        return all(
            find_stop(tokenizer.decode(row[prompt_len:].tolist(), skip_special_tokens=True), stops)
            is not None
            for row in ids
        )

    return check
