"""A headless Chromium for the browser tests: find it (installing Debian's `chromium` when missing), and
open a page in it with the network cut off.

    exe = ensure_chromium()                      # /usr/bin/chromium, installed by apt-get if absent
    page = render(exe, "page.html", tmp_path)    # page.dom (after scripts ran), page.png, page.log

No network: every request goes through a proxy at 127.0.0.1:9 (nothing listens there) and loopback is
not bypassed (`<-loopback>`), so a page that needs a CDN fails to load its script. Background
networking, component updates, sync and QUIC are off. A test that needs the browser FAILS when it cannot
be found or installed (CI machines start with nothing installed); it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
APT_PACKAGES = ("chromium", "fonts-dejavu-core")  # a font, so the page's text renders on a bare machine
INSTALL_TIMEOUT_S = 1200
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


class BrowserUnavailable(RuntimeError):
    """Chromium is neither on this machine nor installable here."""


def find_chromium() -> str | None:
    """The path of a Chromium executable, or None."""
    for name in CANDIDATES:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


def install_chromium(timeout_s: float = INSTALL_TIMEOUT_S) -> float:
    """`apt-get update && apt-get install chromium` (needs root); returns the seconds it took."""
    if shutil.which("apt-get") is None:
        raise BrowserUnavailable("Chromium is not installed and there is no apt-get to install it with; "
                                 f"install one of {', '.join(CANDIDATES)}")
    if os.geteuid() != 0:
        raise BrowserUnavailable("Chromium is not installed and installing it needs root: run "
                                 f"`apt-get install -y {' '.join(APT_PACKAGES)}` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t0 = time.perf_counter()
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # wait for another apt-get (a parallel test run) to finish
    for cmd in (["apt-get", *lock, "update", "-q"],
                ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BrowserUnavailable(f"`{' '.join(cmd)}` did not finish in {timeout_s:.0f} s") from None
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-2000:]
            raise BrowserUnavailable(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{tail}")
    return time.perf_counter() - t0


def ensure_chromium() -> str:
    """A Chromium executable, installed first when missing (raises BrowserUnavailable if impossible)."""
    path = find_chromium()
    if path is None:
        install_chromium()
        path = find_chromium()
        if path is None:
            raise BrowserUnavailable(f"apt-get installed {APT_PACKAGES[0]} but none of {CANDIDATES} is there")
    return path


@dataclass(frozen=True)
class Rendered:
    dom: str  # the DOM serialised after the page's scripts ran
    png: Path | None  # a screenshot of the first window
    log: str  # Chromium's stderr (console messages with --enable-logging=stderr)


def _chromium(exe: str, profile: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [exe, *NO_NETWORK_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"Chromium did not finish in {RENDER_TIMEOUT_S} s: {' '.join(cmd)}") from None


def render(exe: str, page: str | os.PathLike, out: str | os.PathLike, *, width: int = 1200, height: int = 2000,
           budget_ms: int = 20000, screenshot: bool = True) -> Rendered:
    """Load `page` headless and offline; dump its DOM and (`screenshot`) take a `width`x`height` screenshot.

    --virtual-time-budget lets the page's timers and promises (Plotly.newPlot) settle before the dump.
    """
    page, out = Path(page).absolute(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "page.png"
    common = [f"--virtual-time-budget={budget_ms}", f"--window-size={width},{height}"]
    dom = _chromium(exe, out / "profile-dom", [*common, "--dump-dom", page.as_uri()])
    if dom.returncode != 0 or not dom.stdout.strip():
        raise AssertionError(f"chromium --dump-dom failed (exit {dom.returncode}):\n{dom.stderr[-3000:]}")
    if not screenshot:
        return Rendered(dom=dom.stdout, png=None, log=dom.stderr)
    shot = _chromium(exe, out / "profile-png", [*common, f"--screenshot={png}", page.as_uri()])
    if shot.returncode != 0 or not png.is_file():
        raise AssertionError(f"chromium --screenshot failed (exit {shot.returncode}):\n{shot.stderr[-3000:]}")
    return Rendered(dom=dom.stdout, png=png, log=dom.stderr + shot.stderr)


if __name__ == "__main__":  # python tests/browser.py: install if needed, print the path and the time taken
    t = time.perf_counter()
    print(ensure_chromium(), f"({time.perf_counter() - t:.1f} s)")
