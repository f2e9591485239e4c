"""Direct connections to peers first reached through a relay: py-libp2p's DCUtR (hole punching),
with every relayed connection kept for as long as it carries a stream.

When a peer dials another through a relay, it tries at once to reach it directly: a plain dial of
the addresses it knows for it, then DCUtR (both peers exchange their observed addresses through the
relay and dial each other at the same moment, so that their NATs let the other's packets in). New
streams then go to the direct connection (py-libp2p prefers a direct connection to a relayed one).

A session's stream lives as long as the session: moving it would cost a replay. So a session that
began on the relayed connection ends there, with every step, and the relayed connection is closed
as soon as it carries no stream any more. py-libp2p 0.8.1 would cut it instead: its DCUtR closes
a relayed connection 60 s after the direct one verifies, whatever it carries, and its swarm, allowed
one connection per peer (host.py), trims the older connection when the direct one arrives. Here
DCUtR closes nothing, and a peer with a relayed connection is protected from trimming.

Knows nothing of sessions: it looks only at connections and their open streams.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr
from multiaddr.protocols import P_P2P_CIRCUIT

log = logging.getLogger(__name__)

DIRECT_WAIT = 2.0  # seconds a dial through a relay waits for the direct connection it tries for
RETIRE_EVERY = 0.5  # seconds between two looks for relayed connections that carry nothing
# the same while none is known: a look at every connection was ~20% of a settled 32-server swarm's
# servers' idle CPU at twice a second; one opening wakes the look at once
QUIET_LOOK_EVERY = 5.0
PROTECT_TAG = "swarm-node:relayed"
MAX_PEER_ADDRS = 8  # addresses of a peer's DCUtR message this peer dials (py-libp2p: ~400 in 4 KiB)
MAX_RELAYED_PEERS = 1024  # peers remembered as reached through a relay and not yet directly

_UPGRADES: weakref.WeakKeyDictionary[Any, DirectUpgrades] = weakref.WeakKeyDictionary()


def is_relayed(conn: Any) -> bool:
    # by protocol code, not text: _keep_relayed asks for every connection twice a second, and
    # a multiaddr's str() was most of a settled 32-server swarm's idle CPU in this loop
    addrs = conn.get_transport_addresses()
    return bool(addrs) and all(
        any(p.code == P_P2P_CIRCUIT for p in addr.protocols()) for addr in addrs
    )


def open_connections(host: Any, peer: ID) -> tuple[list[Any], list[Any]]:
    """``host``'s open connections to ``peer``: (direct ones, relayed ones)."""
    direct: list[Any] = []
    relayed: list[Any] = []
    for conn in host.get_network().get_connections(peer):
        if not conn.is_closed:
            (relayed if is_relayed(conn) else direct).append(conn)
    return direct, relayed


class _HolePunch(DCUtRProtocol):
    """py-libp2p's DCUtR, except that it closes no relayed connection (DirectUpgrades does, once
    the connection carries no stream), and dials at most MAX_PEER_ADDRS of the addresses a peer
    sends (each is dialed at once, three rounds: a peer could have this one dial hundreds of
    addresses of its choosing)."""

    def _schedule_relay_close(self, peer_id: ID) -> None:
        return None

    def _decode_observed_addrs(self, addr_bytes: list[bytes]) -> list[Multiaddr]:
        return super()._decode_observed_addrs(addr_bytes[:MAX_PEER_ADDRS])


