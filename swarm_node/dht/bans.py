"""Servers a client stopped trusting for a while: a ban that grows with every failure.

Pure: the caller passes ``now`` (seconds on any clock it likes, as long as it is always the same
one). Knows nothing of sessions or the network; the client bans a server that failed a step (an
error, a broken stream, a missed deadline) and leaves banned servers out of its chain choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class BanList:
    """Peer -> banned until; the n-th failure in a row bans for ``base * 2**(n-1)`` s, at most ``cap``."""

    base: float = 15.0  # seconds of the first ban
    cap: float = 600.0  # the longest ban
    _until: dict[str, float] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)

    def ban(self, peer: str, now: float) -> float:
        """Count one more failure of ``peer``; return how many seconds it is banned for."""
        failures = self._failures.get(peer, 0) + 1
        self._failures[peer] = failures
        seconds = min(self.cap, self.base * 2 ** (failures - 1))
        self._until[peer] = max(self._until.get(peer, now), now + seconds)
        return seconds

    def ban_for(self, peer: str, now: float, seconds: float) -> None:
        """Ban ``peer`` for ``seconds`` at least, past ``cap`` (a server caught lying, not failing)."""
        self._until[peer] = max(self._until.get(peer, now), now + seconds)

    def forgive(self, peer: str) -> None:
        """The peer served well again: its next failure starts from the first ban."""
        self._failures.pop(peer, None)

    def is_banned(self, peer: str, now: float) -> bool:
        return self._until.get(peer, now) > now

    def banned(self, now: float) -> frozenset[str]:
        """Every peer banned at ``now`` (expired bans are dropped; their failure counts stay)."""
        for peer in [p for p, until in self._until.items() if until <= now]:
            del self._until[peer]
        return frozenset(self._until)
