"""Fixtures for the real-browser tests: a JupyterLab server and Debian Chromium via Playwright.

They skip (with the reason) where Chromium, Playwright or JupyterLab are missing, except in the
full suite of scripts/test.sh (CI installs all three), where they fail instead. Screenshots land
in artifacts/screenshots/ and are listed at the end of the run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import CHROMIUM, VIEWPORT, Lab, launch_chromium, saved_screenshots, start_lab, stop_lab


def _require_browser_stack() -> None:
    """Skip on a machine without the browser stack, but never in the suite of scripts/test.sh
    (CI), which installs it: there a missing part is a failure, not a quiet skip."""
    missing = [] if Path(CHROMIUM).exists() else [f"{CHROMIUM} (apt-get install chromium)"]
    for module, fix in (("playwright.sync_api", "pip install playwright"),
                        ("jupyterlab", "pip install jupyterlab"),
                        ("anywidget", "pip install 'nbindustria[dashboard]'")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} ({fix})")
    if missing:
        message = "browser tests need: " + "; ".join(missing)
        if os.environ.get("NBINDUSTRIA_FULL_SUITE"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _require_browser_stack()
    scratch = tmp_path_factory.mktemp("jupyterlab")
    server = start_lab(scratch)
    try:
        yield server
    finally:
        stop_lab(server)
        shutil.rmtree(scratch / "notebooks" / ".ipynb_checkpoints", ignore_errors=True)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    _require_browser_stack()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A fresh 1280x800 page; uncaught page errors are collected in ``page.errors``."""
    context = chromium.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if saved_screenshots:
        terminalreporter.section("screenshots")
        for path in saved_screenshots:
            terminalreporter.write_line(str(path))
