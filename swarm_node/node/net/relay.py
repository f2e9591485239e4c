"""Reachability and relays: py-libp2p's AutoNAT and circuit relay v2, for peers behind a NAT.

A peer is "public" (others can dial it), "private" (they cannot: behind a NAT or a firewall) or
"unknown" (nobody could tell yet). ``--reachability auto`` asks connected peers with AutoNAT.
Public peers offer a relay service (py-libp2p's hop protocol) under strict limits; a private peer
reserves a slot at two or more relays, the fastest to answer first, and is dialed at its
``/p2p-circuit`` addresses through them. The relayed connection is itself Noise + yamux, end to
end: a relay sees only ciphertext.

Knows nothing of blocks, records or sessions: the caller gives it relay candidates and learns of
changes through a callback.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.connection_types import ConnectionType
from libp2p.host.autonat import AutoNATService, AutoNATStatus
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2 import CircuitV2Protocol, CircuitV2Transport, RelayLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import get_available_interfaces
from multiaddr import Multiaddr

from swarm_node.node.net.direct import DirectUpgrades

log = logging.getLogger(__name__)

REACHABILITIES = ("auto", "public", "private")
AUTONAT_PEERS = 3  # peers asked at a check; they must agree (fewer when fewer are connected)
AUTONAT_TIMEOUT = 10.0  # seconds one peer has to answer
WATCH_EVERY = 1.0  # seconds between two looks at the relays' connections
MAX_SEARCH_DELAY = 60.0  # seconds between two searches for relays at most, when none is found
RESERVE_TIMEOUT = 10.0  # seconds one reservation has to be answered
CIRCUIT_ADDR_TTL = 3600  # seconds the peerstore keeps a private peer's relayed addresses
DIAL_BACK_TIMEOUT = 8.0  # seconds an AutoNAT answer's dial back may take (the asker waits 10)

_DIALERS: weakref.WeakKeyDictionary[Any, CircuitV2Transport] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    reachability: str  # "auto", "public" or "private"
    offer: bool  # offer a relay service when public
    max_reservations: int  # private peers one relay holds slots for
    max_circuits: int  # concurrent circuits to one reserved peer
    max_circuit_bytes: int  # bytes through one circuit, both ways together
    max_circuit_seconds: int  # seconds one circuit may last
    reservation_ttl: int  # seconds a reservation lasts unless renewed
    relays: int  # relays a private peer keeps a reservation at
    renew_every: float  # seconds between two renewals of a private peer's reservations
    recheck_every: float  # seconds between two AutoNAT checks in "auto" mode
    hole_punch: bool = True  # try for a direct connection to peers reached through a relay (DCUtR)


def is_circuit(addr: str | Multiaddr) -> bool:
    return "/p2p-circuit" in str(addr)


def circuit_addrs(relay_id: str, relay_addrs: Sequence[str], peer_id: str) -> list[str]:
    """This peer's addresses through ``relay_id`` reached at ``relay_addrs`` (direct, dialable)."""
    out = []
    for text in relay_addrs:
        if is_circuit(text) or "/ip4/0.0.0.0/" in text or "/ip6/::/" in text:
            continue
        base = text if "/p2p/" in text else f"{text}/p2p/{relay_id}"
        out.append(f"{base}/p2p-circuit/p2p/{peer_id}")
    return out


async def dial_through_relays(host: Any, peer: ID, addrs: Sequence[Multiaddr]) -> None:
    """Connect to ``peer`` at its ``/p2p-circuit`` addresses ``addrs``: those through relays this
    host is connected to first, one after the other; raises the last error when none works
    (ConnectionError when this host has no relay transport).

    py-libp2p's circuit dial first tries every circuit address the peerstore holds for ``peer``,
    a dead relay's too (each a dial with retries: seconds); while one address is tried, the
    peerstore holds only that one."""
    dialer = _DIALERS.get(host)
    if dialer is None:
        raise ConnectionError(f"peer {peer} is reachable through relays only, and relays are off")
    store = host.get_peerstore()
    direct = [a for a in store.addrs(peer) if not is_circuit(a)]
    ordered = sorted(addrs, key=lambda a: not _relay_open(host, a))
    error: BaseException = ConnectionError(f"peer {peer} has no relay address")
    try:
        for addr in ordered:
            store.clear_addrs(peer)
            store.add_addrs(peer, [addr], CIRCUIT_ADDR_TTL)
            try:
                await _dial_circuit(host, dialer, addr)
                return
            except Exception as exc:  # noqa: BLE001 (a dead relay, a refusal: try the next one)
                log.debug("dialing %s through %s failed: %r", peer, addr, exc)
                error = exc
    finally:  # with the direct ones known (identify's, a hole punch tries them)
        direct += [a for a in store.addrs(peer) if not is_circuit(a) and a not in direct]
        store.clear_addrs(peer)
        store.add_addrs(peer, list(addrs) + direct, CIRCUIT_ADDR_TTL)
    raise error


