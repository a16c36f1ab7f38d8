"""Trust signals: should a user believe a run's output? (``docs/trust.md``)

Three reports, each written as a JSON summary and logged (logger ``cryolatent``), with a line
starting ``WARNING:`` for every signal that fires:

* :func:`training_report` (end of ``cryolatent train``, ``RUNDIR/summary.json``):
  the validation reconstruction loss against a trivial baseline (the same likelihood when
  every image is predicted by the mean training image), the trend of the validation loss over
  the last epochs, and the latent dimensions the model uses (KL per dimension for TARGET-VAE;
  the spread of z across images for IRL-INR, which has no KL).
* :func:`class_report` (``cryolatent embed``: ``OUT_summary.json``; ``cryolatent classes``:
  ``CLASSDIR/summary.json``): per class its size, the resolution of its aligned average from a
  Fourier ring correlation (FRC) between the averages of two random halves of the class
  (0.143 criterion), and the residual rotation / shift that best aligns the two
  half-averages (about 0 when the poses are consistent); whether classes are distinguishable;
  the share of shifts at the edge of the model's translation search; the latent spread.

Definitions (all documented choices, see the constants):

Improvement over the baseline
    ``(B - V) / (B - F)``: V the validation reconstruction loss (the ``recon`` part of the
    loss, per image, as the model reports it), B the baseline's, F the loss of a perfect
    prediction (Gaussian with sigma 1: ``P log(2 pi)/2`` for P pixels; Bernoulli: the binary
    entropy of the pixel values; IRL-INR's mean squared error: 0; a learned sigma has no such
    floor and uses ``|B|``). For a Gaussian with sigma 1 this is the share of the pixel
    variance around the mean image that the model explains (an R^2). The baseline's mean
    image is taken over up to ``BASELINE_SAMPLE`` training images in the loader's layout;
    for the CTF likelihood the plain mean image (not multiplied by each particle's CTF) is the
    prediction. Threshold :func:`learn_threshold`.

Resolution of a class
    Particles of the class are split at random into two halves (seeded); each half is aligned
    by its poses and averaged exactly as ``classes`` averages (Wiener CTF correction when the
    set has CTF parameters, :func:`cryolatent.analysis.averages.aligned_class_averages`).
    Both half-averages get the same soft circular mask (background level removed;
    :func:`cryolatent.masks.circular_mask_np`), and
    ``FRC(k) = Re sum F1 F2* / sqrt(sum |F1|^2 sum |F2|^2)`` over rings of radius ``k``
    Fourier pixels (rounded). The resolution is ``box * apix / k`` at the first crossing of
    ``FRC = 0.143`` (linear interpolation, from k = 1), the half-set criterion RELION uses
    for gold-standard resolution (Rosenthal & Henderson 2003): it estimates the resolution of
    the average of all particles of the class. No crossing: Nyquist (a lower bound on the
    quality, reported as ``limited by Nyquist``); FRC below 0.143 already at k = 1: no
    resolved signal (``None``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..masks import circular_mask_np
from ..models.base import model_device
from ..pose import POSE_COLUMNS, align_particles, rotate_images, wrap_deg_180
from ..preprocess import fourier_crop
from ..utils import atomic_path, summary_path_for  # noqa: F401  (trust's, defined there)
from .averages import aligned_class_averages

log = logging.getLogger("cryolatent")

FRC_THRESHOLD = 0.143
#: training images averaged for the baseline's mean image (random, seeded)
BASELINE_SAMPLE = 4096
#: at least this share of the baseline's excess loss must be removed (see learn_threshold)
MIN_IMPROVEMENT = 0.01
#: fewer validation images than this and convergence cannot be judged: the validation loss
#: is a mean over these images, and the particles of a real set differ (views, defocus,
#: ice, junk), so its sampling error is the per-image spread / sqrt(n): 10 % of it at 100
#: images, about the size of the effects the run is judged by (the 1 % learn threshold of
#: the baseline's excess loss, a 1 %-per-epoch fall, the best epoch for best.pt and early
#: stopping); 27 images (269 particles) make it 19 %. With the 10 % held out by default,
#: 100 images are ~1,000 particles, itself the low end for 2D classification
MIN_VALIDATION_IMAGES = 100
#: epochs over which the trend of the validation loss is measured
TREND_EPOCHS = 5
#: "still falling": the excess validation loss fell by more than this per epoch, on average
#: over the last TREND_EPOCHS epochs
MAX_FALL_PER_EPOCH = 0.01
#: a latent dimension is "used" when its mean KL over validation images exceeds this (nats)
KL_ACTIVE = 0.02
#: ... or (z means across particles) its variance exceeds this: Burda et al. 2016's "active
#: units" for a N(0, 1) prior; for IRL-INR (no prior) var / (var + mean^2) is compared instead
VAR_ACTIVE = 0.01
#: shifts "hit the edge" of the translation search when more than MAX_EDGE_SHARE of the
#: particles sit on its border AND the border holds at least EDGE_RATIO of the per-cell
#: density of the ring just inside it (piled up, not a tail; uniform noise gives ~1)
MAX_EDGE_SHARE = 0.05
EDGE_RATIO = 0.5
#: classes i, j are indistinguishable when their half-averages correlate at least this share
#: of how well the two halves of the less reproducible class correlate with each other
INDISTINCT_RATIO = 0.97
#: averages are compared (rotation / shift search) at most at this box (Fourier crop)
ALIGN_BOX = 64
ALIGN_STEP_DEG = 2.0
#: particles sampled for the shift-edge statistic
EDGE_SAMPLE = 2000


# ============================================================================ helpers
def write_summary(path: str | Path, summary: dict) -> Path:
    """Write ``summary`` as indented JSON (atomic)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_plain(summary), indent=2, allow_nan=False) + "\n")
    return path


