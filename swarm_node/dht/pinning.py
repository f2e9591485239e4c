"""Which servers hold the weights a client expects: records checked against the client's pin.

A client that has its model's folder knows the model's digest and the digest of every span
(model/identity.py); it pins them, and a server is used only when its record announces that model
digest and, for its span, that span digest, held in a variant the client accepts: a quantization
(int8, nf4, or "none": the weights as stored) and a dtype they are computed in. Variants are
declared in the record and chosen by the client's policy, never taken silently.
A client without a pin (it only names the model) refuses a swarm where servers of that name announce
different digests: two models, or two revisions, never meet in one chain silently.

Pure: records in, (kept, why each other one was left out) out. Knows nothing of files or hashing:
``span_digest`` is the client's, passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from swarm_node.choices import DTYPES
from swarm_node.dht.records import ServerRecord
from swarm_node.errors import ModelError

QUANTS = ("none", "int8", "nf4")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelPin:
    """What a client expects of the servers of one model."""

    digest: str  # the model digest
    span_digest: Callable[[int, int], str]  # blocks start..end-1 -> their digest
    quants: Collection[str] = QUANTS  # weight variants the client accepts
    dtypes: Collection[str] = DTYPES  # dtypes it accepts them computed in


def pin_problem(record: ServerRecord, pin: ModelPin) -> str | None:
    """Why ``record``'s server does not hold the pinned weights; None when it does."""
    short = pin.digest[:12]
    if not record.model_digest:
        return f"{record.peer_id} announces no model digest (expected {short})"
    if record.model_digest != pin.digest:
        return (
            f"{record.peer_id} serves other weights of {record.model!r}: model digest "
            f"{record.model_digest[:12]}, expected {short}"
        )
    try:
        expected = pin.span_digest(record.start, record.end)
    except ModelError as exc:
        return f"{record.peer_id} announces blocks {record.start}:{record.end}: {exc}"
    if record.blocks_digest != expected:
        return (
            f"{record.peer_id} announces model {short} but blocks {record.start}:{record.end} "
            f"with digest {record.blocks_digest[:12] or 'none'}, expected {expected[:12]}"
        )
    if record.quant not in pin.quants:
        return (
            f"{record.peer_id} holds blocks {record.start}:{record.end} as {record.quant!r}, "
            f"and this client accepts only {sorted(pin.quants)}"
        )
    if record.dtype not in pin.dtypes:
        return (
            f"{record.peer_id} computes blocks {record.start}:{record.end} in {record.dtype!r}, "
            f"and this client accepts only {sorted(pin.dtypes)}"
        )
    return None


def pinned(
    records: Iterable[ServerRecord], pin: ModelPin
) -> tuple[list[ServerRecord], dict[str, str]]:
    """(the records of servers holding the pinned weights, peer id -> why each other one is out)."""
    kept: list[ServerRecord] = []
    left_out: dict[str, str] = {}
    for record in records:
        problem = pin_problem(record, pin)
        if problem is None:
            kept.append(record)
        else:
            left_out[record.peer_id] = problem
    return kept, left_out


def mixed_digests(records: Iterable[ServerRecord], model: str) -> str | None:
    """Why an unpinned client must not chain these servers of ``model`` (they announce different
    model digests), or None."""
    by_digest: dict[str, list[str]] = {}
    for record in records:
        if record.model_digest:
            by_digest.setdefault(record.model_digest, []).append(record.peer_id)
    if len(by_digest) < 2:
        return None
    held = "; ".join(
        f"{digest[:12]} on {len(peers)} server(s)" for digest, peers in sorted(by_digest.items())
    )
    return (
        f"servers of {model!r} hold {len(by_digest)} different models ({held}): name the model by "
        "its folder or digest so that this client uses only the weights it expects"
    )
