"""UMAP of many synthetic latents the way `cryolatent plot` does it (fit on a subsample,
transform the rest): wall seconds and peak RSS.

    python benchmarks/umap_bench.py --n 1000000 --dim 8 --clusters 10
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from cryolatent.analysis.plots import UMAP_SAMPLE, umap_2d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--sample", type=int, default=UMAP_SAMPLE, help="points UMAP is fitted on")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    centres = rng.normal(0, 3, (a.clusters, a.dim))
    cls = rng.integers(0, a.clusters, a.n)
    z = (centres[cls] + rng.normal(0, 1, (a.n, a.dim))).astype(np.float32)
    t = time.time()
    xy = umap_2d(z, sample=a.sample, seed=a.seed)
    res = dict(n=a.n, dim=a.dim, umap_sample=a.sample, umap_s=round(time.time() - t, 1),
               finite=bool(np.isfinite(xy).all()),
               peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
