"""Benchmark: write and read a synthetic particle STAR with cryolatent.io vs the starfile package.

Each (library, operation) runs in its own subprocess; the child reports wall seconds of the
operation and its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, whole process,
including the Python + pandas baseline, which is reported separately as ``baseline``).

    /work/venv/bin/python benchmarks/star_io.py --n 1000000 --workdir /tmp/star_bench

Writer memory of an embed output (26 columns + 15 float32 latents), cryolatent only, with the
tracemalloc peak of the write itself (tracing makes the write several times slower):

    /work/venv/bin/python benchmarks/star_io.py --n 200000 --latents 15 --ops write \
        --libs cryolatent [--trace]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
lib, op, path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
latents, trace = int(sys.argv[5]), sys.argv[6] == "1"
import numpy as np, pandas as pd
def tables(n):
    rng = np.random.default_rng(0)
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
        "rlnAmplitudeContrast": [0.1, 0.1], "rlnSphericalAberration": [2.7, 2.7], "rlnVoltage": [300.0, 300.0],
        "rlnImagePixelSize": [1.06, 1.06], "rlnImageSize": [256, 256], "rlnImageDimensionality": [2, 2]})
    mic = rng.integers(0, 5000, n)
    cols = {
        "rlnCoordinateX": rng.uniform(0, 4096, n).round(1), "rlnCoordinateY": rng.uniform(0, 4096, n).round(1),
        "rlnAutopickFigureOfMerit": rng.standard_normal(n),
        "rlnClassNumber": rng.integers(1, 51, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnImageName": [f"{i % 300 + 1:06d}@Extract/job012/Movies/mic_{m:05d}.mrcs" for i, m in enumerate(mic)],
        "rlnMicrographName": [f"MotionCorr/job002/Movies/mic_{m:05d}.mrc" for m in mic],
        "rlnOpticsGroup": (mic % 2 + 1).astype(np.int64),
        "rlnCtfMaxResolution": rng.uniform(2, 6, n),
        "rlnCtfFigureOfMerit": rng.uniform(0, 0.3, n),
        "rlnDefocusU": rng.uniform(5000, 30000, n), "rlnDefocusV": rng.uniform(5000, 30000, n),
        "rlnDefocusAngle": rng.uniform(-180, 180, n), "rlnCtfBfactor": np.zeros(n),
        "rlnCtfScalefactor": np.ones(n), "rlnPhaseShift": np.zeros(n),
        "rlnGroupNumber": rng.integers(1, 200, n), "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": rng.uniform(0, 180, n), "rlnOriginXAngst": rng.normal(0, 3, n),
        "rlnOriginYAngst": rng.normal(0, 3, n), "rlnNormCorrection": rng.uniform(0.8, 1.2, n),
        "rlnLogLikeliContribution": rng.normal(1e5, 1e3, n),
        "rlnMaxValueProbDistribution": rng.uniform(0, 1, n),
        "rlnNrOfSignificantSamples": rng.integers(1, 100, n), "rlnRandomSubset": rng.integers(1, 3, n),
    }
    for j in range(latents):
        cols[f"cryolatentZ{j + 1}"] = rng.standard_normal(n).astype(np.float32)
    return pd.DataFrame(cols), optics
if lib == "cryolatent":
    from cryolatent.io import read_star, write_star
else:
    import starfile
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if op == "write":
    parts, optics = tables(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace:
        import tracemalloc
        tracemalloc.start()
    t = time.perf_counter()
    if lib == "cryolatent":
        write_star(path, parts, optics)
    else:
        starfile.write({"optics": optics, "particles": parts}, path)
    dt = time.perf_counter() - t
    nrow = n
    traced = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
else:
    t = time.perf_counter()
    if lib == "cryolatent":
        d = read_star(path)
    else:
        d = starfile.read(path, always_dict=True)
    dt = time.perf_counter() - t
    nrow = len(d["particles"])
    assert isinstance(d["particles"]["rlnImageName"].iloc[0], str)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"lib": lib, "op": op, "seconds": dt, "peak_rss_mb": peak / 1024,
                  "baseline_rss_mb": base / 1024, "rows": nrow,
                  "traced_peak_mb": traced if op == "write" else None}))
"""


def run(lib: str, op: str, path: Path, n: int, latents: int = 0, trace: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", CHILD, lib, op, str(path), str(n), str(latents),
                          "1" if trace else "0"],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--workdir", default="/tmp/cryolatent_star_bench")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--latents", type=int, default=0, help="add K float32 cryolatentZ columns")
    ap.add_argument("--libs", default="cryolatent,starfile")
    ap.add_argument("--ops", default="write,read")
    ap.add_argument("--trace", action="store_true", help="tracemalloc peak of each write")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    rows = []
    for lib in a.libs.split(","):
        path = wd / f"{lib}.star"
        for op in a.ops.split(","):
            for _ in range(a.repeat):
                r = run(lib, op, path, a.n, a.latents, a.trace)
                r["file_mb"] = path.stat().st_size / 2**20
                rows.append(r)
                print(json.dumps(r), flush=True)
    # cross-check: each library reads the other's file with the same number of rows
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    print("| library | operation | seconds | peak RSS (MB) | RSS before op (MB) | file (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lib']} | {r['op']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['baseline_rss_mb']:.0f} | {r['file_mb']:.0f} |")


if __name__ == "__main__":
    main()
