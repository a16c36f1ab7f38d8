"""IRL-INR on ONE centred asymmetric object: does the trained encoder recover psi, and does it stay?

Diagnostic used for docs/irl-inr-rotation.md §5: a two-blob "tadpole" moved so that its centre
of mass is the box centre, ``--n`` rotations psi ~ U(0, 360) (analytic), white noise at
``--snr`` (0: none), box ``--box``; a tiny IRL-INR trained with Adam. Every ``--every`` steps
it prints the circular correlation of the predicted angle with the rule's own target and with
the truth, the resultant length of (pred - truth) (1: a constant offset), |z|, the spread of z,
and the loss parts. The encoder is evaluated in eval mode (BatchNorm running statistics,
as ``embed`` does) and, for comparison, in train mode (batch statistics of all images).

    python benchmarks/studies/irl_inr_centred_single.py --rule moments --snr 10 --steps 400 --threads 1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from cryolatent.metrics import circular_corr
from cryolatent.models.irl_inr import IRLINR, symmetry_targets

_spec = importlib.util.spec_from_file_location("irl_inr_centred",
                                               Path(__file__).with_name("irl_inr_centred.py"))
b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(b)


def resultant(pred_deg, true_deg) -> float:
    return float(np.abs(np.exp(1j * np.radians(np.asarray(pred_deg) - true_deg)).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rule", default="moments", choices=("moments", "com"))
    ap.add_argument("--snr", type=float, default=10.0, help="0: no noise")
    ap.add_argument("--box", type=int, default=24)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--z-dim", type=int, default=2)
    ap.add_argument("--consistency-loss", default="mse", choices=("mse", "cosine"))
    ap.add_argument("--lambdas", default="1,1,15", help="recon,consistency,symmetry")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    rng = np.random.default_rng(0)
    blobs = [(1.0, -1.0, 0, 4.0, 1.5), (0.8, 5.0, 0, 1.5, 1.5)]
    w = np.array([q[0] * q[3] * q[4] for q in blobs])
    mx = (w * np.array([q[1] for q in blobs])).sum() / w.sum()
    blobs = [(q[0], q[1] - mx, q[2], q[3], q[4]) for q in blobs]
    psi = rng.uniform(0, 360, a.n)
    clean = b.render(blobs, a.box, psi)
    noise = math.sqrt(clean.var() / a.snr) * rng.standard_normal(clean.shape) if a.snr else 0
    imgs = torch.from_numpy(clean + noise).float()
    tgt = b.angle(symmetry_targets(imgs, a.rule)[0])
    print(json.dumps({"args": vars(a), "rule_vs_truth": round(circular_corr(tgt, psi), 4)}))

    lam = [float(v) for v in a.lambdas.split(",")]
    torch.manual_seed(a.seed)
    m = IRLINR(a.box, z_dim=a.z_dim, enc_width=8, hyper_width=32, hyper_layers=1, inr_width=16,
               inr_layers=1, fourier_features=16, lambda_recon=lam[0], lambda_consistency=lam[1],
               lambda_symmetry=lam[2], consistency_loss=a.consistency_loss,
               rotation_rule=a.rule, seed=a.seed, ctf=False, pixel_fraction=1.0)
    opt = torch.optim.Adam(m.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    g = torch.Generator().manual_seed(a.seed)
    t0, acc = time.perf_counter(), []
    for s in range(1, a.steps + 1):
        m.train()
        idx = torch.randint(0, a.n, (a.batch,), generator=g)
        loss, parts = m.loss(imgs[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc.append({k: float(v) for k, v in parts.items()})
        if s % a.every == 0:
            row = {"step": s}
            with torch.no_grad():
                for mode in ("eval", "train"):
                    m.train(mode == "train")
                    z, u, _ = m.encode(imgs)
                    ang = b.angle(u)
                    row[mode] = {"vs_truth": round(circular_corr(ang, psi), 3),
                                 "vs_target": round(circular_corr(ang, tgt), 3),
                                 "R_truth": round(resultant(ang, psi), 3)}
                row["z_norm"] = round(float(z.norm(dim=1).mean()), 4)
                row["z_sd"] = round(float(z.std(0).mean()), 4)
            row["parts"] = {k: round(float(np.mean([h[k] for h in acc])), 4) for k in acc[0]}
            row["s"] = round(time.perf_counter() - t0)
            acc = []
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
