"""Open a report page in headless Chromium (for the tests, ``benchmarks/report_bench.py``
and the README's screenshot). Needs Selenium (``pip install selenium``) and Debian's
``chromium`` + ``chromium-driver`` (``apt-get install chromium chromium-driver``; or set
``CRYOLATENT_CHROMIUM`` / ``CRYOLATENT_CHROMEDRIVER``); nothing is downloaded.
:func:`find_chromium` says what is missing."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
DRIVER_NAMES = ("chromedriver",)


def _which(env: str, names, defaults) -> str | None:
    cand = [os.environ.get(env)] + [shutil.which(n) for n in names] + list(defaults)
    return next((c for c in cand if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def find_chromium() -> tuple[str, str] | str:
    """``(chromium, chromedriver)`` paths, or a sentence saying what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    chrome = _which("CRYOLATENT_CHROMIUM", CHROMIUM_NAMES, ("/usr/bin/chromium",))
    driver = _which("CRYOLATENT_CHROMEDRIVER", DRIVER_NAMES, ("/usr/bin/chromedriver",))
    if chrome is None:
        return "no Chromium (apt-get install chromium chromium-driver)"
    if driver is None:
        return "no chromedriver (apt-get install chromium-driver)"
    return chrome, driver


def gl_flags(gl: str | None = None) -> list[str]:
    """Chromium's WebGL backend without a GPU: Mesa's llvmpipe through EGL when Mesa is
    installed (``libegl-mesa0``, ``libgl1-mesa-dri``; redraws 10^5 Bokeh markers ~3× faster
    than SwiftShader), else Chromium's own SwiftShader. ``gl`` (or
    ``$CRYOLATENT_CHROMIUM_GL``): ``llvmpipe``, ``swiftshader`` or ``auto``."""
    import glob

    gl = (gl or os.environ.get("CRYOLATENT_CHROMIUM_GL") or "auto").lower()
    if gl == "auto":
        gl = "llvmpipe" if glob.glob("/usr/lib/*/libEGL_mesa.so*") else "swiftshader"
    if gl == "llvmpipe":
        return ["--use-angle=gl-egl", "--ignore-gpu-blocklist"]
    return ["--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


@contextlib.contextmanager
def chromium(download_dir: str | Path | None = None, width: int = 1400, height: int = 900,
             gl: str | None = None) -> Iterator:
    """A headless Chromium driven by Selenium (WebGL by :func:`gl_flags`); downloads go to
    ``download_dir``. Raises RuntimeError when Chromium is missing."""
    found = find_chromium()
    if isinstance(found, str):
        raise RuntimeError(found)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chrome, driver = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--hide-scrollbars",
              "--disable-background-networking", "--no-first-run", *gl_flags(gl)]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        if download_dir is not None:
            d.execute_cdp_cmd("Browser.setDownloadBehavior",
                              {"behavior": "allow", "downloadPath": str(Path(download_dir))})
        yield d
    finally:
        d.quit()


def open_report(driver, path: str | Path, timeout: float = 120.0) -> dict:
    """Load ``path`` and wait until the page says the map is drawn. Returns ``{"load_ms"
    (navigation start to the map drawn, the page's own clock), "wall_s", "points",
    "errors" (JavaScript errors and console errors)}``."""
    t0 = time.perf_counter()
    driver.get(Path(path).resolve().as_uri())
    end = time.monotonic() + timeout
    while True:
        st = driver.execute_script(
            "const r = window.cryolatentReport; return r ? [r.ready, r.loadMs] : [false, null];")
        if st[0]:
            break
        if time.monotonic() > end:
            raise TimeoutError(f"{path}: the report was not drawn within {timeout:.0f} s; "
                               f"console: {console_errors(driver)}")
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    points = driver.execute_script("return window.cryolatentReport.points();")
    errs = driver.execute_script("return window.cryolatentReport.errors;")
    return {"load_ms": float(st[1]), "wall_s": wall, "points": int(points),
            "errors": list(errs) + console_errors(driver)}


def console_errors(driver) -> list[str]:
    """The browser console's SEVERE entries since the last call."""
    try:
        return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    except Exception:  # noqa: BLE001 - a driver without logs
        return []


def requested_urls(driver) -> list[str]:
    """Every URL the page requested (from the performance log, since the last call)."""
    import json

    urls = []
    try:
        entries = driver.get_log("performance")
    except Exception:  # noqa: BLE001
        return urls
    for e in entries:
        msg = json.loads(e["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def webgl_renderer(driver) -> str:
    """The WebGL renderer the page gets (e.g. ``ANGLE (Mesa/X.org, llvmpipe ...)``)."""
    return str(driver.execute_script(
        "const c = document.createElement('canvas').getContext('webgl');"
        "if (!c) return 'no WebGL';"
        "const e = c.getExtension('WEBGL_debug_renderer_info');"
        "return e ? c.getParameter(e.UNMASKED_RENDERER_WEBGL) : c.getParameter(c.RENDERER);"))
