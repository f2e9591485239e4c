#!/usr/bin/env python
"""Take the README's screenshot of the swarm map: a 3-server SmolLM2 swarm in this process (blocks
0:15, 10:25 and 15:30, so some blocks have two servers), the API beside a client peer, a few chat
requests done and three streaming while headless Chromium renders the page.

    .venv/bin/python scripts/swarm_map_screenshot.py [--out docs/swarm_map.png]
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/browser.py drives Chromium

from swarm_node.node.apps.api import ApiConfig, open_api  # noqa: E402
from swarm_node.node.config import PeerConfig, ServerConfig  # noqa: E402
from swarm_node.node.peer import open_peer  # noqa: E402
from tests.browser import screenshot  # noqa: E402

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
SPANS = [(0, 15), (10, 25), (15, 30)]


async def chat(http: httpx.AsyncClient, question: str, max_tokens: int) -> None:
    reply = await http.post(
        "/v1/chat/completions",
        json={
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )
    if reply.status_code != 200:
        raise SystemExit(f"{reply.status_code}: {reply.text}")


async def main(out: Path) -> None:
    async with AsyncExitStack() as stack:
        servers = []
        for start, end in SPANS:
            initial = tuple(servers[0].addrs[:1]) if servers else ()
            servers.append(
                await stack.enter_async_context(
                    open_peer(
                        PeerConfig(listen=LOOPBACK, initial_peers=initial),
                        server=ServerConfig(model="smollm2-135m", start=start, end=end),
                    )
                )
            )
        client = await stack.enter_async_context(
            open_peer(PeerConfig(listen=LOOPBACK, initial_peers=tuple(servers[0].addrs[:1])))
        )
        api = await stack.enter_async_context(
            open_api(client, ApiConfig(models=("smollm2-135m",), port=0))
        )
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=api.url, timeout=300))
        for question in ("What is the capital of France?", "Name a primary colour."):
            await chat(http, question, 12)
        async with trio.open_nursery() as nursery:
            for question in (
                "Write a poem about peers.",
                "Explain the DHT.",
                "Why is the sky blue?",
            ):
                nursery.start_soon(chat, http, question, 64)
            # the picture needs three replies under way: poll the tracker the map itself reads
            while (  # noqa: ASYNC110
                len(api.tracker.active) < 3
                or min(a.new_tokens for a in api.tracker.active.values()) < 4
            ):
                await trio.sleep(
                    0.2
                )  # a script, not a test: wait until all three are well under way
            await api.refresh()
            await screenshot(api.url + "/", out, width=1280, height=780, budget_ms=1500)
            print(f"wrote {out}", file=sys.stderr)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/swarm_map.png"))
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    trio.run(main, args.out)
