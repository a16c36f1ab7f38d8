"""Why does IRL-INR's semantic code z collapse on centred particles? One variant per run.

Same data and CPU-size model as ``benchmarks/studies/irl_inr_centred.py --data hinge`` (built-in
``hinge_pair``, ``--views`` directions, centred, psi ~ U(0, 360), box 32, 2 x views classes;
ResNet width 8, hypernetwork 64 x 2, INR 32 x 2, 32 Fourier features, moments rule, mse
consistency), trained with one optimiser / scale variant, and at every ``--eval-every`` step:

* cluster accuracy of z (Ward agglomerative, k-means; k = classes, Hungarian matching) and a
  10-NN cross-validated class probe on standardised z (is class information in z at all,
  clustered or not);
* z spread: sd per dimension and the ratio ``between-class sd / within-class sd`` of z;
* reconstruction MSE (eval mode, 600 particles, the encoder's own pose) with each particle's own
  z, with z replaced by the mean z, and with the z of a random particle of another class;
  ``recon_gain = mse(mean z) - mse(own z)`` is what z buys; ``class_render_sd``: sd over
  classes of the canonical images rendered from the class-mean z (pixel mean), against
  ``image_sd`` of the clean canonical images' class means would be the target;
* median psi error per class (after the class's constant offset) and agreement;
* the pure loss-gradient norm (before the optimiser's L2 term) against ``wd * ||W||`` for the
  encoder's z rows and the hypernetwork's input layer: with Adam's coupled L2 decay the update
  is ``lr * (g + wd W) / sqrt(v)``, so a weight whose loss gradient is small against ``wd W``
  is shrunk at a constant ~``lr`` per step whatever its size.

Variants: ``--opt adam|adamw``, ``--weight-decay``, ``--lr``, ``--lambda-consistency``,
``--hyper-head-scale`` (multiplies the hypernetwork's output weight at init),
``--lambda-recon`` (e.g. 1024 = the per-pixel sum instead of the mean at box 32),
``--z-init-scale`` (multiplies the encoder's z rows at init), ``--hyper-in-scale`` (multiplies
the hypernetwork's input layer at init), ``--z-bn`` (z batch-normalised, unit variance per
dimension, so neither loss can shrink it), ``--no-decay-z-path`` (those two layers in a group with
weight decay 0). Prints one JSON line per evaluation and a JSON summary at the end.

    OMP_NUM_THREADS=1 python benchmarks/studies/irl_inr_zcollapse.py --steps 600 --eval-every 200 \
        --opt adam --weight-decay 5e-4 --tag adam-l2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from irl_inr_centred import hinge_data  # noqa: E402

from cryolatent.analysis.cluster import cluster_latents  # noqa: E402
from cryolatent.metrics import (cluster_accuracy, rotation_agreement_per_class,  # noqa: E402
                                rotation_error_per_class)
from cryolatent.models.irl_inr import IRLINR  # noqa: E402


class ZNorm(torch.nn.Module):
    """Appended to the encoder head: BatchNorm1d(affine=False) on the first d outputs (z),
    the pose outputs passed through. (B, d + 4) -> (B, d + 4)."""

    def __init__(self, d: int):
        super().__init__()
        self.d, self.bn = d, torch.nn.BatchNorm1d(d, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.bn(x[:, :self.d]), x[:, self.d:]], 1)


def z_path_params(m: IRLINR) -> dict[str, torch.Tensor]:
    """The weights that carry z: encoder head's z rows (a view) and the hypernetwork input."""
    return {"enc_head_last": m.head[-1].weight, "hyper_in": m.hyper.body[0].weight}


