"""IRL-INR on CENTRED particles: the "moments" rotation rule against the paper's "com" rule.

Two data sets (``--data``), both centred (no shift: picked and re-centred particles), truth in
RELION's convention (particle(x) = canonical(R(psi) x), cryolatent.pose):

* ``blobs``: K random asymmetric 2-D objects (mixtures of anisotropic Gaussian blobs, each
  moved so that its centre of mass is exactly at the box centre), rotated analytically by
  psi ~ U(0, 360), white noise with SNR = var(clean image) / var(noise) over the box.
* ``hinge``: a simulated cryo-EM set, ``cryolatent.simulate.simulate_cryoem`` of the built-in
  two-conformation ``hinge_pair`` model seen along ``--views`` fixed directions, ``centered``,
  psi ~ U(0, 360), no CTF unless ``--ctf``, SNR as ``cryolatent simulate`` defines it (signal
  variance 1 inside the particle's disc, noise variance 1/SNR). A 2-D class is a (conformation,
  view) pair: 2 x views classes.

Measurements (rotation metrics per class, since a canonical orientation is arbitrary per class):

1. ``rule``: the angle each symmetry-breaking rule prescribes, computed from the noisy images
   (no learning) — what the symmetry loss pulls the encoder towards.
2. ``trained``: a small IRL-INR trained with each ``--runs`` entry ``rule:consistency_loss``
   (same data, seed, batches and steps for all), then embedded (eval mode): per-class
   rotation correlation (J-S), rotation agreement (resultant length of pred - truth; robust for
   uniform angles), median rotation error (deg, after the class's constant offset), and
   cluster accuracy of z (agglomerative Ward and k-means, k = number of 2-D classes).

    python benchmarks/studies/irl_inr_centred.py --steps 0 --classes 6 --n-per-class 300 --snr 10
    python benchmarks/studies/irl_inr_centred.py --data hinge --views 3 --n-per-class 300 --snr 10 \
        --steps 1500 --runs moments:mse,com:mse --threads 1

Prints a JSON summary on stdout (one line per finished run first) and, with ``--table``, a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time

import numpy as np
import torch

from cryolatent.analysis.cluster import cluster_latents
from cryolatent.metrics import (cluster_accuracy, rotation_agreement_per_class,
                                rotation_corr_per_class, rotation_error_per_class)
from cryolatent.models.irl_inr import IRLINR, moment_targets, symmetry_targets


def make_objects(k: int, box: int, rng: np.random.Generator) -> list[list[tuple]]:
    """k random asymmetric Gaussian mixtures (amp, cx, cy, sx, sy), centre of mass at 0 (px)."""
    objs = []
    for _ in range(k):
        nb = rng.integers(3, 5)
        blobs = []
        for _ in range(nb):
            r, a = rng.uniform(0, 0.22 * box), rng.uniform(0, 2 * math.pi)
            blobs.append((rng.uniform(0.4, 1.0), r * math.cos(a), r * math.sin(a),
                          rng.uniform(0.04, 0.1) * box, rng.uniform(0.04, 0.1) * box))
        w = np.array([b[0] * b[3] * b[4] for b in blobs])
        mx = (w * np.array([b[1] for b in blobs])).sum() / w.sum()
        my = (w * np.array([b[2] for b in blobs])).sum() / w.sum()
        objs.append([(a, cx - mx, cy - my, sx, sy) for a, cx, cy, sx, sy in blobs])
    return objs


def render(blobs, box: int, psi_deg: np.ndarray) -> np.ndarray:
    """(n, box, box): particle(x) = C(R(psi) x), evaluated analytically (RELION frame)."""
    r = np.arange(box) - box // 2
    y, x = np.meshgrid(r, r, indexing="ij")
    c = np.cos(np.radians(psi_deg))[:, None, None]
    s = np.sin(np.radians(psi_deg))[:, None, None]
    qx, qy = c * x - s * y, s * x + c * y
    out = np.zeros((len(psi_deg), box, box))
    for a, cx, cy, sx, sy in blobs:
        out += a * np.exp(-0.5 * (((qx - cx) / sx) ** 2 + ((qy - cy) / sy) ** 2))
    return out


def angle(rot: torch.Tensor) -> np.ndarray:
    return np.degrees(np.arctan2(rot[:, 1].numpy(), rot[:, 0].numpy()))


def blob_data(a, snr: float, rng: np.random.Generator):
    """(images (n, box, box) float32 tensor, psi (n,) deg, class (n,)) of ``--data blobs``."""
    objs = make_objects(a.classes, a.box, rng)
    psi = rng.uniform(0, 360, (a.classes, a.n_per_class))
    clean = np.concatenate([render(o, a.box, p) for o, p in zip(objs, psi)])
    cls = np.repeat(np.arange(a.classes), a.n_per_class)
    sd = math.sqrt(clean.var() / snr) if snr > 0 else 0.0
    imgs = torch.from_numpy(clean + sd * rng.standard_normal(clean.shape)).float()
    return imgs, psi.reshape(-1), cls


def hinge_data(a, snr: float):
    """``--data hinge``: simulate_cryoem(hinge_pair, views, centred) in a temporary folder.

    Returns (images (n, box, box) float32 tensor, psi (n,) deg, 2-D class (n,) =
    conformation * views + view), n = 2 * views * n_per_class."""
    from cryolatent.io import load_particles
    from cryolatent.simulate.cryoem import simulate_cryoem
    from cryolatent.simulate.synthetic import hinge_pair

    n = 2 * a.views * a.n_per_class
    with tempfile.TemporaryDirectory() as tmp:
        star = simulate_cryoem(tmp, structures=hinge_pair(), n=n, box=a.box,
                               snr=snr if snr > 0 else None, seed=a.seed, views=a.views,
                               ctf=a.ctf, centered=True)
        ps = load_particles(star)
        imgs = torch.from_numpy(np.ascontiguousarray(ps.images(slice(None)))).float()
        t = ps.table
        psi = t["rlnAnglePsi"].to_numpy(np.float64)
        cls = (t["rlnClassNumber"].to_numpy() - 1) * a.views + t["cryolatentViewNumber"].to_numpy() - 1
    return imgs, psi, cls


def rotation_scores(pred, psi, cls) -> dict:
    r = lambda v: None if v is None else round(v, 4)   # noqa: E731
    return {"rotation_corr_per_class": r(rotation_corr_per_class(pred, psi, cls)),
            "rotation_agreement_per_class": r(rotation_agreement_per_class(pred, psi, cls)),
            "rotation_error_deg_per_class": r(rotation_error_per_class(pred, psi, cls))}


@torch.no_grad()
def embed(m: IRLINR, imgs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode inference: psi (n,) deg, z (n, d)."""
    m.eval()
    infs = [m.infer(imgs[i:i + 256]) for i in range(0, len(imgs), 256)]
    m.train()
    return (torch.cat([q.psi_deg for q in infs]).numpy(),
            torch.cat([q.z_mean for q in infs]).numpy())


