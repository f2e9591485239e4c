"""Routing tables that keep only peers serving the DHT, and what identify says a peer offers.

py-libp2p adds every peer that opens a DHT stream to its routing table (``KadDHT._do_handle_stream``
skips its own check that the peer serves the protocol): clients too, handed to later lookups long
after they exited. ServersOnlyKad asks such a peer over identify first (discovery.SwarmDHT runs it on
servers; clients run the DHT in client mode and offer no DHT protocol).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.utils.varint import read_length_prefixed_protobuf

log = logging.getLogger(__name__)

# peers a server checks at once for whether they serve the DHT: a stranger opening DHT streams from
# many identities costs this many identify exchanges at a time, at most
MAX_KAD_CHECKS = 32
MAX_IDENTIFY_BYTES = 64 * 1024  # an identify answer read for such a check (py-libp2p's: ~1 KB)
IDENTIFY_TIMEOUT = 3.0  # seconds for one peer's identify answer (a DHT query's deadline)


class ServersOnlyKad(KadDHT):
    """KadDHT whose routing table takes only peers that serve the DHT.

    py-libp2p adds every peer that opens a DHT stream to this one (it skips its own check that the
    peer serves the protocol): each `generate` or `status` process was then handed to every later
    lookup as a closer peer for as long as the table kept it, long after it exited, and each fresh
    client dialled those dead ones (loopback: +0.3 s to a first token after 6 runs against one
    server; over a network each a dial timeout). Here a peer new to the table that opened a stream
    is added once identify says it serves the DHT (clients run it in client mode: they do not), a
    round trip in the background; MAX_KAD_CHECKS such checks at once, others are not added.
    """

    async def refresh_routing_table(self) -> None:
        """A server's: py-libp2p's (a lookup of its own id, at start and every 5 minutes). A client
        runs none: its table holds its initial peers and fills from its own lookups' answers, and
        the self-lookup dialled ~10 servers of a 32-server swarm while a fresh `generate` looked its
        chain up (0.3 s of its first token, measured)."""
        if self.mode == DHTMode.SERVER:
            await super().refresh_routing_table()

    def __init__(self, host: IHost, *args: Any, **kwargs: Any) -> None:
        super().__init__(host, *args, **kwargs)
        self._checks: trio.Nursery | None = None
        self._checking: set[ID] = set()
        self.clients_not_added = 0  # peers that opened DHT streams without serving the DHT

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        if not skip_server_mode_check or self.routing_table.peer_in_table(peer_id):
            return await super().add_peer(peer_id, skip_server_mode_check=skip_server_mode_check)
        served = serves_kad(self.host, peer_id)
        if served is None and self._checks is not None and len(self._checking) < MAX_KAD_CHECKS:
            self._checking.add(peer_id)
            self._checks.start_soon(self._check_then_add, peer_id)
        elif served:
            return await super().add_peer(peer_id)
        elif served is False:
            self.clients_not_added += 1
        return False

    async def _check_then_add(self, peer_id: ID) -> None:
        try:
            await self.check_then_add(peer_id)
        except Exception as exc:  # noqa: BLE001 (a peer gone or garbled: it is simply not added)
            log.debug("could not tell whether %s serves the DHT: %r", peer_id, exc)
        finally:
            self._checking.discard(peer_id)

    async def check_then_add(self, peer_id: ID) -> bool:
        """Ask ``peer_id`` over identify which protocols it offers (IDENTIFY_TIMEOUT at most) and add
        it to the routing table if it serves the DHT; whether it was added."""
        with trio.move_on_after(IDENTIFY_TIMEOUT):
            await learn_protocols(self.host, peer_id)
        if serves_kad(self.host, peer_id):
            return await super().add_peer(peer_id)
        self.clients_not_added += 1
        return False

    @asynccontextmanager
    async def checking(self) -> AsyncIterator[None]:
        async with trio.open_nursery() as nursery:
            self._checks = nursery
            try:
                yield
            finally:
                self._checks = None
                nursery.cancel_scope.cancel()


async def learn_protocols(host: IHost, peer_id: ID) -> None:
    """Ask ``peer_id`` over identify which protocols it offers (one round trip on the connection it
    has with this host) and note them in the peerstore (``serves_kad`` reads them)."""
    stream = await host.new_stream(peer_id, [IDENTIFY_PROTOCOL])
    try:
        data = await read_length_prefixed_protobuf(stream, max_length=MAX_IDENTIFY_BYTES)
    finally:
        await stream.reset()
    answer = Identify()
    answer.ParseFromString(data)
    host.get_peerstore().add_protocols(peer_id, list(answer.protocols))


def serves_kad(host: IHost, peer_id: ID) -> bool | None:
    """Whether ``peer_id`` offers the DHT protocol as identify told this host, None before."""
    try:
        protocols = host.get_peerstore().get_protocols(peer_id)
    except Exception:  # noqa: BLE001 (py-libp2p raises PeerStoreError for a peer it never met)
        return None
    if not protocols:
        return None
    return str(PROTOCOL_ID) in protocols
