"""The swarm map's data: what the DHT says about each model, and what this API is generating.

Pure: coverage reports (from ``swarm_status.gather_status``) and generation events in, the JSON of
``/api/v1/state`` out; ``now`` is always an argument. The page that draws it is ``api/map_page.py``;
the task that asks the DHT is in ``api/service.py``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class _Active:
    id: int
    model: str
    kind: str  # "chat" or "completion"
    prompt_tokens: int
    started: float
    new_tokens: int = 0
    first_token_at: float | None = None


@dataclass(kw_only=True)
class GenerationTracker:
    """Requests in flight and the last ``keep`` finished ones, for the map's live stats."""

    keep: int = 12
    active: dict[int, _Active] = field(default_factory=dict)
    recent: deque[dict[str, Any]] = field(default_factory=deque)
    completed: int = 0
    failed: int = 0
    tokens_generated: int = 0
    peak_active: int = 0  # most requests generating at the same time so far
    _next_id: int = 0

    def start(self, *, model: str, kind: str, prompt_tokens: int, now: float) -> int:
        self._next_id += 1
        self.active[self._next_id] = _Active(
            id=self._next_id, model=model, kind=kind, prompt_tokens=prompt_tokens, started=now
        )
        self.peak_active = max(self.peak_active, len(self.active))
        return self._next_id

    def token(self, request_id: int, now: float) -> None:
        entry = self.active.get(request_id)
        if entry is None:
            return
        entry.new_tokens += 1
        self.tokens_generated += 1
        if entry.first_token_at is None:
            entry.first_token_at = now

    def finish(
        self,
        request_id: int,
        now: float,
        *,
        error: str | None = None,
        chain: list[str] | None = None,
    ) -> None:
        entry = self.active.pop(request_id, None)
        if entry is None:
            return
        if error is None:
            self.completed += 1
        else:
            self.failed += 1
        self.recent.appendleft({**self._describe(entry, now), "error": error, "chain": chain or []})
        while len(self.recent) > self.keep:
            self.recent.pop()

    @staticmethod
    def _describe(entry: _Active, now: float) -> dict[str, Any]:
        elapsed = max(now - entry.started, 0.0)
        ttft = None if entry.first_token_at is None else entry.first_token_at - entry.started
        steady = None if entry.first_token_at is None else now - entry.first_token_at
        rate = (entry.new_tokens - 1) / steady if steady and entry.new_tokens > 1 else None
        return {
            "id": entry.id,
            "model": entry.model,
            "kind": entry.kind,
            "prompt_tokens": entry.prompt_tokens,
            "new_tokens": entry.new_tokens,
            "elapsed_s": round(elapsed, 3),
            "time_to_first_token_s": None if ttft is None else round(ttft, 3),
            "tokens_per_s": None if rate is None else round(rate, 2),
        }

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "active": [self._describe(e, now) for e in self.active.values()],
            "completed": self.completed,
            "failed": self.failed,
            "tokens_generated": self.tokens_generated,
            "peak_active": self.peak_active,
            "recent": list(self.recent),
        }


def model_view(
    report: Mapping[str, Any] | None, *, model: str, num_blocks: int, error: str | None
) -> dict[str, Any]:
    """One model's block of the map: coverage per block (server count and total throughput) and
    its servers, from a ``coverage_report`` (None: not looked up yet)."""
    if report is None:
        return {
            "model": model,
            "num_blocks": num_blocks,
            "coverage": [0] * num_blocks,
            "throughput": [0.0] * num_blocks,
            "missing": list(range(num_blocks)),
            "servers": [],
            "variants": [],
            "error": error,
            "updated": False,
        }
    servers = {s["peer_id"]: s for s in report["servers"]}
    coverage = [len(b["servers"]) for b in report["blocks"]]
    throughput = [
        round(sum(servers[p]["throughput"] for p in b["servers"]), 2) for b in report["blocks"]
    ]
    return {
        "model": model,
        "num_blocks": report["num_blocks"],
        "coverage": coverage,
        "throughput": throughput,
        "missing": list(report["missing"]),
        "servers": [
            {
                key: s[key]
                for key in (
                    "peer_id",
                    "start",
                    "end",
                    "throughput",
                    "cache_tokens_left",
                    "sessions",
                    "batch",
                    "rtt_ms",
                    "state",
                    "dtype",
                    "quant",
                    "version",
                )
            }
            | {"model_digest": s.get("model_digest", "")[:12]}
            for s in report["servers"]
        ],
        # the weights served under the name, by digest (short): a client uses only its own
        "variants": [
            {
                "digest": v["digest"][:12],
                "local": v["local"],
                "servers": len(v["servers"]),
                "quants": v["quants"],
                "held_as": v.get("held_as", {}),
                "missing": v["missing"],
            }
            for v in report.get("variants", [])
            if v["digest"]
        ],
        "error": error,
        "updated": True,
    }


def swarm_state(
    models: Mapping[str, dict[str, Any]],
    generation: dict[str, Any],
    *,
    now: float,
    refreshed_at: float | None,
    api_peer: str,
    refresh_interval: float,
    events: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The JSON of ``/api/v1/state``; ``events``: the API peer's recent late hops, hedges and
    recoveries (client/recovery.py's journal), newest first."""
    return {
        "now": now,
        "refreshed_at": refreshed_at,
        "refresh_interval_s": refresh_interval,
        "api_peer": api_peer,
        "models": list(models.values()),
        "generation": generation,
        "events": [dict(e) for e in events],
    }
