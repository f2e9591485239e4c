"""The one error hierarchy of swarm-node.

Every message says which field, what was expected and what came, so a user can act on it:
``'max_length' must be an int in [1, 8192], got -3``.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base of every error swarm-node raises on purpose."""


class ConfigError(SwarmError):
    """A flag, setting or argument the user gave is wrong."""


class ModelError(SwarmError):
    """A model folder, checkpoint or config cannot be used."""


class ProtocolError(SwarmError):
    """Something broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (our bug or our caller's)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow (garbage, oversize, wrong shape)."""


class RemoteError(SwarmError):
    """A peer answered a request with an error message (it is alive, it refused)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RequestError(SwarmError):
    """A request a server refuses: answered as an ErrorResponse with ``code``, and the stream keeps
    going (the client sees it as a RemoteError with the same code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class MissingBlocksError(SwarmError):
    """No server in the swarm covers some blocks of the model."""


class SessionError(SwarmError):
    """An inference session cannot continue (closed, timed out, over its max length)."""


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """ConfigError ``'name' must be an int >= low`` (or ``in [low, high]``) unless ``value`` is one."""
    too_high = high is not None and isinstance(value, int) and value > high
    if isinstance(value, bool) or not isinstance(value, int) or value < low or too_high:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name!r} must be an int {bound}, got {value!r}")