async def _dial_circuit(host: Any, dialer: CircuitV2Transport, addr: Multiaddr) -> None:
    """py-libp2p's circuit dial (CircuitV2Transport.dial), with this host's swarm key on the
    relayed connection as on every other: 0.8.1 puts it on the relayed connections a peer accepts,
    not on those it dials, so two peers of a private swarm could not talk through a relay."""
    relay_addr, peer = dialer.parse_circuit_ma(addr)
    relay_id = relay_addr.get_peer_id()
    relay = relay_id if isinstance(relay_id, ID) else ID.from_base58(str(relay_id))
    raw = await dialer.dial_peer_info(
        PeerInfo(peer, [addr]), relay_info=PeerInfo(relay, [relay_addr])
    )
    psk = host.get_network().psk
    if psk is not None:
        raw = new_protected_conn(raw, psk)
    conn = await host.upgrade_outbound_connection(raw, peer)
    # what the accepting side's relay protocol does: the swarm cannot read these through the key
    conn.set_transport_info([addr], ConnectionType.RELAYED)


def _relay_open(host: Any, addr: Multiaddr) -> bool:
    """Whether ``host`` has an open connection to the relay of circuit address ``addr``."""
    relay_part = str(addr).split("/p2p-circuit")[0]
    try:
        relay = ID.from_base58(relay_part.rsplit("/p2p/", 1)[-1])
    except Exception:  # noqa: BLE001 (no relay id: tried last)
        return False
    return _open(host, relay)


def _open(host: Any, peer: ID) -> bool:
    return any(not c.is_closed for c in host.get_network().get_connections(peer))


def _concrete(addr: Multiaddr) -> list[Multiaddr]:
    """``addr``, or for a wildcard (0.0.0.0, ::) the addresses of this machine's interfaces."""
    text = str(addr)
    if not text.startswith(("/ip4/0.0.0.0/", "/ip6/::/")):
        return [addr]
    try:
        port = int(addr.value_for_protocol("tcp"))
    except Exception:  # noqa: BLE001 (not TCP: nothing to dial back)
        return []
    return get_available_interfaces(port)


def _remote_addrs(host: Any, peer: ID) -> list[Multiaddr]:
    """The addresses of ``peer`` this host's open, direct connections to it reached."""
    out = []
    for conn in host.get_network().get_connections(peer):
        if not conn.is_closed:
            out += [a for a in conn.get_transport_addresses() if not is_circuit(a)]
    return out


class _AutoNAT(AutoNATService):
    """py-libp2p's AutoNAT, answering after a dial back of its own: 0.8.1's calls ``host.connect``,
    which returns at once when the asker is connected, as it always is (it asked over that
    connection): a firewalled machine that others cannot dial was told it is public.

    The dial back is a TCP connection to the address and a Noise handshake proving the asker's id
    there, then closed: never a connection of the swarm (with one connection per peer, a second
    one would take new streams and cut them when closed)."""

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs:
            with trio.move_on_after(DIAL_BACK_TIMEOUT):
                try:
                    await _handshake(self.host, Multiaddr(raw), peer_id)
                    return bytes(raw)
                except Exception as exc:  # noqa: BLE001 (unreachable there: try the next)
                    log.debug("AutoNAT dial back to %s failed: %r", peer_id, exc)
        return None


async def _handshake(host: Any, addr: Multiaddr, peer: ID) -> None:
    """Dial ``addr`` and authenticate ``peer`` there (swarm key, Noise), then hang up."""
    network = host.get_network()
    transport = network.transport_manager.transport_for_dialing(addr)
    if transport is None:
        raise ConnectionError(f"no transport dials {addr}")
    raw = await transport.dial(addr)
    try:
        if network.psk is not None:
            raw = new_protected_conn(raw, network.psk)
        await network.upgrader.upgrade_security(raw, True, peer)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await raw.close()
            except Exception as exc:  # noqa: BLE001 (hanging up: the verdict is made)
                log.debug("closing the AutoNAT dial back failed: %r", exc)