def _plain(x):
    """JSON-able copy: numpy scalars/arrays to Python, NaN/Inf to None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _warn(warnings: list[str], text: str) -> None:
    warnings.append(text)
    log.warning("WARNING: %s", text)


# ============================================================================ FRC
def _masked(img: np.ndarray) -> np.ndarray:
    """Background level (mean outside the mask) removed, then a soft circular mask applied:
    1 inside 0.45 n, a raised-cosine fall-off over 0.05 n (at least 1 px)
    (:func:`cryolatent.masks.circular_mask_np`)."""
    n = img.shape[-1]
    m = circular_mask_np(n, 0.45 * n, edge=max(1.0, 0.05 * n))
    out = np.asarray(img, dtype=np.float64)
    bg = (out[..., m == 0].mean(-1) if (m == 0).any() else out.mean((-2, -1)))
    return (out - np.asarray(bg)[..., None, None]) * m


def ring_index(n: int) -> np.ndarray:
    """(n, n) ring number round(|k|) of each coefficient of an n x n FFT (numpy layout)."""
    k = np.fft.fftfreq(n) * n
    return np.rint(np.hypot(*np.meshgrid(k, k, indexing="ij"))).astype(np.int64)


def frc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fourier ring correlation of two (n, n) images: (n//2 + 1,) values for rings
    k = 0 .. n//2 (radius round(|k|) in Fourier pixels). Images are used as given (mask them
    first); a ring where either image has no power gets 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n = a.shape[-1]
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    ring = ring_index(n).ravel()
    keep = ring <= n // 2
    ring = ring[keep]
    num = np.bincount(ring, (fa * fb.conj()).real.ravel()[keep], minlength=n // 2 + 1)
    pa = np.bincount(ring, (np.abs(fa) ** 2).ravel()[keep], minlength=n // 2 + 1)
    pb = np.bincount(ring, (np.abs(fb) ** 2).ravel()[keep], minlength=n // 2 + 1)
    den = np.sqrt(pa * pb)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def frc_resolution(curve: np.ndarray, box: int, apix: float,
                   threshold: float = FRC_THRESHOLD) -> dict[str, Any]:
    """Resolution (Å) at the first crossing of ``threshold`` from ring 1 upwards.

    Returns ``{"resolution_A", "ring", "limited_by_nyquist"}``: ``ring`` the (interpolated)
    crossing in Fourier pixels; no crossing: Nyquist (2 apix) with ``limited_by_nyquist``;
    below the threshold already at ring 1: ``resolution_A`` None (no resolved signal).
    """
    curve = np.asarray(curve, dtype=np.float64)
    last = len(curve) - 1
    if last < 1 or curve[1] < threshold:
        return {"resolution_A": None, "ring": 0.0, "limited_by_nyquist": False}
    for k in range(2, last + 1):
        if curve[k] < threshold:
            kc = (k - 1) + (curve[k - 1] - threshold) / (curve[k - 1] - curve[k])
            return {"resolution_A": box * apix / kc, "ring": kc, "limited_by_nyquist": False}
    return {"resolution_A": box * apix / last, "ring": float(last), "limited_by_nyquist": True}


# ============================================================================ alignment
def _prepare_for_alignment(imgs: np.ndarray, lowpass_ring: float | None) -> torch.Tensor:
    """Masked, Fourier-cropped to <= ALIGN_BOX, optionally low-passed (Gaussian, sd at
    ``lowpass_ring`` of the original box), unit-norm images (M, d, d) float64."""
    x = _masked(np.asarray(imgs, dtype=np.float64))
    n = x.shape[-1]
    d = min(n, ALIGN_BOX)
    if d < n:
        x = np.asarray(fourier_crop(x, d))
    t = torch.as_tensor(x, dtype=torch.float64)
    if lowpass_ring is not None and lowpass_ring > 0:
        k = torch.fft.fftfreq(d, dtype=torch.float64) * n   # rings of the original box
        k2 = k[:, None] ** 2 + k[None, :] ** 2
        t = torch.fft.ifft2(torch.fft.fft2(t) * torch.exp(-0.5 * k2 / lowpass_ring ** 2)).real
    t = t - t.mean((-2, -1), keepdim=True)
    return t / t.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]


def align_images(refs: torch.Tensor, movs: torch.Tensor, pairs: list[tuple[int, int]],
                 step_deg: float = ALIGN_STEP_DEG, max_shift: float | None = None
                 ) -> list[dict[str, float]]:
    """Best rotation and shift of ``movs[j]`` onto ``refs[i]`` for every (i, j) of ``pairs``.

    refs, movs: unit-norm (M, d, d) float64 tensors. For every angle a on a ``step_deg``
    grid the rotated image R(a)·mov (:func:`cryolatent.pose.rotate_images`) is correlated
    with the reference at every integer shift (FFT, periodic) up to ``max_shift`` px
    (default d/4). Returns per pair ``{"cc", "psi_deg", "shift_px": (x, y)}``: the largest
    normalised correlation and where: ``rotate_images(mov, psi)`` moved by +shift matches ref.
    """
    d = refs.shape[-1]
    max_shift = d / 4 if max_shift is None else max_shift
    angles = torch.arange(0.0, 360.0, step_deg, dtype=torch.float64)
    A = len(angles)
    used = sorted({j for _, j in pairs})
    rot = {}
    for j in used:
        rot[j] = torch.fft.rfft2(rotate_images(movs[j].expand(A, d, d).contiguous(), angles))
    fref = torch.fft.rfft2(refs)
    s = torch.fft.fftfreq(d, dtype=torch.float64) * d
    sy, sx = torch.meshgrid(s, s, indexing="ij")
    allowed = (sx ** 2 + sy ** 2) <= max_shift ** 2
    out = []
    for i, j in pairs:
        cc = torch.fft.irfft2(fref[i][None] * rot[j].conj(), s=(d, d))  # (A, d, d)
        # cc[a, s] = sum_x ref(x) mov_a(x - s)  (mov moved by +s)
        cc = torch.where(allowed[None], cc, torch.full_like(cc, -math.inf))
        best = int(torch.argmax(cc))
        a, rest = divmod(best, d * d)
        r, c = divmod(rest, d)
        out.append({"cc": float(cc.flatten()[best]), "psi_deg": float(angles[a]),
                    "shift_px": (float(sx[r, c]), float(sy[r, c]))})
    return out


# ============================================================================ halves
def half_split(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N,) 0/1: a random half of each class (sizes differ by at most one)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(labels), dtype=np.int64)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        idx = idx[rng.permutation(len(idx))]
        half[idx[1::2]] = 1
    return half


def half_set_averages(particle_set, table, labels: np.ndarray, n_classes: int, seed: int = 0,
                      **kw) -> tuple[np.ndarray, np.ndarray]:
    """Aligned averages of two random halves of every class: ``(halves (K, 2, D, D),
    counts (K, 2))``, made by :func:`aligned_class_averages` (same alignment and CTF
    correction as the class averages) with class k's half h as class ``2(k-1) + h + 1``.
    ``labels``: (N,) class numbers 1..K (< 1: left out). ``kw``: passed on
    (``ctf``, ``wiener_snr``, ``batch_size``, ``device``)."""
    labels = np.asarray(labels, dtype=np.int64)
    half = half_split(labels, seed)
    t = table[list(POSE_COLUMNS)].copy()
    t["rlnClassNumber"] = np.where(labels >= 1, 2 * (labels - 1) + half + 1, 0)
    avg, counts = aligned_class_averages(particle_set, t.reset_index(drop=True),
                                         n_classes=2 * n_classes, show_progress=False, **kw)
    D = avg.shape[-1]
    return avg.reshape(n_classes, 2, D, D), counts.reshape(n_classes, 2)


# ============================================================================ latent
def latent_spread(z: np.ndarray, model_name: str | None) -> dict[str, Any]:
    """Which latent dimensions vary across particles (z means, (N, D)).

    TARGET-VAE (N(0, I) prior): variance across particles > VAR_ACTIVE (Burda et al.'s
    active units). Other models (IRL-INR: no prior, arbitrary scale): the relative variance
    var / (var + mean^2) > VAR_ACTIVE (0 when every particle has the same z)."""
    z = np.asarray(z, dtype=np.float64)
    var = z.var(0)
    if model_name == "target-vae":
        score, kind = var, "variance of the latent mean across particles (prior N(0, 1))"
    else:
        score = var / np.maximum(var + z.mean(0) ** 2, 1e-30)
        kind = "variance of z across particles relative to var + mean^2 (no prior)"
    used = score > VAR_ACTIVE
    return {"measure": kind, "threshold": VAR_ACTIVE, "per_dim": score.tolist(),
            "variance": var.tolist(), "used_dims": int(used.sum()), "dims": int(z.shape[1])}


# ============================================================================ training
def validation_size_warning(n_val: int, n_particles: int | None = None) -> str | None:
    """The warning (text without ``WARNING:``) when ``n_val`` validation images (> 0) are
    fewer than :data:`MIN_VALIDATION_IMAGES`, else None. ``train`` can say it before the
    first epoch too; :func:`training_report` puts it in ``summary.json``."""
    if n_val <= 0 or n_val >= MIN_VALIDATION_IMAGES:
        return None
    of = f" of {n_particles} particles" if n_particles else ""
    return (f"too few particles to judge the training: only {n_val} validation images{of} "
            f"(fewer than {MIN_VALIDATION_IMAGES}); the validation loss, the best epoch, the "
            "convergence test and these trust signals are noise at this size; use at least "
            f"~{10 * MIN_VALIDATION_IMAGES} particles (or a larger --val-fraction)")


def learn_threshold(z_dim: int, n_pixels: int) -> float:
    """The improvement below which a run "did not learn": max(MIN_IMPROVEMENT,
    2 (z_dim + 3) / n_pixels). On pure noise a model that fits z_dim latent values and 3 pose
    parameters per image explains about (z_dim + 3) / P of the variance (each fitted
    parameter removes about one of P independent noise components); twice that is out of
    reach for noise. 1 % at least: a perfect model of SNR-0.1 particles explains about 9 %
    (signal / (signal + noise)), so 1 % still passes low-SNR data that was learned."""
    return max(MIN_IMPROVEMENT, 2.0 * (z_dim + 3) / max(n_pixels, 1))


@torch.no_grad()
def _baseline_parts(model, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (B,): the baseline's reconstruction loss and the perfect prediction's (floor;
    NaN when there is none) in the model's ``recon`` units."""
    b = x.shape[0]
    y = x.reshape(b, -1).double()
    m = mean.reshape(1, -1).double()
    lik = getattr(model, "likelihood", None)
    if lik is None:  # IRL-INR: mean squared error over pixels
        return ((y - m) ** 2).mean(-1), torch.zeros(b, dtype=torch.float64, device=x.device)
    log2pi = math.log(2 * math.pi)
    if lik == "bernoulli":
        p = m.clamp(1e-6, 1 - 1e-6)
        nll = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
        yc = y.clamp(1e-12, 1 - 1e-12)
        floor = -(y * torch.log(yc) + (1 - y) * torch.log1p(-yc))
    elif getattr(model, "learn_sigma", False):
        ls = torch.log(std.reshape(1, -1).double().clamp_min(1e-30)).clamp(-9.0, 4.0)
        nll = 0.5 * ((y - m) * torch.exp(-ls)) ** 2 + ls + 0.5 * log2pi
        floor = torch.full_like(y, math.nan)
    else:
        nll = 0.5 * (y - m) ** 2 + 0.5 * log2pi
        floor = torch.full_like(y, 0.5 * log2pi)
    if getattr(model, "use_mask", False):
        w = model.mask2d.reshape(1, -1).double().to(x.device)
        nll, floor = nll * w, floor * w
    return nll.sum(-1), floor.sum(-1)


