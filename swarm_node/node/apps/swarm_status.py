"""``swarm-node status``: the block coverage map of a model, as text or JSON.

``coverage_report`` and ``format_report`` are pure (records and measured round trips in, a dict or
text out); ``gather_status`` is the part that asks the swarm.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from swarm_node.dht.records import ServerRecord
from swarm_node.dht.routing import format_blocks
from swarm_node.errors import MissingBlocksError

# blocks looked up to find any server (and, through it, how many blocks the model has) when the
# model's keys give none
PROBE_BLOCKS = (0, 1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128)


def coverage_report(
    servers: Sequence[ServerRecord],
    *,
    model: str,
    num_blocks: int,
    rtt: Mapping[str, float],
    expected_digest: str = "",
) -> dict[str, Any]:
    """Every block with the servers covering it; servers with their numbers and round trip; the
    variants (model digests) served, each with its own coverage (``expected_digest``: the local
    model's, marked)."""
    servers = sorted(servers, key=lambda s: (s.start, s.end, s.peer_id))
    blocks = [
        {"block": b, "servers": [s.peer_id for s in servers if s.covers(b)]}
        for b in range(num_blocks)
    ]
    digests = sorted({s.model_digest for s in servers} | ({expected_digest} - {""}))
    variants = []
    for digest in digests:
        held = [s for s in servers if s.model_digest == digest]
        variants.append(
            {
                "digest": digest,
                "local": bool(digest) and digest == expected_digest,
                "servers": [s.peer_id for s in held],
                "quants": sorted({s.quant for s in held}),
                "held_as": {
                    label: sum(1 for s in held if _held_as(s) == label)
                    for label in sorted({_held_as(s) for s in held})
                },
                "missing": [b for b in range(num_blocks) if not any(s.covers(b) for s in held)],
            }
        )
    return {
        "model": model,
        "num_blocks": num_blocks,
        "expected_digest": expected_digest,
        "variants": variants,
        "servers": [
            {
                "peer_id": s.peer_id,
                "addrs": list(s.addrs),
                "start": s.start,
                "end": s.end,
                "throughput": s.throughput,
                "cache_tokens_left": s.cache_tokens_left,
                "rtt_ms": None if s.peer_id not in rtt else round(rtt[s.peer_id] * 1000, 2),
                "next_rtts_ms": {p: round(r * 1000, 2) for p, r in s.next_rtts},
                "dtype": s.dtype,
                "quant": s.quant,
                "bytes_per_block": s.bytes_per_block,
                "cache_bytes_per_token": s.cache_bytes_per_token,
                "device": s.device,
                "version": s.version,
                "adapters": list(s.adapters),
                "state": s.state,
                "reachability": s.reachability,
                "relayed": any("/p2p-circuit" in a for a in s.addrs),
                "relay_slots": s.relay_slots,
                "moving_to": None if s.moving_span is None else list(s.moving_span),
                "model_digest": s.model_digest,
                "blocks_digest": s.blocks_digest,
                "sessions": s.sessions,
                "batch": s.batch,
            }
            for s in servers
        ],
        "blocks": blocks,
        "missing": [b["block"] for b in blocks if not b["servers"]],
    }


def _held_as(server: ServerRecord) -> str:
    """The variant a server holds its weights in: its quantization, or the dtype it computes in."""
    return server.dtype if server.quant == "none" else server.quant


def _short(peer_id: str) -> str:
    return "…" + peer_id[-8:]


def _reach(server: dict[str, Any]) -> str:
    reach = server.get("reachability", "unknown")
    if reach == "private" or server.get("relayed"):
        return f"  {reach}, through relays"
    slots = server.get("relay_slots", 0)
    return f"  {reach}" + (f", relays for up to {slots}" if slots else "")


def format_report(report: dict[str, Any]) -> str:
    """The coverage map for a terminal: one line a block, missing blocks marked, then the servers."""
    servers = {s["peer_id"]: s for s in report["servers"]}
    missing = report["missing"]
    lines = [
        f"{report['model']}: {report['num_blocks']} blocks, {len(servers)} server(s), "
        + (f"MISSING blocks {format_blocks(missing)}" if missing else "every block served")
    ]
    width = len(str(max(report["num_blocks"] - 1, 0)))
    for entry in report["blocks"]:
        ids = entry["servers"]
        if not ids:
            lines.append(f"  block {entry['block']:>{width}}  !! MISSING: no server")
            continue
        total = sum(servers[p]["throughput"] for p in ids)
        names = ", ".join(_short(p) for p in ids)
        lines.append(
            f"  block {entry['block']:>{width}}  {'#' * min(len(ids), 8):<8} {len(ids)} server(s), {total:.1f} tok/s: {names}"
        )
    lines.append("servers:")
    for s in report["servers"]:
        rtt = "unreachable" if s["rtt_ms"] is None else f"{s['rtt_ms']:.1f} ms"
        moving = s.get("moving_to")
        lines.append(
            f"  {_short(s['peer_id'])}  blocks {s['start']}:{s['end']}  {s['throughput']:.1f} tok/s  "
            f"{s['cache_tokens_left']} cache tokens free  round trip {rtt}  "
            f"{s['dtype'] if s['quant'] == 'none' else s['quant']}  v{s['version']}"
            + f"  model {s.get('model_digest', '')[:12] or '-'}"
            + _reach(s)
            + f"  {s.get('sessions', 0)} session(s), decode batch up to {s.get('batch', 0)}"
            + (f"  adapters: {', '.join(s['adapters'])}" if s.get("adapters") else "")
            + (f"  moving to blocks {moving[0]}:{moving[1]}" if moving else "")
        )
    variants = report.get("variants", [])
    if not any(v["digest"] for v in variants):  # older servers only: nothing to tell apart
        variants = []
    if variants:
        lines.append("models (by digest):")
    for variant in variants:
        digest = variant["digest"][:12] or "no digest (older servers)"
        mine = " (this client's)" if variant["local"] else ""
        gaps = variant["missing"]
        lines.append(
            f"  {digest}{mine}: {len(variant['servers'])} server(s) "
            f"({', '.join(f'{n} {v}' for v, n in variant.get('held_as', {}).items()) or '-'}), "
            + (f"missing blocks {format_blocks(gaps)}" if gaps else "every block served")
        )
    return "\n".join(lines)


async def gather_status(
    peer: Any, model: str, *, num_blocks: int | None = None, expected_digest: str = ""
) -> dict[str, Any]:
    """Ask the swarm: every server of ``model``, pinged, as a coverage report. One round where the
    model's keys tell everything: the servers they give are pinged together, and the first answer
    says how many blocks the model has (unless ``num_blocks`` does)."""
    timeout = peer.client_config.lookup_timeout
    rtt: dict[str, float] = {}
    with trio.move_on_after(timeout) as lookup:
        servers: list[ServerRecord] = await peer.dht.find_servers(model, None, now=time.time())
        if not servers and num_blocks is None:  # some blocks' own keys may know one
            servers = await peer.dht.find_servers(model, PROBE_BLOCKS)
        told = await _ping_all(peer, servers, rtt)
        num_blocks = num_blocks if num_blocks is not None else told
        if num_blocks is None:
            raise MissingBlocksError(
                f"no server of {model!r} answered (looked up blocks "
                f"{format_blocks(PROBE_BLOCKS)}); check the model name, or pass --num-blocks to "
                "see the empty map anyway"
            )
        covered = {b for rec in servers for b in range(rec.start, rec.end)}
        if not covered.issuperset(range(num_blocks)):  # else the model's keys told everything
            known = {rec.peer_id for rec in servers}
            servers = await peer.dht.find_servers(model, range(num_blocks), now=time.time())
            await _ping_all(peer, [rec for rec in servers if rec.peer_id not in known], rtt)
    if lookup.cancelled_caught or num_blocks is None:
        raise MissingBlocksError(
            f"looking up the servers of {model!r} took longer than {timeout:g} s (the DHT "
            "peers asked did not answer in time); try again, or give --initial-peers closer by"
        )
    return coverage_report(
        servers, model=model, num_blocks=num_blocks, rtt=rtt, expected_digest=expected_digest
    )


async def _ping_all(
    peer: Any, servers: Sequence[ServerRecord], rtt: dict[str, float]
) -> int | None:
    """Ping ``servers`` together (round trips into ``rtt`` and the peer's estimator); the block
    count of the model as the first server that answered tells it (None: none answered)."""
    told: list[int] = []

    async def ping(rec: ServerRecord) -> None:
        try:
            seconds, info = await peer.ping(rec.peer_id)
        except Exception:  # noqa: BLE001 (a server that fails a ping is shown without a round trip)
            return
        rtt[rec.peer_id] = seconds
        peer.rtt.observe(rec.peer_id, seconds)
        told.append(int(info.num_blocks))

    async with trio.open_nursery() as nursery:
        for rec in servers:
            nursery.start_soon(ping, rec)
    return told[0] if told else None
