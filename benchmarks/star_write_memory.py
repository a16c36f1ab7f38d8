"""Peak memory of ``cryolatent.io.write_star`` on a 200,000-row × 41-column particle table
(an embed output: 26 RELION columns + 15 float32 latents), with optics.

    /usr/bin/time -v python benchmarks/star_write_memory.py OUT.star          # peak RSS
    python benchmarks/star_write_memory.py OUT.star --trace                   # tracemalloc peak

Prints wall seconds, the tracemalloc peak of the write alone (with --trace; tracing makes it
~5x slower), and ru_maxrss before and after the write (the table itself is built first).
"""

import json
import resource
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd

out = sys.argv[1]
trace = "--trace" in sys.argv
n = 200_000
rng = np.random.default_rng(0)
mic = rng.integers(0, 5000, n)
cols = {
    "rlnCoordinateX": rng.uniform(0, 4096, n).round(1),
    "rlnCoordinateY": rng.uniform(0, 4096, n).round(1),
    "rlnAutopickFigureOfMerit": rng.standard_normal(n), "rlnClassNumber": rng.integers(1, 51, n),
    "rlnImageName": [f"{i % 300 + 1:06d}@Extract/job012/Movies/mic_{m:05d}.mrcs"
                     for i, m in enumerate(mic)],
    "rlnMicrographName": [f"MotionCorr/job002/Movies/mic_{m:05d}.mrc" for m in mic],
    "rlnOpticsGroup": (mic % 2 + 1).astype(np.int64),
    "rlnCtfMaxResolution": rng.uniform(2, 6, n), "rlnCtfFigureOfMerit": rng.uniform(0, 0.3, n),
    "rlnDefocusU": rng.uniform(5000, 30000, n), "rlnDefocusV": rng.uniform(5000, 30000, n),
    "rlnDefocusAngle": rng.uniform(-180, 180, n), "rlnCtfBfactor": np.zeros(n),
    "rlnCtfScalefactor": np.ones(n), "rlnPhaseShift": np.zeros(n),
    "rlnGroupNumber": rng.integers(1, 200, n), "rlnAngleRot": rng.uniform(-180, 180, n),
    "rlnAngleTilt": rng.uniform(0, 180, n), "rlnNormCorrection": rng.uniform(0.8, 1.2, n),
    "rlnLogLikeliContribution": rng.normal(1e5, 1e3, n),
    "rlnMaxValueProbDistribution": rng.uniform(0, 1, n),
    "rlnNrOfSignificantSamples": rng.integers(1, 100, n), "rlnRandomSubset": rng.integers(1, 3, n),
    "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.normal(0, 3, n),
    "rlnOriginYAngst": rng.normal(0, 3, n),
}
for j in range(41 - len(cols)):
    cols[f"cryolatentZ{j + 1}"] = rng.standard_normal(n).astype(np.float32)
parts = pd.DataFrame(cols)
optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
                       "rlnImagePixelSize": [1.06, 1.06], "rlnImageSize": [256, 256]})
from cryolatent.io import write_star  # noqa: E402

rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if trace:
    tracemalloc.start()
t = time.perf_counter()
write_star(out, parts, optics)
dt = time.perf_counter() - t
peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
print(json.dumps({"shape": list(parts.shape), "seconds": round(dt, 1), "tracemalloc_peak_mb": peak,
                  "maxrss_before_mb": round(rss0),
                  "maxrss_after_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
