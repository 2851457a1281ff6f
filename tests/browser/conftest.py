"""Fixtures for the browser tests: Debian's Chromium driven by Playwright, and wscat.

Nothing here downloads a browser: Playwright launches /usr/bin/chromium
(``scripts/install-browser-test-deps.sh`` installs it, the Python package and
wscat).  A missing piece fails the test with that hint; it is never skipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.node import NodeThread

HINT = "run scripts/install-browser-test-deps.sh (as root) to install it"
CHROMIUM = "/usr/bin/chromium"
# --headless and a temporary --user-data-dir are added by Playwright.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage"]
TOOLS = Path(os.environ.get("IMFAST_TEST_TOOLS")
             or Path.home() / ".cache" / "imfast" / "test-tools")


def wscat_path() -> str:
    """wscat installed by the install script, else the one on PATH."""
    local = TOOLS / "node_modules" / ".bin" / "wscat"
    if local.is_file():
        return str(local)
    found = shutil.which("wscat")
    assert found, f"wscat not found in {local.parent} or on PATH: {HINT}"
    return found


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the module (Playwright gives it a temporary
    --user-data-dir); each person gets an isolated context in it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - depends on the machine
        pytest.fail(f"the Python package playwright is missing: {HINT}")
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: {HINT}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def open_browser(chromium: Any) -> Iterator[Callable[[str], Any]]:
    """``open_browser("alice")``: one person's browser, an isolated context (its own
    cookies and localStorage, kept across reloads and closed tabs until the test ends)."""
    contexts: list[Any] = []

    def open_(name: str) -> Any:
        context = chromium.new_context(viewport={"width": 1100, "height": 680})
        context.set_default_timeout(10_000)
        contexts.append(context)
        return context

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def chat_node(make_node: Callable[..., NodeThread]) -> NodeThread:
    """A node that also accepts ``?user=NAME`` (the page's dev login)."""
    return make_node(insecure_dev_auth=True)