@torch.no_grad()
def _kl_per_dim(model, x: torch.Tensor) -> torch.Tensor | None:
    """TARGET-VAE: E_q[KL(q(z|t,r,y) || N(0, I))] per latent dimension, (B, D); q the
    posterior cell weights. None for a model without that posterior."""
    enc = getattr(model, "encode", None)
    if getattr(model, "name", "") != "target-vae" or enc is None:
        return None
    post = enc(x)
    q = post["log_q"].float().exp()
    mu, ls = post["z_mu"].float(), post["z_logstd"].float()
    kl = -ls + 0.5 * (torch.exp(2 * ls) + mu ** 2) - 0.5
    return torch.einsum("bn,bnd->bd", q, kl)


def training_report(model, source, train_idx: np.ndarray, val_batches, rows: list[dict],
                    rundir: str | Path, z_dim: int | None = None, seed: int = 0
                    ) -> dict[str, Any]:
    """Convergence and latent-use report of a finished run; writes ``RUNDIR/summary.json``.

    model: the trained model (put in eval mode here); source: the
    :class:`cryolatent.data.ParticleData` it was trained on; train_idx: training indices;
    val_batches: an iterable of validation ``(x, ctf)`` batches in the loader's layout
    (``Batches.val()``); rows: the log.csv rows (``val_recon`` / ``val_loss`` per epoch).
    """
    warnings: list[str] = []
    model.eval()
    dev = model_device(model)
    rng = np.random.default_rng(seed)
    train_idx = np.asarray(train_idx)
    take = np.sort(rng.choice(train_idx, size=min(len(train_idx), BASELINE_SAMPLE),
                              replace=False)) if len(train_idx) else train_idx
    imgs = source.images(take) if len(take) else np.zeros((1, source.box, source.box))
    mean = torch.as_tensor(np.asarray(imgs, np.float64).mean(0), device=dev)
    std = torch.as_tensor(np.asarray(imgs, np.float64).std(0), device=dev)
    del imgs
    base_sum = floor_sum = 0.0
    n_val = 0
    kl_sum = None
    zs = []
    for x, _c in val_batches:
        b, f = _baseline_parts(model, x, mean, std)
        base_sum += float(b.sum())
        floor_sum += float(f.sum())
        n_val += x.shape[0]
        kl = _kl_per_dim(model, x)
        if kl is not None:
            kl_sum = kl.sum(0).double() if kl_sum is None else kl_sum + kl.sum(0).double()
        elif hasattr(model, "infer"):
            zs.append(model.infer(x).z_mean.double().cpu().numpy())
    name = getattr(model, "name", None)
    rep: dict[str, Any] = {"kind": "training", "model": name, "validation_images": n_val,
                           "epochs": len(rows)}
    # the whole validation set (under torchrun the batches here are rank 0's share)
    n_all = int(getattr(source, "n", 0) or 0)
    n_val_all = max(n_val, n_all - len(train_idx)) if n_all else n_val
    small = validation_size_warning(n_val_all, n_all or None)
    if small:
        _warn(warnings, small)
    val = [float(r["val_recon"]) for r in rows if _num(r.get("val_recon"))]
    if not val:
        val = [float(r["val_loss"]) for r in rows if _num(r.get("val_loss"))]
        rep["loss_used"] = "val_loss"
    else:
        rep["loss_used"] = "val_recon"
    if n_val == 0 or not val:
        rep["note"] = "no validation set: no convergence report"
        rep["warnings"] = warnings
        write_summary(Path(rundir) / "summary.json", rep)
        return rep
    B = base_sum / n_val
    F = floor_sum / n_val
    V = val[-1]
    denom = (B - F) if math.isfinite(F) and B - F > 0 else abs(B)
    impr = (B - V) / denom if denom > 0 else 0.0
    npix = int(source.box) ** 2
    zd = int(z_dim or getattr(model, "z_dim", 0) or 0)
    thr = learn_threshold(zd, npix)
    rep["baseline"] = {
        "what": "the same likelihood with every validation image predicted by the mean of "
                f"{len(take)} training images (CTF not applied)",
        "recon": B, "perfect_prediction": F if math.isfinite(F) else None}
    rep["validation_recon_last"] = V
    rep["validation_recon_best"] = min(val)
    rep["improvement"] = impr
    rep["improvement_threshold"] = thr
    log.info("convergence: validation recon %.6g, mean-image baseline %.6g: the model removes "
             "%.1f %% of the baseline's excess loss (threshold %.1f %%)", V, B, 100 * impr,
             100 * thr)
    if impr < thr:
        how = (f"only {100 * impr:.2g}% below" if impr >= 0 else
               f"{-100 * impr:.3g}% above")
        _warn(warnings, f"the model did not learn: validation loss is {how} the mean-image "
                        f"baseline (needs >= {100 * thr:.2g}% below); its poses, latents and "
                        "classes are not to be trusted")
    k = min(TREND_EPOCHS, len(val) - 1)
    if k >= 1:
        exc = (V - F) if math.isfinite(F) and V - F > 0 else abs(V)
        fall = (val[-1 - k] - V) / max(exc, 1e-30) / k
        rep["trend"] = {"epochs": k, "fall_per_epoch": fall,
                        "threshold": MAX_FALL_PER_EPOCH,
                        "measure": "mean relative fall per epoch of the validation loss "
                                   "above the perfect prediction's"}
        log.info("trend: the validation loss fell %.2f %% per epoch over the last %d epochs",
                 100 * fall, k)
        if fall > MAX_FALL_PER_EPOCH:
            _warn(warnings, f"not converged: the validation loss still falls "
                            f"{100 * fall:.2g}% per epoch over the last {k} epochs; train "
                            "longer (--resume --epochs N)")
    else:
        rep["trend"] = {"epochs": 0, "note": "one epoch: no trend"}
    if kl_sum is not None:
        kl = (kl_sum / n_val).cpu().numpy()
        used = int((kl > KL_ACTIVE).sum())
        rep["latent"] = {"measure": "E_q[KL_z] per dimension, mean over validation images "
                                    "(nats)", "threshold": KL_ACTIVE,
                         "per_dim": kl.tolist(), "used_dims": used, "dims": len(kl)}
    elif zs:
        rep["latent"] = latent_spread(np.concatenate(zs), name)
        rep["latent"]["note"] = "this model has no KL: the spread of z across validation images"
    lat = rep.get("latent")
    if lat:
        log.info("latent: %d of %d dimensions used (%s: %s)", lat["used_dims"], lat["dims"],
                 lat["measure"], ", ".join(f"{v:.3g}" for v in lat["per_dim"]))
        if lat["used_dims"] == 0:
            _warn(warnings, "latent space collapsed: no latent dimension is used; the latents "
                            "and classes carry no information")
    rep["warnings"] = warnings
    write_summary(Path(rundir) / "summary.json", rep)
    return rep


