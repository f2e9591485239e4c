"""The proof a checked session asks of a server that a step was pushed to (verification.py).

In a push chain the client never sends a middle server its input: the server before pushes it. The
client holds it all the same, as that server answered it; the receiving server's signed receipt
(dht/receipts.py) names the digest of the input it computed from. When the two agree, the client
holds the hop's true input and checks the answer as any other; when they do not (a server that
signs no receipts, or a pusher that pushed something else than it answered), ``PushUnproven``.

Knows nothing of what is done about it (inference_session.py redoes the step client-star).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarm_node.node.client.evidence import signed_input
from swarm_node.protocol.messages import StepResponse
from swarm_node.protocol.tensors import WireTensor

if TYPE_CHECKING:
    from swarm_node.node.client.inference_session import RemoteSpan


class PushUnproven(Exception):
    """A server answered a pushed step without a signed receipt of having computed it from what
    the pushing server answered the client."""

    def __init__(self, span: RemoteSpan) -> None:
        super().__init__(
            f"{span.hop.server.peer_id} gave no signed proof that it computed from the pushed "
            f"input the client holds (blocks {span.hop.start}:{span.hop.end})"
        )
        self.span = span


def proven(
    span: RemoteSpan, position: int, given: WireTensor | None, reply: StepResponse
) -> WireTensor:
    """``given`` (the step's input as the server before answered it), once ``span``'s server
    signed that it computed ``reply`` from exactly that; PushUnproven otherwise."""
    if given is None or not signed_input(span.hop, span.session_id, position, given, reply):
        raise PushUnproven(span)
    return given


def last_answer(spans: list[RemoteSpan]) -> WireTensor | None:
    """The wire of the last answer of the last of ``spans``, where answers are logged."""
    answered = spans[-1].answered
    return answered[-1].wire if answered else None
