"""MNIST(U) / MNIST(N) quality over training time (SPEC's quality table), CPU or CUDA.

    python benchmarks/mnist_quality.py --model target-vae --dataset mnist-u \
        --rotations 16 --z-dim 32 --time-budget-s 420 --eval-every-s 60 \
        --device cuda --outdir /tmp/mq_tvae --json $OUT/mnist_tvae.json

What it does
------------
1. Builds the train and test sets in memory, exactly as ``cryolatent simulate mnist-u|mnist-n``
   does (same library functions: :func:`cryolatent.simulate.mnist.load_mnist`,
   :func:`~cryolatent.simulate.mnist.mnist_poses`, :func:`~cryolatent.simulate.mnist.pad_digits`,
   :func:`cryolatent.pose.transform_to_particle`, same 1024-image chunks, clipped to [0, 1];
   ``tests/test_benchmarks_mnist.py`` checks the images equal the written stack). Train: the
   first ``--n-train`` digits of MNIST's train split with poses of ``--seed``; test: the first
   ``--n-test`` digits of the test split with poses of ``--seed + 1``. 50 px, shifts N(0, 5²)
   px, rotations U(0, 360°) (mnist-u) or N(0, 45²)° (mnist-n).
2. Trains with :func:`cryolatent.train.train` (the library's loop, images handed over as an
   array) in increments: each increment resumes the run folder with a larger ``epochs``
   (``--eval-every-epochs`` epochs, or as many as fit in ``--eval-every-s`` seconds judged from
   the previous increment). The library trains whole epochs only, so an increment is never
   shorter than one epoch.
3. After each increment loads ``checkpoints/last.pt``, runs ``model.infer`` on the test set,
   clusters the latent means and (as ``cryolatent embed`` does by default, ``--no-centre``
   to skip) moves each cluster's frame with :func:`cryolatent.pose.centre_class_frames`, then
   scores it with :func:`cryolatent.metrics.evaluate_tables` (the code of ``cryolatent
   evaluate``): rotation_corr (Jammalamadaka–SenGupta over all particles), per-class
   variants, translation_corr_x/y (Pearson) and cluster_accuracy / nmi / ari of Ward
   agglomerative clustering of the latent means into K = 10 classes
   (:func:`cryolatent.analysis.cluster.cluster_latents`, exact up to 10,000 points).
4. Writes ``OUTDIR/timeline.json`` and ``OUTDIR/timeline.csv`` after every evaluation (and
   ``--json`` if given), plus ``OUTDIR/predictions.npz`` of the last evaluation. Each row:
   ``train_wall_s`` (time inside ``train()`` calls, restarts included, evaluations excluded),
   ``epoch_s_sum`` (sum of log.csv's per-epoch seconds, training + validation), ``epoch``,
   ``images_seen``, the metrics, and which SPEC targets hold. The summary gives the first
   ``train_wall_s`` at which every target of the SPEC for this model and dataset is met.

Every :class:`cryolatent.config.TrainConfig` field is an option (``--rotations 16``,
``--z-dim 32``, ``--enc-channels 32``, ``--gen-width 128``, ``--kernel 25``,
``--translation-range 15``, ``--lr 1e-3``, ``--gumbel-tau 0.5``, ``--amp off`` ...); options
not given take the CLI's defaults (``cryolatent train``: TARGET-VAE lr 2e-4, batch 100;
IRL-INR lr 1e-4, batch 128, weight decay 5e-4; for TARGET-VAE on mnist-n the rotation prior
is normal with sd 45°, as in the paper). ``--epochs`` caps the total number of epochs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: SPEC quality targets per (model, dataset): metric -> minimum
TARGETS = {
    ("target-vae", "mnist-u"): {"rotation_corr": 0.95, "translation_corr_x": 0.99,
                                "translation_corr_y": 0.99, "cluster_accuracy": 0.72},
    ("irl-inr", "mnist-u"): {"rotation_corr": 0.99, "translation_corr_x": 0.99,
                             "translation_corr_y": 0.99, "cluster_accuracy": 0.72},
    ("target-vae", "mnist-n"): {"cluster_accuracy": 0.78},
    ("irl-inr", "mnist-n"): {"cluster_accuracy": 0.78},
}
#: TrainConfig fields this script sets itself (not options)
_OWN = {"input", "outdir", "datadir", "command", "extra", "device", "epochs", "model",
        "threads"}  # threads: its own --threads (torch.set_num_threads)
METRIC_KEYS = ("rotation_corr", "rotation_corr_per_class", "rotation_agreement_per_class",
               "rotation_error_deg_per_class", "translation_corr_x", "translation_corr_y",
               "cluster_accuracy", "nmi", "ari", "cluster_accuracy_kmeans",
               "translation_corr_x_raw", "translation_corr_y_raw", "frames_centred",
               "rotation_agreement_mod180_per_class", "flip_frac_per_class",
               "psi_on_grid_frac_P4", "psi_on_grid_frac_P8", "psi_on_grid_frac_P16")


# ----------------------------------------------------------------------------- data
def make_mnist(variant: str, split: str, n: int | None, seed: int, mnist=None,
               box: int = 50, shift_sd: float = 5.0, device: str = "cpu"):
    """MNIST(U) ('u') / MNIST(N) ('n') particles in memory, as ``simulate_mnist`` writes them.

    Returns images (n, box, box) float32 in [0, 1], psi (n,) degrees in (-180, 180] and
    shift (n, 2) px (rlnAnglePsi, rlnOriginX/Y at 1 Å/px), labels (n,) int 0..9.
    """
    import torch

    from cryolatent.pose import transform_to_particle, wrap_deg_180
    from cryolatent.simulate import chunk_slices, resolve_device
    from cryolatent.simulate.mnist import CHUNK, load_mnist, mnist_poses, pad_digits

    digits, labels = load_mnist(mnist, split)
    if n is not None:
        if n > len(digits):
            raise SystemExit(f"--n-{split} {n}: the {split} split has {len(digits)} digits")
        digits, labels = digits[:n], labels[:n]
    n = len(digits)
    psi, t = mnist_poses(n, variant, seed, shift_sd)
    dev = resolve_device(device)
    out = np.empty((n, box, box), dtype=np.float32)
    for sl in chunk_slices(n, CHUNK):
        canon = torch.from_numpy(pad_digits(digits[sl], box)).to(dev)
        p = transform_to_particle(canon, torch.from_numpy(psi[sl]), torch.from_numpy(t[sl]))
        out[sl] = p.clamp_(0.0, 1.0).cpu().numpy()
    return out, np.asarray(wrap_deg_180(psi), dtype=np.float64), t.astype(np.float64), labels


# ----------------------------------------------------------------------------- evaluation
def infer_all(model, images: np.ndarray, device, batch: int) -> dict[str, np.ndarray]:
    """model.infer over images (n, box, box) in batches -> psi (n,), shift (n, 2), z (n, D)."""
    import torch

    psi, shift, z = [], [], []
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s:s + batch]).to(device, non_blocking=True)
            r = model.infer(x)
            psi.append(r.psi_deg.float().cpu().numpy())
            shift.append(r.shift_px.float().cpu().numpy())
            z.append(r.z_mean.float().cpu().numpy())
    return {"psi": np.concatenate(psi).astype(np.float64),
            "shift": np.concatenate(shift).astype(np.float64),
            "z": np.concatenate(z)}


def score(pred: dict[str, np.ndarray], psi_true, shift_true, labels, k: int = 10,
          seed: int = 0, kmeans: bool = True, centre: bool = True
          ) -> tuple[dict, np.ndarray, float]:
    """SPEC metrics via cryolatent.metrics.evaluate_tables (the code of ``evaluate``) on the
    poses ``cryolatent embed --clusters k --cluster-method agglomerative`` would write: with
    ``centre`` (embed's default) each cluster's frame is recentred by
    :func:`cryolatent.pose.centre_class_frames` where the library has it. Returns (metrics,
    cluster labels (n,), clustering seconds); ``translation_corr_{x,y}_raw`` are the
    correlations of the model's shifts before centring."""
    import pandas as pd

    from cryolatent import pose
    from cryolatent.analysis.cluster import cluster_latents
    from cryolatent.metrics import cluster_accuracy, evaluate_tables, pearson
    from cryolatent.pose import wrap_deg_180

    t0 = time.perf_counter()
    cl = cluster_latents(pred["z"], k, "agglomerative", seed=seed)
    t_cluster = time.perf_counter() - t0
    shift = pred["shift"]
    centred = centre and hasattr(pose, "centre_class_frames")
    if centred:
        shift, _ = pose.centre_class_frames(pred["psi"], shift, cl)
    names = [f"{i + 1:06d}@test.mrcs" for i in range(len(labels))]
    P = pd.DataFrame({"rlnImageName": names, "rlnAnglePsi": wrap_deg_180(pred["psi"]),
                      "rlnOriginXAngst": shift[:, 0],
                      "rlnOriginYAngst": shift[:, 1], "rlnClassNumber": cl + 1})
    T = pd.DataFrame({"rlnImageName": names, "rlnAnglePsi": psi_true,
                      "rlnOriginXAngst": shift_true[:, 0], "rlnOriginYAngst": shift_true[:, 1],
                      "rlnClassNumber": np.asarray(labels) + 1})
    m = evaluate_tables(P, T)
    m["frames_centred"] = centred
    for j, ax in enumerate("xy"):
        m[f"translation_corr_{ax}_raw"] = pearson(pred["shift"][:, j], shift_true[:, j])
    m.update(rotation_diagnostics(pred["psi"], psi_true, labels))
    if kmeans:
        m["cluster_accuracy_kmeans"] = cluster_accuracy(
            cluster_latents(pred["z"], k, "kmeans", seed=seed), labels)
    return m, cl, t_cluster


def rotation_diagnostics(psi_pred, psi_true, labels, grid: tuple[int, ...] = (4, 8, 16)
                         ) -> dict:
    """Diagnostics beside the SPEC metrics (not targets).

    ``rotation_agreement_mod180_per_class``: mean over classes of |mean exp(2i(pred - true))|:
    1 when pred = true + c_k or true + c_k + 180° (a 180° flip, the ambiguity of 0, 1, 8 the
    TARGET-VAE paper notes); compare with ``rotation_agreement_per_class``.
    ``flip_frac_per_class``: share of particles on the minority branch of pred - true (0° or
    180° from the class's constant, found mod 180), mean over classes (0.5: no structure).
    ``psi_on_grid_frac_P{R}``: share of predicted angles within 1° of a multiple of 360°/R
    (TARGET-VAE: the continuous angle theta unused beyond the discrete rotation r).
    """
    d = np.radians(np.asarray(psi_pred, float) - np.asarray(psi_true, float))
    labels = np.asarray(labels)
    agree2, flips = [], []
    for c in np.unique(labels):
        dc = d[labels == c]
        if len(dc) < 2:
            continue
        m2 = np.exp(2j * dc).mean()
        agree2.append(float(abs(m2)))
        ck = np.angle(m2) / 2                       # constant mod 180
        r = np.angle(np.exp(1j * (dc - ck)))        # in (-pi, pi]
        f = float(np.mean(np.abs(r) > np.pi / 2))
        flips.append(min(f, 1.0 - f))              # the minority branch is the flipped one
    out = {"rotation_agreement_mod180_per_class": float(np.mean(agree2)) if agree2 else None,
           "flip_frac_per_class": float(np.mean(flips)) if flips else None}
    for R in grid:
        step = 360.0 / R
        off = np.abs((np.asarray(psi_pred, float) + step / 2) % step - step / 2)
        out[f"psi_on_grid_frac_P{R}"] = float(np.mean(off < 1.0))
    return out


def targets_met(metrics: dict, targets: dict) -> dict[str, bool]:
    return {k: (metrics.get(k) is not None and metrics[k] >= v) for k, v in targets.items()}


# ----------------------------------------------------------------------------- options
def _field_type(f: dataclasses.Field):
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (int, float, str)):
        return type(default)
    ann = str(f.type)                    # None defaults: the annotation says ("float | None")
    for name, typ in (("bool", "bool"), ("float", float), ("int", int)):
        if name in ann:
            return typ
    return str


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {s!r}")


