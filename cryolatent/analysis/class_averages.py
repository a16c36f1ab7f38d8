"""Class averages: aligned (from the particles) and denoised (from the generator).

Aligned class averages
    The particles of each class aligned by their poses and averaged, Wiener CTF-corrected:
    :func:`cryolatent.analysis.averages.aligned_class_averages` (the module docstring there).

Denoised class averages
    The model's generator at each class's latent centre (the mean of z over the class), in the
    canonical pose (ψ = 0, no shift).

Latent traversals
    Generator images along the first principal axes of z, through the mean of z, from the
    2.5th to the 97.5th percentile of the particles' coordinates along each axis.

Class k (1-based, ``rlnClassNumber``) is slice k of every stack (RELION's ``_classes.mrcs``
layout); a class without particles gets a zero image and count 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import CryolatentError
from ..io import load_particles, read_particle_table, write_mrcs
from ..io.particles import nth_keys, particle_keys
from ..models import model_device
from ..pose import POSE_COLUMNS
from ..run import RunDir, load_run
from ..utils import atomic_path, resolve_device
from .averages import WIENER_SNR, aligned_class_averages, class_labels, table_poses
from .plots import _mpl, latent_columns, save_figure, style
from .trust import classes_report_safe, gallery_notes

log = logging.getLogger("cryolatent")



# ----------------------------------------------------------------------------- inputs
def match_table(particle_names: Sequence[str], table, source: str = "OUT.star"
                ) -> np.ndarray:
    """For each particle of a set, the row of ``table`` (an ``embed`` output) describing it.

    particle_names: (N,) the set's ``rlnImageName`` values (``ParticleSet.names``).
    Matched on ``rlnImageName`` or ``rlnImageOriginalName`` (what ``preprocess`` keeps, so an
    unbinned set finds the rows of its binned copy), exactly or else by image index and stack
    file name (:func:`cryolatent.io.particles.particle_keys`), whichever matches the most particles; a set with as many particles as the
    table and no names in common is matched by order (warned). Returns (N,) int64 row indices, -1 where a particle has no row.
    """
    names = [str(n) for n in particle_names]
    n = len(names)
    if "rlnImageName" in table and n == len(table) and \
            list(map(str, table["rlnImageName"])) == names:
        return np.arange(n)
    best = None  # (matches, rows, column): exact names first, then index@file-name keys
    for keyf, cols in ((lambda x: [str(v) for v in x], ("rlnImageName", "rlnImageOriginalName")),
                       (particle_keys, ("rlnImageOriginalName", "rlnImageName"))):
        for col in cols:
            if col not in table:
                continue
            # a repeated name pairs its k-th particle with its k-th row (by position)
            lut = pd.Index(nth_keys(keyf(table[col])))
            rows = lut.get_indexer(nth_keys(keyf(names))).astype(np.int64)
            hits = int((rows >= 0).sum())
            if hits and (best is None or hits > best[0]):
                best = (hits, rows, col)
        if best is not None and best[0] == n:
            break
    if best is not None:
        hits, rows, col = best
        if hits < n:
            log.warning("%d of %d particles have no row in %s (matched by %s); left out",
                        n - hits, n, source, col)
        return rows
    if n == len(table):
        log.warning("particle names do not match %s; matching particles by order", source)
        return np.arange(n)
    raise CryolatentError(f"{source}: none of the {n} particles is named in its rlnImageName "
                          f"or rlnImageOriginalName, and the counts differ ({len(table)} rows)")


# ------------------------------------------------------------------ generator images
def class_centres(z: np.ndarray, labels: np.ndarray, n_classes: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean latent of each class. z: (N, D); labels: (N,) 1-based.

    Returns ``(centres (K, D), counts (K,))``; an empty class gets the zero vector.
    """
    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    K = int(n_classes if n_classes is not None else max(int(labels.max(initial=0)), 0))
    ok = (labels >= 1) & (labels <= K)
    counts = np.bincount(labels[ok] - 1, minlength=K)
    sums = np.zeros((K, z.shape[1]))
    np.add.at(sums, labels[ok] - 1, z[ok])
    return sums / np.maximum(counts, 1)[:, None], counts


