"""Images/s of the streamed training loader alone (no model): memory-mapped ``.mrcs`` reads in
worker processes, whole batches per item, prefetch, pinned memory + non-blocking copies on
CUDA — exactly :class:`cryolatent.data.Batches` with ``resident=False``.

    python benchmarks/loader_bench.py --n 100000 --box 128 --dir /work/bench_data \\
        --workers 0 1 2 --batches 300

Writes a synthetic float32 stack of ``n`` particles (once; kept with ``--keep``), then for
each worker count reads ``--batches`` training batches in the epoch's random order (the
order training uses), twice: "cold" — the file's pages evicted from the page cache first
(``posix_fadvise(DONTNEED)``, so reads come from the disk as for a stack larger than host
memory) — and "warm" (pages cached). Prints one JSON line per run and a table.

Compare with the GPU step rate: the SPEC targets 2,000 images/s for TARGET-VAE at 100 px
(config 3) and 12,500 at 50 px on an H100; the loader must deliver more than the step eats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryolatent.data import Batches, ParticleData, split_indices  # noqa: E402
from cryolatent.io import MRCStackWriter  # noqa: E402


def make_stack(path: Path, n: int, box: int, chunk: int = 4096) -> None:
    """n synthetic particles (noise blocks shifted per chunk: content is irrelevant here)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((chunk, box, box), dtype=np.float32)
    t = time.perf_counter()
    with MRCStackWriter(path, box, 1.0) as w:
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            w.write(base[:m] + np.float32(i / n))
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t:.0f} s", file=sys.stderr)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(path: Path, workers: int, batch: int, n_batches: int, device: torch.device,
        cold: bool, epoch: int) -> dict:
    from cryolatent.io import mrc

    mrc.clear_cache()
    if cold:
        evict(path)
    data = ParticleData.from_source(str(path))
    tr, va = split_indices(data.n, 0.0, seed=0)
    b = Batches(data, tr, va, batch, device, seed=0, num_workers=workers, resident=False)
    it = b.train(epoch)
    x, _ = next(it)                                  # start-up (workers, first batch) apart
    t0 = time.perf_counter()
    n = 0
    for k, (x, _) in enumerate(it):
        n += x.shape[0]
        if k + 1 >= n_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    del it, b
    return {"workers": workers, "cache": "cold" if cold else "warm", "images": n,
            "seconds": round(dt, 3), "images_per_s": round(n / dt, 1),
            "MB_per_s": round(n * data.box ** 2 * 4 / dt / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=300, help="batches timed per run")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dir", default="bench_loader_data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic stack")
    ap.add_argument("--warm-only", action="store_true")
    a = ap.parse_args()

    torch.set_num_threads(1)
    dev = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available())
                       else ("cpu" if a.device == "auto" else a.device))
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"synthetic_{a.n}_{a.box}.mrcs"
    if not path.exists():
        make_stack(path, a.n, a.box)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} CPUs",
            "device": str(dev), "torch": torch.__version__, "n": a.n, "box": a.box,
            "batch": a.batch, "command": " ".join(sys.argv)}
    print(json.dumps(meta))
    results = []
    for e, w in enumerate(a.workers):
        for cold in ([False] if a.warm_only else [True, False]):
            r = run(path, w, a.batch, a.batches, dev, cold, epoch=e)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'workers':>8} {'cache':>6} {'images/s':>10} {'MB/s':>8}")
    for r in results:
        print(f"{r['workers']:>8} {r['cache']:>6} {r['images_per_s']:>10.0f} "
              f"{r['MB_per_s']:>8.0f}")
    if not a.keep:
        path.unlink()


if __name__ == "__main__":
    main()
