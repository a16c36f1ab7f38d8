"""Pictures of an embedding: latent maps (UMAP / PCA), pose histograms, training curves.

Library functions, callable from a notebook; ``cryolatent plot`` is a thin layer over
:func:`plot_all`. Every figure uses one style (:data:`STYLE`, applied with
:func:`style`), colour-blind-friendly colours (Okabe–Ito for up to 8 classes, ``tab20``
beyond), the cyclic ``twilight`` colour map for ψ (0° and 360° get the same colour), and
units on every axis (degrees, Å). Files are written atomically as PNG (and PDF on request).

Shapes: ``z`` (N, D) latents; ``classes`` (N,) integer class numbers (1-based, as
``rlnClassNumber``); ``psi_deg`` (N,) degrees; ``shift_A`` (N, 2) = (rlnOriginXAngst,
rlnOriginYAngst).

Large sets: up to :data:`MAX_SCATTER` points are drawn as a scatter; beyond, a hexbin density
map is added and the coloured maps show a random subset of :data:`MAX_SCATTER` points (said so
in the title). UMAP is fitted on at most ``sample`` points (default 50,000) and the other
points are placed with ``UMAP.transform``. All random choices use ``seed``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import CryolatentError
from ..io import read_particle_table
from ..utils import atomic_path

log = logging.getLogger("cryolatent")

#: points drawn as a scatter; beyond this a hexbin density map is drawn as well
MAX_SCATTER = 100_000
#: default number of points UMAP is fitted on (the rest are transformed)
UMAP_SAMPLE = 50_000

#: the one style of every cryolatent figure (matplotlib rc parameters)
STYLE: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "image.cmap": "viridis",
    "pdf.fonttype": 42,       # editable text in PDFs (Illustrator / Inkscape)
    "svg.fonttype": "none",
}

#: Okabe & Ito (2008) colour-blind-safe palette (black last, so class 1 is not black)
OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00",
             "#CC79A7", "#000000"]
#: cyclic colour map for angles
PSI_CMAP = "twilight"


# ------------------------------------------------------------------------------- helpers
def _mpl():
    """Import matplotlib with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo") and \
            not matplotlib.is_interactive():
        with contextlib.suppress(Exception):
            matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return matplotlib, plt


@contextlib.contextmanager
def style():
    """Context manager applying :data:`STYLE` (used around every figure this module makes)."""
    matplotlib, _ = _mpl()
    with matplotlib.rc_context(STYLE):
        yield


def class_colors(class_ids: Sequence[int]) -> dict[int, str | tuple]:
    """Colour per class number: Okabe–Ito for <= 8 classes, ``tab20`` (cycled) beyond."""
    matplotlib, _ = _mpl()
    ids = [int(c) for c in class_ids]
    if len(ids) <= len(OKABE_ITO):
        return {c: OKABE_ITO[i] for i, c in enumerate(ids)}
    cmap = matplotlib.colormaps["tab20"]
    return {c: cmap(i % 20) for i, c in enumerate(ids)}