class DirectUpgrades:
    """A host's DCUtR service (``hole_punch``: answers and starts hole punches) and the keeper of
    its relayed connections (always: protected while open, closed once idle beside a direct one)."""

    def __init__(self, host: Any, *, hole_punch: bool) -> None:
        self.host = host
        self.protocol = _HolePunch(host) if hole_punch else None
        self.upgraded = 0  # peers first reached through a relay and then directly
        self.retired = 0  # relayed connections closed once a direct one carried the traffic
        self.changed = trio.Event()  # set (and replaced) when a peer's connections change kind
        self._protected: set[ID] = set()
        self._relayed_only: dict[ID, None] = {}  # reached through a relay, not directly since
        self._relayed_opened = trio.Event()  # set when a relayed connection opens
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.protocol is not None:
                nursery.start_soon(self._serve, self.protocol)
                await self.protocol.event_started.wait()
            _UPGRADES[self.host] = self
            notifee = _ConnectionEvents(self)
            self.host.get_network().register_notifee(notifee)
            try:
                task_status.started()
                await self._keep_relayed()
            finally:
                self.host.get_network().remove_notifee(notifee)
                _UPGRADES.pop(self.host, None)

    async def _serve(self, protocol: DCUtRProtocol) -> None:
        async with background_trio_service(protocol):
            await trio.sleep_forever()

    async def upgrade(self, peer: ID) -> bool:
        """Try once to reach ``peer`` directly (it is reached through a relay): True if a direct
        connection is open after the attempt."""
        if self.protocol is not None:
            # a fresh budget: py-libp2p allows 3 attempts per peer until a disconnection, and its
            # auto-drive spends them within seconds of the relayed connection (before this peer
            # may have had an address to give, or its NAT a mapping)
            self.protocol.on_peer_disconnected(peer)
            try:
                await self.protocol.initiate_hole_punch(peer)
            except Exception as exc:  # noqa: BLE001 (a failed punch leaves the relayed connection)
                log.debug("hole punch to %s failed: %r", peer, exc)
        return bool(open_connections(self.host, peer)[0])

    def upgrade_soon(self, peer: ID) -> trio.Event:
        """Start ``upgrade(peer)`` in the background: the event is set when it is over."""
        done = trio.Event()

        async def attempt() -> None:
            try:
                await self.upgrade(peer)
            finally:
                done.set()

        if self.protocol is None or self._nursery is None:
            done.set()
        else:
            self._nursery.start_soon(attempt)
        return done

    async def _keep_relayed(self) -> None:
        while True:
            network = self.host.get_network()
            for peer in list(network.connections):
                direct, relayed = open_connections(self.host, peer)
                if relayed and peer not in self._protected:
                    network.protect(peer, PROTECT_TAG)
                    self._protected.add(peer)
                if relayed and not direct:  # also those marked relayed after they opened
                    self._note_relayed(peer)
                if direct:
                    for conn in relayed:
                        if not conn.get_streams():
                            await self._retire(peer, conn)
            for peer in list(self._protected):
                if not open_connections(self.host, peer)[1]:
                    network.unprotect(peer, PROTECT_TAG)
                    self._protected.discard(peer)
                    self._signal()
            with trio.move_on_after(RETIRE_EVERY if self._protected else QUIET_LOOK_EVERY):
                await self._relayed_opened.wait()
            self._relayed_opened = trio.Event()

    async def _retire(self, peer: ID, conn: Any) -> None:
        try:
            await conn.close()
        except Exception as exc:  # noqa: BLE001 (closing anyway; py-libp2p's close catches the same)
            log.debug("closing the relayed connection to %s failed: %r", peer, exc)
        self.retired += 1
        log.info("closed the relayed connection to %s: its traffic goes direct", peer)
        self._signal()

    def _note_relayed(self, peer: ID) -> None:
        if peer not in self._relayed_only:
            self._relayed_only[peer] = None
            while len(self._relayed_only) > MAX_RELAYED_PEERS:
                del self._relayed_only[next(iter(self._relayed_only))]

    def _signal(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def connected(self, peer: ID, conn: Any) -> None:
        """A new connection to ``peer``: counted as an upgrade when it is direct and the peer was
        reached through a relay (counted here, as it opens: the relayed connection may be closed by
        the other side before a periodic look would have seen both)."""
        if is_relayed(conn):
            self._relayed_opened.set()
            if not open_connections(self.host, peer)[0]:
                self._note_relayed(peer)
            return
        if peer in self._relayed_only:
            del self._relayed_only[peer]
            self.upgraded += 1
            relayed = open_connections(self.host, peer)[1]
            log.info(
                "direct connection to %s (was relayed: the relayed one stays while it "
                "carries %d stream(s))",
                peer,
                sum(len(c.get_streams()) for c in relayed),
            )
            self._signal()


class _ConnectionEvents:
    """py-libp2p's network notifications, handed to DirectUpgrades (connections only)."""

    def __init__(self, upgrades: DirectUpgrades) -> None:
        self.upgrades = upgrades

    async def connected(self, network: Any, conn: Any) -> None:
        self.upgrades.connected(conn.muxed_conn.peer_id, conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


async def try_direct(host: Any, peer: ID) -> None:
    """``peer`` was just reached through a relay: try to reach it directly, waiting at most
    DIRECT_WAIT seconds (the attempt goes on in the background after that)."""
    upgrades = _UPGRADES.get(host)
    if upgrades is None:
        return
    done = upgrades.upgrade_soon(peer)
    with trio.move_on_after(DIRECT_WAIT):
        await done.wait()


def upgrades_of(host: Any) -> DirectUpgrades | None:
    return _UPGRADES.get(host)