@torch.no_grad()
def _generate(model, z: np.ndarray, size: int, batch: int = 64) -> np.ndarray:
    dev = model_device(model)
    out = []
    for s in range(0, len(z), batch):
        zz = torch.as_tensor(z[s:s + batch], dtype=torch.float32, device=dev)
        img = model.generate(zz, int(size))
        out.append(img.detach().float().cpu().numpy().reshape(len(zz), size, size))
    return np.concatenate(out) if out else np.zeros((0, size, size), np.float32)


def _model_size(model, size: int | None) -> int:
    if size is not None:
        return int(size)
    box = getattr(model, "box", None)
    if box is None:
        raise CryolatentError("the model does not say its box size; pass size=")
    return int(box)


def denoised_class_averages(model, z: np.ndarray, labels: np.ndarray,
                            size: int | None = None, n_classes: int | None = None
                            ) -> np.ndarray:
    """The generator's canonical image at each class's latent centre.

    model: a :class:`cryolatent.models.LatentModel`; z: (N, D) latents; labels: (N,)
    1-based classes; size: output box (default ``model.box``; the generator resamples the
    training field of view). Returns (K, size, size) float32; empty classes are zero.
    """
    size = _model_size(model, size)
    was = model.training
    model.eval()
    try:
        centres, counts = class_centres(z, labels, n_classes)
        imgs = _generate(model, centres, size).astype(np.float32)
    finally:
        model.train(was)
    imgs[counts == 0] = 0.0
    return imgs


@dataclass
class Traversal:
    """Images along the principal axes of z.

    images:  (n_axes, steps, size, size) float32
    offsets: (n_axes, steps) coordinate along each axis, in standard deviations of z on it
    axes:    (n_axes, D) unit principal axes;  mean: (D,);  sd: (n_axes,) sd along each axis
    explained: (n_axes,) fraction of the variance of z along each axis
    """

    images: np.ndarray
    offsets: np.ndarray
    axes: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    explained: np.ndarray


