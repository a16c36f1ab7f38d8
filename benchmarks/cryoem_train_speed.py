"""Training cost per particle at the cryo-EM setting (issue 14): 64-px particles with CTF,
TARGET-VAE, before (the paper's sizes and MNIST's translation search, float32 — what `train`
picked before the data-derived defaults) and after (what `train` picks now on this machine),
each in its own subprocess (peak RSS is the child's), alternating timed steps is not possible
across processes, so the two run back to back, twice (ABAB) to expose drift.

    python benchmarks/cryoem_train_speed.py [--box 64] [--batch 100] [--steps 4] [--threads 2]

Prints one JSON line per run: images/s (median over the timed steps), seconds per step,
peak RSS (MB) of the process after the steps, and the configuration.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

BEFORE = dict(z_dim=8, enc_channels=128, gen_width=512, gen_fourier_features=256,
              translation_prior=5.0, translation_range=None, mask=False, amp="off",
              gumbel_tau=1.0, kl_warmup=0.0, kl_free_bits=0.0, lr=2e-4, weight_decay=0.0)


def child(box: int, batch: int, steps: int, threads: int, which: str) -> dict:
    import torch

    import numpy as np

    from cryolatent.config import TrainConfig
    from cryolatent.ctf import CTFParams, ctf_params_tensor
    from cryolatent.models import build_model
    from cryolatent.train import StepRunner, amp_dtype, make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kw = dict(BEFORE) if which == "before" else {}
    cfg = TrainConfig(likelihood="gaussian", ctf=True, batch_size=batch, **kw)
    if which == "after":
        cfg.resolve_defaults(box, has_ctf=True, device_type="cpu")
    model = build_model(cfg, box)
    opt, _ = make_optimizer(model, cfg)
    dev = torch.device("cpu")
    runner = StepRunner(model, opt, dev, amp_dtype(cfg.amp, dev))
    x = torch.randn(batch, box, box)
    # per-particle CTF parameters, as `train` hands them to the model (the CTF is made per
    # batch on the device): defocus 1-2.5 um, 300 kV, 2 A/px
    g = np.random.default_rng(0)
    ctf = ctf_params_tensor(CTFParams(g.uniform(1e4, 2.5e4, batch), g.uniform(1e4, 2.5e4, batch),
                                      g.uniform(0, 180, batch), 300.0, 2.7, 0.1, 0.0), 2.0)
    runner.train_step(x, ctf)                                   # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        runner.train_step(x, ctf)
        times.append(time.perf_counter() - t)
    step = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"which": which, "box": box, "batch": batch, "threads": threads,
            "images_per_s": round(batch / step, 2), "s_per_step": round(step, 3),
            "peak_rss_mb": round(rss, 1),
            "config": {k: getattr(cfg, k) for k in (
                "z_dim", "enc_channels", "gen_width", "gen_fourier_features", "translation_range",
                "mask", "amp")}
            | {"kernel": model.kernel, "grid": 2 * model.trange + 1,
               "precision": "bf16" if amp_dtype(cfg.amp, dev) else "float32"}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.box, a.batch, a.steps, a.threads, a.child)))
        return
    rows = []
    for which in ("before", "after", "before", "after"):
        out = subprocess.run([sys.executable, __file__, "--child", which, "--box", str(a.box),
                              "--batch", str(a.batch), "--steps", str(a.steps),
                              "--threads", str(a.threads)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    b = statistics.median(r["images_per_s"] for r in rows if r["which"] == "before")
    f = statistics.median(r["images_per_s"] for r in rows if r["which"] == "after")
    print(json.dumps({"speedup": round(f / b, 1), "before_images_per_s": b,
                      "after_images_per_s": f}))


if __name__ == "__main__":
    main()