def build_parser() -> argparse.ArgumentParser:
    from cryolatent.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="target-vae", choices=["target-vae", "irl-inr"])
    p.add_argument("--dataset", default="mnist-u", choices=["mnist-u", "mnist-n"])
    p.add_argument("--n-train", type=int, default=None, help="first N train digits [60000]")
    p.add_argument("--n-test", type=int, default=None, help="first N test digits [10000]")
    p.add_argument("--mnist", default=None, help="mnist.npz [../shared/data/mnist/mnist.npz]")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop before an increment that would take train_wall_s past this")
    p.add_argument("--wall-limit-s", type=float, default=None,
                   help="stop before an increment + evaluation that would take this process "
                        "(data, training, evaluations) past this")
    p.add_argument("--eval-every-s", type=float, default=60.0,
                   help="training seconds between evaluations (whole epochs) [60]")
    p.add_argument("--eval-every-epochs", type=int, default=None,
                   help="epochs between evaluations (overrides --eval-every-s)")
    p.add_argument("--epochs", type=int, default=500, help="maximum total epochs [500]")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--eval-batch", type=int, default=None, help="[250 on CUDA, 100 on CPU]")
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--no-kmeans", action="store_true", help="skip the k-means companion")
    p.add_argument("--no-centre", action="store_true",
                   help="score the model's shifts without embed's per-class frame centring")
    p.add_argument("--outdir", required=True, help="work folder (run, timeline, predictions)")
    p.add_argument("--json", default=None, help="also write the timeline JSON here")
    p.add_argument("--resume", action="store_true",
                   help="continue OUTDIR's run and timeline (budgets count from its start)")
    g = p.add_argument_group("TrainConfig options (cryolatent train's; defaults as the CLI)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _OWN:
            continue
        typ = _field_type(f)
        g.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, default=None,
                       type=_bool if typ == "bool" else typ, metavar=f.name.upper())
    return p


