"""The library's front door: ``async with open_peer(config) as peer:``, a peer of the swarm.

A peer always has a libp2p host and a seat in the DHT; it serves blocks when given a ServerConfig and
runs inference sessions over the swarm as a client.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import trio

from swarm_node import __version__
from swarm_node.compression import native
from swarm_node.dht.bans import BanList
from swarm_node.dht.discovery import ANSWER_FRESH, RecentAnswers, SwarmDHT
from swarm_node.dht.pinning import ModelPin, mixed_digests, pinned
from swarm_node.dht.records import MAX_NEXT_RTTS, ServerRecord
from swarm_node.dht.routing import (
    DEFAULT_LATENCY,
    ChainShares,
    Hop,
    RttEstimator,
    ThroughputEstimator,
    choose_inference_chain,
    choose_training_chain,
    missing_blocks,
    server_rtts,
    spread_exclusion,
    trusted_throughputs,
)
from swarm_node.errors import ConfigError, MissingBlocksError, ModelError
from swarm_node.model.bundled import identity_of, model_id_of
from swarm_node.model.identity import ModelIdentity
from swarm_node.node.config import ClientConfig, PeerConfig, ServerConfig
from swarm_node.node.net.dialing import connect_initial_peers, open_stream, parse_multiaddr
from swarm_node.node.net.host import (
    CLIENT_LIMITS,
    SERVER_LIMITS,
    build_host,
    close_connections,
    dial_on_demand,
    host_peer_id,
)
from swarm_node.node.net.identity import load_or_create_identity
from swarm_node.node.net.message_stream import request
from swarm_node.node.net.relay import Relays, RelaySettings
from swarm_node.node.net.swarm_key import load_swarm_key
from swarm_node.protocol import PROTOCOL_ID
from swarm_node.protocol import messages as m

if TYPE_CHECKING:  # these load torch: imported where a session or a server needs them, so that
    # a peer that only looks the swarm up (`swarm-node status`) never loads it
    from swarm_node.node.client.early_spans import EarlySpans
    from swarm_node.node.client.inference_session import InferenceSession
    from swarm_node.node.client.recovery import Recovery
    from swarm_node.node.client.settings import HopTuning, SessionSettings
    from swarm_node.node.client.verification import Finding
    from swarm_node.node.server.block_server import BlockServer

log = logging.getLogger(__name__)
EVIDENCE_AGAIN = 600.0  # seconds before published evidence against a server is looked up again

PING_TIMEOUT = 5.0
JOURNAL_LENGTH = 20  # recent late hops, hedges and recoveries a peer remembers
REFRESH_AFTER = 5.0  # seconds after which reused lookup results are renewed in the background
NO_DHT_SERVER = (
    "no peer this one knows serves the DHT: '--initial-peers' must name a server of the swarm "
    "(a client, such as another `generate`, `status` or the API, answers no DHT queries)"
)
NEXT_LOOKUP_EVERY = 300.0  # seconds a server pings the next block's servers it found, unlooked


class Peer:
    """A running peer. Made by ``open_peer``; do not construct directly."""

    def __init__(
        self,
        host: Any,
        dht: SwarmDHT,
        config: PeerConfig,
        client: ClientConfig,
        relays: Relays | None = None,
    ) -> None:
        self.host = host
        self.relays = relays
        self.dht = dht
        self.config = config
        self.client_config = client
        self.server: BlockServer | None = None
        self.compute_limiter = trio.CapacityLimiter(1)
        self._seq = 0
        self._nursery: trio.Nursery | None = None  # open_peer's, for paced provider records
        # the last late hops, hedges and recoveries of this peer's sessions (newest first)
        self.journal: deque[dict[str, object]] = deque(maxlen=JOURNAL_LENGTH)
        self.moving_to: int | None = None  # first block of the span a placed server is moving to
        self.announced: ServerRecord | None = None  # the last record whose announcement completed
        self.announcements = 0  # how many have completed
        self._announced_lot = trio.lowlevel.ParkingLot()
        self.bans = BanList(base=client.ban_time)  # servers that failed this peer's sessions lately
        self._known: dict[str, list[ServerRecord]] = {}  # model -> servers found by lookups
        self._known_at: dict[str, float] = {}  # model -> trio time of its last lookup
        self._refreshing: set[str] = set()  # models looked up again in the background now
        self._evidence_sought: dict[str, float] = {}  # server -> when its evidence was looked up
        self._partial: set[str] = set()  # models whose last lookup stopped at a chain's servers
        self.rtt = RttEstimator()  # smoothed round trips to the servers this peer pinged
        self._answered_at: RecentAnswers[float] = RecentAnswers()  # pings and steps answered here
        self.next_rtt = RttEstimator()  # a server's round trips to the servers of its next blocks
        # (trio time, block, servers) of its last lookup of the servers of the block after its span
        self._next_servers: tuple[float, int, list[ServerRecord]] | None = None
        self.observed = ThroughputEstimator()  # tokens/s of the servers this peer's sessions timed
        self.shares = ChainShares(share=client.max_server_share)  # the servers of its last chains
        self.identity: ModelIdentity | None = None  # what this peer serves
        self.pins: dict[str, ModelPin] = {}  # model name -> the weights this client expects
        self.left_out: dict[str, dict[str, str]] = {}  # model -> peer id -> why (last lookup)

    @property
    def peer_id(self) -> str:
        return host_peer_id(self.host)

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs of this peer, with /p2p/<id>, to give others as --initial-peers; a
        private peer's are its relayed ones only (nobody can dial where it listens)."""
        if self.relays is not None and self.relays.status == "private":
            return self.relays.addrs()
        texts = [str(addr) for addr in self.host.get_addrs()]
        return [text if "/p2p/" in text else f"{text}/p2p/{self.peer_id}" for text in texts]

    @property
    def reachability(self) -> str:
        """ "public", "private" (reached through relays) or "unknown"."""
        return self.relays.status if self.relays is not None else "unknown"

    async def relay_candidates(self) -> list[tuple[str, list[str]]]:
        """Peers that may relay for this one: its initial peers, then the servers of its model whose
        records offer relay slots, as (peer id, addresses)."""
        out: dict[str, list[str]] = {}
        for text in self.config.initial_peers:
            head, _, peer_id = text.rpartition("/p2p/")
            out.setdefault(peer_id, []).append(head)
        records: list[ServerRecord] = []
        if self.server is not None:
            blocks = range(self.server.span.config.num_hidden_layers)
            with trio.move_on_after(self.client_config.lookup_timeout):
                records = await self.dht.find_servers(
                    self.server.model_id, blocks, digest=self.server.model_digest
                )
        for rec in records:
            if rec.relay_slots > 0 and rec.reachability == "public":
                out.setdefault(rec.peer_id, list(rec.addrs))
        return list(out.items())

    async def _addresses_changed(self) -> None:
        if self.server is None:
            return
        try:
            await self.announce()
            log.info("re-announced at %s", ", ".join(self.addrs) or "no address")
        except Exception:  # the announce loop retries
            log.warning("re-announcing new addresses failed", exc_info=True)

    # -- serving ---------------------------------------------------------------------------------
    async def start_serving(
        self,
        config: ServerConfig,
        prepared: tuple[Any, float, dict[str, Any]],
        nursery: trio.Nursery,
    ) -> None:
        await self.switch_server(config, prepared)
        nursery.start_soon(self._announce_loop)

    async def switch_server(
        self, config: ServerConfig, prepared: tuple[Any, float, dict[str, Any]]
    ) -> BlockServer | None:
        """Serve ``prepared`` (a loaded span, its throughput and its LoRA adapters) from now on and
        announce it; returns the server it replaces, whose open streams keep running until their
        sessions end."""
        from swarm_node.node.server.block_server import BlockServer

        span, throughput, adapters = prepared
        old = self.server
        self.identity = await trio.to_thread.run_sync(identity_of, config.model)
        self.server = BlockServer(
            adapters=adapters,
            span=span,
            model_id=model_id_of(config.model),
            model_digest=self.identity.digest,
            config=config,
            max_frame_size=self.config.max_frame_size,
            compute_limiter=self.compute_limiter,
            throughput=throughput,
            host=self.host,
            push_targets=self.dht.server_record,
        )
        self.host.set_stream_handler(PROTOCOL_ID, self.server.handle_stream)
        await self.announce()
        log.info(
            "serving blocks %d:%d of %s (%s, %.1f tokens/s)",
            config.start,
            config.end,
            self.identity.describe(),
            config.dtype,
            throughput,
        )
        return old

    def make_record(self, state: str, ttl: float) -> ServerRecord:
        """This server's record as it would be announced now (a new seq each call)."""
        from swarm_node.node.server.adapters import is_adapter_id

        assert self.server is not None and self.identity is not None
        self._seq += 1
        return ServerRecord(
            peer_id=self.peer_id,
            addrs=tuple(self.addrs),
            model=self.server.model_id,
            start=self.server.start,
            end=self.server.end,
            throughput=float(self.server.throughput),
            cache_tokens_left=self.server.cache_tokens_left,
            dtype=self.server.config.dtype,
            version=__version__,
            quant=self.server.config.quant or "none",
            adapters=tuple(sorted(k for k in self.server.adapters if not is_adapter_id(k))),
            adapter_ids=tuple(sorted(k for k in self.server.adapters if is_adapter_id(k))),
            bytes_per_block=self.server.span.memory_bytes()
            // (self.server.end - self.server.start),
            cache_bytes_per_token=self.server.span.cache_bytes_per_token()
            // (self.server.end - self.server.start),
            device=self.server.span.device.type,
            next_rtts=tuple(sorted(self.next_rtt.as_dict().items()))[:MAX_NEXT_RTTS],
            state=state,
            moving_to=-1 if self.moving_to is None else self.moving_to,
            model_digest=self.identity.digest,
            blocks_digest=self.identity.span_digest(self.server.start, self.server.end),
            reachability=self.reachability,
            relay_slots=self.relays.relay_slots if self.relays is not None else 0,
            sessions=self.server.active_sessions,
            batch=self.server.batcher.batch_lately(trio.current_time()),
            operator=self.server.config.operator,
            seq=time.time_ns() // 1000 + self._seq,  # survives restarts with the same identity
            expires_at=time.time() + ttl,
        )

    async def announce(self, state: str = "ONLINE", *, provide_blocks: bool = True) -> None:
        """Sign and store this server's record; an ONLINE one also re-provides its blocks unless
        ``provide_blocks`` is False (the span did not change, say a move claim)."""
        record = self.make_record(state, self.config.dht_ttl)
        await self.dht.announce(
            record, provide_blocks=provide_blocks and state == "ONLINE", later=self._nursery
        )
        self.announced = record
        self.announcements += 1
        self._announced_lot.unpark_all()

    async def wait_announcement(self, after: int) -> None:
        """Return once more than ``after`` announcements have completed (``after``: a value of
        ``announcements`` read before)."""
        while self.announcements <= after:
            await self._announced_lot.park()

    async def _announce_loop(self) -> None:
        period, first = self.config.dht_ttl / 3, True
        while True:
            # every third of the TTL, minus up to a quarter of it at random: servers started together
            # (a swarm brought up at once, a test) would otherwise flood the DHT all in the same
            # second; the first wait anywhere from a quarter of that to all of it, or such servers
            # stay within seconds of each other for many rounds (32 loopback servers on 2 cores:
            # both cores busy ~6 s of every ~35 s, measured)
            share = random.uniform(0.25, 1.0) if first else 1 - 0.25 * random.random()
            first = False
            await trio.sleep(period * share)
            try:
                await self.measure_next_rtts()
            except Exception:  # must not stop the re-announcement (the rtts stay as they were)
                log.warning("measuring round trips to the next servers failed", exc_info=True)
            try:
                await self.announce()
            except Exception:  # a failed re-announce must not take the server down
                log.warning("re-announcing failed; will retry", exc_info=True)

    async def measure_next_rtts(self) -> dict[str, float]:
        """Ping the servers of the block after this server's span; fold the round trips into
        ``next_rtt`` (published in the record as ``next_rtts``). Returns this round's samples."""
        assert self.server is not None
        if self.server.end >= self.server.span.config.num_hidden_layers:
            return {}
        block, now = self.server.end, trio.current_time()
        known = self._next_servers
        if known is not None and known[1] == block and now - known[0] < NEXT_LOOKUP_EVERY:
            servers = known[2]  # a lookup was ~125 DHT queries a round in a 32-server swarm
        else:
            servers = []
            with trio.move_on_after(self.client_config.lookup_timeout):
                servers = await self.dht.find_servers(
                    self.server.model_id, [block], digest=self.server.model_digest
                )
            servers = [s for s in servers if s.peer_id != self.peer_id]
            self._next_servers = (now, block, servers) if servers else None
        samples = await self.ping_all(servers)
        if len(samples) < len(servers):  # one left or failed: look again next round
            self._next_servers = None
        for peer_id, seconds in samples.items():
            self.next_rtt.observe(peer_id, seconds)
        return samples

    async def _withdraw(self) -> None:
        """Shutting down: refuse new sessions, withdraw the record (OFFLINE), then give the steps
        being computed up to ``shutdown_grace`` seconds to be answered."""
        if self.server is None:
            return
        self.server.closing = True
        with trio.move_on_after(3.0):
            try:
                await self.announce("OFFLINE")
                log.info("withdrew the record of blocks %d:%d", self.server.start, self.server.end)
            except Exception:  # shutting down anyway
                log.warning("could not withdraw the server record", exc_info=True)
        if not await self.server.drain(self.server.config.shutdown_grace):
            log.warning(
                "%d step(s) still running after %.1f s; leaving them to the clients' recovery",
                self.server.steps_in_flight,
                self.server.config.shutdown_grace,
            )

    # -- client side -------------------------------------------------------------------------------
    async def ping(self, peer_id: str) -> tuple[float, m.InfoResponse]:
        """Round trip (seconds) of one request to a server (opening the stream not counted), and its info."""
        # a hung server holds nobody longer
        timeout = min(PING_TIMEOUT, self.client_config.step_timeout)
        conn = await open_stream(
            self.host, peer_id, max_frame_size=self.config.max_frame_size, timeout=timeout
        )
        try:
            t0 = trio.current_time()
            info = await request(conn, m.InfoRequest(), m.InfoResponse, timeout=timeout)
            elapsed = trio.current_time() - t0
            self._note_answer(peer_id)
        finally:
            await conn.close()
        return elapsed, info

    async def pin_model(self, model: str) -> ModelIdentity | None:
        """From now on use only servers holding the weights of ``model`` (a name, folder or digest,
        as ``--model`` takes; its digests computed once, then cached) in a variant the client
        config's ``accept_quant`` and ``accept_dtype`` allow; its sessions name the model by
        ``identity.name``. A folder holding only what a client needs (embeddings, norm, head) is
        identified by the manifest beside it (model/identity.py's ``manifest_identity``).

        None (nothing pinned, a WARNING logged) for a folder that cannot be identified, say such
        a folder without a manifest: its servers are then told apart by their announced digests
        only (a name served with two digests is refused)."""
        try:
            identity = await trio.to_thread.run_sync(identity_of, model)
        except ModelError as exc:
            log.warning("not pinning the weights of %s: %s", model, exc)
            return None
        self.pins[identity.name] = ModelPin(
            digest=identity.digest,
            span_digest=identity.span_digest,
            quants=self.client_config.accept_quant,
            dtypes=self.client_config.accept_dtype,
        )
        self._known.pop(identity.name, None)  # servers found before were not checked against it
        self._known_at.pop(identity.name, None)
        return identity

    def _holding_the_weights(self, model: str, servers: list[ServerRecord]) -> list[ServerRecord]:
        """``servers`` less those not holding the pinned weights of ``model`` (each logged once, and
        remembered in ``left_out``); without a pin, ModelError if they hold different models."""
        pin = self.pins.get(model)
        if pin is None:
            problem = mixed_digests(servers, model)
            if problem is not None:
                raise ModelError(problem)
            return servers
        kept, left_out = pinned(servers, pin)
        before = self.left_out.get(model, {})
        for peer_id, why in left_out.items():
            if before.get(peer_id) != why:
                log.warning("leaving a server of %s out: %s", model, why)
        self.left_out[model] = left_out
        return kept

    async def find_servers(
        self,
        model: str,
        num_blocks: int | None = None,
        *,
        start: int = 0,
        leaving_out: frozenset[str] | None = None,
    ) -> list[ServerRecord]:
        """Live servers of blocks ``start..num_blocks-1`` of ``model`` (None: those the model's key
        gives, whatever their blocks) holding the weights this client pinned (``pin_model``:
        looked up under their digest), remembered for routing. When the digest's keys leave
        blocks uncovered, the name's are asked too: servers found there holding other weights are
        left out with the reason (``left_out``), so that a missing block's error says why.

        ``leaving_out`` (a chain's lookup, with ``num_blocks``): the lookup stops at the first
        servers that hold every block less those in it (sooner, and maybe not all of them)."""
        blocks = None if num_blocks is None else range(start, num_blocks)
        pin = self.pins.get(model)
        enough = None
        cut: list[bool] = []
        if leaving_out is not None and num_blocks is not None:

            def enough(records: list[ServerRecord]) -> bool:
                usable = [r for r in records if r.peer_id not in leaving_out]
                cut[:] = [not missing_blocks(usable, start, num_blocks)]
                return cut[0]

        with trio.fail_after(self.client_config.lookup_timeout):
            digest = "" if pin is None else pin.digest
            servers = await self.dht.find_servers(model, blocks, digest=digest, enough=enough)
            if cut and cut[0]:
                self._partial.add(model)
            else:
                self._partial.discard(model)
            if digest and num_blocks is not None and missing_blocks(servers, start, num_blocks):
                by_peer = {s.peer_id: s for s in await self.dht.find_servers(model, blocks)}
                servers = list({**by_peer, **{s.peer_id: s for s in servers}}.values())
        servers = self._holding_the_weights(model, servers)
        if self.client_config.trust_evidence and self._nursery is not None:
            now = trio.current_time()
            for record in servers:
                if now >= self._evidence_sought.get(record.peer_id, -math.inf) + EVIDENCE_AGAIN:
                    self._evidence_sought[record.peer_id] = now
                    self._nursery.start_soon(self._check_evidence, model, record)
        known = {s.peer_id: s for s in self._known.get(model, [])}
        known.update((s.peer_id, s) for s in servers)
        self._known[model] = list(known.values())
        self._known_at[model] = trio.current_time()
        return servers

    def _publish_evidence(self, finding: Finding) -> None:
        """A spot check caught a liar: publish the evidence, in the background (--publish-evidence)."""
        from swarm_node.node.client import evidence_trust

        if self._nursery is not None:
            self._nursery.start_soon(
                self._best_effort,
                evidence_trust.publish(
                    self, finding, activations=self.client_config.publish_activations
                ),
            )

    async def _check_evidence(self, model: str, record: ServerRecord) -> None:
        from swarm_node.node.client import evidence_trust

        await self._best_effort(evidence_trust.check(self, model, record))

    @staticmethod
    async def _best_effort(work: Awaitable[object]) -> None:
        try:
            await work
        except Exception as exc:  # noqa: BLE001 (evidence is best effort: it never ends the peer)
            log.warning("evidence: %r", exc)

    def _refresh_soon(self, model: str, num_blocks: int) -> None:
        """Look ``model``'s servers up again in the background, unless that is under way."""
        if self._nursery is None or model in self._refreshing:
            return
        self._refreshing.add(model)

        async def refresh() -> None:
            try:
                await self.find_servers(model, num_blocks)
            except Exception as exc:  # noqa: BLE001 (the servers known stay; the next route retries)
                log.info("refreshing the servers of %s failed: %r", model, exc)
            finally:
                self._refreshing.discard(model)

        self._nursery.start_soon(refresh)

    async def ping_all(self, servers: Sequence[ServerRecord]) -> dict[str, float]:
        """Ping servers in parallel: peer id -> round trip (s); those that fail are left out."""
        samples: dict[str, float] = {}

        async def measure(rec: ServerRecord) -> None:
            try:
                samples[rec.peer_id], _ = await self.ping(rec.peer_id)
            except Exception as exc:  # noqa: BLE001 (a server that fails a ping in any way is skipped)
                log.info("server %s did not answer a ping: %r", rec.peer_id, exc)

        async with trio.open_nursery() as nursery:
            for rec in servers:
                nursery.start_soon(measure, rec)
        return samples

    async def find_chain(
        self,
        model: str,
        num_blocks: int,
        *,
        start: int = 0,
        end: int | None = None,
        push: bool | None = None,
        max_length: int = 1,
        batch_size: int = 1,
        adapter: str | None = None,
    ) -> list[Hop]:
        """``route`` over blocks start..end-1 of ``model`` after a new lookup; ``adapter``: only
        servers holding this LoRA adapter (default: the client config's; "": any server)."""
        from swarm_node.node.client.settings import SessionSettings

        settings = SessionSettings(
            model=model, push=push, max_length=max_length, batch_size=batch_size
        )
        adapter = self.client_config.adapter if adapter is None else adapter
        end = num_blocks if end is None else end
        return await self.route(settings, start, end, adapter=adapter or "", max_age=0.0)

    async def route(
        self,
        settings: SessionSettings,
        start: int,
        end: int,
        *,
        adapter: str = "",
        max_age: float | None = None,
        rng: random.Random | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> list[Hop]:
        """A chain for blocks start..end-1 of ``settings.model``, the one way inference and training
        find servers: among those of a new lookup (or of one at most ``max_age`` seconds old that
        covers the blocks; default: the client config's ``lookup_reuse``, and then one older than
        REFRESH_AFTER is renewed in the background) that hold ``adapter`` (when named), leaving out banned servers. With
        ``rng`` (training), drawn in proportion to throughput; else the lowest expected per-token
        latency, costing server-to-server hops from the round trips servers publish and leaving out
        servers whose cache cannot hold ``max_length * batch_size`` tokens, and those in ``avoid``.
        Every server of that chain has answered the lookup itself or a ping just now (the round
        trips feed ``self.rtt``): a server not measured yet counts farther than the farthest that
        answered (DEFAULT_LATENCY at least), those of the chosen chain that have not answered lately
        are pinged, and the chain is chosen again with their round trips (without those that did
        not answer) until all of its servers have: a chain of 8 among 32 servers costs 8 pings
        (each a dial that the session reuses), not 32.

        What servers claim is checked: throughputs are capped by what this peer measured
        (``self.observed``) or by the other servers' claims (``trusted_throughputs``), and a server
        already in its share of this peer's recent chains (``self.shares``) is left out where
        others hold its blocks."""
        model = settings.model
        if max_age is None:
            again = functools.partial(self.route, settings, start, end, adapter=adapter, rng=rng)
            try:
                chain = await again(max_age=self.client_config.lookup_reuse, avoid=avoid)
            except MissingBlocksError:  # the servers known give no chain now: new ones may
                return await again(max_age=0.0, avoid=avoid)
            if trio.current_time() - self._known_at.get(model, -math.inf) > REFRESH_AFTER:
                self._refresh_soon(model, end)
            return chain
        servers = self._known.get(model, [])
        fresh = trio.current_time() - self._known_at.get(model, -math.inf) <= max_age
        if not (fresh and servers and not missing_blocks(servers, start, end)):
            leaving_out = self.bans.banned(trio.current_time()) | avoid
            servers = await self.find_servers(model, end, start=start, leaving_out=leaving_out)
        try:
            try:
                return await self._route(settings, servers, start, end, adapter, rng, avoid)
            except MissingBlocksError:
                if model not in self._partial:
                    raise
                servers = await self.find_servers(model, end, start=start)  # all of them
                return await self._route(settings, servers, start, end, adapter, rng, avoid)
        except MissingBlocksError as exc:
            left_out = self.left_out.get(model)
            if not servers and not await self.dht.knows_dht_servers():
                raise MissingBlocksError(f"{exc}: {NO_DHT_SERVER}") from None
            if not left_out:
                raise
            why = "; ".join(sorted(left_out.values())[:8])
            raise MissingBlocksError(f"{exc}; servers left out: {why}") from None

    async def ping_a_chain(self, model: str, start: int, end: int) -> None:
        """Ping the servers that a chain over blocks start..end-1 of ``model`` would take now, among
        those found (each a dial that the chain's session then reuses): a cold `generate` does
        this while torch and its side of the model load, so that its route finds them answered
        (ANSWER_FRESH) instead of dialling them after (8 dials at 25 ms a hop: ~0.2 s)."""
        wants = ChainWants(model=model)
        adapter = self.client_config.adapter or ""
        await self._route(wants, self._known.get(model, []), start, end, adapter, None, frozenset())

    async def _route(
        self,
        settings: SessionSettings | ChainWants,
        servers: list[ServerRecord],
        start: int,
        end: int,
        adapter: str,
        rng: random.Random | None,
        avoid: frozenset[str],
    ) -> list[Hop]:
        model = settings.model
        servers = trusted_throughputs(servers, self.observed.as_dict())
        exclude = self.bans.banned(trio.current_time()) | avoid
        blocks: dict[str, Any] = dict(model=model, start=start, end=end, now=time.time())
        crowded = self.shares.crowded()
        if rng is not None:
            exclude = spread_exclusion(
                servers, exclude=exclude, crowded=crowded, adapter=adapter, **blocks
            )
            chain = choose_training_chain(
                servers, rng=rng, exclude=exclude, adapter=adapter, **blocks
            )
            self.shares.record(chain)
            return chain
        candidates = [s for s in servers if s.peer_id not in exclude]
        samples = self.dht.recent_answers(s.peer_id for s in candidates)  # a lookup's: no ping
        answered = set(samples) | self._answered_lately(
            s.peer_id for s in candidates if s.peer_id not in samples
        )
        unreachable: set[str] = set()
        while True:  # each round pings at least one server more, or returns
            self._observe(samples)  # the lookup's answers are noted here too
            rtt = self.rtt.as_dict()
            # a server not measured counts a quarter farther than the farthest that answered
            # (DEFAULT_LATENCY at least): assumed nearer, or as near, each round would try the
            # unmeasured ones next (3 rounds of pings at 25 ms a hop, measured)
            farthest = max([0.0, *(rtt[p] for p in answered if p in rtt)])
            assumed = max(DEFAULT_LATENCY, 1.25 * farthest)
            rtt |= {s.peer_id: assumed for s in candidates if s.peer_id not in rtt}
            chain = choose_inference_chain(
                servers,
                rtt=rtt,
                server_rtt=server_rtts(servers),
                push=self.client_config.push if settings.push is None else settings.push,
                max_length=settings.max_length,
                batch_size=settings.batch_size,
                exclude=spread_exclusion(
                    servers,
                    exclude=exclude | unreachable,
                    crowded=crowded,
                    cache_tokens=settings.max_length * settings.batch_size,
                    adapter=adapter,
                    **blocks,
                ),
                adapter=adapter,
                **blocks,
            )
            unmeasured = [h.server for h in chain if h.server.peer_id not in answered]
            if not unmeasured:
                self.shares.record(chain)
                return chain
            samples = await self.ping_all(unmeasured)
            answered |= samples.keys()
            unreachable |= {s.peer_id for s in unmeasured if s.peer_id not in samples}

    def _observe(self, samples: dict[str, float]) -> None:
        for peer_id, seconds in samples.items():
            self.rtt.observe(peer_id, seconds)
            self._note_answer(peer_id)

    def _note_answer(self, peer_id: str) -> None:
        self._answered_at.note(peer_id, 0.0)

    def _answered_lately(self, peer_ids: Iterable[str]) -> set[str]:
        """Those of ``peer_ids`` that answered a ping or a step of this peer in the last
        ANSWER_FRESH seconds and have a round trip: a route needs no ping of them (as of a
        lookup's answers): a warm client's next chain costs no round trip."""
        return {
            p
            for p in peer_ids
            if self._answered_at.fresh(p, within=ANSWER_FRESH) is not None
            and self.rtt.get(p) is not None
        }

    def observe_step(self, hop: Hop, seconds: float) -> None:
        """A one-token step of ``hop`` took ``seconds`` (sent to answered): fold the server's
        compute rate into ``self.observed`` (its round trip taken off, at most 3/4 of the time)."""
        peer = hop.server.peer_id
        self._note_answer(peer)
        compute = max(seconds - (self.rtt.get(peer) or 0.0), seconds / 4)
        if compute <= 0:
            return
        share = (hop.end - hop.start) / (hop.server.end - hop.server.start)
        self.observed.observe(peer, tokens=share, seconds=compute)

    def _recovery(self, settings: SessionSettings, adapter: str) -> Recovery | None:
        """How a session replaces a failed server (None when the config turns it off): from the
        servers already known first (no lookup: fastest), then after new lookups."""
        from swarm_node.node.client.recovery import Recovery

        config = self.client_config
        if config.max_attempts == 0:
            return None
        unpushed = replace(settings, push=False)

        async def reroute(start: int, end: int, attempt: int, avoid: frozenset[str]) -> list[Hop]:
            age = math.inf if attempt == 0 else 0.0
            return await self.route(unpushed, start, end, adapter=adapter, max_age=age, avoid=avoid)

        return Recovery(
            journal=self.journal,
            reroute=reroute,
            bans=self.bans,
            max_attempts=config.max_attempts,
            retry_delay=config.retry_delay,
            clock=trio.current_time,
        )

    def inference_session(
        self,
        chain: list[Hop],
        settings: SessionSettings,
        tuning: HopTuning | None = None,
        *,
        early: EarlySpans | None = None,
    ) -> InferenceSession:
        """A session over ``chain`` (``settings``' None fields: the client config's); ``tuning``:
        deep prompts of every block of the model and a named adapter or client-owned LoRA, each
        server getting its blocks' part at open; ``early``: sessions opened on the chain's servers
        before this one (early_spans.py), taken where they match."""
        from swarm_node.node.client.inference_session import IdleWatch, InferenceSession, Verify
        from swarm_node.node.client.settings import HopTuning

        if settings.max_length < 1:
            raise ConfigError(f"'max_length' must be an int >= 1, got {settings.max_length!r}")
        config = self.client_config
        settings = replace(
            settings,
            compression=settings.compression or config.compression,
            push=config.push if settings.push is None else settings.push,
        )
        tuning = (tuning or HopTuning()).resolved(config.adapter)
        return InferenceSession(
            self.host,
            chain,
            settings,
            tuning=tuning,
            step_timeout=config.step_timeout,
            max_frame_size=self.config.max_frame_size,
            recovery=self._recovery(settings, tuning.adapter or ""),
            observe=self.observe_step,
            watch=None
            if config.idle_ping == 0 or self._nursery is None
            else IdleWatch(every=config.idle_ping, ping=self.ping, spawn=self._nursery.start_soon),
            verify=None
            if config.verify_rate == 0 or self._nursery is None
            else Verify(
                rate=config.verify_rate,
                ban_seconds=config.verify_ban,
                spawn=self._nursery.start_soon,
                on_found=self._publish_evidence if config.publish_evidence else None,
            ),
            early=early,
        )


@dataclass(frozen=True)
class ChainWants:
    """What ``_route`` reads of a session's settings, for a chain chosen before torch is loaded."""

    model: str
    push: bool | None = None
    max_length: int = 1
    batch_size: int = 1


@asynccontextmanager
async def open_peer(
    config: PeerConfig | None = None,
    *,
    server: ServerConfig | None = None,
    client: ClientConfig | None = None,
) -> AsyncIterator[Peer]:
    """Start a peer; leaving the block withdraws its records and closes everything it opened.

    Errors come out as themselves (a ConfigError, a SwarmError...), not wrapped in the exception
    groups of py-libp2p's internal nurseries.
    """
    config = config or PeerConfig()
    client = client or ClientConfig()
    key_pair = load_or_create_identity(config.identity)
    listen = [parse_multiaddr(a, "listen") for a in config.listen]
    announce = [parse_multiaddr(a, "announce_addrs") for a in config.announce_addrs] or None
    psk = load_swarm_key(config.swarm_key) if config.swarm_key is not None else None
    prepared = None
    if server is not None:  # "auto" device, dtype, blocks or cache made concrete (memory.py)
        from swarm_node.node.server.loading import prepare_span
        from swarm_node.node.server.memory import resolve_server

        server, _ = await trio.to_thread.run_sync(resolve_server, server)
        placed = server.num_blocks is not None and server.end == 0
        prepared = None if placed else await prepare_span(server)
    await trio.to_thread.run_sync(native.decode_kernel)  # a first compile never holds the loop
    limits = CLIENT_LIMITS if server is None else SERVER_LIMITS
    host = build_host(key_pair=key_pair, announce=announce, psk=psk, limits=limits)
    relays = Relays(host, relay_settings(config), listening=bool(listen))
    try:
        async with host.run(listen_addrs=listen):
            await dial_on_demand(host)
            dht = SwarmDHT(host, addrs=relays.reachable_addrs, serving=_dht_server(config, server))
            await connect_initial_peers(
                host,
                dht,
                config.initial_peers,
                timeout=config.connect_timeout,
                private=config.swarm_key is not None,
            )
            async with dht.running(), trio.open_nursery() as nursery:
                peer = Peer(host, dht, config, client, relays)
                peer._nursery = nursery
                await nursery.start(relays.run, peer.relay_candidates)
                relays.changed = peer._addresses_changed
                try:
                    if server is not None and prepared is not None:
                        await peer.start_serving(server, prepared, nursery)
                    elif server is not None:  # --num-blocks: choose where, with the swarm in view
                        from swarm_node.node.server.placement import start_placed

                        await start_placed(peer, server, nursery)
                    yield peer
                finally:
                    with trio.CancelScope(shield=True):
                        await peer._withdraw()
                        await close_connections(host)
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        from swarm_node.node.client.recovery import sole_error

        raise sole_error(group) or group from None  # one failure comes out as itself


def _dht_server(config: PeerConfig, server: ServerConfig | None) -> bool:
    """Whether this peer runs the DHT in server mode (PeerConfig.dht_mode)."""
    if config.dht_mode == "auto":
        return server is not None or not config.initial_peers
    return config.dht_mode == "server"


def relay_settings(config: PeerConfig) -> RelaySettings:
    """``config``'s relay fields (in a private swarm too: relayed connections carry the key)."""
    return RelaySettings(
        reachability=config.reachability,
        offer=not config.no_relay,
        max_reservations=config.relay_max_reservations,
        max_circuits=config.relay_max_circuits,
        max_circuit_bytes=config.relay_max_circuit_mb * 2**20,
        max_circuit_seconds=config.relay_max_circuit_seconds,
        reservation_ttl=config.relay_reservation_ttl,
        relays=config.relays,
        renew_every=config.relay_renew_every,
        recheck_every=config.autonat_every,
        hole_punch=not config.no_hole_punch,
    )
