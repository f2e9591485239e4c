"""Headless Chromium (Debian's ``chromium`` package) driven as a process: the DOM after the page's
scripts ran, or a screenshot (the swarm map test, scripts/swarm_map_screenshot.py); or driven
through Playwright (``chromium_page``: typing, clicking, waiting on the DOM) for the chat page.
Playwright's own browser download is not used: it launches Debian's /usr/bin/chromium."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install Debian's chromium package (scripts/setup_env.sh does it as root: apt-get install -y chromium)"


def find_chromium() -> str:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        f"no headless browser found (looked for {', '.join(CANDIDATES)}); {INSTALL_HINT}"
    )


async def run_chromium(
    url: str, *flags: str, budget_ms: int = 4000, timeout: float = 60.0
) -> bytes:
    """Load ``url`` with the page's timers run for ``budget_ms`` of virtual time (network waits do
    not count against it); returns what Chromium wrote to stdout."""
    with tempfile.TemporaryDirectory(prefix="swarm-node-chromium-") as profile:
        command = [
            find_chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *flags,
            url,
        ]
        with trio.fail_after(timeout):
            result = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False
            )
    if result.returncode != 0:
        raise RuntimeError(
            f"chromium exited with {result.returncode}: {result.stderr.decode()[-2000:]}"
        )
    return result.stdout


async def dump_dom(url: str, **kwargs: float) -> str:
    return (await run_chromium(url, "--dump-dom", **kwargs)).decode()  # type: ignore[arg-type]


async def screenshot(
    url: str, path: Path, *, width: int = 1280, height: int = 900, budget_ms: int = 4000
) -> Path:
    await run_chromium(
        url, f"--screenshot={path}", f"--window-size={width},{height}", budget_ms=budget_ms
    )
    if not await trio.Path(path).is_file():
        raise RuntimeError(f"chromium did not write the screenshot {path}")
    return path


CHROMIUM = "/usr/bin/chromium"
PLAYWRIGHT_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@contextmanager
def chromium_page(
    *, timeout_s: float = 60.0, width: int = 1100, height: int = 800
) -> Iterator[Any]:
    """A Playwright page in Debian's Chromium with a fresh profile, every wait and action bounded by
    ``timeout_s``. Playwright's sync API: use it from one worker thread (trio.to_thread)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        raise FileNotFoundError(f"{CHROMIUM} is missing; {INSTALL_HINT}")
    with (
        tempfile.TemporaryDirectory(prefix="swarm-node-playwright-") as profile,
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=list(PLAYWRIGHT_ARGS),
            viewport={"width": width, "height": height},
            timeout=timeout_s * 1000,
        )
        try:
            context.set_default_timeout(timeout_s * 1000)
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