def _num(v) -> bool:
    try:
        return v not in (None, "") and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


# ============================================================================ classes
def shift_edge(model, psi_deg: np.ndarray, shift_px: np.ndarray, z: np.ndarray,
               seed: int = 0) -> dict[str, Any]:
    """Share of particles whose shift lies at the edge of the model's translation search.

    psi_deg, shift_px: the model's poses (RELION convention, px of the model's box, before
    any frame centring); z: (N, D) latent means. TARGET-VAE searches a grid of -T..T px
    (``model.trange``) in x and y; with recentring the reported location is the grid cell plus
    R(-psi) c(z) (the generated object's centre, :meth:`TargetVAE.canonical_centre`), which
    is subtracted again for a random sample of up to EDGE_SAMPLE particles. A particle is at
    the edge when max(|x|, |y|) of its cell >= T - 0.5; ``edge_density_ratio`` compares the
    particles per border cell with those per cell of the ring inside (see EDGE_RATIO).
    Models without a bounded search report the shifts' spread only."""
    shift_px = np.asarray(shift_px, np.float64).reshape(-1, 2)
    r = np.hypot(shift_px[:, 0], shift_px[:, 1])
    out: dict[str, Any] = {"rms_px": float(np.sqrt((r ** 2).mean())) if len(r) else 0.0,
                           "max_px": float(r.max(initial=0.0))}
    T = getattr(model, "trange", None)
    if T is None or len(r) == 0:
        out["search_limit_px"] = None
        out["note"] = "the model has no bounded translation search"
        return out
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(r), size=min(len(r), EDGE_SAMPLE), replace=False))
    u = -shift_px[idx]
    if getattr(model, "recentre", False) and hasattr(model, "canonical_centre"):
        dev = model_device(model)
        cs = []
        with torch.no_grad():
            for s in range(0, len(idx), 256):
                zb = torch.as_tensor(np.asarray(z[idx[s:s + 256]]), dtype=torch.float32,
                                     device=dev)
                cs.append(model.canonical_centre(zb).double().cpu().numpy())
        c = np.concatenate(cs)
        th = np.deg2rad(np.asarray(psi_deg, np.float64)[idx])
        co, si = np.cos(th), np.sin(th)
        u = u - np.stack([co * c[:, 0] + si * c[:, 1], -si * c[:, 0] + co * c[:, 1]], -1)
    ring = np.minimum(np.rint(np.abs(u)).max(1), T).astype(np.int64)   # Chebyshev ring
    edge = ring >= T
    # density per cell on the border vs. on the ring just inside it: a distribution that
    # tails off inside the grid leaves the border sparse (ratio << 1); one cut off by the
    # search (or spread uniformly, as for noise) piles up there (ratio ~ 1 or more)
    per_cell = lambda r: (ring == r).mean() / (8 * r if r else 1)  # noqa: E731
    ratio = (float(per_cell(T) / per_cell(T - 1)) if T >= 1 and per_cell(T - 1) > 0
             else (math.inf if edge.any() else 0.0))
    out.update({"search_limit_px": int(T), "at_edge_share": float(edge.mean()),
                "edge_density_ratio": ratio, "sampled": int(len(idx)),
                "threshold": MAX_EDGE_SHARE, "ratio_threshold": EDGE_RATIO})
    return out