def save_figure(fig, out_dir: str | Path, name: str, fmt: Iterable[str] = ("png",)) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for each format (atomically); close it.

    Returns the paths written.
    """
    _, plt = _mpl()
    out = []
    try:
        for f in fmt:
            f = f.lower().lstrip(".")
            path = Path(out_dir) / f"{name}.{f}"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=f)
            out.append(path)
    finally:
        plt.close(fig)
    return out


def _marker_size(n: int) -> float:
    """Scatter marker area (pt²) that keeps structure visible from 100 to 10^5 points."""
    return float(np.clip(4000.0 / max(n, 1), 0.3, 16.0))


def _subsample(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted random subset of ``k`` of ``range(n)`` (all of them when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _check_z(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] == 0:
        raise CryolatentError(f"latents must be an (N, D) array with N > 0, got {z.shape}")
    if not np.all(np.isfinite(z)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(z), axis=1))[0])
        raise CryolatentError(f"latent of particle {bad} (0-based) is not finite")
    return z


# ------------------------------------------------------------------------ 2-D embeddings
def pca_2d(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project latents on their first two principal axes.

    z: (N, D). Returns ``(coords (N, 2), explained (2,))`` where ``explained`` is the fraction
    of the variance along each axis. D == 1 gives a second coordinate of zeros. Deterministic
    (axis signs fixed so that the largest loading is positive).
    """
    z = _check_z(z)
    zc = z - z.mean(axis=0)
    # covariance eigen-decomposition: cheap for N up to 10^6+ (D x D)
    cov = zc.T @ zc / max(len(z) - 1, 1)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order]
    sign = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])])
    v = v * np.where(sign == 0, 1.0, sign)
    k = min(2, z.shape[1])
    coords = np.zeros((len(z), 2))
    coords[:, :k] = zc @ v[:, :k]
    total = float(w.sum())
    expl = np.zeros(2)
    if total > 0:
        expl[:k] = w[:k] / total
    return coords, expl


def umap_2d(z: np.ndarray, sample: int = UMAP_SAMPLE, seed: int = 0,
            n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """UMAP of the latents to 2-D: fitted on at most ``sample`` points, the rest transformed.

    z: (N, D). Returns coords (N, 2). Deterministic for a given ``seed`` (umap-learn then
    runs single-threaded). Sets of fewer than ~10 points cannot be embedded and raise
    :class:`CryolatentError`.
    """
    z = _check_z(z).astype(np.float32)
    n = len(z)
    if n < 10:
        raise CryolatentError(f"UMAP needs at least 10 particles, got {n}; use PCA")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba / n_jobs chatter
        import umap

    fit_idx = _subsample(n, max(int(sample), 10), seed)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(fit_idx) - 1),
                        min_dist=min_dist, random_state=seed, transform_seed=seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb_fit = reducer.fit_transform(z[fit_idx])
        log.info("UMAP fitted on %d particles in %.0f s", len(fit_idx), time.perf_counter() - t0)
        coords = np.empty((n, 2), dtype=np.float64)
        coords[fit_idx] = emb_fit
        if len(fit_idx) < n:
            rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
            t0 = time.perf_counter()
            for start in range(0, len(rest), 200_000):  # bounded memory
                part = rest[start:start + 200_000]
                coords[part] = reducer.transform(z[part])
            log.info("UMAP transform of %d particles: %.0f s", len(rest),
                     time.perf_counter() - t0)
    return coords


# ------------------------------------------------------------------------------ figures
def _scatter_by_class(ax, xy: np.ndarray, classes: np.ndarray, s: float, seed: int = 0
                      ) -> None:
    """One scatter in a random drawing order (no class hides another), legend per class."""
    from matplotlib.lines import Line2D

    ids = np.unique(classes)
    cols = class_colors(ids)
    order = np.random.default_rng(seed).permutation(len(xy))
    lut = {int(c): i for i, c in enumerate(ids)}
    rgba = np.array([_to_rgba(cols[int(c)]) for c in ids])
    cidx = np.array([lut[int(c)] for c in classes[order]], dtype=np.int64)
    ax.scatter(xy[order, 0], xy[order, 1], s=s, c=rgba[cidx], linewidths=0, rasterized=True)
    if len(ids) <= 20:
        handles = [Line2D([], [], ls="", marker="o", ms=5, color=cols[int(c)]) for c in ids]
        labels = [f"{int(c)} ({int(np.count_nonzero(classes == c)):,})" for c in ids]
        ax.legend(handles, labels, title="class (particles)", loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(1.02, 1.0, f"{len(ids)} classes", transform=ax.transAxes, va="top")


def _to_rgba(c) -> tuple:
    from matplotlib.colors import to_rgba

    return to_rgba(c)


def _scatter_by_psi(fig, ax, xy: np.ndarray, psi: np.ndarray, s: float) -> None:
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.mod(psi, 360.0), cmap=PSI_CMAP, vmin=0,
                    vmax=360, s=s, linewidths=0, rasterized=True)
    cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label("ψ (°)")
    cb.set_ticks([0, 90, 180, 270, 360])


