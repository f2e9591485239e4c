"""Evidence shared between clients through the DHT, both ways opt-in.

``publish``: a client with ``--publish-evidence`` stores, for each server its spot checks caught
lying, signed evidence under the server's key (dht/evidence_records.py): the server's signed
receipts, and with ``--publish-activations`` the inputs and answers themselves (activations reveal
something of the prompt), as long as they fit the DHT's bound (else the receipt alone).

``check``: a client with ``--trust-evidence`` looks up evidence against the servers it finds and
believes none of it on the reporter's word: it re-runs the published inputs on another server of
the same blocks (neither the accused nor the reporter) and bans the accused only when the answers
it signed lie beyond the calibrated bound from that server's. Evidence without activations (a
receipt alone) cannot be re-run and is not acted on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import trio

from swarm_node import compression
from swarm_node.dht.evidence_records import PublishedEvidence
from swarm_node.dht.records import MAX_TTL, ServerRecord
from swarm_node.errors import LocalProtocolError, MissingBlocksError, SwarmError
from swarm_node.node.client.evidence import published, republished
from swarm_node.node.client.settings import SessionSettings
from swarm_node.node.client.tolerances import bound, position_errors, weights_kind
from swarm_node.node.client.verification import Finding

log = logging.getLogger(__name__)

EVIDENCE_TTL = MAX_TTL  # seconds published evidence lives


async def publish(peer: Any, finding: Finding, *, activations: bool) -> PublishedEvidence | None:
    """Sign and store evidence of ``finding`` (a node.peer.Peer's DHT); what was stored."""
    if finding.evidence is None:
        return None
    fields = dict(
        reporter=peer.peer_id,
        error=finding.error,
        bound=finding.bound,
        expires_at=time.time() + EVIDENCE_TTL,
    )
    for full in (True, False) if activations else (False,):
        evidence = published(finding.evidence, activations=full, **fields)
        try:
            await peer.dht.publish_evidence(evidence)
        except LocalProtocolError as exc:
            log.info("evidence against %s does not fit the DHT (%s)", finding.liar[-8:], exc)
            continue
        log.warning("published evidence against %s (activations: %s)", finding.liar, full)
        return evidence
    return None


async def check(peer: Any, model: str, record: ServerRecord) -> bool:
    """Whether published evidence against ``record``'s server holds (re-run: see the module's
    docstring); the server is then banned for the client's ``verify_ban``."""
    evidence = await peer.dht.find_evidence(record.peer_id)
    if evidence is None:
        return False
    found = republished(evidence)
    receipt = evidence.steps[0].receipt
    if found is None or receipt.model != record.model_digest:
        log.info("evidence against %s cannot be re-run here: not acted on", record.peer_id[-8:])
        return False
    inputs = [compression.decode(s.sent, max_numel=1 << 26) for s in found.steps]
    answers = [compression.decode(s.answer, max_numel=1 << 26) for s in found.steps]
    sent = torch.cat(inputs, dim=1)  # (B, T, H)
    settings = SessionSettings(
        model=model,
        max_length=sent.shape[1],
        batch_size=sent.shape[0],
        dtype=str(sent.dtype).removeprefix("torch."),
    )
    avoid = frozenset({evidence.accused, evidence.reporter})
    try:
        chain = await peer.route(settings, receipt.start, receipt.end, avoid=avoid)
        async with peer.inference_session(chain, settings) as session:
            honest = await session.step(sent)
    except (SwarmError, trio.TooSlowError, MissingBlocksError) as exc:
        log.info("evidence against %s not re-run: %s", record.peer_id[-8:], exc)
        return False
    kinds = {weights_kind(h.server.dtype, h.server.quant) for h in chain}
    theirs = weights_kind(record.dtype, record.quant)
    codec = found.steps[0].answer.codec
    limit = max(bound((kind, theirs), (codec, "none")) for kind in kinds)
    error = float(position_errors(honest, torch.cat(answers, dim=1))[evidence.wrong :].max())
    if error <= limit:
        log.info(
            "evidence against %s does not hold (%.2e <= %.2e)", record.peer_id[-8:], error, limit
        )
        return False
    config = peer.client_config
    peer.bans.ban_for(record.peer_id, trio.current_time(), config.verify_ban)
    log.warning(
        "evidence published by %s against %s holds (re-run: %.2e > %.2e): banned for %.0f s",
        *(evidence.reporter[-8:], record.peer_id, error, limit, config.verify_ban),
    )
    return True