def latent_traversal(model, z: np.ndarray, n_axes: int = 2, steps: int = 7,
                     size: int | None = None, lo: float = 2.5, hi: float = 97.5
                     ) -> Traversal:
    """Generator images along the first ``n_axes`` principal axes of z (through its mean).

    z: (N, D). Along axis a the ``steps`` points run evenly from the ``lo``-th to the ``hi``-th
    percentile of the particles' coordinates on that axis, the other coordinates at the mean.
    Returns a :class:`Traversal` (images (n_axes, steps, size, size)).
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or len(z) < 2:
        raise CryolatentError("latent traversal needs at least 2 latents")
    size = _model_size(model, size)
    n_axes = max(1, min(int(n_axes), z.shape[1]))
    steps = max(2, int(steps))
    mean = z.mean(axis=0)
    zc = z - mean
    w, v = np.linalg.eigh(zc.T @ zc / (len(z) - 1))
    order = np.argsort(w)[::-1]
    w, v = np.clip(w[order], 0, None), v[:, order]
    sign = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])])
    v = v * np.where(sign == 0, 1.0, sign)
    axes = v[:, :n_axes].T                            # (n_axes, D)
    sd = np.sqrt(w[:n_axes])
    proj = zc @ axes.T                                # (N, n_axes)
    pts, offs = [], []
    for a in range(n_axes):
        t = np.linspace(np.percentile(proj[:, a], lo), np.percentile(proj[:, a], hi), steps)
        pts.append(mean[None, :] + t[:, None] * axes[a][None, :])
        offs.append(t / sd[a] if sd[a] > 0 else t)
    was = model.training
    model.eval()
    try:
        imgs = _generate(model, np.concatenate(pts), size).astype(np.float32)
    finally:
        model.train(was)
    total = float(w.sum())
    return Traversal(images=imgs.reshape(n_axes, steps, size, size), offsets=np.array(offs),
                     axes=axes, mean=mean, sd=sd,
                     explained=(w[:n_axes] / total) if total > 0 else np.zeros(n_axes))


# ----------------------------------------------------------------------------- pictures
def _bare_axes(ax) -> None:
    """An image panel: axes on (a label still shows), no ticks, no frame."""
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
        sp.set_visible(False)


def _display_range(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        lo, hi = float(np.min(img)), float(np.max(img))
        if hi <= lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def _nice_length(target: float) -> float:
    """A round number (1, 2, 5 × 10^k) close to and not above ``target``."""
    if target <= 0:
        return 0.0
    e = 10 ** np.floor(np.log10(target))
    for m in (5, 2, 1):
        if m * e <= target:
            return float(m * e)
    return float(e)


def _scale_bar(ax, box: int, apix: float) -> None:
    L = _nice_length(box * apix / 4)
    if L <= 0:
        return
    px = L / apix
    y = box * 0.92
    ax.plot([box * 0.06, box * 0.06 + px], [y, y], color="white", lw=2.5,
            solid_capstyle="butt")
    ax.text(box * 0.06 + px / 2, y - box * 0.04, f"{L:g} Å", color="white", ha="center",
            va="bottom", fontsize=7)


def plot_gallery(out_path: str | Path, aligned: np.ndarray | None, counts: np.ndarray,
                 denoised: np.ndarray | None = None, apix: float | None = None,
                 denoised_apix: float | None = None, per_row: int = 10,
                 fmt: Sequence[str] = ("png",), include_empty: bool = False,
                 notes: dict[int, str] | None = None) -> list[Path]:
    """A labelled gallery: for each class, the aligned average above the denoised one.

    aligned: (K, D, D) or None; denoised: (K, d, d) or None; counts: (K,). Each image is
    scaled to its own 0.5–99.5 percentile range; titles give class number and particle count;
    the first image of each row carries a scale bar when the pixel size is given;
    ``notes``: class index (0-based) -> a third title line (e.g. the estimated resolution).
    Writes ``out_path`` with each suffix of ``fmt``; returns the paths.
    """
    _, plt = _mpl()
    rows_kind = [(k, a, p) for k, a, p in (("aligned", aligned, apix),
                                           ("denoised", denoised, denoised_apix))
                 if a is not None]
    if not rows_kind:
        raise CryolatentError("nothing to draw in the gallery")
    counts = np.asarray(counts)
    show = np.arange(len(counts)) if include_empty else np.flatnonzero(counts > 0)
    if len(show) == 0:
        raise CryolatentError("every class is empty")
    ncol = min(per_row, len(show))
    blocks = -(-len(show) // ncol)
    nr = blocks * len(rows_kind)
    with style():
        fig, axes = plt.subplots(nr, ncol, figsize=(1.25 * ncol + 0.6, 1.4 * nr + 0.3),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for j, k in enumerate(show):
            b, col = divmod(j, ncol)
            for r, (kind, imgs, px) in enumerate(rows_kind):
                ax = axes[b * len(rows_kind) + r, col]
                img = imgs[k]
                lo, hi = _display_range(img)
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                _bare_axes(ax)
                if r == 0:
                    ax.set_title(f"class {k + 1}\nn = {int(counts[k]):,}"
                                 + (f"\n{notes[k]}" if notes and k in notes else ""),
                                 fontsize=8)
                if col == 0:
                    ax.set_ylabel(kind, fontsize=8)
                    if px:
                        _scale_bar(ax, img.shape[-1], px)
        fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2)
        out_path = Path(out_path)
        return save_figure(fig, out_path.parent, out_path.stem, fmt)


def plot_traversal(out_path: str | Path, trav: Traversal, apix: float | None = None,
                   fmt: Sequence[str] = ("png",)) -> list[Path]:
    """One row per principal axis, one column per step, labelled in sd along the axis."""
    _, plt = _mpl()
    n_axes, steps = trav.images.shape[:2]
    with style():
        fig, axes = plt.subplots(n_axes, steps, figsize=(1.25 * steps + 0.6, 1.35 * n_axes + 0.5),
                                 squeeze=False)
        for a in range(n_axes):
            lo, hi = _display_range(trav.images[a])  # one range per row: changes stay visible
            for s in range(steps):
                ax = axes[a, s]
                ax.imshow(trav.images[a, s], cmap="gray", vmin=lo, vmax=hi,
                          interpolation="nearest")
                _bare_axes(ax)
                ax.set_title(f"{trav.offsets[a, s]:+.1f} sd", fontsize=8)
                if s == 0:
                    ax.set_ylabel(f"PC {a + 1}\n({100 * trav.explained[a]:.0f} %)", fontsize=8)
                    if apix:
                        _scale_bar(ax, trav.images.shape[-1], apix)
        fig.suptitle("latent traversals along the principal axes of z", fontsize=10)
        fig.tight_layout(pad=0.3)
        out_path = Path(out_path)
        return save_figure(fig, out_path.parent, out_path.stem, fmt)


# ----------------------------------------------------------------------------- writing
def write_counts(path: str | Path, counts: np.ndarray, stack_name: str | None = None,
                 centres: np.ndarray | None = None) -> Path:
    """CSV with ``class, count, fraction[, image][, z1..zD]``; row k is class k (1-based)."""
    counts = np.asarray(counts, dtype=np.int64)
    K = len(counts)
    df = pd.DataFrame({"class": np.arange(1, K + 1), "count": counts,
                       "fraction": counts / max(int(counts.sum()), 1)})
    if stack_name:
        df["image"] = [f"{k:06d}@{stack_name}" for k in range(1, K + 1)]
    if centres is not None:
        for d in range(centres.shape[1]):
            df[f"z{d + 1}"] = centres[:, d]
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return Path(path)


def make_class_averages(rundir: str | Path | None, star: str | Path, out_dir: str | Path, *,
                        particles: str | Path | None = None, datadir: str | Path | None = None,
                        batch_size: int = 256, device: str = "auto",
                        wiener_snr: float = WIENER_SNR, ctf: bool | str = "auto",
                        n_axes: int = 2, steps: int = 7, fmt: Sequence[str] = ("png",),
                        trust: bool = True) -> dict[str, Any]:
    """Everything ``cryolatent classes`` writes.

    rundir: the training run (for the generator; None skips denoised averages and
    traversals); star: the ``embed`` output; particles: the set to average (default: the
    images ``star`` names; an unbinned set gives full-resolution averages).
    Writes into ``out_dir``: ``aligned_averages.mrcs`` (K, D, D, pixel size of the particles),
    ``denoised_averages.mrcs`` (K, d, d), ``traversals.mrcs`` (n_axes·steps, d, d, row-major
    by axis), ``class_counts.csv``, ``gallery.png``, ``traversals.png`` and, with ``trust``,
    ``summary.json`` (:func:`cryolatent.analysis.trust.classes_report`).
    Returns ``{"files": [...], "counts": (K,), "aligned": ..., "denoised": ...}``.
    """
    out_dir = Path(out_dir)
    star = Path(star)
    # a missing file, no particles, text in a pose / class column, a duplicate name:
    # one line naming the file, column and particle
    table, optics = read_particle_table(star, numeric=POSE_COLUMNS + ("rlnClassNumber",))
    labels = class_labels(table, str(star))
    table_poses(table, str(star))
    zcols = latent_columns(table)
    K = int(labels.max(initial=0))
    if K < 1:
        raise CryolatentError(f"{star}: no particle has a class number >= 1")

    # --- aligned averages, at the resolution of the given particle set
    try:
        ps = load_particles(particles if particles is not None else star, datadir=datadir)
    except CryolatentError as e:
        if particles is None and "not found" in str(e):
            raise CryolatentError(f"{e}; say where the stacks are with --datadir DIR, or "
                                  f"give the particle set with --particles INPUT") from None
        raise
    if particles is None:
        rows = np.arange(len(ps))
        ptable = ps.table
    else:
        rows = match_table(ps.names, table, str(star))
        ptable = table.iloc[np.where(rows >= 0, rows, 0)].reset_index(drop=True).copy()
        ptable.loc[rows < 0, "rlnClassNumber"] = 0  # unmatched: left out
    dev = resolve_device(device)
    model = run_cfg = None
    if rundir is not None:  # before anything is written: a bad run leaves no partial output
        if not zcols:
            raise CryolatentError(f"{star}: no cryolatentZ columns; run `cryolatent embed` "
                                  f"first")
        model, run_cfg = load_run(rundir, dev)
        model.eval()
    log.info("aligning %d particles of box %d px (%.4g Å/px) into %d classes",
             int((rows >= 0).sum()), ps.box, ps.apix, K)
    aligned, counts = aligned_class_averages(ps, ptable, n_classes=K, batch_size=batch_size,
                                             ctf=ctf, wiener_snr=wiener_snr, device=dev)
    files: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    write_mrcs(out_dir / "aligned_averages.mrcs", aligned, float(ps.apix))
    files.append(out_dir / "aligned_averages.mrcs")

    denoised = trav = None
    d_apix = None
    centres = None
    if zcols:
        z = table[zcols].to_numpy(dtype=np.float64)
        centres, _ = class_centres(z, labels, K)
    if model is not None:
        size = int(getattr(model, "box", 0)) or int(ps.box)
        d_apix = _model_apix(rundir, run_cfg, optics, ps, size)
        denoised = denoised_class_averages(model, z, labels, size=size, n_classes=K)
        write_mrcs(out_dir / "denoised_averages.mrcs", denoised, d_apix)
        files.append(out_dir / "denoised_averages.mrcs")
        trav = latent_traversal(model, z, n_axes=n_axes, steps=steps, size=size)
        write_mrcs(out_dir / "traversals.mrcs",
                   trav.images.reshape(-1, size, size), d_apix)
        files.append(out_dir / "traversals.mrcs")
    files.append(write_counts(out_dir / "class_counts.csv", counts, "aligned_averages.mrcs",
                              centres))
    summary = None
    if trust:  # half-set resolution, pose agreement, distinguishability (docs/trust.md)
        summary = classes_report_safe(
            star, out_dir, ps, ptable, class_labels(ptable, str(star)), K, model=model,
            z=z if zcols else None, rundir=rundir, batch_size=batch_size, ctf=ctf,
            wiener_snr=wiener_snr, device=dev)
        if summary is not None:
            files.append(out_dir / "summary.json")
    files += plot_gallery(out_dir / "gallery.png", aligned, counts, denoised,
                          apix=float(ps.apix), denoised_apix=d_apix, fmt=fmt,
                          notes=gallery_notes(summary) if summary else None)
    if trav is not None:
        files += plot_traversal(out_dir / "traversals.png", trav, apix=d_apix, fmt=fmt)
    return {"files": files, "counts": counts, "aligned": aligned, "denoised": denoised,
            "traversal": trav, "summary": summary}


def _model_apix(rundir, cfg, optics, ps, size: int) -> float:
    """Pixel size (Å) of the generator's ``size``-px images: the field of view of the
    training images (box × pixel size, as the run recorded them:
    :meth:`cryolatent.run.RunDir.preprocessing`) over ``size``. A run that recorded no
    preprocessing (an older cryolatent) or no pixel size: :func:`_field_of_view`'s guess."""
    if cfg is not None and getattr(cfg, "preprocessing", None):
        prep = RunDir(rundir).preprocessing(cfg)
        if prep.apix is not None:
            return float(prep.box) * float(prep.apix) / size
    return _field_of_view(optics, ps) / size


def _field_of_view(optics, ps) -> float:
    """Box edge in Å of the images the model saw, guessed for runs that do not record it:
    the ``embed`` input's optics table
    (rlnImageSize × rlnImagePixelSize) when the STAR has them, else the averaged set's."""
    try:
        if optics is not None and len(optics) and {"rlnImageSize", "rlnImagePixelSize"} <= \
                set(optics.columns):
            return float(optics["rlnImageSize"].iloc[0]) * float(
                optics["rlnImagePixelSize"].iloc[0])
    except (TypeError, ValueError):
        pass
    return float(ps.box) * float(ps.apix)