def class_report(halves: np.ndarray, counts: np.ndarray, apix: float,
                 full_counts: np.ndarray | None = None, null: dict | None = None
                 ) -> dict[str, Any]:
    """Per-class resolution, pose agreement between halves and class distinguishability.

    halves: (K, 2, D, D) half-set averages; counts: (K, 2); apix: Å/px of the averages.
    null: an :func:`aligned_noise_null` result; each class's FRC is compared with it
    (:func:`beats_null`, margin :func:`null_margin`).
    Returns ``{"classes": [...], "indistinguishable_pairs": [...], "warnings": [...]}``
    (classes with fewer than 2 particles are reported without resolution)."""
    warnings: list[str] = []
    K, _, D, _ = halves.shape
    counts = np.asarray(counts)
    sizes = counts.sum(1) if full_counts is None else np.asarray(full_counts)
    ok = [k for k in range(K) if counts[k].min() >= 1]
    classes = []
    rings = []
    for k in range(K):
        c: dict[str, Any] = {"class": k + 1, "size": int(sizes[k]),
                             "halves": [int(counts[k, 0]), int(counts[k, 1])]}
        if k in ok:
            curve = frc(_masked(halves[k, 0]), _masked(halves[k, 1]))
            res = frc_resolution(curve, D, apix)
            c.update({"resolution_A": res["resolution_A"],
                      "limited_by_nyquist": res["limited_by_nyquist"],
                      "frc": [round(float(v), 4) for v in curve]})
            if null is not None:
                m = beats_null(curve, D, apix, null, int(counts[k].min()))
                need = null_margin(null_curve(null, int(counts[k].min())))
                c["log_snr_above_aligned_noise"] = m
                c["log_snr_margin"] = need
                c["beats_aligned_noise"] = bool(m > need)
            rings.append(res["ring"])
        else:
            c["resolution_A"] = None
            c["note"] = "fewer than 2 particles"
        classes.append(c)
    pairs_out = []
    if ok:
        lp = float(np.median(rings)) if rings else None
        lp = max(lp, 3.0) if lp else 3.0
        flat = halves[ok].reshape(-1, D, D)
        t = _prepare_for_alignment(flat, lp)
        d = t.shape[-1]
        scale = D / d
        pos = {k: i for i, k in enumerate(ok)}
        pairs = [(2 * pos[k], 2 * pos[k] + 1) for k in ok]
        cross = [(i, j) for a, i0 in enumerate(ok) for j0 in ok[a + 1:]
                 for i, j in ((2 * pos[i0], 2 * pos[j0] + 1), (2 * pos[i0] + 1, 2 * pos[j0]))]
        res = align_images(t, t, pairs + cross)
        within = {}
        for k, r in zip(ok, res[:len(ok)]):
            psi = wrap_deg_180(r["psi_deg"])
            sh = np.asarray(r["shift_px"]) * scale * apix
            within[k] = r["cc"]
            classes[k].update({"halves_cc": r["cc"], "pose_residual_psi_deg": psi,
                               "pose_residual_shift_A": [float(sh[0]), float(sh[1])]})
        rc = res[len(ok):]
        for n, (a, b) in enumerate((a, b) for i, a in enumerate(ok) for b in ok[i + 1:]):
            cc = 0.5 * (rc[2 * n]["cc"] + rc[2 * n + 1]["cc"])
            ref = min(within[a], within[b])
            ratio = cc / ref if ref > 0 else math.inf
            if ratio >= INDISTINCT_RATIO:
                pairs_out.append({"classes": [a + 1, b + 1], "cross_cc": cc,
                                  "halves_cc": ref, "ratio": ratio})
    for c in classes:
        if c.get("resolution_A") is not None:
            log.info("class %d: %d particles, %.3g Å%s (FRC 0.143 of half-set averages), "
                     "halves agree to %.1f° and %.2g Å", c["class"], c["size"],
                     c["resolution_A"], " (Nyquist)" if c["limited_by_nyquist"] else "",
                     c.get("pose_residual_psi_deg", math.nan),
                     float(np.hypot(*c.get("pose_residual_shift_A", (math.nan, math.nan)))))
        else:
            log.info("class %d: %d particles, no resolved signal", c["class"], c["size"])
    no_signal = [c["class"] for c in classes if c["size"] >= 2 and c["resolution_A"] is None]
    if no_signal and len(no_signal) == len([c for c in classes if c["size"] >= 2]):
        _warn(warnings, "no class average has resolved signal (the FRC between random halves "
                        "of every class is below 0.143 from the lowest frequency): the poses "
                        "do not align the particles")
    elif no_signal:
        _warn(warnings, "no resolved signal in class(es) " + ", ".join(map(str, no_signal)))
    sized = [c for c in classes if c["size"] >= 2 and c["resolution_A"] is not None]
    noisy = [c["class"] for c in sized if c.get("beats_aligned_noise") is False]
    if noisy and len(noisy) == len(sized):
        _warn(warnings, "no class average is better than pure noise aligned the same way "
                        "(their half-set FRC does not clearly exceed that of shuffled-pixel "
                        "noise: 'Einstein from noise'); the resolutions are no evidence of "
                        "signal")
    elif noisy:
        _warn(warnings, "class(es) " + ", ".join(map(str, noisy[:30])) + " are no better "
                        "than pure noise aligned the same way")
    if pairs_out:
        txt = ", ".join(f"{p['classes'][0]}-{p['classes'][1]}" for p in pairs_out[:20])
        _warn(warnings, f"classes indistinguishable: {txt} (their averages correlate with each "
                        f"other as well as random halves of one class do); merge them or use "
                        f"fewer classes")
    return {"classes": classes, "indistinguishable_pairs": pairs_out, "warnings": warnings,
            "resolution_method": "FRC = 0.143 between the aligned averages of two random "
                                 "halves of each class (soft circular mask)"}