def plot_latents(z: np.ndarray, classes: np.ndarray | None = None,
                 psi: np.ndarray | None = None, out_dir: str | Path = ".",
                 method: str = "umap", sample: int = UMAP_SAMPLE,
                 fmt: Sequence[str] = ("png",), seed: int = 0,
                 max_scatter: int = MAX_SCATTER, coords: np.ndarray | None = None,
                 name: str | None = None) -> dict[str, Any]:
    """Map the latents to 2-D and draw them coloured by class and by ψ.

    z: (N, D) latents; classes: (N,) class numbers or None; psi: (N,) degrees or None.
    method: ``"umap"`` (fit on ``sample`` points, transform the rest) or ``"pca"``.
    ``coords`` (N, 2) skips the embedding (reuse a previous one). Writes
    ``out_dir/latent_<method>.<fmt>`` (panels: by class, by ψ; latent density instead when
    neither is given) and, for N > ``max_scatter``, ``latent_<method>_density.<fmt>`` (hexbin).
    Returns ``{"coords": (N, 2), "files": [Path, ...]}``.
    """
    method = method.lower()
    if method not in ("umap", "pca"):
        raise CryolatentError(f"unknown latent map {method!r}: choose umap or pca")
    z = _check_z(z)
    n = len(z)
    for arr, what in ((classes, "classes"), (psi, "psi")):
        if arr is not None and len(arr) != n:
            raise CryolatentError(f"{what} has {len(arr)} values for {n} latents")
    extra = ""
    if coords is None:
        if method == "pca":
            coords, expl = pca_2d(z)
            labels = (f"PC 1 ({100 * expl[0]:.0f} % of variance)",
                      f"PC 2 ({100 * expl[1]:.0f} % of variance)")
        else:
            coords = umap_2d(z, sample=sample, seed=seed)
            labels = ("UMAP 1", "UMAP 2")
            if n > sample:
                extra = f"; fitted on {int(sample):,}"
    else:
        coords = np.asarray(coords, dtype=np.float64)
        labels = (f"{method.upper()} 1", f"{method.upper()} 2")
    name = name or f"latent_{method}"
    title = f"{'UMAP' if method == 'umap' else 'PCA'} of z (D = {z.shape[1]}, N = {n:,}{extra})"

    show = _subsample(n, max_scatter, seed)
    shown_note = "" if len(show) == n else f"\nrandom {len(show):,} of {n:,} shown"
    xy = coords[show]
    s = _marker_size(len(show))
    panels = [p for p, a in (("class", classes), ("psi", psi)) if a is not None]
    files: list[Path] = []
    _, plt = _mpl()
    with style():
        if panels:
            fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6),
                                     squeeze=False)
            for ax, p in zip(axes[0], panels):
                if p == "class":
                    _scatter_by_class(ax, xy, np.asarray(classes)[show].astype(np.int64), s, seed)
                    ax.set_title("coloured by class" + shown_note)
                else:
                    _scatter_by_psi(fig, ax, xy, np.asarray(psi, dtype=np.float64)[show], s)
                    ax.set_title("coloured by in-plane angle ψ" + shown_note)
                ax.set_xlabel(labels[0])
                ax.set_ylabel(labels[1])
                if method == "umap":
                    ax.set_xticks([])
                    ax.set_yticks([])
            fig.suptitle(title)
            fig.tight_layout()
            files += save_figure(fig, out_dir, name, fmt)
        if n > max_scatter or not panels:
            fig, ax = plt.subplots(figsize=(5.6, 4.6))
            if n > 2000:
                hb = ax.hexbin(coords[:, 0], coords[:, 1], gridsize=150, bins="log",
                               cmap="viridis", mincnt=1, linewidths=0, rasterized=True)
                cb = fig.colorbar(hb, ax=ax, fraction=0.046, pad=0.03)
                cb.set_label("particles per bin")
            else:
                ax.scatter(coords[:, 0], coords[:, 1], s=_marker_size(n), color="#0072B2",
                           linewidths=0, rasterized=True)
            ax.set_xlabel(labels[0])
            ax.set_ylabel(labels[1])
            if method == "umap":  # UMAP coordinates have no meaning of their own
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_title(title + "\nparticle density", fontsize=10)
            fig.tight_layout()
            files += save_figure(fig, out_dir, name + ("_density" if panels else ""), fmt)
    return {"coords": coords, "files": files}


