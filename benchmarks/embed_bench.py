"""Benchmark ``cryolatent embed``: images/s for 128-px particles, and peak host memory at 10^6.

Two measurements, each in its own child process (so the peak RSS is that of embed alone):

``throughput``  a synthetic 128-px set (noisy blobs, written as one .mrcs + STAR) and a run
    folder holding a randomly initialised model of the default size for that box (TARGET-VAE:
    P8, 128 channels, generator 2×512; IRL-INR: ResNet-18 width 64, hypernetwork 256, INR
    256, 256 Fourier features), saved in ``cryolatent train``'s checkpoint format. Reports
    (a) ``embed()`` end to end (load run, read, infer, write STAR + z.npy) and (b) the model
    loop alone (``model.infer`` on batches already on the device, synchronised), in images/s.
    CUDA when present, else CPU. The embedded set is the run's training set, so the images go
    to the model as stored (no crop); the cost of an on-the-fly crop is reported separately
    as ``crop_images_per_s`` (256 -> 128 px Fourier crop + normalisation on the host).

``memory``  10^6 particles, 32 px: 1000 stack files that are symbolic links to one
    1000-image stack (so 10^6 distinct particle names point at 10^6 distinct (file, section)
    pairs while only 4 MB are on disk: a real 128-px set of 10^6 would need 65 GB), a tiny
    TARGET-VAE (z = 8) trained for 0 epochs. The child runs ``embed(..., clusters=10)`` and
    reports its peak RSS (``ru_maxrss``) and the RSS after importing torch, scikit-learn and
    cryolatent (``baseline``), plus the wall time. The model is a trivial stand-in
    LatentModel (intensity centroid, second-moment axis, 8 moments as z; defined in the
    child), so that 10^6 particles take minutes on a CPU instead of hours of network compute. The box and model are small on purpose: what grows
    with N is the table, the poses, z and the STAR writing, not the images, which are
    streamed in batches.

    /work/venv/bin/python benchmarks/embed_bench.py throughput --n 256
    /work/venv/bin/python benchmarks/embed_bench.py memory --n 1000000

Measured 2026-11-22 on the development VM (2 x86_64 cores shared with other jobs, no GPU,
torch 2.13.0+cpu, 2 threads); CPU smoke figures only, no H100 was available to this task:

    throughput --n 64 --batch-size 16 (TARGET-VAE default size, 128 px, randomly initialised)
        embed end to end 1.13 images/s, model loop 1.30 images/s, peak RSS 830 MB;
        host crop+normalise 256 -> 128 px: 250 images/s
    throughput --model irl-inr --n 64 --batch-size 16 (IRL-INR default size, 128 px)
        embed end to end 1.21 images/s, model loop 1.02 images/s, peak RSS 1513 MB
    memory --n 1000000 (32 px, trivial stand-in model, --clusters 10, batch 1024)
        peak RSS 1029 MB, of which 513 MB after importing torch/sklearn/cryolatent;
        270 s wall (embed + k-means + writing a 225 MB OUT.star and 32 MB OUT.z.npy)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_set(folder: Path, n: int, box: int, apix: float, n_unique: int | None = None,
               n_links: int = 1) -> Path:
    """Synthetic particles: ``n_unique`` images (default n) in one stack, optionally seen
    through ``n_links`` symbolic links (particle i = image i % n_unique of link i // n_unique)."""
    import pandas as pd

    from cryolatent.io import MRCStackWriter, write_star

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    m = n_unique or n
    y, x = np.mgrid[:box, :box] - box // 2
    with MRCStackWriter(folder / "stack.mrcs", box, apix) as w:
        for s in range(0, m, 1024):
            k = min(1024, m - s)
            c = rng.normal(0, box / 16, (k, 2, 1, 1))
            img = np.exp(-((x - c[:, 0]) ** 2 + (y - c[:, 1]) ** 2) / (2 * (box / 10) ** 2))
            w.write((img + rng.normal(0, 0.5, img.shape)).astype(np.float32))
    stacks = ["stack.mrcs"]
    if n_links > 1:
        stacks = []
        for j in range(n_links):
            p = folder / f"link{j:05d}.mrcs"
            if not p.exists():
                p.symlink_to("stack.mrcs")
            stacks.append(p.name)
    i = np.arange(n)
    names = [f"{k + 1:06d}@{stacks[j]}" for k, j in zip(i % m, i // m)]
    table = pd.DataFrame({
        "rlnImageName": names,
        "rlnMicrographName": [f"MotionCorr/job002/mic_{j:05d}.mrc" for j in i // 300],
        "rlnCoordinateX": rng.uniform(0, 4096, n).round(1),
        "rlnCoordinateY": rng.uniform(0, 4096, n).round(1),
        "rlnDefocusU": rng.uniform(1e4, 3e4, n).round(1),
        "rlnDefocusV": rng.uniform(1e4, 3e4, n).round(1),
        "rlnDefocusAngle": rng.uniform(0, 180, n).round(2),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box],
                           "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_star(folder / "particles.star", table, optics)
    return folder / "particles.star"


def _make_run(rundir: Path, star: Path, box: int, model: str, **opts) -> None:
    """A run folder with a randomly initialised model, in train's checkpoint format."""
    import torch

    from cryolatent.config import TrainConfig
    from cryolatent.models import build_model
    from cryolatent.utils import seed_everything

    cfg = TrainConfig(input=str(star), outdir=str(rundir), model=model, **opts)
    if cfg.likelihood == "auto":
        cfg.likelihood = "gaussian"
    seed_everything(0)
    m = build_model(cfg.validate(), box)
    (rundir / "checkpoints").mkdir(parents=True, exist_ok=True)
    cfg.save(rundir / "config.json")
    torch.save({"format": 1, "model_name": m.name, "box": box, "model": m.state_dict(),
                "config": cfg.to_dict(), "epoch": 0}, rundir / "checkpoints" / "last.pt")


CHILD = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
import numpy as np, torch
import cryolatent.inference as inf
import sklearn.cluster, cryolatent.io, cryolatent.preprocess
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if args.get("light_model"):
    # a trivial LatentModel (intensity centroid and second-moment axis, z = a few moments):
    # embed's own memory and speed at 10^6 rows without hours of network compute on a CPU
    from cryolatent.config import TrainConfig
    from cryolatent.models.base import Inference, LatentModel
    class Moments(LatentModel):
        name = "moments"
        def __init__(self, box, z_dim):
            super().__init__(); self.box, self.z_dim = box, z_dim
            c = torch.arange(box, dtype=torch.float32) - box // 2
            self.register_buffer("y", c[:, None].expand(box, box).reshape(-1))
            self.register_buffer("x", c[None, :].expand(box, box).reshape(-1))
        @torch.no_grad()
        def infer(self, images):
            w = images.flatten(1).clamp_min(0) + 1e-6
            w = w / w.sum(1, keepdim=True)
            mx, my = w @ self.x, w @ self.y
            dx, dy = self.x[None] - mx[:, None], self.y[None] - my[:, None]
            sxx, syy, sxy = (w * dx * dx).sum(1), (w * dy * dy).sum(1), (w * dx * dy).sum(1)
            psi = torch.rad2deg(0.5 * torch.atan2(2 * sxy, sxx - syy)) % 360
            z = torch.stack([sxx, syy, sxy, mx, my, w.max(1).values, images.mean((1, 2)),
                             images.std((1, 2))], 1)[:, :self.z_dim]
            b = images.shape[0]
            return Inference(psi, torch.stack([-mx, -my], 1), z, torch.ones_like(z),
                             torch.ones(b))
    cfg = TrainConfig(input=args["input"], z_dim=args["light_model"], batch_size=args["batch_size"])
    inf._load_run = lambda rundir, device, checkpoint="best": (Moments(args["box"], cfg.z_dim).to(device), cfg)
t0 = time.perf_counter()
inf.embed(args["run"], args["input"], args["out"], clusters=args.get("clusters"),
          batch_size=args["batch_size"], device=args["device"])
if args["device"] != "cpu" and torch.cuda.is_available():
    torch.cuda.synchronize()
wall = time.perf_counter() - t0
res = {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "baseline_rss_mb": base}
if args.get("model_loop"):
    from cryolatent.io import load_particles
    from cryolatent.utils import resolve_device
    dev = resolve_device(args["device"])
    model, cfg = inf._load_run(args["run"], dev)
    ps = load_particles(args["input"])
    n = min(len(ps), args["model_loop"])
    x = torch.from_numpy(ps.images(np.arange(n))).to(dev)
    bs = args["batch_size"]
    with torch.inference_mode():
        model.infer(x[:bs])                       # warm-up
        if dev.type == "cuda": torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(0, n, bs):
            out = model.infer(x[s:s + bs])
        if dev.type == "cuda": torch.cuda.synchronize()
        res["model_images_per_s"] = n / (time.perf_counter() - t)
print("RESULT " + json.dumps(res))
"""


def _child(args: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"child failed:\n{r.stdout}\n{r.stderr}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def _machine(device: str) -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "host_cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def throughput(a) -> dict:
    import torch

    from cryolatent.preprocess import fourier_crop, normalize

    work = Path(a.workdir)
    star = _write_set(work / f"set{a.box}_{a.n}", a.n, a.box, 1.0)
    run = work / f"run_{a.model}_{a.box}"
    opts = {"z_dim": a.z_dim}
    _make_run(run, star, a.box, a.model, **opts)
    dev = "cuda" if (a.device == "auto" and torch.cuda.is_available()) else \
        ("cpu" if a.device == "auto" else a.device)
    res = _child({"run": str(run), "input": str(star), "out": str(work / "out.star"),
                  "batch_size": a.batch_size, "device": dev, "model_loop": a.n})
    # host-side cost of the on-the-fly crop (INPUT = 2x larger originals)
    big = np.random.default_rng(0).normal(size=(64, 2 * a.box, 2 * a.box)).astype(np.float32)
    t = time.perf_counter()
    for _ in range(3):
        normalize(fourier_crop(torch.from_numpy(big), a.box))
    crop = 3 * len(big) / (time.perf_counter() - t)
    return {"measure": "throughput", "model": a.model, "box": a.box, "n": a.n,
            "batch_size": a.batch_size, "device": dev,
            "embed_images_per_s": a.n / res["wall_s"], "embed_wall_s": res["wall_s"],
            "model_images_per_s": res["model_images_per_s"],
            "crop_images_per_s": crop, "peak_rss_mb": res["peak_rss_mb"], **_machine(dev)}


def memory(a) -> dict:
    work = Path(a.workdir)
    n_unique = 1000
    star = _write_set(work / f"mem{a.n}", a.n, a.box, 2.0, n_unique=n_unique,
                      n_links=-(-a.n // n_unique))
    run = work / f"run_mem_{a.box}"
    run.mkdir(parents=True, exist_ok=True)
    res = _child({"run": str(run), "input": str(star), "out": str(work / "mem_out.star"),
                  "batch_size": a.batch_size, "device": a.device, "clusters": 10,
                  "light_model": 8, "box": a.box})
    out_mb = (work / "mem_out.star").stat().st_size / 2**20
    return {"measure": "memory", "n": a.n, "box": a.box, "batch_size": a.batch_size,
            "clusters": 10, "z_dim": 8, "peak_rss_mb": res["peak_rss_mb"],
            "baseline_rss_mb": res["baseline_rss_mb"], "wall_s": res["wall_s"],
            "out_star_mb": out_mb, **_machine(a.device)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("throughput", "memory"))
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--box", type=int, default=None)
    p.add_argument("--model", default="target-vae", choices=("target-vae", "irl-inr"))
    p.add_argument("--z-dim", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="embed_bench_")
        a.workdir = tmp.name
    if a.what == "throughput":
        a.n = a.n or 256
        a.box = a.box or 128
        a.batch_size = a.batch_size or 64
        out = throughput(a)
    else:
        a.n = a.n or 1_000_000
        a.box = a.box or 32
        a.batch_size = a.batch_size or 1024
        a.device = "cpu" if a.device == "auto" else a.device
        out = memory(a)
    print(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