def trust_summary(particle_set, table, labels: np.ndarray, n_classes: int, *, model=None,
                  z: np.ndarray | None = None, shifts: dict | None = None,
                  rundir: str | Path | None = None, seed: int = 0, null: dict | None = None,
                  **avg_kw) -> dict[str, Any]:
    """The report after ``embed`` / ``classes``: per-class size and half-set resolution, pose
    agreement between halves, distinguishability, shift edge (``shifts``: a
    :func:`shift_edge` dict), latent spread (``z``) and the training run's own report
    (``rundir/summary.json``, its warnings repeated). ``avg_kw``: for the averaging."""
    warnings: list[str] = []
    out: dict[str, Any] = {"kind": "classes", "particles": int(len(labels))}
    if rundir is not None:
        p = Path(rundir) / "summary.json"
        if p.exists():
            try:
                tr = json.loads(p.read_text())
            except (OSError, ValueError):
                tr = None
            if tr:
                out["training"] = tr
                for w in tr.get("warnings", []):
                    _warn(warnings, f"training run: {w}")
    halves, hcounts = half_set_averages(particle_set, table, labels, n_classes, seed=seed,
                                        **avg_kw)
    apix = float(particle_set.apix)
    rep = class_report(halves, hcounts, apix, null=null)
    if null is not None:
        rep["aligned_noise"] = null
    warnings += rep.pop("warnings")
    out.update(rep)
    out["apix"] = apix
    if shifts is not None:
        out["shifts"] = shifts
        share = shifts.get("at_edge_share")
        if share is not None:
            ratio = shifts.get("edge_density_ratio")
            log.info("shifts: %.1f %% of the particles at the edge of the %d-px translation "
                     "search (per-cell density there / inside: %s)", 100 * share,
                     shifts["search_limit_px"], "-" if ratio is None else f"{ratio:.2g}")
            if share > MAX_EDGE_SHARE and (ratio is None or ratio >= EDGE_RATIO):
                _warn(warnings, f"shifts hit the edge of the translation search: "
                                f"{100 * share:.2g}% of the particles are at +-"
                                f"{shifts['search_limit_px']} px (model box); the search is "
                                "too small or the particles are not centred "
                                "(--translation-range)")
    if z is not None:
        lat = latent_spread(z, getattr(model, "name", None) if model is not None else None)
        out["latent"] = lat
        log.info("latent: %d of %d dimensions vary across particles", lat["used_dims"],
                 lat["dims"])
        if lat["used_dims"] == 0:
            _warn(warnings, "latent space collapsed: no latent dimension varies across the "
                            "particles; the classes are arbitrary")
    out["warnings"] = warnings
    return out


