"""Drive a real JupyterLab in headless Debian Chromium (see shared/RECIPES.md section 3).

``start_lab`` serves a scratch copy of ``notebooks/`` on 127.0.0.1 with its own config, runtime,
settings and workspace directories (so nothing of the user's Lab leaks in, and the news pop-up is
off); ``launch_chromium`` starts ``/usr/bin/chromium`` through Playwright (never a downloaded
browser). The page helpers wait for rendered elements, never for "no error": without the widget
manager, JupyterLab shows widgets as plain text and reports nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NOTEBOOKS = HERE / "notebooks"
SCREENSHOTS = ROOT / "artifacts" / "screenshots"  # git-ignored (/artifacts/)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1280, "height": 800}
saved_screenshots: list[Path] = []


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    process: subprocess.Popen[bytes]
    log: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}&reset"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_lab(scratch: Path, timeout: float = 60) -> Lab:
    """JupyterLab serving a copy of ``notebooks/`` (plus ``synthetic.py``) from ``scratch``."""
    root = scratch / "notebooks"
    shutil.copytree(NOTEBOOKS, root)
    shutil.copy(HERE / "synthetic.py", root / "synthetic.py")
    config = scratch / "config"
    (config / "labconfig").mkdir(parents=True)
    # news_url= alone does not stop the "get notified about Jupyter news?" toast.
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(scratch / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(scratch / "lab-workspaces"),
        "IPYTHONDIR": str(scratch / "ipython"),
        # A cache of its own: the notebook's first run must really run.
        "NBINDUSTRIA_CACHE_DIR": str(scratch / "nbi-cache"),
        "NBINDUSTRIA_KEY_DIR": str(scratch / "nbi-keys"),
        "NBINDUSTRIA_CONFIG": str(scratch / "nbi-config.json"),
        # The kernel imports nbindustria from this checkout even when it is not installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
        f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: kernel-idle waits, theme
    ]
    log = scratch / "lab.log"
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited ({process.returncode}):\n{lab.log_tail()}")
        try:
            with urllib.request.urlopen(f"{lab.url}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    return lab
        except OSError:
            time.sleep(0.2)
    stop_lab(lab)
    raise RuntimeError(f"JupyterLab did not answer in {timeout} s:\n{lab.log_tail()}")


def stop_lab(lab: Lab) -> None:
    lab.process.terminate()  # Lab shuts its kernels down first (~1.3 s)
    try:
        lab.process.wait(20)
    except subprocess.TimeoutExpired:
        lab.process.kill()
        lab.process.wait(5)


def launch_chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=CHROMIUM_FLAGS)


# -- page helpers ------------------------------------------------------------------------------

KERNEL_IDLE = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
            && w.sessionContext.session.kernel.status === 'idle'); }"""


def open_notebook(page: Any, lab: Lab, name: str, timeout: float = 60_000) -> None:
    """Open ``name`` in Lab, with the left sidebar closed, and wait for an idle kernel."""
    page.goto(lab.notebook_url(name))
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=timeout)
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
    page.wait_for_function(KERNEL_IDLE, timeout=timeout)


def run_all(page: Any) -> None:
    """Run > Run All Cells, through the menu as a user would."""
    page.click("li.lm-MenuBar-item:has-text('Run')")
    page.click("li.lm-Menu-item[data-command='runmenu:run-all']")


def wait_until_idle(page: Any, timeout: float = 90_000) -> None:
    """Every cell has run: no cell is still marked ``[*]`` and the kernel is idle."""
    page.wait_for_function(
        "() => ![...document.querySelectorAll('.jp-InputPrompt')]"
        ".some(p => p.textContent.includes('*'))", timeout=timeout)
    page.wait_for_function(KERNEL_IDLE, timeout=timeout)


def set_theme(page: Any, theme: str) -> None:
    """Switch JupyterLab's theme ("JupyterLab Light" / "JupyterLab Dark") and wait for it."""
    page.evaluate("(t) => window.jupyterapp.commands.execute('apputils:change-theme', {theme: t})",
                  theme)
    page.wait_for_function("(t) => document.body.dataset.jpThemeName === t", arg=theme)
    # Two frames: the theme's CSS variables have reached every element and been painted.
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def screenshot(target: Any, name: str) -> Path:
    """Save a PNG of a page or a locator under artifacts/screenshots/ and remember where."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    target.screenshot(path=str(path), animations="disabled")
    saved_screenshots.append(path)
    print(f"screenshot: {path}")
    return path
