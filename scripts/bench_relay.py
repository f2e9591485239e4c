#!/usr/bin/env python
"""Relays: what a private server (behind a NAT, reached through a relay) costs a generation.

`swarm-node serve` processes: two public relays (servers of a tiny model of their own, so that they
hold none of the benchmarked blocks), a public server of blocks 0:H, and two servers of blocks H:L,
three of blocks H:L: one public, and two private ones that listen nowhere (--reachability private
--listen none: they announce only relayed addresses and nothing can dial them). Two clients run
here: one listens nowhere, so its connection to the "relayed" private server is relayed end to end;
the other listens on 127.0.0.1, as a client on a public address, and uses the "upgraded" private
server: once it reaches it through a relay, DCUtR has that server dial it back and the sessions go
direct (node/net/direct.py; or the server's DHT reached it directly first: ``upgrades`` says which).
Rounds alternate the three chains (side by side: these machines drift); then the public H:L server
and the upgraded one leave and the relay carrying the first client's connection to the relayed
server is SIGKILLed after --kill-after tokens: the client recovers through that server's other
relay.

Prints one JSON line: tokens/s of each chain (the steady decode: first to last token),
``relayed_over_direct``, ``upgraded_over_direct`` (with ``upgrades``: peers the client reached
through a relay and then directly, and ``upgraded_connection``: how it reaches that server at the
end), ``relay_loss_to_next_token_s`` (SIGKILL of the relay to the next token) and ``same_tokens``
(every generation, the one with the loss too, gave the same tokens).

    .venv/bin/python scripts/bench_relay.py [--model smollm2-135m] [--new-tokens 32]
        [--kill-after 12] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ helpers

from swarm_node.dht.routing import Hop  # noqa: E402
from swarm_node.model import Checkpoint, ClientHead, load_tokenizer, resolve_model  # noqa: E402
from swarm_node.model.bundled import model_id_of  # noqa: E402
from swarm_node.node.client.generation import SamplingConfig, generate_tokens  # noqa: E402
from swarm_node.node.client.settings import SessionSettings  # noqa: E402
from swarm_node.node.config import ClientConfig, PeerConfig  # noqa: E402
from swarm_node.node.peer import Peer, open_peer  # noqa: E402
from tests.model_fixtures import make_tiny_model_dir  # noqa: E402
from tests.process_swarm import ServerProcess, start_server, stop_all  # noqa: E402

PROMPT = "The capital of France is"


class Timeline:
    """Token callback: each token's time; SIGKILLs the relay ``pick()`` names after ``kill_after``."""

    def __init__(self, kill_after: int | None = None, pick=None) -> None:
        self.times: list[float] = []
        self.kill_after, self.pick = kill_after, pick
        self.killed_at: float | None = None

    def __call__(self, token: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if self.pick is not None and len(self.times) == self.kill_after:
            self.pick().process.send_signal(signal.SIGKILL)
            self.killed_at = time.perf_counter()

    def tokens_per_s(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def connection_kind(client: Peer, server_id: str) -> str:
    """How ``client`` reaches ``server_id`` now: "direct", "relayed", "both" or "none"."""
    from libp2p.peer.id import ID

    from swarm_node.node.net.direct import open_connections

    direct, relayed = open_connections(client.host, ID.from_base58(server_id))
    return {(1, 0): "direct", (0, 1): "relayed", (1, 1): "both"}.get(
        (min(len(direct), 1), min(len(relayed), 1)), "none"
    )


def relay_in_use(client: Peer, server_id: str) -> str:
    from libp2p.peer.id import ID

    conns = client.host.get_network().get_connections(ID.from_base58(server_id))
    addrs = [str(a) for c in conns if not c.is_closed for a in c.get_transport_addresses()]
    (circuit,) = [a for a in addrs if "/p2p-circuit" in a]
    return circuit.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1]


async def run(args: argparse.Namespace) -> dict:
    path = resolve_model(args.model)
    checkpoint = Checkpoint.open(path)
    layers = checkpoint.config.num_hidden_layers
    half = layers // 2
    head = ClientHead.load(checkpoint)
    input_ids = load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids
    model = model_id_of(args.model)
    relay_model = make_tiny_model_dir(Path(tempfile.mkdtemp()) / "relay-host", num_layers=2)
    fast = ["--throughput", "100"]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    settings = SessionSettings(model=model, num_blocks=layers, dtype="float32")
    started: list[trio.Process] = []
    async with trio.open_nursery() as nursery:
        try:
            relay_args = ["--model", str(relay_model), "--blocks", "0:2", *fast]
            relays = [
                await start_server(nursery, [*relay_args, "--reachability", "public"], started)
            ]
            relays.append(
                await start_server(
                    nursery,
                    [*relay_args, "--reachability", "public", "--initial-peers", relays[0].addr],
                    started,
                )
            )
            initial = [r.addr for r in relays]
            common = ["--model", args.model, *fast, "--initial-peers", *initial]
            public = ["--reachability", "public", "--no-relay"]
            first = await start_server(
                nursery, [*common, "--blocks", f"0:{half}", *public], started
            )
            direct = await start_server(
                nursery, [*common, "--blocks", f"{half}:{layers}", *public], started
            )
            private = await start_server(
                nursery,
                [*common, "--blocks", f"{half}:{layers}", "--reachability", "private"]
                + ["--listen", "none"],  # no inbound path at all: the relays are the only way in
                started,
            )
            upgraded = await start_server(  # the same, for the client that listens
                nursery,
                [*common, "--blocks", f"{half}:{layers}", "--reachability", "private"]
                + ["--listen", "none"],
                started,
            )
            by_id: dict[str, ServerProcess] = {r.peer_id: r for r in relays}
            client_config = ClientConfig(
                step_timeout=args.step_timeout, retry_delay=0.2, ban_time=0.1
            )
            async with (
                open_peer(  # listening nowhere: no server can open a direct connection to it
                    PeerConfig(listen=(), reachability="private", initial_peers=tuple(initial)),
                    client=client_config,
                ) as client,
                open_peer(  # dialable, as on a public address: the upgraded server dials it back
                    PeerConfig(
                        listen=("/ip4/127.0.0.1/tcp/0",),
                        reachability="public",
                        no_relay=True,
                        initial_peers=tuple(initial),
                    ),
                    client=client_config,
                ) as public_client,
            ):
                records = {}
                while not all(s.peer_id in records for s in (first, direct, private, upgraded)):
                    records.update((r.peer_id, r) for r in await client.find_servers(model, layers))

                def chain(second: ServerProcess) -> list[Hop]:
                    return [
                        Hop(records[first.peer_id], 0, half),
                        Hop(records[second.peer_id], half, layers),
                    ]

                async def generate(second: ServerProcess, timeline: Timeline):
                    ids, stats = await generate_tokens(
                        public_client if second is upgraded else client,
                        head,
                        input_ids,
                        settings,
                        sampling,
                        chain=chain(second),
                        on_tokens=timeline,
                    )
                    return ids[0].tolist(), stats

                await generate(direct, Timeline())  # warm-up: connections, first-call costs
                await generate(private, Timeline())
                await generate(upgraded, Timeline())
                rates: dict[str, list[float]] = {"direct": [], "relayed": [], "upgraded": []}
                outputs = []
                for r in range(args.repeats):
                    order = [("direct", direct), ("relayed", private), ("upgraded", upgraded)]
                    for name, second in order if r % 2 == 0 else order[::-1]:
                        timeline = Timeline()
                        ids, _ = await generate(second, timeline)
                        rates[name].append(timeline.tokens_per_s())
                        outputs.append(ids)
                upgraded_kind = connection_kind(public_client, upgraded.peer_id)
                relayed_kind = connection_kind(client, private.peer_id)
                watch = public_client.relays
                upgrades = watch.direct.upgraded if watch is not None else 0
                for gone in (direct, upgraded):  # recovery must use the private server
                    gone.process.send_signal(signal.SIGTERM)
                    await gone.process.wait()
                loss = Timeline(
                    args.kill_after, lambda: by_id[relay_in_use(client, private.peer_id)]
                )
                loss_ids, stats = await generate(private, loss)
                assert loss.killed_at is not None, "the relay was not killed"
        finally:
            stop_all(started)
    direct_rate = statistics.median(rates["direct"])
    relayed_rate = statistics.median(rates["relayed"])
    upgraded_rate = statistics.median(rates["upgraded"])
    return {
        "model": model,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "direct_tokens_per_s": round(direct_rate, 2),
        "relayed_tokens_per_s": round(relayed_rate, 2),
        "relayed_over_direct": round(relayed_rate / direct_rate, 3),
        "upgraded_tokens_per_s": round(upgraded_rate, 2),
        "upgraded_over_direct": round(upgraded_rate / direct_rate, 3),
        "upgrades": upgrades,
        "upgraded_connection": upgraded_kind,
        "relayed_connection": relayed_kind,
        "relay_loss_to_next_token_s": round(loss.times[args.kill_after] - loss.killed_at, 3),
        "recoveries": len(stats.recoveries),
        "recovery_s": round(stats.recoveries[0].seconds, 3) if stats.recoveries else None,
        "replay_s": round(stats.recoveries[0].replay_seconds, 3) if stats.recoveries else None,
        "load_average": round(os.getloadavg()[0], 2),  # the machine's load while measuring
        "same_tokens": all(o == outputs[0] for o in [*outputs, loss_ids]),
        "runs": {k: [round(v, 2) for v in vs] for k, vs in rates.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kill-after", type=int, default=12)
    parser.add_argument("--step-timeout", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three chains")
    parser.add_argument("--quick", action="store_true", help="16 tokens, one round (developing)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.kill_after = 16, 1, min(args.kill_after, 8)
    if not 1 <= args.kill_after < args.new_tokens:
        parser.error("--kill-after must be in [1, --new-tokens)")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    print(json.dumps(trio.run(run, args)))


if __name__ == "__main__":
    main()
