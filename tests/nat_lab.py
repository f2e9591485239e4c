"""A NAT lab in network namespaces: a relay on the "internet", a private server behind one
masquerading router and a client behind another. tests/test_nat_lab.py runs it.

    unshare -rn python -m tests.nat_lab lab MODEL_DIR OUT_DIR INPUT_IDS_JSON NEW_TOKENS

Inside a user + network namespace of its own (``unshare -rn``: the "internet", holding the relay),
it makes four more network namespaces (router A, host A, router B, host B) joined by veth pairs;
each router forwards its LAN to its WAN through nftables' masquerade and drops every packet from
the WAN that no connection from inside opened (``ct state established,related``), to itself too
(no RST for an early hole-punch SYN): a home router.
No address here is reachable from outside the lab, nor anything outside from it.

    internet 203.0.113.1/30 -- 203.0.113.2 router A 10.0.1.1 -- 10.0.1.2 host A (client)
    internet 203.0.113.5/30 -- 203.0.113.6 router B 10.0.2.1 -- 10.0.2.2 host B (server)

The client's result (tokens of two generations, whether its connection to the server went direct
and at which address) is written to OUT_DIR/client.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

RELAY_ADDR = "/ip4/203.0.113.1/tcp/4000"
ROUTER_RULES = """
table ip nat {
  chain postrouting {
    type nat hook postrouting priority 100;
    oifname "wan" masquerade
  }
}
table ip filter {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan" accept
  }
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
}
"""
LAB_SECONDS = 240  # the whole lab, at most (the namespaces' holders are killed at its end)


def run(*args: str, pid: int | None = None, stdin: str | None = None) -> None:
    prefix = ["nsenter", "-t", str(pid), "-n"] if pid else []
    subprocess.run([*prefix, *args], check=True, input=stdin, text=True, timeout=30)


def namespace() -> subprocess.Popen:
    return subprocess.Popen(["unshare", "-n", "sleep", str(LAB_SECONDS + 60)])


def wait_own_namespace(proc: subprocess.Popen, seconds: float) -> None:
    """Until ``proc`` is in a network namespace of its own (its unshare done)."""
    mine = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.readlink(f"/proc/{proc.pid}/ns/net") != mine:
                return
        except OSError:
            pass  # between fork and exec: /proc/PID/ns may not be readable yet
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args} not in a namespace of its own within {seconds} s")
        time.sleep(0.01)


def link(a: int | None, a_if: str, a_ip: str, b: int | None, b_if: str, b_ip: str) -> None:
    run("ip", "link", "add", "name", a_if, "type", "veth", "peer", "name", b_if)
    for pid, name, ip in ((a, a_if, a_ip), (b, b_if, b_ip)):
        if pid:
            run("ip", "link", "set", name, "netns", str(pid))
        run("ip", "addr", "add", ip, "dev", name, pid=pid)
        run("ip", "link", "set", name, "up", pid=pid)
        run("ip", "link", "set", "lo", "up", pid=pid)


def build() -> tuple[list[subprocess.Popen], int, int]:
    """The namespaces: (their holder processes, host A's pid, host B's pid)."""
    holders = [namespace() for _ in range(4)]
    router_a, host_a, router_b, host_b = (h.pid for h in holders)
    for holder in holders:  # each holder's unshare must be done before its namespace is used
        wait_own_namespace(holder, 10)
    run("ip", "link", "set", "lo", "up")
    run("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")  # the internet routes A <-> B
    link(None, "wa", "203.0.113.1/30", router_a, "wan", "203.0.113.2/30")
    link(None, "wb", "203.0.113.5/30", router_b, "wan", "203.0.113.6/30")
    link(router_a, "lan", "10.0.1.1/24", host_a, "eth0", "10.0.1.2/24")
    link(router_b, "lan", "10.0.2.1/24", host_b, "eth0", "10.0.2.2/24")
    for router, upstream in ((router_a, "203.0.113.1"), (router_b, "203.0.113.5")):
        run("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward", pid=router)
        run("ip", "route", "add", "default", "via", upstream, pid=router)
        run("nft", "-f", "-", pid=router, stdin=ROUTER_RULES)
    run("ip", "route", "add", "default", "via", "10.0.1.1", pid=host_a)
    run("ip", "route", "add", "default", "via", "10.0.2.1", pid=host_b)
    return holders, host_a, host_b


def wait_file(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before writing {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written within {seconds} s")
        time.sleep(0.1)


def lab(model: str, out: str, input_ids: str, new_tokens: str) -> None:
    out_dir = Path(out)
    holders, host_a, host_b = build()
    me = [sys.executable, "-m", "tests.nat_lab"]
    procs: list[subprocess.Popen] = []
    try:
        relay = subprocess.Popen([*me, "relay", out])
        procs.append(relay)
        wait_file(out_dir / "relay.addr", relay, 60)
        relay_addr = (out_dir / "relay.addr").read_text()
        ns_b = ["nsenter", "-t", str(host_b), "-n"]
        server = subprocess.Popen([*ns_b, *me, "server", out, relay_addr, model])
        procs.append(server)
        wait_file(out_dir / "server.ready", server, 90)
        ns_a = ["nsenter", "-t", str(host_a), "-n"]
        client = subprocess.run(
            [*ns_a, *me, "client", out, relay_addr, model, input_ids, new_tokens], timeout=120
        )
        if client.returncode != 0:
            raise RuntimeError(f"the client exited with {client.returncode}")
    finally:
        for proc in [*procs, *holders]:
            proc.kill()
            proc.wait()


def relay(out: str) -> None:
    import trio

    from swarm_node.node.config import PeerConfig
    from swarm_node.node.peer import open_peer

    async def main() -> None:
        async with open_peer(PeerConfig(listen=(RELAY_ADDR,), reachability="public")) as peer:
            await trio.Path(out, "relay.addr").write_text(f"{RELAY_ADDR}/p2p/{peer.peer_id}")
            await trio.sleep_forever()

    trio.run(main)


def server(out: str, relay_addr: str, model: str) -> None:
    import trio

    from swarm_node.node.config import PeerConfig, ServerConfig
    from swarm_node.node.peer import open_peer

    async def main() -> None:
        config = PeerConfig(
            listen=("/ip4/0.0.0.0/tcp/4002",), initial_peers=(relay_addr,), reachability="private"
        )
        serving = ServerConfig(model=model, start=0, end=6, throughput=100.0)
        async with open_peer(config, server=serving) as peer:
            await trio.Path(out, "server.ready").write_text(json.dumps(peer.addrs))
            await trio.sleep_forever()

    trio.run(main)


def client(out: str, relay_addr: str, model: str, input_ids: str, new_tokens: str) -> None:
    import torch
    import trio
    from libp2p.peer.id import ID

    from swarm_node.model import Checkpoint, ClientHead
    from swarm_node.node.client.generation import SamplingConfig, generate_tokens
    from swarm_node.node.client.settings import SessionSettings
    from swarm_node.node.config import PeerConfig
    from swarm_node.node.net.direct import open_connections
    from swarm_node.node.peer import open_peer

    ids = torch.tensor(json.loads(input_ids))
    head = ClientHead.load(Checkpoint.open(Path(model)))
    settings = SessionSettings(model=Path(model).name, num_blocks=6, dtype="float32")
    sampling = SamplingConfig(max_new_tokens=int(new_tokens))

    async def main() -> dict:
        config = PeerConfig(
            listen=("/ip4/0.0.0.0/tcp/4001",), initial_peers=(relay_addr,), reachability="private"
        )
        async with open_peer(config) as peer:
            first, stats = await generate_tokens(peer, head, ids, settings, sampling)
            server = ID.from_base58(stats.chain[0].server.peer_id)
            direct = peer.relays.direct
            with trio.move_on_after(30):  # the hole punch, if the NATs let it through
                while [bool(c) for c in open_connections(peer.host, server)] != [True, False]:
                    await direct.changed.wait()
            direct_conns, relayed_conns = open_connections(peer.host, server)
            second, _ = await generate_tokens(peer, head, ids, settings, sampling)
            after = open_connections(peer.host, server)
            return {
                "first": first.tolist(),
                "second": second.tolist(),
                "upgraded": direct.upgraded,
                "direct_addrs": [str(a) for c in direct_conns for a in c.get_transport_addresses()],
                "relayed_left": len(relayed_conns),
                "second_relayed": len(after[1]),
            }

    result = trio.run(main)
    Path(out, "client.json").write_text(json.dumps(result))


if __name__ == "__main__":
    role, *rest = sys.argv[1:]

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    {"lab": lab, "relay": relay, "server": server, "client": client}[role](*rest)