def _shift_bins(values: np.ndarray, max_bins: int = 60) -> np.ndarray:
    """Histogram edges for shifts (Å): ``max_bins`` even bins over the central 99.9 %, or, for
    shifts on a grid (models with discrete translations), bins centred on the grid values
    (width a whole number of grid steps), so no bin is empty by aliasing."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    lim = max(float(np.percentile(np.abs(v), 99.9)) if v.size else 1.0, 1e-3)
    u = np.unique(np.round(v, 4))
    if 2 <= len(u) <= 4 * max_bins:
        d = np.diff(u)
        q = float(d.min())
        if q > 0 and np.all(np.abs(d / q - np.round(d / q)) < 1e-2):
            w = q * max(1, int(np.ceil((u[-1] - u[0]) / q / max_bins)))
            n = int(np.ceil((u[-1] - u[0]) / w - 1e-9)) + 1
            return u[0] + (np.arange(n + 1) - 0.5) * w
    return np.linspace(-lim, lim, max_bins + 1)


def plot_pose_histograms(psi_deg: np.ndarray | None, shift_A: np.ndarray | None,
                         out_dir: str | Path = ".", fmt: Sequence[str] = ("png",),
                         name: str = "pose_histograms") -> list[Path]:
    """Histograms of the in-plane angle and the shifts.

    psi_deg: (N,) degrees (wrapped to [0, 360)); shift_A: (N, 2) (rlnOriginXAngst,
    rlnOriginYAngst) in Å. Either may be None. Panels: ψ (10° bins, 5° from 5,000
    particles), x and y shift (Å; up to 60 bins, aligned to the grid of discrete shifts),
    2-D shift density (Å × Å). Writes ``out_dir/<name>.<fmt>``; returns the paths.
    """
    _, plt = _mpl()
    panels = []
    if psi_deg is not None:
        panels.append("psi")
    if shift_A is not None:
        shift_A = np.asarray(shift_A, dtype=np.float64).reshape(-1, 2)
        panels += ["shift", "shift2d"]
        nb = int(np.clip(2 * np.sqrt(len(shift_A)), 10, 60))  # bins per shift axis
    if not panels:
        raise CryolatentError("no pose columns to plot (rlnAnglePsi, rlnOriginXAngst/YAngst)")
    with style():
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6),
                                 squeeze=False)
        for ax, p in zip(axes[0], panels):
            if p == "psi":
                psi = np.mod(np.asarray(psi_deg, dtype=np.float64), 360.0)
                step = 5 if len(psi) >= 5000 else 10
                ax.hist(psi, bins=np.arange(0, 360 + step, step), color="#0072B2")
                ax.set_xlim(0, 360)
                ax.set_xticks([0, 90, 180, 270, 360])
                ax.set_xlabel("in-plane angle ψ (°)")
                ax.set_ylabel("particles")
                ax.set_title(f"ψ (N = {len(psi):,})")
            elif p == "shift":
                bins = _shift_bins(shift_A, nb)
                ax.hist(shift_A[:, 0], bins=bins, histtype="step", lw=1.5, color="#E69F00",
                        label="x (rlnOriginXAngst)")
                ax.hist(shift_A[:, 1], bins=bins, histtype="step", lw=1.5, color="#56B4E9",
                        label="y (rlnOriginYAngst)")
                ax.set_xlabel("shift (Å)")
                ax.set_ylabel("particles")
                ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend
                ax.legend(loc="upper right")
                sd = shift_A.std(axis=0)
                ax.set_title(f"shifts (sd x {sd[0]:.1f} Å, y {sd[1]:.1f} Å)")
            else:
                nb2 = int(np.clip(np.sqrt(len(shift_A)), 10, 60))
                bx, by = _shift_bins(shift_A[:, 0], nb2), _shift_bins(shift_A[:, 1], nb2)
                h = ax.hist2d(shift_A[:, 0], shift_A[:, 1], bins=[bx, by], cmap="viridis",
                              cmin=1, rasterized=True)
                cb = fig.colorbar(h[3], ax=ax, fraction=0.046, pad=0.03)
                cb.set_label("particles per bin")
                ax.set_aspect("equal")
                ax.set_xlabel("x shift (Å)")
                ax.set_ylabel("y shift (Å)")
                ax.set_title("shift density")
        fig.tight_layout()
        return save_figure(fig, out_dir, name, fmt)


#: log.csv columns that are not curves to plot against the epoch
_NOT_CURVES = {"epoch", "images", "step", "time", "seconds", "wall_s", "elapsed", "elapsed_s",
               "skipped_steps"}


def _curve_groups(columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """Group loss columns by quantity: ``{"loss": {"train": "train_loss", "val": "val_loss"}}``."""
    groups: dict[str, dict[str, str]] = {}
    for c in columns:
        lc = c.lower()
        if lc in _NOT_CURVES or lc == "lr":
            continue
        split = "train"
        base = c
        for pre, sp in (("train_", "train"), ("val_", "val"), ("valid_", "val"),
                        ("validation_", "val"), ("test_", "val")):
            if lc.startswith(pre):
                split, base = sp, c[len(pre):]
                break
        else:
            for suf, sp in (("_train", "train"), ("_val", "val"), ("_valid", "val")):
                if lc.endswith(suf):
                    split, base = sp, c[: -len(suf)]
                    break
        groups.setdefault(base, {})[split] = c
    return groups


def plot_training_curves(log_csv: str | Path, out_dir: str | Path = ".",
                         fmt: Sequence[str] = ("png",), name: str = "training_curves"
                         ) -> list[Path]:
    """The run's ``log.csv`` against the epoch: each loss (train and validation together),
    the learning rate (log scale) and the throughput (images/s) when logged.

    ``log.csv`` has one row per epoch with ``epoch`` and any numeric columns; ``train_X`` /
    ``val_X`` (or ``X_train`` / ``X_val``) pairs are drawn on one panel. Writes
    ``out_dir/<name>.<fmt>``; returns the paths.
    """
    path = Path(log_csv)
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise CryolatentError(f"{path}: training log not found")
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise CryolatentError(f"{path}: cannot read the training log ({e})")
    if len(df) == 0:
        raise CryolatentError(f"{path}: the training log has no rows yet")
    num = df.select_dtypes(include=[np.number])
    x = num["epoch"].to_numpy() if "epoch" in num else np.arange(1, len(df) + 1)
    groups = _curve_groups([c for c in num.columns])
    panels: list[tuple[str, dict[str, str]]] = list(groups.items())
    lr_col = next((c for c in num.columns if c.lower() == "lr"), None)
    if lr_col:
        panels.append(("learning rate", {"train": lr_col}))
    if not panels:
        raise CryolatentError(f"{path}: no numeric columns to plot")
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    _, plt = _mpl()
    with style():
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (base, cols) in zip(axes.flat, panels):
            marker = "o" if len(x) <= 30 else None
            for split, color in (("train", "#0072B2"), ("val", "#D55E00")):
                if split in cols:
                    y = num[cols[split]].to_numpy(dtype=np.float64)
                    ax.plot(x, y, color=color, marker=marker, ms=3, lw=1.5,
                            label="validation" if split == "val" else "training")
            if len(cols) > 1:
                ax.legend()
            ax.set_xlabel("epoch")
            if base == "learning rate":
                ax.set_yscale("log")
                ax.set_ylabel("learning rate")
            elif "per_s" in base or base.endswith("_s") and "images" in base:
                ax.set_ylabel("images / s")
            else:
                ax.set_ylabel(base.replace("_", " "))
                vals = num[list(cols.values())].to_numpy(dtype=np.float64)
                vals = vals[np.isfinite(vals)]
                if vals.size and vals.min() > 0 and vals.max() / vals.min() > 100:
                    ax.set_yscale("log")
            ax.set_title(base.replace("_", " "))
        fig.suptitle(f"training log ({path.parent.name or path.name})")
        fig.tight_layout()
        return save_figure(fig, out_dir, name, fmt)


# ------------------------------------------------------------------------ from OUT.star
def latent_columns(table) -> list[str]:
    """The ``cryolatentZ1..ZD`` columns of a particle table, in numeric order."""
    cols = [c for c in table.columns if str(c).startswith("cryolatentZ")
            and str(c)[len("cryolatentZ"):].isdigit()]
    return sorted(cols, key=lambda c: int(str(c)[len("cryolatentZ"):]))


#: columns plotted as numbers besides cryolatentZ* (checked only where present)
PLOT_NUMERIC = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber")


def read_embedding(star: str | Path):
    """Read the particle table of an ``embed`` output STAR (``OUT.star``).

    Returns the particles DataFrame; raises :class:`CryolatentError` when the file cannot be
    read or has no ``cryolatentZ`` columns (then ``cryolatent embed`` has not been run on it).
    """
    star = Path(star)
    # a missing file, no particles, text in cryolatentZ* / pose / class columns: one line
    # naming the file, column and particle (names may repeat: a symmetry-expanded set)
    table, _optics = read_particle_table(star, numeric=PLOT_NUMERIC, unique=False)
    if not latent_columns(table):
        raise CryolatentError(f"{star}: no cryolatentZ columns; run `cryolatent embed RUNDIR "
                              f"INPUT -o {star.name}` first and plot its output")
    return table


def plot_all(star: str | Path, out_dir: str | Path, rundir: str | Path | None = None,
             methods: Sequence[str] = ("umap", "pca"), umap_sample: int = UMAP_SAMPLE,
             fmt: Sequence[str] = ("png",), seed: int = 0) -> list[Path]:
    """Every plot of ``cryolatent plot``: latent maps (each of ``methods``), pose histograms,
    and the training curves of ``rundir/log.csv`` when ``rundir`` is given.

    star: an ``embed`` output (``cryolatentZ*``, ``rlnAnglePsi``, ``rlnOriginX/YAngst``,
    ``rlnClassNumber``). Returns the paths written.
    """
    out_dir = Path(out_dir)
    table = read_embedding(star)
    zcols = latent_columns(table)
    z = table[zcols].to_numpy(dtype=np.float64)
    classes = (table["rlnClassNumber"].to_numpy().astype(np.int64)
               if "rlnClassNumber" in table else None)
    psi = table["rlnAnglePsi"].to_numpy(dtype=np.float64) if "rlnAnglePsi" in table else None
    shift = None
    if "rlnOriginXAngst" in table and "rlnOriginYAngst" in table:
        shift = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=np.float64)
    files: list[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for m in methods:
        if m == "umap" and len(z) < 10:
            log.warning("only %d particles: skipping UMAP", len(z))
            continue
        log.info("latent map: %s of %d particles", m.upper(), len(z))
        files += plot_latents(z, classes, psi, out_dir, method=m, sample=umap_sample,
                              fmt=fmt, seed=seed)["files"]
    if psi is not None or shift is not None:
        files += plot_pose_histograms(psi, shift, out_dir, fmt=fmt)
    if rundir is not None:
        log_csv = Path(rundir) / "log.csv"
        if not log_csv.exists():
            raise CryolatentError(f"{log_csv}: no training log in the run folder")
        files += plot_training_curves(log_csv, out_dir, fmt=fmt)
    return files
