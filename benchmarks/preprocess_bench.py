"""Benchmark: ``cryolatent preprocess --box 64`` against ``cryodrgn downsample -D 64``.

Makes N synthetic particles (default 6,000 x 256 x 256 float32, ~1.6 GB) as one ``.mrcs`` + a
RELION 3.1 STAR, then runs both tools on the same STAR, alternating, ``--repeats`` times each,
and reports wall time and peak RSS of each child process (``os.wait4`` rusage: ru_maxrss,
which counts file-backed pages mapped by the process too).

    python benchmarks/preprocess_bench.py --workdir /tmp/plbench \
        --cryodrgn /work/venv-cryodrgn/bin/cryodrgn [--n 6000 --box 256 --new-box 64]

Outputs a JSON summary on stdout (and in WORKDIR/results.json).

Measured 2026-11-22 on the 2-core dev VM (AMD EPYC, 23.5 GiB; load average ~8 from other
jobs), 6,000 x 256 -> 64, page cache warm, two alternating runs each:
cryodrgn 4.3.1 ``downsample -D 64``: 83.9 / 87.9 s wall, 9.41 GB peak RSS;
``cryolatent preprocess --box 64`` (normalising): 6.5 / 8.9 s, 527 / 567 MB;
with ``--no-normalize``: 7.4 / 5.8 s, 558 MB. Wall ratio (best/best) 0.078.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_data(folder: Path, n: int, box: int, apix: float = 1.1, seed: int = 0) -> Path:
    """Synthetic particles: a blurred random blob + Gaussian noise; written in chunks."""
    import pandas as pd

    from cryolatent.io import MRCStackWriter, write_star

    folder.mkdir(parents=True, exist_ok=True)
    star = folder / "particles.star"
    stack = folder / "stack.mrcs"
    if star.exists() and stack.exists() and stack.stat().st_size == 1024 + n * box * box * 4:
        return star
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:box, 0:box] - box // 2
    r2 = (xx ** 2 + yy ** 2) / (0.15 * box) ** 2
    blob = np.exp(-r2).astype(np.float32)
    with MRCStackWriter(stack, box, apix) as w:
        for s in range(0, n, 500):
            m = min(500, n - s)
            imgs = rng.standard_normal((m, box, box), dtype=np.float32)
            imgs += 3.0 * blob * rng.uniform(0.5, 1.5, (m, 1, 1)).astype(np.float32)
            w.write(imgs)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box],
                           "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
        "rlnDefocusU": rng.uniform(8000, 20000, n), "rlnDefocusV": rng.uniform(8000, 20000, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnOpticsGroup": np.ones(n, int),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(size=n), "rlnOriginYAngst": rng.normal(size=n),
    })
    write_star(star, parts, optics)
    return star


def run(cmd: list[str], cwd: Path | None = None, env=None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    _out, err = p.stdout.read().decode(), p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"cmd": " ".join(cmd), "rc": p.returncode, "wall_s": round(wall, 2),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2),
            "stderr_tail": err[-400:] if p.returncode else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/cryolatent_preprocess_bench")
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--new-box", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cryodrgn", default="/work/venv-cryodrgn/bin/cryodrgn")
    ap.add_argument("--cryolatent", default=str(Path(sys.executable).parent / "cryolatent"))
    ap.add_argument("--extra", default="", help="extra cryolatent options (space separated)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic data")
    args = ap.parse_args()

    work = Path(args.workdir)
    t0 = time.perf_counter()
    star = make_data(work / "data", args.n, args.box)
    gen_s = time.perf_counter() - t0
    # warm the page cache the same way for both tools
    subprocess.run(["cat", str(work / "data" / "stack.mrcs")], stdout=subprocess.DEVNULL)

    results: dict[str, list] = {"cryodrgn": [], "cryolatent": [], "cryolatent_no_normalize": []}
    for r in range(args.repeats):
        for tool in results:
            out = work / f"out_{tool}_{r}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            if tool == "cryodrgn":
                if not Path(args.cryodrgn).exists():
                    continue
                cmd = [args.cryodrgn, "downsample", str(star), "-D", str(args.new_box),
                       "-o", str(out / "particles.mrcs"), "--datadir", str(work / "data")]
            else:
                cmd = [args.cryolatent, "preprocess", str(star), "-o", str(out),
                       "--box", str(args.new_box), *args.extra.split()]
                if tool.endswith("no_normalize"):
                    cmd.append("--no-normalize")
            res = run(cmd)
            results[tool].append(res)
            print(f"{tool:26s} run {r}: wall {res['wall_s']:7.2f} s  peak RSS "
                  f"{res['peak_rss_mb']:7.1f} MB  rc {res['rc']}", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)

    def best(tool):
        ok = [x for x in results[tool] if x["rc"] == 0]
        return min(ok, key=lambda x: x["wall_s"]) if ok else None

    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB",
        "n": args.n, "box": args.box, "new_box": args.new_box,
        "input_gb": round(args.n * args.box * args.box * 4 / 1e9, 3),
        "data_generation_s": round(gen_s, 1),
        "runs": results,
    }
    b_c, b_l = best("cryodrgn"), best("cryolatent")
    if b_c and b_l:
        summary["wall_ratio_cryolatent_over_cryodrgn"] = round(b_l["wall_s"] / b_c["wall_s"], 3)
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    if not args.keep:
        shutil.rmtree(work / "data", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
