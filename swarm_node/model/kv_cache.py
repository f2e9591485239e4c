"""The attention cache of one span for one session: keys/values of its layers, indexed 0..n-1.

Wraps transformers' DynamicCache built from the model's config and cut down to the span's layers,
so sliding-window layers keep their window. Tracks how many positions it holds and refuses to grow
past `max_length`. Knows nothing of sessions, peers or budgets beyond that one number.
"""

from __future__ import annotations

from typing import Any

from swarm_node.errors import SessionError


class SpanCache:
    """KV cache for blocks `start..end-1` of a model; made by `BlockSpan.new_cache`."""

    def __init__(
        self, *, config: Any, start: int, end: int, max_length: int, batch_size: int
    ) -> None:
        from transformers import DynamicCache

        dynamic = DynamicCache(config=config)
        if len(dynamic.layers) != config.num_hidden_layers:  # our invariant, not user input
            raise AssertionError("DynamicCache(config=...) did not build one layer per block")
        dynamic.layers = dynamic.layers[start:end]  # layer_idx inside the span is local
        self.dynamic = dynamic
        self.start = start
        self.end = end
        self.max_length = max_length
        self.batch_size = batch_size
        self.length = 0  # positions held (same in every layer)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def check_step(self, *, start: int, end: int, batch_size: int, new_tokens: int) -> None:
        """SessionError unless `new_tokens` more positions of this batch fit this span's cache."""
        if (start, end) != (self.start, self.end):
            raise SessionError(
                f"cache belongs to blocks {self.start}:{self.end}, used with blocks {start}:{end}"
            )
        if batch_size != self.batch_size:
            raise SessionError(
                f"'batch_size' of hidden states must be {self.batch_size} (the cache's), "
                f"got {batch_size}"
            )
        if self.length + new_tokens > self.max_length:
            raise SessionError(
                f"cache 'max_length' is {self.max_length}: it holds {self.length} positions and "
                f"cannot take {new_tokens} more"
            )

    def reorder(self, rows: tuple[int, ...]) -> None:
        """Row i of the cache becomes what row ``rows[i]`` was (beam search); the caller checked
        that there is one index per row, each below ``batch_size``."""
        import torch

        if self.length:
            self.dynamic.reorder_cache(torch.tensor(rows, dtype=torch.int64))

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    @property
    def can_truncate(self) -> bool:
        """Whether `truncate` can roll back any length: no layer keeps only a sliding window
        (a window's dropped positions are gone)."""
        return not any(hasattr(layer, "sliding_window") for layer in self.dynamic.layers)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on: the cache is then the one that never saw them
        (the kept keys and values are the same numbers)."""
        if not self.can_truncate:
            raise SessionError("this cache keeps sliding windows: it cannot be rolled back")
        if type(length) is not int or not 0 <= length <= self.length:
            raise SessionError(
                f"'length' must be an int in [0, {self.length}] (the positions held), got {length!r}"
            )
        if length < self.length:
            for layer in self.dynamic.layers:
                layer.crop(length - self.length)  # negative: how many positions go
            self.length = length

    def __repr__(self) -> str:
        return (
            f"SpanCache(blocks {self.start}:{self.end}, {self.length}/{self.max_length} positions, "
            f"batch {self.batch_size})"
        )
