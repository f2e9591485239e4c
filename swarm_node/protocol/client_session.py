"""A client's session rules, sans IO: step ids and positions, which answer belongs to which step,
and an error answer turned into the library's exception, here and only here.

The trio shell (node/client/inference_session.py) sends and receives; these rules say what an
answer means. This module does NOT know streams, time, tensors' contents or how a failed server is
replaced (node/client/recovery.py).
"""

from __future__ import annotations

from typing import TypeVar

from swarm_node.errors import RemoteError, RemoteProtocolError, SessionError
from swarm_node.protocol.messages import ErrorResponse, Message, StepResponse

T = TypeVar("T")


def answer(reply: Message | None, expect: type[T], *, peer: str, asked: str) -> T:
    """The answer to one request: an ErrorResponse becomes RemoteError, anything but ``expect``
    (or a closed stream: None) RemoteProtocolError."""
    if reply is None:
        raise RemoteProtocolError(f"{peer} closed the stream instead of answering")
    if isinstance(reply, ErrorResponse):
        raise RemoteError(reply.code, f"{reply.message} (from {peer})")
    if not isinstance(reply, expect):
        raise RemoteProtocolError(f"{peer} answered {asked} with {type(reply).__name__}")
    return reply


class SessionSteps:
    """One inference session's steps on the client: one id per step, the same on every hop, and
    positions that never pass ``max_length``."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.position = 0  # tokens every server's cache holds
        self.step_id = 0  # the newest step's id (ids start at 1)

    def check(self, tokens: int) -> None:
        if self.position + tokens > self.max_length:
            raise SessionError(
                f"session max_length is {self.max_length}: {self.position} tokens so far + "
                f"{tokens} new would exceed it"
            )

    def next_id(self) -> int:
        self.step_id += 1
        return self.step_id

    def advance(self, tokens: int) -> None:
        self.position += tokens

    def truncate(self, length: int) -> None:
        """The servers' caches keep only their first ``length`` positions from the next step on."""
        if type(length) is not int or not 0 <= length <= self.position:
            raise SessionError(
                f"'length' must be an int in [0, {self.position}] (the positions the session "
                f"holds), got {length!r}"
            )
        self.position = length


class HopAnswers:
    """What one server's stream answers to steps: older steps' answers (duplicates) are dropped,
    and ``push_failed`` means the client must send that step itself."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.duplicates = 0  # answers dropped because they were for an older step
        self.push_failures = 0  # push_failed answers heard
        self.refused_pushes = 0  # bad_push answers heard for steps the client sent itself

    def step_answer(
        self, reply: Message | None, step_id: int, *, sent: bool
    ) -> StepResponse | bool | None:
        """``reply`` read while waiting for step ``step_id`` (``sent``: the client sent it, not a
        push): its StepResponse; False: the push failed (send the step); None: a duplicate, or a
        refused push of a step the client sent itself (read on). ``bad_push`` for a step the client
        did not send: RemoteError with that code (the server that pushed is at fault)."""
        if isinstance(reply, ErrorResponse) and reply.code == "bad_push":
            if not sent:
                raise RemoteError(reply.code, f"{reply.message} (from {self.peer})")
            self.refused_pushes += 1
            return None
        if isinstance(reply, ErrorResponse) and reply.code == "push_failed":
            if sent:
                raise RemoteProtocolError(f"{self.peer} reported a failed push for a step we sent")
            self.push_failures += 1
            return False
        reply = answer(reply, StepResponse, peer=self.peer, asked="a step")
        if reply.step_id > step_id:
            raise RemoteProtocolError(
                f"{self.peer} answered step {reply.step_id}, expected {step_id}"
            )
        if reply.step_id < step_id:
            self.duplicates += 1
            return None
        return reply
