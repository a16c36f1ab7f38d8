"""How fast a `cryolatent report` page opens in headless Chromium, on synthetic embeddings.

Makes an `embed`-like STAR of N particles (10 classes of 8-D latents, CTF, pose, picking
columns; 1,000 particles per stack), writes the report with both maps (PCA, and a stand-in
for UMAP: a fixed nonlinear warp of the PCA, so the page has the size and layout of a real
two-map report without minutes of UMAP), opens it `--repeat` times in headless Chromium
(Debian's chromium + chromedriver, Selenium; WebGL in software: Mesa's llvmpipe, else
SwiftShader; `CRYOLATENT_CHROMIUM_GL` chooses) and prints one
JSON line: the page's size, the time from navigation start to the map drawn (the page's
own clock, `performance.now()` when Bokeh reports the document idle and two frames have
been painted), and the time a box selection of about half the points and a change of
colouring take.

    python benchmarks/report_bench.py --n 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from cryolatent.train import cpu_name


def synthetic_star(path: Path, n: int, seed: int = 0) -> None:
    from cryolatent.io import write_star

    rng = np.random.default_rng(seed)
    k = 10
    centres = rng.normal(0, 2.0, (k, 8))
    cls = rng.integers(0, k, n)
    z = (centres[cls] + rng.normal(0, 0.6, (n, 8))).astype(np.float32)
    i = np.arange(n)
    names = pd.Series(i % 1000 + 1).map("{:06d}".format) + "@Extract/job012/Movies/mic" + \
        pd.Series(i // 1000).map("{:05d}".format) + ".mrcs"
    du = rng.uniform(8000, 25000, n)
    p = pd.DataFrame({
        "rlnImageName": names.to_numpy(dtype=object),
        "rlnMicrographName": ("MotionCorr/job002/Movies/mic" + pd.Series(i // 1000).map(
            "{:05d}".format) + ".mrc").to_numpy(dtype=object),
        "rlnCoordinateX": rng.uniform(0, 4096, n).round(1),
        "rlnCoordinateY": rng.uniform(0, 4096, n).round(1),
        "rlnOpticsGroup": np.ones(n, np.int64),
        "rlnDefocusU": du, "rlnDefocusV": du - rng.uniform(0, 500, n),
        "rlnDefocusAngle": rng.uniform(-180, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n).astype(np.float32),
        "rlnOriginXAngst": rng.normal(0, 3, n).astype(np.float32),
        "rlnOriginYAngst": rng.normal(0, 3, n).astype(np.float32),
        "rlnClassNumber": cls + 1,
        "rlnAutopickFigureOfMerit": rng.normal(1, 0.3, n).astype(np.float32),
    })
    for d in range(8):
        p[f"cryolatentZ{d + 1}"] = z[:, d]
    o = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                      "rlnImagePixelSize": [1.1], "rlnImageSize": [256],
                      "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                      "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_star(path, p, o)


def fake_umap(z, sample=None, seed=0):
    """A stand-in for UMAP with its output's shape: a fixed warp of the PCA."""
    from cryolatent.analysis.plots import pca_2d

    xy, _ = pca_2d(z)
    return np.stack([np.tanh(xy[:, 0] / 3) * 10 + 0.3 * xy[:, 1],
                     np.sin(xy[:, 1] / 2) * 6 + 0.2 * xy[:, 0]], axis=1)


def bench(n: int, repeat: int, work: Path) -> dict:
    import cryolatent.analysis.plots as plots
    from cryolatent.report.browser import chromium, open_report, webgl_renderer
    from cryolatent.report.build import make_report

    star = work / f"bench_{n}.star"
    t = time.perf_counter()
    synthetic_star(star, n)
    star_s = time.perf_counter() - t
    html = work / f"bench_{n}.html"
    real = plots.umap_2d
    plots.umap_2d = fake_umap
    try:
        t = time.perf_counter()
        make_report([star], html, umap=True)
        build_s = time.perf_counter() - t
    finally:
        plots.umap_2d = real
    loads, walls, sel_ms, colour_ms = [], [], [], []
    points = renderer = None
    errors: list[str] = []
    load_avg = [os.getloadavg()[0]]
    for _ in range(repeat):
        with chromium() as d:
            r = open_report(d, html, timeout=300)
            loads.append(r["load_ms"] / 1000)
            walls.append(r["wall_s"])
            points = r["points"]
            errors += r["errors"]
            renderer = webgl_renderer(d)
            sel_ms.append(_box_select_ms(d))
            colour_ms.append(d.execute_script("""
                const sel = document.getElementById('cl-colour');
                const t = performance.now();
                sel.value = 'rlnAnglePsi'; sel.dispatchEvent(new Event('change'));
                return new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(
                    () => ok(performance.now() - t))));"""))
    load_avg.append(os.getloadavg()[0])
    return {"n": n, "html_mb": round(html.stat().st_size / 1e6, 1),
            "star_s": round(star_s, 1), "report_build_s_without_umap": round(build_s, 1),
            "load_s": [round(x, 2) for x in loads],
            "load_s_median": round(statistics.median(loads), 2),
            "wall_s_median": round(statistics.median(walls), 2), "points": points,
            "box_select_ms_median": round(statistics.median(sel_ms)),
            "recolour_ms_median": round(statistics.median(colour_ms)),
            "js_errors": errors, "webgl": renderer,
            "load_average_1min": [round(x, 1) for x in load_avg]}


def _box_select_ms(d) -> float:
    """Drag a box over the left half of the plot area; ms until the page shows the count."""
    from selenium.webdriver.common.action_chains import ActionChains

    el = d.find_element("css selector", "#cl-map-box")
    r = el.rect
    d.execute_script("window.__sel = null; const R = window.cryolatentReport; "
                     "const f = R.onSelect; R.onSelect = function () { f(); "
                     "window.__sel = performance.now(); R.onSelect = f; };")
    x0, y0 = int(r["width"] * 0.12), int(r["height"] * 0.15)
    x1, y1 = int(r["width"] * 0.5), int(r["height"] * 0.85)
    t0 = d.execute_script("return performance.now();")
    (ActionChains(d).move_to_element_with_offset(el, x0 - r["width"] // 2, y0 - r["height"] // 2)
     .click_and_hold().move_by_offset((x1 - x0) // 2, (y1 - y0) // 2)
     .move_by_offset((x1 - x0) - (x1 - x0) // 2, (y1 - y0) - (y1 - y0) // 2).release()
     .perform())
    for _ in range(6000):
        t1 = d.execute_script("return window.__sel;")
        if t1 is not None:
            return float(t1 - t0)
        time.sleep(0.01)
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the STAR and HTML files here [default: a temporary folder]")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for n in a.n:
            res = bench(n, a.repeat, work)
            res.update(cpu=cpu_name(), date=time.strftime("%Y-%m-%d"),
                       chromium=_chromium_version())
            print(json.dumps(res), flush=True)


def _chromium_version() -> str:
    from cryolatent.report.browser import find_chromium

    f = find_chromium()
    if isinstance(f, str):
        return f
    return subprocess.run([f[0], "--version"], capture_output=True, text=True
                          ).stdout.strip()


if __name__ == "__main__":
    main()