def knn_probe(z: np.ndarray, cls: np.ndarray, seed: int = 0) -> float:
    """5-fold cross-validated 10-NN accuracy on standardised z."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    zs = (z - z.mean(0)) / (z.std(0) + 1e-12)
    return float(cross_val_score(KNeighborsClassifier(10), zs, cls, cv=5).mean())


@torch.no_grad()
def diagnose(m: IRLINR, imgs, psi, cls, k: int, rng: np.random.Generator) -> dict:
    m.eval()
    zs, ps = [], []
    for i in range(0, len(imgs), 256):
        inf = m.infer(imgs[i:i + 256])
        zs.append(inf.z_mean)
        ps.append(inf.psi_deg)
    z = torch.cat(zs).numpy()
    pred = torch.cat(ps).numpy()
    out = {}
    for method in ("agglomerative", "kmeans"):
        out[f"acc_{method}"] = round(cluster_accuracy(
            cluster_latents(z, k, method=method, seed=0), cls), 3)
    out["knn_probe"] = round(knn_probe(z, cls), 3)
    out["z_sd"] = [float(f"{v:.3g}") for v in z.std(0)]
    cm = np.stack([z[cls == c].mean(0) for c in range(k)])
    within = np.sqrt(np.mean([z[cls == c].var(0).sum() for c in range(k)]))
    out["z_between_over_within"] = round(float(np.sqrt(cm.var(0).sum()) / (within + 1e-30)), 3)
    out["psi_err_deg"] = round(rotation_error_per_class(pred, psi, cls), 2)
    out["psi_agreement"] = round(rotation_agreement_per_class(pred, psi, cls), 4)

    # reconstruction with own z / mean z / another class's z (same pose), 600 particles
    sub = rng.choice(len(imgs), 600, replace=False)
    x = imgs[sub]
    N = x.shape[-1]
    zt, u, tau = m.encode(x)
    other = torch.from_numpy(np.array([rng.choice(np.flatnonzero(cls[sub] != cls[sub][i]))
                                       for i in range(len(sub))]))
    mse = lambda zz: float(((m.render(zz, u, tau, N) - x) ** 2).mean())   # noqa: E731
    own, mean = mse(zt), mse(zt.mean(0, keepdim=True).expand_as(zt))
    out["recon_own_z"] = round(own, 5)
    out["recon_mean_z"] = round(mean, 5)
    out["recon_other_class_z"] = round(mse(zt[other]), 5)
    out["recon_gain"] = float(f"{mean - own:.3g}")
    can = m.generate(torch.from_numpy(cm).float(), N)                   # (k, N, N)
    out["class_render_sd"] = float(f"{float(can.std(0).mean()):.3g}")
    m.train()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--n-per-class", type=int, default=300)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--snr", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--opt", default="adam", choices=("adam", "adamw"))
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--no-decay-z-path", action="store_true",
                    help="weight decay 0 for the encoder head's last layer and hyper input")
    ap.add_argument("--lambda-recon", type=float, default=1.0)
    ap.add_argument("--lambda-consistency", type=float, default=1.0)
    ap.add_argument("--consistency-loss", default="mse", choices=("mse", "cosine"))
    ap.add_argument("--z-dim", type=int, default=2)
    ap.add_argument("--z-init-scale", type=float, default=1.0)
    ap.add_argument("--hyper-in-scale", type=float, default=1.0)
    ap.add_argument("--hyper-head-scale", type=float, default=1.0,
                    help="multiplies the hypernetwork's output-layer weight at init (its bias, "
                         "the shared base INR, is kept)")
    ap.add_argument("--z-bn", action="store_true",
                    help="batch-normalise z (affine-free BatchNorm1d after the encoder head)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.ctf = False

    imgs, psi, cls = hinge_data(a, a.snr)
    k = int(len(np.unique(cls)))
    torch.manual_seed(a.seed)
    m = IRLINR(a.box, z_dim=a.z_dim, enc_width=8, hyper_width=64, hyper_layers=2,
               inr_width=32, inr_layers=2, fourier_features=32, fourier_sigma=2.0,
               rotation_rule="moments", consistency_loss=a.consistency_loss,
               lambda_recon=a.lambda_recon, lambda_consistency=a.lambda_consistency,
               lambda_symmetry=15.0, seed=a.seed, ctf=False, pixel_fraction=1.0)
    with torch.no_grad():
        m.head[-1].weight[:a.z_dim].mul_(a.z_init_scale)
        m.head[-1].bias[:a.z_dim].mul_(a.z_init_scale)
        m.hyper.body[0].weight.mul_(a.hyper_in_scale)
        m.hyper.head.weight.mul_(a.hyper_head_scale)
    zp = z_path_params(m)
    if a.z_bn:
        m.head.append(ZNorm(a.z_dim))
    if a.no_decay_z_path:
        ids = {id(p) for p in zp.values()}
        groups = [{"params": [p for p in m.parameters() if id(p) not in ids]},
                  {"params": list(zp.values()), "weight_decay": 0.0}]
    else:
        groups = [{"params": list(m.parameters())}]
    Opt = torch.optim.Adam if a.opt == "adam" else torch.optim.AdamW
    opt = Opt(groups, lr=a.lr, weight_decay=a.weight_decay)
    g = torch.Generator().manual_seed(a.seed)
    rng = np.random.default_rng(a.seed + 1)
    hist, acc, secs = [], [], 0.0
    row = {"step": 0, **diagnose(m, imgs, psi, cls, k, rng)}
    print(json.dumps({"tag": a.tag, **row}), flush=True)
    hist.append(row)
    for step in range(1, a.steps + 1):
        t1 = time.perf_counter()
        idx = torch.randint(0, len(imgs), (a.batch,), generator=g)
        loss, parts = m.loss(imgs[idx])
        opt.zero_grad()
        loss.backward()
        if step % a.eval_every == 0 or step == 1:
            gr = {}
            for name, p in zp.items():
                w = p[:a.z_dim] if name == "enc_head_last" else p
                gw = p.grad[:a.z_dim] if name == "enc_head_last" else p.grad
                gr[name] = {"grad": float(f"{float(gw.norm()):.3g}"),
                            "wd_W": float(f"{a.weight_decay * float(w.detach().norm()):.3g}"),
                            "W": float(f"{float(w.detach().norm()):.3g}")}
        opt.step()
        secs += time.perf_counter() - t1
        acc.append({q: float(v) for q, v in parts.items()})
        if step % a.eval_every == 0 or step == a.steps:
            row = {"step": step, **diagnose(m, imgs, psi, cls, k, rng),
                   "parts": {q: round(float(np.mean([h[q] for h in acc])), 6) for q in acc[0]},
                   "grad_vs_decay": gr, "train_s": round(secs, 1)}
            acc = []
            hist.append(row)
            print(json.dumps({"tag": a.tag, **row}), flush=True)
    print(json.dumps({"tag": a.tag, "args": vars(a), "final": hist[-1],
                      "history": hist[:-1]}))


if __name__ == "__main__":
    main()
