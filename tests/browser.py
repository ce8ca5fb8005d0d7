"""A headless Chromium for the browser tests: find it (the set-up of `make test-e2e` installs Debian's
`chromium`, scripts/setup_browser.sh), and open a page in it with the network cut off.

    exe = find_chromium()                        # /usr/bin/chromium, or None
    page = render(exe, "page.html", tmp_path)    # page.dom (after scripts ran), page.png, page.log

No network: every request goes through a proxy at 127.0.0.1:9 (nothing listens there) and loopback is
not bypassed (`<-loopback>`), so a page that needs a CDN fails to load its script. `loopback=True` lets
requests to this machine through (a page served here, e.g. the MLflow UI) and still nothing else. Background
networking, component updates, sync and QUIC are off. A test that needs the browser FAILS when it is
not installed; it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
RENDER_TIMEOUT_S = 120
NO_NETWORK_FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--proxy-server=127.0.0.1:9",  # discard port: every fetch fails
    "--proxy-bypass-list=<-loopback>",  # ... loopback included
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """The path of a Chromium executable, or None."""
    for name in CANDIDATES:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


@dataclass(frozen=True)
class Rendered:
    dom: str  # the DOM serialised after the page's scripts ran
    png: Path | None  # a screenshot of the first window
    log: str  # Chromium's stderr (console messages with --enable-logging=stderr)


def _chromium(exe: str, profile: Path, args: list[str], loopback: bool = False) -> subprocess.CompletedProcess:
    flags = [f for f in NO_NETWORK_FLAGS if not (loopback and f.startswith("--proxy-bypass-list"))]
    cmd = [exe, *flags, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"Chromium did not finish in {RENDER_TIMEOUT_S} s: {' '.join(cmd)}") from None


def render(exe: str, page: str | os.PathLike, out: str | os.PathLike, *, width: int = 1200, height: int = 2000,
           budget_ms: int = 20000, screenshot: bool = True, loopback: bool = False) -> Rendered:
    """Load `page` (a file, or an http:// address with `loopback`) headless and offline; dump its DOM and
    (`screenshot`) take a `width`x`height` screenshot. A fresh browser profile each time: no remembered
    choice of the page's carries over.

    --virtual-time-budget lets the page's timers and promises (Plotly.newPlot) settle before the dump.
    """
    url = str(page) if str(page).startswith("http") else Path(page).absolute().as_uri()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "page.png"
    common = [f"--virtual-time-budget={budget_ms}", f"--window-size={width},{height}"]
    dom = _chromium(exe, out / "profile-dom", [*common, "--dump-dom", url], loopback)
    if dom.returncode != 0 or not dom.stdout.strip():
        raise AssertionError(f"chromium --dump-dom failed (exit {dom.returncode}):\n{dom.stderr[-3000:]}")
    if not screenshot:
        return Rendered(dom=dom.stdout, png=None, log=dom.stderr)
    shot = _chromium(exe, out / "profile-png", [*common, f"--screenshot={png}", url], loopback)
    if shot.returncode != 0 or not png.is_file():
        raise AssertionError(f"chromium --screenshot failed (exit {shot.returncode}):\n{shot.stderr[-3000:]}")
    return Rendered(dom=dom.stdout, png=png, log=dom.stderr + shot.stderr)