class Relays:
    """A peer's reachability, its relay service and (when private) its reservations."""

    def __init__(self, host: Any, settings: RelaySettings, *, listening: bool) -> None:
        self.host = host
        self.settings = settings
        self.status = {"public": "public", "private": "private"}.get(
            settings.reachability, "unknown"
        )
        if not listening:
            self.status = "private"
        limits = RelayLimits(
            duration=settings.max_circuit_seconds,
            data=settings.max_circuit_bytes,
            max_circuit_conns=settings.max_circuits,
            max_reservations=settings.max_reservations,
            reservation_ttl=settings.reservation_ttl,
        )
        self.hop = settings.offer and listening and settings.reachability != "private"
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=self.hop)
        self.dialer = CircuitV2Transport(
            host, self.protocol, RelayConfig(roles=RelayRole.STOP, limits=limits)
        )
        self.autonat = _AutoNAT(host, serve=True)
        self.direct = DirectUpgrades(host, hole_punch=settings.hole_punch)
        self.reserved: dict[str, list[str]] = {}  # relay peer id -> this peer's addresses there
        self.changed: Callable[[], Awaitable[None]] | None = None  # called when addresses change

    @property
    def relay_slots(self) -> int:
        """Reservations this peer offers others (0: it is no relay, or not reachable)."""
        return self.settings.max_reservations if self.hop and self.status == "public" else 0

    def addrs(self) -> list[str]:
        """This peer's relayed addresses (with /p2p/<its id>)."""
        return [a for addrs in self.reserved.values() for a in addrs]

    def reachable_addrs(self) -> list[Multiaddr]:
        """Where others reach this peer: its relayed addresses when private, else where it listens."""
        if self.status == "private":
            return [Multiaddr(a) for a in self.addrs()]
        return list(self.host.get_addrs())

    async def run(
        self,
        candidates: Callable[[], Awaitable[list[tuple[str, list[str]]]]],
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the relay protocols; check reachability (auto); keep reservations while private.
        ``candidates()``: relays to try, as (peer id, direct addresses)."""
        async with background_trio_service(self.protocol):
            await self.protocol.event_started.wait()
            _DIALERS[self.host] = self.dialer
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.direct.run)
                    auto = self.settings.reachability == "auto" and self.status != "private"
                    if auto:
                        await self.check_reachability()
                    if self.status == "private":
                        await self._reserve_more(await candidates(), nursery)
                    self._log_status()
                    task_status.started()
                    if auto:
                        nursery.start_soon(self._recheck)
                    await self._keep_reservations(candidates, nursery)
            finally:
                _DIALERS.pop(self.host, None)

    def _log_status(self) -> None:
        if self.status == "private":
            log.info(
                "reachability: private (reached through relays: %s)",
                ", ".join(self.reserved) or "none yet",
            )
        elif self.hop:
            log.info(
                "reachability: %s (relay service on: %d reservations, %d circuits each, "
                "%d MiB and %d s a circuit)",
                self.status,
                self.settings.max_reservations,
                self.settings.max_circuits,
                self.settings.max_circuit_bytes // 2**20,
                self.settings.max_circuit_seconds,
            )
        else:
            log.info("reachability: %s (relay service off)", self.status)

    async def check_reachability(self) -> str:
        """Ask up to AUTONAT_PEERS connected peers to dial this peer back; they must agree."""
        peers = [p for p in self.host.get_network().connections if _open(self.host, p)]
        peers = peers[:AUTONAT_PEERS]
        if not peers:
            return self.status
        self.autonat.confirmations = len(peers)
        self.autonat.dial_results.clear()
        # a wildcard listen address (0.0.0.0) as the interfaces' addresses: an AutoNAT server dials
        # back only addresses whose IP is the one it sees (a NAT's public IP is none of them)
        addrs = [a.to_bytes() for own in self.host.get_addrs() for a in _concrete(own)]

        async def ask(peer: ID) -> None:
            try:
                await self.autonat.query_server(peer, addrs=addrs, timeout=AUTONAT_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 (no answer counts as "could not dial back")
                log.debug("AutoNAT query to %s failed: %r", peer, exc)
                self.autonat.dial_results[peer] = False

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        self.autonat.update_status()
        verdict = {AutoNATStatus.PUBLIC: "public", AutoNATStatus.PRIVATE: "private"}.get(
            self.autonat.get_status(), self.status
        )
        if verdict != self.status:
            log.info(
                "reachability: %s (AutoNAT: %d of %d peers could dial this peer back)",
                verdict,
                sum(self.autonat.dial_results.values()),
                len(peers),
            )
            self.status = verdict
            if self.changed is not None:
                await self.changed()
        return self.status

    async def _recheck(self) -> None:
        while True:
            await trio.sleep(self.settings.recheck_every)
            try:
                await self.check_reachability()
            except Exception:  # noqa: BLE001 (a failed check leaves the status as it was)
                log.warning("AutoNAT check failed", exc_info=True)

    async def _keep_reservations(
        self,
        candidates: Callable[[], Awaitable[list[tuple[str, list[str]]]]],
        nursery: trio.Nursery,
    ) -> None:
        renewed = trio.current_time()
        search_at, search_delay = renewed, WATCH_EVERY  # a search that found nobody backs off
        while True:
            lost = [r for r in self.reserved if not _open(self.host, ID.from_base58(r))]
            for relay in lost:
                log.warning("lost relay %s; looking for another", relay)
                del self.reserved[relay]
            if lost:
                search_at, search_delay = trio.current_time(), WATCH_EVERY
            added = False
            short = self.status == "private" and len(self.reserved) < self.settings.relays
            if short and trio.current_time() >= search_at:
                added = await self._reserve_more(await candidates(), nursery)
                search_delay = WATCH_EVERY if added else min(search_delay * 2, MAX_SEARCH_DELAY)
                search_at = trio.current_time() + search_delay
            if self.status != "private" and self.reserved:
                self.reserved.clear()
                added = True
            if (lost or added) and self.changed is not None:
                await self.changed()
            if trio.current_time() - renewed >= self.settings.renew_every:
                renewed = trio.current_time()
                for relay in list(self.reserved):
                    if await self._reserve(relay, nursery) is None:
                        log.warning("relay %s did not renew the reservation", relay)
            await trio.sleep(WATCH_EVERY)

    async def _reserve_more(
        self, candidates: list[tuple[str, list[str]]], nursery: trio.Nursery
    ) -> bool:
        """Reserve at candidates not used yet, the fastest to answer first; True if any was added."""
        me = self.host.get_id().to_base58()
        fresh = [(p, a) for p, a in candidates if p != me and p not in self.reserved]
        answered: list[tuple[float, str, list[str]]] = []

        async def attempt(peer_id: str, addrs: list[str]) -> None:
            try:
                peer = ID.from_base58(peer_id)
                direct = [Multiaddr(a) for a in addrs if not is_circuit(a)]
                with trio.fail_after(RESERVE_TIMEOUT):
                    await self.host.connect(PeerInfo(peer, direct))
            except Exception as exc:  # noqa: BLE001 (an unreachable candidate is skipped)
                log.debug("relay candidate %s unreachable: %r", peer_id, exc)
                return
            seconds = await self._reserve(peer_id, nursery)
            if seconds is not None:
                answered.append((seconds, peer_id, addrs))

        async with trio.open_nursery() as attempts:
            for peer_id, addrs in fresh[:16]:
                attempts.start_soon(attempt, peer_id, addrs)
        added = False
        for seconds, peer_id, addrs in sorted(answered):
            if len(self.reserved) >= self.settings.relays:
                break
            reached = [str(a) for a in _remote_addrs(self.host, ID.from_base58(peer_id))]
            # where it says it listens, else (a wildcard: 0.0.0.0) where this peer reached it
            self.reserved[peer_id] = circuit_addrs(peer_id, addrs, me) or circuit_addrs(
                peer_id, reached, me
            )
            log.info("reserved a relay slot at %s (%.1f ms)", peer_id, seconds * 1000)
            added = True
        return added

    async def _reserve(self, relay_id: str, nursery: trio.Nursery) -> float | None:
        """Reserve (or renew) at ``relay_id``: the seconds the exchange took, None if refused."""
        relay = ID.from_base58(relay_id)
        t0 = trio.current_time()
        try:
            with trio.fail_after(RESERVE_TIMEOUT):
                stream = await self.host.new_stream(relay, [HOP_PROTOCOL_ID])
                try:
                    ok = await self.dialer.reserve(stream, relay, nursery)
                finally:
                    await stream.close()
        except Exception as exc:  # noqa: BLE001 (not a relay, gone, refusing: not used)
            log.debug("no reservation at %s: %r", relay_id, exc)
            return None
        return trio.current_time() - t0 if ok else None
