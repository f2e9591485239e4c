#!/usr/bin/env python
"""Take the README's screenshot of the chat page: a 2-server SmolLM2 swarm in this process (blocks
0:15 and 15:30), the API beside a client peer, two questions typed into /chat in headless Chromium
(Playwright on Debian's /usr/bin/chromium) and answered greedily.

    .venv/bin/python scripts/chat_page_screenshot.py [--out docs/chat_page.png] [--width 390 --height 800]
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ drive Chromium

from swarm_node.node.apps.api import ApiConfig, open_api  # noqa: E402
from tests.browser import chromium_page  # noqa: E402
from tests.swarm_helpers import local_swarm  # noqa: E402
from tests.test_chat_page import ask, settings  # noqa: E402

QUESTIONS = ("What is the capital of France?", "Name three primary colours.")


def shoot(url: str, out: Path, width: int, height: int) -> None:
    with chromium_page(timeout_s=300, width=width, height=height) as page:
        page.goto(url + "/chat")
        page.locator("body[data-ready='1']").wait_for()
        settings(page, temperature="0", max_tokens="40")
        for question in QUESTIONS:
            ask(page, question)
        page.click("#settings summary")  # closed again: more room for the conversation
        page.screenshot(path=str(out))


async def main(out: Path, width: int, height: int) -> None:
    async with AsyncExitStack() as stack:
        _, client = await stack.enter_async_context(
            local_swarm("smollm2-135m", [(0, 15), (15, 30)])
        )
        api = await stack.enter_async_context(
            open_api(client, ApiConfig(models=("smollm2-135m",), port=0))
        )
        await trio.to_thread.run_sync(shoot, api.url, out, width, height)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/chat_page.png"))
    parser.add_argument("--width", type=int, default=1100, help="of the window, in CSS pixels")
    parser.add_argument("--height", type=int, default=760)
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    trio.run(main, args.out, args.width, args.height)
