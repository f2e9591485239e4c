"""The one way a server refuses a request: ``RequestError(code, message)``, answered as an ErrorResponse."""

from __future__ import annotations


class RequestError(Exception):
    """A request we refuse; becomes an ErrorResponse and the stream keeps going."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
