"""Evidence that a server answered wrongly, checkable by anyone holding the same blocks.

Evidence is a server's session up to its first wrong step: every input and answer as they
travelled, with the server's signed receipt of each step (dht/receipts.py). ``signed_by`` checks
that the server signed exactly those inputs and answers; ``recomputed_error`` runs the inputs
through the blocks (model.BlockSpan, as one prefill) and measures how far the signed answer lies
from the honest one at the wrong step (compare with tolerances.bound). Activations reveal
something of the prompt: evidence stays with the client unless it chooses to publish it.

Knows nothing of the network or of sessions beyond these records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm_node import compression
from swarm_node.dht.evidence_records import PublishedEvidence, PublishedStep
from swarm_node.dht.receipts import Receipt, verify_receipt, wire_digest
from swarm_node.dht.routing import Hop
from swarm_node.node.client.tolerances import position_errors
from swarm_node.protocol.messages import StepResponse
from swarm_node.protocol.tensors import WireTensor


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedStep:
    receipt: Receipt
    signature: str  # hex, by the server
    sent: WireTensor  # the input as it travelled  # (B, T, H)
    answer: WireTensor  # the output as it travelled  # (B, T, H)


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    server: str  # peer id of the server that signed the steps
    steps: tuple[SignedStep, ...]  # its session from position 0 to the end of the wrong step
    wrong: int  # the first position whose answer was wrong


def digest(wire: WireTensor) -> str:
    return wire_digest(wire.codec, wire.dtype, tuple(wire.shape), wire.data)


def signed_input(
    hop: Hop, session_id: str, position: int, given: WireTensor, reply: StepResponse
) -> bool:
    """Whether ``hop``'s server signed that it computed ``reply`` from exactly ``given``: a step
    another server pushed it, which the client holds only as that server answered it."""
    receipt = Receipt(
        model=hop.server.model_digest,
        start=hop.start,
        end=hop.end,
        session_id=session_id,
        step_id=reply.step_id,
        position=position,
        input_digest=digest(given),
        output_digest=digest(reply.hidden),
    )
    return verify_receipt(receipt, reply.receipt, hop.server.peer_id)


def signed_by(evidence: Evidence) -> bool:
    """Whether every step's receipt is the server's signature of exactly that input and answer."""
    return bool(evidence.steps) and all(
        step.receipt.input_digest == digest(step.sent)
        and step.receipt.output_digest == digest(step.answer)
        and verify_receipt(step.receipt, step.signature, evidence.server)
        for step in evidence.steps
    )


def recomputed_error(evidence: Evidence, span: object) -> float:
    """The largest relative distance (tolerances.position_errors), from the wrong position to the
    end of its step, between the signed answers and ``span``'s (a model.BlockSpan holding the
    receipts' blocks) own answers to the same inputs."""
    first = evidence.steps[0].receipt
    sent = [compression.decode(s.sent, max_numel=1 << 30) for s in evidence.steps]
    answers = [compression.decode(s.answer, max_numel=1 << 30) for s in evidence.steps]
    inputs = torch.cat(sent, dim=1)  # (B, T, H)
    with torch.inference_mode():
        honest = span.forward(inputs, start=first.start, end=first.end)  # type: ignore[attr-defined]
    errors = position_errors(honest, torch.cat(answers, dim=1))  # (T,)
    return float(errors[evidence.wrong :].max())


def published(
    found: Evidence,
    *,
    reporter: str,
    error: float,
    bound: float,
    expires_at: float,
    activations: bool,
) -> PublishedEvidence:
    """``found`` as the DHT carries it: every step with its inputs and answers (``activations``),
    else the wrong step's signed receipt alone."""
    steps = found.steps if activations else found.steps[-1:]
    return PublishedEvidence(
        accused=found.server,
        reporter=reporter,
        steps=tuple(
            PublishedStep(
                receipt=s.receipt,
                signature=s.signature,
                sent=s.sent if activations else None,
                answer=s.answer if activations else None,
            )
            for s in steps
        ),
        wrong=found.wrong,
        error=error,
        bound=bound,
        expires_at=expires_at,
    )


def republished(evidence: PublishedEvidence) -> Evidence | None:
    """Published evidence with its activations as ``Evidence`` (None: it has none)."""
    if not evidence.has_activations:
        return None
    steps = tuple(
        SignedStep(receipt=s.receipt, signature=s.signature, sent=s.sent, answer=s.answer)  # type: ignore[arg-type]
        for s in evidence.steps
    )
    return Evidence(server=evidence.accused, steps=steps, wrong=evidence.wrong)