def make_config(args, rundir: Path):
    from cryolatent.config import MODEL_OPTIM
    from cryolatent.config import TrainConfig

    cfg = TrainConfig(model=args.model, **MODEL_OPTIM.get(args.model, {}))
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.dataset == "mnist-n" and args.model == "target-vae":
        given.setdefault("rotation_prior", "normal")
        given.setdefault("rotation_prior_sd", 45.0)
    for k, v in given.items():
        setattr(cfg, k, v)
    cfg.model = args.model
    cfg.outdir, cfg.device = str(rundir), args.device
    cfg.command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    return cfg.validate()


def machine_info(device) -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def _read_log(rundir: Path) -> list[dict]:
    path = rundir / "log.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in r.items()}
                for r in csv.DictReader(fh)]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ----------------------------------------------------------------------------- main
def run(args) -> dict:
    import torch

    from cryolatent.train import load_run, train
    from cryolatent.utils import resolve_device

    t_start = t_proc = time.perf_counter()   # t_start moves back on --resume; t_proc not
    if args.threads:
        torch.set_num_threads(args.threads)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rundir = outdir / "run"
    prev = None
    if args.resume:
        if not (outdir / "timeline.json").exists() or not (rundir / "checkpoints" /
                                                           "last.pt").exists():
            raise SystemExit(f"--resume: no timeline.json and run/checkpoints/last.pt in "
                             f"{outdir}")
        prev = json.loads((outdir / "timeline.json").read_text())
    elif rundir.exists() and any(rundir.iterdir()):
        raise SystemExit(f"{rundir} exists and is not empty: choose another --outdir "
                         "(or --resume)")
    device = resolve_device(args.device)
    variant = args.dataset[-1]
    cfg = make_config(args, rundir)
    targets = TARGETS[(args.model, args.dataset)]
    eval_batch = args.eval_batch or (250 if device.type == "cuda" else 100)

    t0 = time.perf_counter()
    x_tr, _, _, _ = make_mnist(variant, "train", args.n_train, cfg.seed, args.mnist,
                               device=str(device))
    x_te, psi_te, t_te, y_te = make_mnist(variant, "test", args.n_test, cfg.seed + 1,
                                          args.mnist, device=str(device))
    t_data = time.perf_counter() - t0
    print(f"data: {len(x_tr)} train, {len(x_te)} test ({args.dataset}) in {t_data:.1f} s",
          file=sys.stderr, flush=True)

    result = {"benchmark": "mnist_quality", "model": args.model, "dataset": args.dataset,
              "n_train": len(x_tr), "n_test": len(x_te), "targets": targets,
              "options": {k: v for k, v in cfg.to_dict().items()
                          if k not in ("input", "outdir", "datadir", "extra")},
              "time_budget_s": args.time_budget_s, "wall_limit_s": args.wall_limit_s,
              "eval_every_s": args.eval_every_s, "eval_every_epochs": args.eval_every_epochs,
              "machine": machine_info(device), "data_s": t_data, "timeline": [],
              "first_all_targets_met": None, "first_target_met": {}, "status": "running"}
    def save():
        result["elapsed_s"] = time.perf_counter() - t_start
        _write_json(outdir / "timeline.json", result)
        if args.json:
            _write_json(Path(args.json), result)
        rows = result["timeline"]
        if rows:
            keys = [k for k in rows[0] if not isinstance(rows[0][k], dict)]
            with open(outdir / "timeline.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore",
                                   lineterminator="\n")
                w.writeheader()
                w.writerows(rows)

    train_wall, done, epoch_s, eval_s = 0.0, 0, None, None
    if prev is not None:
        # continue the timeline: the run's stored options win (train's --resume rules),
        # budgets count from the first session, the clock continues from its elapsed_s
        stored = json.loads((rundir / "config.json").read_text())
        for k, v in stored.items():
            if k not in ("input", "outdir", "datadir", "command", "extra", "device", "epochs",
                         "num_workers", "compile", "amp", "early_stop") and hasattr(cfg, k):
                if getattr(cfg, k) != v and k in {kk[4:] for kk, vv in vars(args).items()
                                                  if kk.startswith("cfg_") and vv is not None}:
                    print(f"--resume: keeping {k}={v!r} of the run", file=sys.stderr)
                setattr(cfg, k, v)
        done = int(prev.get("epochs") or prev["timeline"][-1]["epoch"])
        train_wall = float(prev.get("train_wall_s") or prev["timeline"][-1]["train_wall_s"])
        epoch_s = train_wall / max(done, 1)
        eval_s = prev["timeline"][-1].get("eval_s") if prev["timeline"] else None
        t_start -= float(prev.get("elapsed_s", 0.0))
        result["timeline"] = prev["timeline"]
        result["first_all_targets_met"] = prev.get("first_all_targets_met")
        result["first_target_met"] = prev.get("first_target_met", {})
        result["sessions"] = prev.get("sessions", [prev.get("machine")]) + [result["machine"]]
    status = "epochs"
    while done < args.epochs:
        if args.eval_every_epochs:
            k = args.eval_every_epochs
        elif epoch_s is None:
            k = 1
        else:
            k = max(1, int(args.eval_every_s // epoch_s))
        if epoch_s is not None:
            if args.time_budget_s is not None:
                fit = int((args.time_budget_s - train_wall) // epoch_s)
                if fit < 1:
                    status = "time_budget"
                    break
                k = min(k, fit)
            if args.wall_limit_s is not None:
                left = args.wall_limit_s - (time.perf_counter() - t_proc) - (eval_s or 0.0)
                fit = int(left // epoch_s)
                if fit < 1:
                    status = "wall_limit"
                    break
                k = min(k, fit)
        k = min(k, args.epochs - done)
        cfg.epochs = done + k
        t0 = time.perf_counter()
        train(cfg, resume=done > 0, data=x_tr)
        dt = time.perf_counter() - t0
        log_rows = _read_log(rundir)
        new_done = int(log_rows[-1]["epoch"]) if log_rows else done
        if new_done <= done:
            status = "no_progress"
            break
        if cfg.likelihood == "auto":  # keep what the first increment resolved
            cfg.likelihood = json.loads((rundir / "config.json").read_text())["likelihood"]
        train_wall += dt
        epoch_s = dt / (new_done - done)
        done = new_done

        t0 = time.perf_counter()
        model, _ = load_run(rundir, device=str(device), which="last")
        pred = infer_all(model, x_te, device, eval_batch)
        t_infer = time.perf_counter() - t0
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        m, cl, t_cluster = score(pred, psi_te, t_te, y_te, args.clusters, cfg.seed,
                                 kmeans=not args.no_kmeans, centre=not args.no_centre)
        eval_s = time.perf_counter() - t0
        last = log_rows[-1]
        met = targets_met(m, targets)
        row = {"train_wall_s": round(train_wall, 3),
               "epoch_s_sum": round(sum(r.get("seconds", 0.0) for r in log_rows), 3),
               "elapsed_s": round(time.perf_counter() - t_start, 3), "epoch": done,
               "images_seen": int(sum(r.get("images", 0.0) for r in log_rows)),
               "images_per_s_last_epoch": _clean(last.get("images_per_s")),
               "train_loss": _clean(last.get("train_loss")),
               "val_loss": _clean(last.get("val_loss")), "lr": _clean(last.get("lr")),
               **{k2: _clean(m.get(k2)) for k2 in METRIC_KEYS},
               "n_clusters_found": int(len(np.unique(cl))),
               "infer_s": round(t_infer, 3), "cluster_s": round(t_cluster, 3),
               "eval_s": round(eval_s, 3), "all_targets_met": all(met.values()),
               "met": met}
        result["timeline"].append(row)
        for name, ok in met.items():
            if ok and name not in result["first_target_met"]:
                result["first_target_met"][name] = {"train_wall_s": row["train_wall_s"],
                                                   "epoch": done,
                                                   "images_seen": row["images_seen"]}
        if row["all_targets_met"] and result["first_all_targets_met"] is None:
            result["first_all_targets_met"] = {"train_wall_s": row["train_wall_s"],
                                               "epoch": done, "images_seen": row["images_seen"]}
        np.savez_compressed(outdir / "predictions.npz", psi_pred=pred["psi"],
                            psi_true=psi_te, shift_pred=pred["shift"], shift_true=t_te,
                            z=pred["z"], labels=y_te, clusters=cl, epoch=done)
        print(f"[{row['elapsed_s']:8.1f} s] epoch {done:4d}  train {train_wall:8.1f} s  "
              f"{row['images_seen']:9d} img  rot {_fmt(m['rotation_corr'])}  "
              f"rot/class {_fmt(m['rotation_corr_per_class'])}  "
              f"agree {_fmt(m['rotation_agreement_per_class'])}  "
              f"agree180 {_fmt(m['rotation_agreement_mod180_per_class'])}  "
              f"tx {_fmt(m['translation_corr_x'])}  ty {_fmt(m['translation_corr_y'])}  "
              f"acc {_fmt(m['cluster_accuracy'])}  (kmeans {_fmt(m.get('cluster_accuracy_kmeans'))})"
              f"  loss {row['train_loss']:.4g}/{row['val_loss'] if row['val_loss'] is None else round(row['val_loss'], 2)}"
              f"  eval {eval_s:.1f} s", file=sys.stderr, flush=True)
        save()
        if done < cfg.epochs:
            status = "early_stop"
            break
    result["status"] = status
    result["train_wall_s"] = train_wall
    result["epochs"] = done
    save()
    f = result["first_all_targets_met"]
    print(json.dumps({"summary": True, "model": args.model, "dataset": args.dataset,
                      "epochs": done, "train_wall_s": round(train_wall, 1), "status": status,
                      "last": {k: result["timeline"][-1].get(k) for k in
                               ("rotation_corr", "translation_corr_x", "translation_corr_y",
                                "cluster_accuracy")} if result["timeline"] else None,
                      "first_all_targets_met": f}), flush=True)
    return result


def _fmt(v) -> str:
    return "  n/a" if v is None else f"{v:6.3f}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