def gallery_notes(summary: dict) -> dict[int, str]:
    """Class index (0-based) -> short text for the gallery: the half-set resolution, marked
    "≈ noise" when the class does not beat noise aligned by the same model."""
    notes = {}
    for c in summary.get("classes", []):
        r = c.get("resolution_A")
        txt = ("no signal" if r is None else
               f"{'≤' if c.get('limited_by_nyquist') else ''}{r:.3g} Å")
        if r is not None and c.get("beats_aligned_noise") is False:
            txt += " (≈ noise)"
        notes[c["class"] - 1] = txt
    return notes


def training_report_safe(model, source, train_idx, val_batches, rows, rundir, z_dim=None,
                         seed: int = 0) -> dict[str, Any] | None:
    """:func:`training_report` for the end of ``train``: ``val_batches`` a callable giving
    the validation batches; a failure of the report is logged, never fails the run."""
    try:
        return training_report(model, source, train_idx, val_batches(), rows, rundir,
                               z_dim=z_dim, seed=seed)
    except Exception as e:  # noqa: BLE001 - the trained model is on disk already
        log.warning("WARNING: no convergence report (%s: %s)", type(e).__name__, e)
        return None


def embed_report(star, particle_set, table, labels: np.ndarray | None, model,
                 psi_model: np.ndarray, shift_model_px: np.ndarray, z, rundir=None,
                 seed: int = 0, batch_size: int = 256, device="cpu", adapter=None,
                 model_apix: float | None = None) -> dict[str, Any]:
    """The report after ``embed``, written to ``OUT_summary.json`` beside OUT.star.

    table: OUT.star's particle table (poses in Å of ``particle_set``); labels: 0-based
    classes or None (all particles one class); psi_model, shift_model_px: the model's poses
    before frame centring (px of the model's box, for the translation-search edge); z: (N, D);
    adapter: brings INPUT images to the model's layout (``InputAdapter``), for the
    aligned-noise null (:func:`aligned_noise_null`, pixel size ``model_apix``).
    """
    labels1 = (np.ones(len(table), np.int64) if labels is None
               else np.asarray(labels, np.int64) + 1)
    K = int(labels1.max(initial=1))
    shifts = shift_edge(model, psi_model, shift_model_px, z, seed=seed)
    null = None
    if adapter is not None:
        sizes = np.bincount(labels1)[1:]
        per_half = int(min(NULL_HALF, max(1, -(-sizes.max() // 2))))
        m = min(len(labels1), 2 * per_half)
        idx = np.sort(np.random.default_rng(seed + 5).choice(len(labels1), m, replace=False))
        x = adapter(np.asarray(particle_set.images(idx), np.float32), idx)
        ap = model_apix or float(particle_set.apix) * particle_set.box / x.shape[-1]
        null = aligned_noise_null(model, x, ap, seed=seed, batch_size=batch_size)
    rep = trust_summary(particle_set, table, labels1, K, model=model, z=z, shifts=shifts,
                        rundir=rundir, seed=seed, null=null, batch_size=batch_size,
                        device=device)
    rep["kind"] = "embed"
    rep["clustered"] = labels is not None
    return _write_report(summary_path_for(star), rep)


def _write_report(path, rep: dict[str, Any]) -> dict[str, Any]:
    """Write ``rep`` to ``path`` (:func:`write_summary`), log where and how many warnings."""
    path = write_summary(path, rep)
    log.info("trust signals: %s (%d warning%s)", path, len(rep["warnings"]),
             "" if len(rep["warnings"]) == 1 else "s")
    return rep


def _logging_errors(report, what: str):
    """``report`` that logs instead of raising (what it reports on is written already)."""
    def safe(*args, **kw) -> dict[str, Any] | None:
        try:
            return report(*args, **kw)
        except Exception as e:  # noqa: BLE001
            log.warning("WARNING: no trust report for %s (%s: %s)", what, type(e).__name__, e)
            return None

    safe.__name__ = f"{report.__name__}_safe"
    safe.__doc__ = f":func:`{report.__name__}` that logs instead of raising."
    return safe


embed_report_safe = _logging_errors(embed_report, "the embedding")


def classes_report(star, out_dir, particle_set, table, labels: np.ndarray, n_classes: int,
                   model=None, z: np.ndarray | None = None, rundir=None, seed: int = 0,
                   **avg_kw) -> dict[str, Any]:
    """The report after ``classes``, written to ``CLASSDIR/summary.json``. The shift-edge
    statistic comes from the embed report beside the STAR (``OUT_summary.json``) when there
    is one (``classes`` sees only frame-centred shifts)."""
    shifts = null = None
    p = summary_path_for(star)
    if p.exists():
        try:
            prev = json.loads(p.read_text())
            shifts, null = prev.get("shifts"), prev.get("aligned_noise")
        except (OSError, ValueError):
            shifts = null = None
    rep = trust_summary(particle_set, table, np.asarray(labels, np.int64), n_classes,
                        model=model, z=z, shifts=shifts, rundir=rundir, seed=seed, null=null,
                        **avg_kw)
    if shifts is None:
        rep["shifts"] = {"note": f"no {p.name} beside {Path(star).name}: run embed for the "
                                 "translation-search statistic"}
    return _write_report(Path(out_dir) / "summary.json", rep)


classes_report_safe = _logging_errors(classes_report, "the classes")


# ============================================================================ aligned-noise null
#: a class beats aligned noise when its spectral SNR FRC / (1 - FRC) is at least this factor
#: above the null's (geometric mean over the null's rings 1 .. d/2), see null_margin
NULL_SNR_RATIO = 2.0
FRC_CLIP = (0.01, 0.9999)
#: particles per half of the null (at most)
NULL_HALF = 500


@torch.no_grad()
def aligned_noise_null(model, images: torch.Tensor, apix: float, seed: int = 0,
                       batch_size: int = 256) -> dict[str, Any]:
    """FRC of half-averages of pure noise aligned by the model's own poses.

    Poses inferred from the images themselves bias any average towards what the model looks
    for ("Einstein from noise"): two halves of noise aligned this way correlate. ``images``
    (M, d, d): particles in the model's layout; the pixels of each are shuffled (white noise
    with the same pixel values), the model infers their poses, they are aligned with
    :func:`cryolatent.pose.align_particles`, split into two random halves and averaged.
    Returns ``{"particles", "frc" (d//2+1,), "resolution_A", "apix"}``; a class average is
    evidence of signal only where its FRC exceeds this one."""
    g = torch.Generator().manual_seed(seed + 17)
    M, d, _ = images.shape
    flat = images.reshape(M, -1).float().cpu()
    perm = torch.argsort(torch.rand(flat.shape, generator=g), dim=1)
    noise = torch.gather(flat, 1, perm).reshape(M, d, d)
    dev = model_device(model)
    model.eval()
    al = []
    for s in range(0, M, batch_size):
        x = noise[s:s + batch_size].to(dev)
        inf = model.infer(x)
        # zero-mean before aligning: the zeros the alignment brings in at the box edge would
        # otherwise draw the same pose-dependent window into every image
        x0 = x.double() - x.double().mean((-2, -1), keepdim=True)
        al.append(align_particles(x0, inf.psi_deg.double(),
                                  inf.shift_px.double()).cpu().numpy())
    al = np.concatenate(al)
    order = np.random.default_rng(seed + 3).permutation(M)
    h = M // 2
    sizes = sorted({int(v) for v in np.geomspace(2, max(h, 2), 8).round()} | {h})
    curves = {}
    for n in sizes:  # the bias grows with the number of particles averaged
        if n < 1:
            continue
        a = al[order[:n]].mean(0)
        b = al[order[h:h + n]].mean(0)
        curves[str(n)] = [round(float(v), 4) for v in frc(_masked(a), _masked(b))]
    res = frc_resolution(np.asarray(curves[str(h)]), d, apix)
    return {"particles": int(2 * h), "frc_by_half_size": curves,
            "frc": curves[str(h)], "resolution_A": res["resolution_A"], "apix": float(apix)}


def _logit(f) -> np.ndarray:
    f = np.clip(np.asarray(f, np.float64), *FRC_CLIP)
    return np.log(f / (1 - f))


def null_margin(nc: np.ndarray) -> float:
    """How far (mean log-odds over rings 1 .. d/2) a class's FRC must lie above the null's
    curve ``nc``: max(log NULL_SNR_RATIO, 3 standard errors of that mean difference), with
    Var(logit FRC_k) ~ (1 + FRC)^2 / (N_k FRC^2) (Fisher: Var FRC ~ (1 - FRC^2)^2 / N_k,
    N_k ~ 2 pi k coefficients in ring k; FRC clipped to [0.1, 0.99] there). About log 2 for
    64-px models; more for tiny boxes, whose few coefficients per ring scatter more."""
    f = np.clip(np.asarray(nc, np.float64)[1:], 0.1, 0.99)
    k = np.arange(1, len(f) + 1)
    var = (1 + f) ** 2 / (2 * np.pi * k * f ** 2)
    se = math.sqrt(2.0 * var.mean() / len(k))
    return max(math.log(NULL_SNR_RATIO), 3.0 * se)


def null_curve(null: dict, half_size: int) -> np.ndarray:
    """The null's FRC for the smallest stored half size >= ``half_size`` (else the largest)."""
    by = {int(k): v for k, v in (null.get("frc_by_half_size") or {}).items()}
    if not by:
        return np.asarray(null["frc"], np.float64)
    fit = [n for n in sorted(by) if n >= half_size]
    return np.asarray(by[fit[0] if fit else max(by)], np.float64)


def beats_null(curve: np.ndarray, box: int, apix: float, null: dict,
               half_size: int | None = None) -> float:
    """Mean over the null's rings 1 .. d/2 of logit(FRC_class) - logit(FRC_null), i.e. the
    log of the ratio of the spectral SNRs FRC / (1 - FRC) (geometric mean over rings); FRCs
    clipped to FRC_CLIP. The class curve (box, apix) is read at the null's spatial
    frequencies (linear interpolation; beyond its Nyquist: 0); the null's curve is the one for
    ``half_size`` particles per half (:func:`null_curve`)."""
    nc = (null_curve(null, half_size) if half_size is not None
          else np.asarray(null["frc"], np.float64))
    dn = 2 * (len(nc) - 1)
    fn = np.arange(1, len(nc)) / (dn * null["apix"])           # cycles / Å
    kc = fn * box * apix                                        # the class's rings
    cc = np.interp(kc, np.arange(len(curve)), np.asarray(curve, np.float64), right=0.0)
    return float(np.mean(_logit(cc) - _logit(nc[1:])))