def score(m: IRLINR, imgs, psi, cls, k: int) -> dict:
    pred, z = embed(m, imgs)
    out = rotation_scores(pred, psi, cls)
    for method in ("agglomerative", "kmeans"):
        out[f"cluster_acc_{method}"] = round(cluster_accuracy(
            cluster_latents(z, k, method=method, seed=0), cls), 4)
    out["z_sd"] = [round(float(v), 4) for v in z.std(0)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="blobs", choices=("blobs", "hinge"))
    ap.add_argument("--classes", type=int, default=3, help="blobs: number of objects")
    ap.add_argument("--views", type=int, default=3, help="hinge: projection directions")
    ap.add_argument("--ctf", action="store_true", help="hinge: apply a CTF (not in the loss)")
    ap.add_argument("--n-per-class", type=int, default=400)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--snr", default="1", help="signal variance / noise variance; a comma-"
                    "separated list runs each in turn (0: no noise)")
    ap.add_argument("--steps", type=int, default=300, help="training steps per run (0: none)")
    ap.add_argument("--eval-every", type=int, default=0, help="also score every N steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4, help="Adam (L2); paper 5e-4")
    ap.add_argument("--opt", default="adam", choices=("adam", "adamw"),
                    help="adam: L2 coupled into the gradient (torch Adam weight_decay); adamw: "
                         "decoupled decay (docs/irl-inr-rotation.md section 6)")
    ap.add_argument("--z-dim", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="moments:mse,com:mse",
                    help="comma-separated rule:consistency_loss[@SNR] (rule moments|com, loss "
                         "mse|cosine; @SNR: only at that SNR of --snr)")
    ap.add_argument("--lambda-symmetry", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="print a Markdown table at the end")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = [run_snr(a, float(snr)) for snr in a.snr.split(",")]
    print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    if a.table:
        print_table(results)


def run_snr(a, snr: float) -> dict:
    """Data at one SNR, the rule targets, then every --runs entry that applies; a summary dict."""
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    imgs, psi, cls = blob_data(a, snr, rng) if a.data == "blobs" else hinge_data(a, snr)
    k = int(len(np.unique(cls)))
    out = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                      f"{a.threads} torch threads, torch {torch.__version__}",
           "args": vars(a), "snr": snr, "n": len(imgs), "classes": k,
           "data_seconds": round(time.perf_counter() - t0, 1), "rule": {}, "trained": {}}
    for rule in ("moments", "com"):
        out["rule"][rule] = rotation_scores(angle(symmetry_targets(imgs, rule)[0]), psi, cls)
    e2 = moment_targets(imgs)["e2"]      # the axis alone (2 theta), before the skewness bit
    out["rule"]["moments_axis_2theta"] = rotation_scores(angle(e2), 2 * psi, cls)
    print(json.dumps({"snr": snr, "rule": out["rule"]}), flush=True)

    for spec in a.runs.split(",") if a.steps > 0 else ():
        run, _, only = spec.partition("@")
        if only and float(only) != snr:
            continue
        rule, closs = run.split(":")
        torch.manual_seed(a.seed)
        m = IRLINR(a.box, z_dim=a.z_dim, enc_width=8, hyper_width=64, hyper_layers=2,
                   inr_width=32, inr_layers=2, fourier_features=32, fourier_sigma=2.0,
                   rotation_rule=rule, consistency_loss=closs,
                   lambda_symmetry=a.lambda_symmetry, seed=a.seed, ctf=False, pixel_fraction=1.0)
        Opt = torch.optim.Adam if a.opt == "adam" else torch.optim.AdamW
        opt = Opt(m.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        g = torch.Generator().manual_seed(a.seed)
        secs, cpu, hist, acc = 0.0, 0.0, [], []
        m.train()
        for step in range(1, a.steps + 1):
            t1, c1 = time.perf_counter(), time.process_time()
            idx = torch.randint(0, len(imgs), (a.batch,), generator=g)
            loss, parts = m.loss(imgs[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            secs += time.perf_counter() - t1
            cpu += time.process_time() - c1
            acc.append({q: float(v) for q, v in parts.items()})
            if (a.eval_every and step % a.eval_every == 0) or step == a.steps:
                row = {"step": step, **score(m, imgs, psi, cls, k),
                       "parts": {q: round(float(np.mean([h[q] for h in acc])), 5)
                                 for q in acc[0]}}
                acc = []
                hist.append(row)
                print(json.dumps({"snr": snr, run: row}), flush=True)
        res = dict(hist[-1])
        res["train_seconds"] = round(secs, 1)
        res["train_cpu_seconds"] = round(cpu, 1)
        res["images_per_s"] = round(a.steps * a.batch / secs, 1)
        res["corr_with_rule_target_per_class"] = round(rotation_corr_per_class(
            embed(m, imgs)[0], angle(symmetry_targets(imgs, rule)[0]), cls), 4)
        if len(hist) > 1:
            res["history"] = hist[:-1]
        out["trained"][run] = res
    return out


def print_table(results: list[dict]) -> None:
    cols = ("rotation_corr_per_class", "rotation_agreement_per_class",
            "rotation_error_deg_per_class")
    print("\n| SNR | angle from | rot. corr / class | agreement / class | median error (deg) | "
          "cluster acc. agglo. | k-means |")
    print("|---|---|---|---|---|---|---|")
    for out in results:
        for rule in ("moments", "com", "moments_axis_2theta"):
            r = out["rule"][rule]
            print(f"| {out['snr']:g} | rule {rule}, no learning | "
                  + " | ".join(str(r[c]) for c in cols) + " | – | – |")
        for run, r in out["trained"].items():
            print(f"| {out['snr']:g} | trained {run}, {out['args']['steps']} steps | "
                  + " | ".join(str(r[c]) for c in cols)
                  + f" | {r['cluster_acc_agglomerative']} | {r['cluster_acc_kmeans']} |")


if __name__ == "__main__":
    main()
