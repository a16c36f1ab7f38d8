"""Agreement between predicted and true poses / classes (``cryolatent evaluate``).

* ``rotation_corr``: Jammalamadaka–SenGupta circular correlation between predicted and true
  ``rlnAnglePsi`` over all particles (the papers' tables)::

      rho = sum sin(a - abar) sin(b - bbar) / sqrt(sum sin²(a - abar) · sum sin²(b - bbar))

  with abar, bbar the circular means. It is 1 when pred = truth + const (a learned canonical
  orientation is arbitrary) and -1 when pred = const - truth (a mirrored/negated angle).
* ``rotation_corr_per_class``: the mean over true classes of the within-class correlation (a
  model may pick a different canonical angle per class).
* ``rotation_agreement_per_class``: mean over true classes of the resultant length
  |mean exp(i(pred - true))|: 1 when pred = truth + one constant per class, about 0 for random
  or mirrored (pred = const - truth) angles. Unlike the circular correlation it does not
  subtract each set's circular mean, which is ill-defined for uniformly distributed angles
  (a few wrong particles can then swing ``rotation_corr_per_class`` from +1 to -1 while most
  angles are right); report both.
* ``rotation_error_deg_per_class``: median absolute angle error in degrees after removing
  each true class's constant (the circular mean of pred - true), median over particles, mean
  over classes.
* ``translation_corr_x`` / ``_y``: Pearson correlation of ``rlnOriginXAngst`` / ``YAngst``.
* ``cluster_accuracy``: best one-to-one matching of predicted to true classes (Hungarian,
  :func:`scipy.optimize.linear_sum_assignment`), fraction of particles matched; ``nmi`` and
  ``ari`` from scikit-learn.

Particles are matched by name, never by row order (:func:`match_particles`).

Junk (``cryolatent simulate cryoem --junk``): truth rows with ``rlnClassNumber`` 0 are not
particles. When the truth has any, :func:`evaluate_tables` also reports how well the
prediction (typically a selection, fewer rows than the truth) removed them
(:func:`junk_report`), and computes every metric above on the prediction's real particles
only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .io import read_particle_table
from .io.particles import nth_keys, particle_keys
from .pose import wrap_deg_180

__all__ = ["circular_mean", "circular_corr", "rotation_corr_per_class",
           "rotation_agreement_per_class", "rotation_error_per_class", "pearson",
           "cluster_accuracy", "match_particles", "junk_report", "evaluate_tables",
           "heldout_direction_spearman", "morph_report", "morph_report_files"]


def circular_mean(a_rad: np.ndarray) -> float:
    """Circular mean (radians) of angles a_rad (n,)."""
    a = np.asarray(a_rad, dtype=np.float64)
    return float(math.atan2(np.sin(a).sum(), np.cos(a).sum()))


def circular_corr(a_deg, b_deg) -> float | None:
    """Jammalamadaka–SenGupta circular correlation of two (n,) angle arrays in degrees.

    None when undefined (fewer than 2 angles, or one set constant)."""
    a = np.radians(np.asarray(a_deg, dtype=np.float64))
    b = np.radians(np.asarray(b_deg, dtype=np.float64))
    if a.size < 2 or a.shape != b.shape:
        return None
    sa = np.sin(a - circular_mean(a))
    sb = np.sin(b - circular_mean(b))
    den = math.sqrt(float((sa * sa).sum()) * float((sb * sb).sum()))
    if not den > 1e-12 * a.size:
        return None
    return float((sa * sb).sum() / den)


def rotation_corr_per_class(pred_deg, true_deg, true_class) -> float | None:
    """Mean over true classes (with >= 2 particles and a defined value) of circular_corr."""
    pred_deg, true_deg, true_class = map(np.asarray, (pred_deg, true_deg, true_class))
    vals = []
    for c in np.unique(true_class):
        m = true_class == c
        r = circular_corr(pred_deg[m], true_deg[m])
        if r is not None:
            vals.append(r)
    return float(np.mean(vals)) if vals else None


def _per_class_differences(pred_deg, true_deg, true_class):
    """Yield (pred - true) in radians for each true class with >= 2 particles."""
    pred_deg, true_deg, true_class = map(np.asarray, (pred_deg, true_deg, true_class))
    for c in np.unique(true_class):
        m = true_class == c
        if m.sum() >= 2:
            yield np.radians(pred_deg[m].astype(np.float64) - true_deg[m].astype(np.float64))


def rotation_agreement_per_class(pred_deg, true_deg, true_class) -> float | None:
    """Mean over true classes of |mean exp(i (pred - true))| (resultant length, in [0, 1])."""
    vals = [float(np.abs(np.exp(1j * d).mean())) for d in
            _per_class_differences(pred_deg, true_deg, true_class)]
    return float(np.mean(vals)) if vals else None


def rotation_error_per_class(pred_deg, true_deg, true_class) -> float | None:
    """Mean over true classes of the median |pred - true - c_k| in degrees, c_k the class's
    circular mean of pred - true (the learned constant), differences wrapped to (-180, 180]."""
    vals = []
    for d in _per_class_differences(pred_deg, true_deg, true_class):
        r = d - circular_mean(d)
        vals.append(float(np.median(np.abs(wrap_deg_180(np.degrees(r))))))
    return float(np.mean(vals)) if vals else None


def pearson(a, b) -> float | None:
    """Pearson correlation of two (n,) arrays; None when undefined (constant input, n < 2)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if not den > 0:
        return None
    return float((a * b).sum() / den)


def cluster_accuracy(pred_labels, true_labels) -> float:
    """Fraction of particles correctly classified under the best one-to-one mapping of
    predicted to true labels (Hungarian algorithm on the contingency table; any numbers of
    clusters; unmatched clusters count as wrong)."""
    from scipy.optimize import linear_sum_assignment

    p = np.unique(np.asarray(pred_labels), return_inverse=True)[1]
    t = np.unique(np.asarray(true_labels), return_inverse=True)[1]
    cont = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(cont, (p, t), 1)
    r, c = linear_sum_assignment(cont, maximize=True)
    return float(cont[r, c].sum() / len(p))


def match_particles(pred: pd.DataFrame, truth: pd.DataFrame,
                    pred_label: str = "PRED", truth_label: str = "TRUTH") -> tuple[np.ndarray, np.ndarray]:
    """Row indices (pi, ti) pairing every particle of ``pred`` with its truth, by name.

    A particle's identity is its first original name: ``rlnImageOriginalName`` where a
    table has it (the stack was rewritten, e.g. by ``preprocess``), else ``rlnImageName``
    (``embed`` and ``select`` keep their input's names). Column pairs are tried in the order
    (original, original), (pred original, truth name), (pred name, truth original),
    (name, name), names first as written, then as (index, stack file name) in case the
    folders differ; the first pairing that matches every prediction row is used. Every
    prediction row must match exactly one truth row (the truth may hold more particles).
    A name that appears several times (a joined or re-extracted set) is ambiguous: its k-th
    row in ``pred`` is paired with its k-th row in ``truth``, i.e. by position (warned);
    repeats beyond those of ``truth`` pair with its last row of that name (the same image).
    Raises InputError with one line otherwise.
    """
    O, N = "rlnImageOriginalName", "rlnImageName"
    if N not in pred.columns and O not in pred.columns:
        raise InputError(f"{pred_label}: no rlnImageName column to match particles by")
    if N not in truth.columns and O not in truth.columns:
        raise InputError(f"{truth_label}: no rlnImageName column to match particles by")
    # the first original name is the most reliable identity: prefer it on either side
    pairs = [(cp, ct) for cp, ct in ((O, O), (O, N), (N, O), (N, N))
             if cp in pred.columns and ct in truth.columns]
    best = None
    for norm in (False, True):
        for cp, ct in pairs:
            pb, tb = _keys(pred[cp], norm), _keys(truth[ct], norm)
            pn, tn = pd.Series(nth_keys(pb), index=pb.index), nth_keys(tb)
            ti = pn.map(pd.Series(np.arange(len(tn)), index=tn))
            if ti.isna().any():   # more repeats in PRED than in TRUTH: the same image
                last = pd.Series(np.arange(len(tb)), index=tb.values)
                ti = ti.fillna(pb.map(last[~last.index.duplicated(keep="last")]))
            hits = int(ti.notna().sum())
            if best is None or hits > best[0]:
                best = (hits, cp, ct, ti, pn)
            if hits == len(pred):
                break
        if best is not None and best[0] == len(pred):
            break
    if best is None:
        raise InputError(f"{truth_label}: particle names are not unique")
    hits, cp, ct, ti, pn = best
    if hits < len(pred):
        first = int(np.nonzero(ti.isna().to_numpy())[0][0])
        raise InputError(
            f"{pred_label}: {len(pred) - hits} of {len(pred)} particles have no match in "
            f"{truth_label} by name (first: {pred[cp].iloc[first]!r} in {cp}, looked up in "
            f"{truth_label}'s {ct})")
    n_rep = int(pred[cp].astype(str).duplicated().sum())
    if n_rep:
        logging.getLogger("cryolatent").warning(
            "%s: %d repeated names in %s, matched to %s by position (k-th with k-th)",
            pred_label, n_rep, cp, truth_label)
    return np.arange(len(pred)), ti.to_numpy().astype(np.int64)


def _keys(names: pd.Series, norm: bool) -> pd.Series:
    """Names as written (white space stripped), or with ``norm`` as (index, stack file name)
    keys (:func:`cryolatent.io.particles.particle_keys`); the index of ``names`` kept."""
    s = names.astype(str)
    return pd.Series(particle_keys(s), index=s.index) if norm else s.str.strip()


def _col(df: pd.DataFrame, col: str) -> np.ndarray | None:
    if col not in df.columns:
        return None
    return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)


#: truth ``rlnClassNumber`` of junk (picks that are not particles)
JUNK_CLASS = 0
#: truth column naming the kind of each junk pick (``simulate cryoem --junk``)
JUNK_KIND_COLUMN = "cryolatentJunkKind"


def truth_junk(truth: pd.DataFrame) -> np.ndarray:
    """(n,) bool: the truth rows that are junk (``rlnClassNumber`` 0); all False without
    that column."""
    c = _col(truth, "rlnClassNumber")
    return np.zeros(len(truth), bool) if c is None else c == JUNK_CLASS


def junk_report(ti: np.ndarray, truth: pd.DataFrame) -> dict:
    """How a prediction matched to truth rows ``ti`` (from :func:`match_particles`) treats the
    truth's junk: ``junk_in_truth`` (count), ``junk_kept`` (how many of them are present in
    the prediction) and ``junk_kept_fraction`` (of ``junk_in_truth``), ``good_in_truth``,
    ``good_lost`` (truth particles absent from the prediction) and ``good_lost_fraction`` (of
    ``good_in_truth``); with a ``cryolatentJunkKind`` column also ``junk_kept_by_kind``
    {kind: fraction kept}. A truth row counts once however often the prediction repeats it.
    Fractions of an empty set are None."""
    junk = truth_junk(truth)
    present = np.zeros(len(truth), bool)
    present[np.asarray(ti, np.int64)] = True
    nj, ng = int(junk.sum()), int((~junk).sum())
    kept, lost = int((present & junk).sum()), int((~present & ~junk).sum())
    out = {"junk_in_truth": nj, "junk_kept": kept,
           "junk_kept_fraction": kept / nj if nj else None,
           "good_in_truth": ng, "good_lost": lost,
           "good_lost_fraction": lost / ng if ng else None}
    if JUNK_KIND_COLUMN in truth.columns:
        kind = truth[JUNK_KIND_COLUMN].astype(str).str.strip().to_numpy()
        out["junk_kept_by_kind"] = {
            str(k): float((present & junk & (kind == k)).sum() / (junk & (kind == k)).sum())
            for k in sorted(set(kind[junk]))}
    return out


def evaluate_tables(pred: pd.DataFrame, truth: pd.DataFrame, class_column: str = "rlnClassNumber",
                    pred_label: str = "PRED", truth_label: str = "TRUTH") -> dict:
    """All metrics for two particle tables; keys missing from either table give None.

    Returns {rotation_corr, rotation_corr_per_class, rotation_agreement_per_class,
    rotation_error_deg_per_class, translation_corr_x, translation_corr_y, cluster_accuracy,
    nmi, ari, n}. ``class_column`` names the truth's class column (the
    prediction's classes are always ``rlnClassNumber``).

    When the truth holds junk (``rlnClassNumber`` 0, whatever ``class_column`` is), the keys
    of :func:`junk_report` are added, ``n_pred`` is the number of prediction rows, and the
    metrics above (and ``n``) are computed on the prediction rows that are real particles.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    pi, ti = match_particles(pred, truth, pred_label, truth_label)
    junk = truth_junk(truth)
    extra: dict = {}
    if junk.any():
        extra = {"n_pred": int(len(pi)), **junk_report(ti, truth)}
        good = ~junk[ti]
        pi, ti = pi[good], ti[good]
    P = pred.iloc[pi].reset_index(drop=True)
    T = truth.iloc[ti].reset_index(drop=True)
    out: dict = {k: None for k in ("rotation_corr", "rotation_corr_per_class",
                                   "rotation_agreement_per_class",
                                   "rotation_error_deg_per_class", "translation_corr_x", "translation_corr_y",
                                   "cluster_accuracy", "nmi", "ari")}
    out["n"] = int(len(P))

    def ok(*arrs):
        return all(a is not None and np.isfinite(a).all() for a in arrs)

    ppsi, tpsi = _col(P, "rlnAnglePsi"), _col(T, "rlnAnglePsi")
    tcls = _col(T, class_column)
    if ok(ppsi, tpsi):
        out["rotation_corr"] = circular_corr(ppsi, tpsi)
        if ok(tcls):
            out["rotation_corr_per_class"] = rotation_corr_per_class(ppsi, tpsi, tcls)
            out["rotation_agreement_per_class"] = rotation_agreement_per_class(ppsi, tpsi, tcls)
            out["rotation_error_deg_per_class"] = rotation_error_per_class(ppsi, tpsi, tcls)
    for ax in ("X", "Y"):
        a, b = _col(P, f"rlnOrigin{ax}Angst"), _col(T, f"rlnOrigin{ax}Angst")
        if ok(a, b):
            out[f"translation_corr_{ax.lower()}"] = pearson(a, b)
    pcls = _col(P, "rlnClassNumber")
    if ok(pcls, tcls) and len(P):
        out["cluster_accuracy"] = cluster_accuracy(pcls, tcls)
        out["nmi"] = float(normalized_mutual_info_score(tcls, pcls))
        out["ari"] = float(adjusted_rand_score(tcls, pcls))
    out.update(extra)
    return out


#: columns the metrics read as numbers (checked only where present)
NUMERIC = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber")


def _particles_table(path: Path, extra: tuple[str, ...] = ()):
    """The particle table of ``path`` (PRED or TRUTH), checked by
    :func:`cryolatent.io.read_particle_table`: a missing file, no particles, a non-number in
    a pose / class column or a duplicate name is a one-line InputError naming the file."""
    return read_particle_table(path, numeric=NUMERIC + tuple(extra))[0]


def evaluate_files(pred: str | Path, truth: str | Path,
                   class_column: str = "rlnClassNumber") -> dict:
    """Metrics of :func:`cryolatent.metrics.evaluate_tables` for two STAR files."""
    pred, truth = Path(pred), Path(truth)
    P = _particles_table(pred)
    T = _particles_table(truth, (class_column,))
    return evaluate_tables(P, T, class_column=class_column, pred_label=str(pred),
                           truth_label=str(truth))


# ----------------------------------------------------------------------------- continuous motion
#: truth column of ``simulate cryoem --morph``: the conformation λ in [0, 1]; -1 for a row
#: that is not a morph particle
MORPH_COLUMN = "cryolatentMorph"
#: a group (true class, and view where the truth has one) needs this many morph particles
MORPH_MIN_GROUP = 10
#: the PCA baseline works on the aligned particles Fourier-cropped to at most this box
MORPH_PCA_MAX_BOX = 64
#: PCA components when PRED has no latent columns (else as many as latent dimensions)
MORPH_PCA_DEFAULT_DIMS = 8


def latent_columns(table: pd.DataFrame) -> list[str]:
    """The ``cryolatentZ1 .. ZD`` columns of a particle table, in numeric order."""
    cols = [c for c in table.columns if str(c).startswith("cryolatentZ")
            and str(c)[len("cryolatentZ"):].isdigit()]
    return sorted(cols, key=lambda c: int(str(c)[len("cryolatentZ"):]))


def heldout_direction_spearman(features, target, seed: int = 0) -> float | None:
    """How well the best single linear direction of ``features`` (n, d) orders ``target``
    (n,): a Spearman rank correlation on held-out particles.

    The particles are split at random (``seed``) into two halves. On one half, the ranks of
    ``target`` are regressed on the features by least squares (with an intercept; features
    standardised with that half's mean and sd), which gives a direction w; on the other half
    the Spearman correlation between ``features @ w`` and ``target`` is computed. The halves
    then swap, and the mean of the two held-out correlations is returned. Fitting on one half
    and scoring on the other keeps a high-dimensional d from finding a direction that only
    fits noise (with d close to n/2 the score falls rather than rises). Signed: a direction
    that orders the particles the wrong way round scores below 0. None with fewer than
    :data:`MORPH_MIN_GROUP` particles or a constant target.
    """
    from scipy.stats import rankdata, spearmanr

    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    if X.ndim == 1:
        X = X[:, None]
    n = len(y)
    if n < MORPH_MIN_GROUP or X.shape[0] != n or np.ptp(y) == 0:
        return None
    perm = np.random.default_rng(seed).permutation(n)
    halves = (perm[: n // 2], perm[n // 2:])
    scores = []
    for fit, test in (halves, halves[::-1]):
        mu = X[fit].mean(0)
        sd = X[fit].std(0)
        sd[sd == 0] = 1.0
        A = np.c_[np.ones(len(fit)), (X[fit] - mu) / sd]
        r = rankdata(y[fit])
        beta = np.linalg.lstsq(A, r - r.mean(), rcond=None)[0][1:]
        proj = ((X[test] - mu) / sd) @ beta
        if np.ptp(proj) == 0 or np.ptp(y[test]) == 0:
            scores.append(0.0)
            continue
        scores.append(float(spearmanr(proj, y[test]).statistic))
    return float(np.mean(scores))


def morph_groups(T: pd.DataFrame, class_column: str = "rlnClassNumber") -> np.ndarray:
    """(n,) str group label of each truth row: its class (``class_column``), and where the
    truth has ``cryolatentViewNumber`` (and the class column is not that), ``"C/view V"``:
    a 2D class is one view of one structure."""
    cls = _col(T, class_column)
    lab = np.array(["all"] * len(T), dtype=object) if cls is None else \
        np.array([f"{int(c)}" if np.isfinite(c) else "?" for c in cls], dtype=object)
    if "cryolatentViewNumber" in T.columns and class_column != "cryolatentViewNumber":
        v = _col(T, "cryolatentViewNumber")
        lab = np.array([f"{a}/view {int(b)}" if np.isfinite(b) else a for a, b in zip(lab, v)],
                       dtype=object)
    return lab


def _group_scores(features: np.ndarray, lam: np.ndarray, groups: np.ndarray) -> dict:
    """{group: held-out Spearman} (:func:`heldout_direction_spearman`) for each group with
    enough particles; None values left out."""
    out = {}
    for g in sorted(set(groups)):
        m = groups == g
        r = heldout_direction_spearman(features[m], lam[m])
        if r is not None:
            out[str(g)] = r
    return out


def morph_pca_features(ps, rows: np.ndarray, psi_deg: np.ndarray, shift_angst: np.ndarray,
                       k: int, batch: int = 256) -> np.ndarray:
    """The classical baseline's features: PCA scores (n, k) of particles ``rows`` of the
    :class:`cryolatent.io.ParticleSet` ``ps``, phase-flipped with their own CTF (when the set
    has CTF columns), aligned by the given poses (:func:`cryolatent.pose.align_particles`,
    RELION's convention; shifts in Å), Fourier-cropped to at most
    :data:`MORPH_PCA_MAX_BOX` px and masked to the disc of diameter 0.9 box; PCA by
    scikit-learn's randomized SVD (``random_state`` 0)."""
    import torch
    from sklearn.decomposition import PCA

    from .ctf import compute_ctf
    from .pose import align_particles
    from .preprocess import fourier_crop

    rows = np.asarray(rows, np.int64)
    D = ps.box
    apix = float(ps.apix)
    d = min(D, MORPH_PCA_MAX_BOX)
    ctfp = ps.ctf_params()
    r = np.arange(d) - d // 2
    disc = (r[:, None] ** 2 + r[None, :] ** 2) <= (0.45 * d) ** 2
    feats = np.empty((len(rows), int(disc.sum())), dtype=np.float32)
    for a in range(0, len(rows), batch):
        ii = rows[a:a + batch]
        x = torch.from_numpy(ps.images(ii)).to(torch.float64)
        if ctfp is not None:
            sign = torch.sign(compute_ctf(ctfp.subset(ii), D, apix, dtype=torch.float64))
            x = torch.fft.ifft2(torch.fft.fft2(x) * sign).real
        x = align_particles(x, psi_deg[a:a + batch], shift_angst[a:a + batch] / apix)
        if d < D:
            x = fourier_crop(x, d)
        feats[a:a + len(ii)] = x.numpy()[:, disc].astype(np.float32)
    k = int(max(1, min(k, len(rows) - 1, feats.shape[1])))
    return PCA(n_components=k, svd_solver="randomized", random_state=0).fit_transform(feats)


def morph_report(pred: pd.DataFrame, truth: pd.DataFrame, class_column: str = "rlnClassNumber",
                 particles=None, pred_label: str = "PRED", truth_label: str = "TRUTH") -> dict:
    """Continuous motion (``simulate cryoem --morph``): how well the latent space, and a
    classical baseline, order the particles by their true conformation λ
    (``cryolatentMorph``).

    Only PRED rows that are real particles (not junk) with λ ≥ 0 count (``morph_n``). They
    are grouped by true class (and view: :func:`morph_groups`). Within each group the score is
    :func:`heldout_direction_spearman` of λ against (a) PRED's latent vectors
    (``cryolatentZ*``): ``morph_latent_spearman_per_class`` and their mean over groups
    ``morph_latent_spearman`` (None without latent columns); (b) the baseline, the PCA
    scores of the particle images aligned by PRED's own poses and phase-flipped with their
    CTF (:func:`morph_pca_features`, as many components as latent dimensions, else
    :data:`MORPH_PCA_DEFAULT_DIMS`; fitted per group): ``morph_pca_spearman(_per_class)``,
    computed when ``particles`` (PRED as a :class:`cryolatent.io.ParticleSet`, rows in
    PRED's order) is given. ``morph_dims`` is the number of dimensions both use.
    """
    pi, ti = match_particles(pred, truth, pred_label, truth_label)
    lam_all = _col(truth, MORPH_COLUMN)
    if lam_all is None:
        return {}
    junk = truth_junk(truth)
    lam = lam_all[ti]
    keep = (lam >= 0) & np.isfinite(lam) & ~junk[ti]
    pi, ti, lam = pi[keep], ti[keep], lam[keep]
    groups = morph_groups(truth.iloc[ti].reset_index(drop=True), class_column)
    zc = latent_columns(pred)
    dims = len(zc) if zc else MORPH_PCA_DEFAULT_DIMS
    out: dict = {"morph_n": int(len(pi)), "morph_dims": int(dims),
                 "morph_latent_spearman": None, "morph_latent_spearman_per_class": None,
                 "morph_pca_spearman": None, "morph_pca_spearman_per_class": None}
    if not len(pi):
        return out
    if zc:
        z = pred.iloc[pi][zc].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        per = _group_scores(z, lam, groups)
        out["morph_latent_spearman_per_class"] = per
        out["morph_latent_spearman"] = float(np.mean(list(per.values()))) if per else None
    if particles is not None:
        psi = _col(pred.iloc[pi], "rlnAnglePsi")
        psi = np.zeros(len(pi)) if psi is None else psi
        sh = particles.shifts_angst()[pi]
        per = {}
        for g in sorted(set(groups)):
            m = groups == g
            if m.sum() < MORPH_MIN_GROUP:
                continue
            f = morph_pca_features(particles, pi[m], psi[m], sh[m], dims)
            r = heldout_direction_spearman(f, lam[m])
            if r is not None:
                per[str(g)] = r
        out["morph_pca_spearman_per_class"] = per
        out["morph_pca_spearman"] = float(np.mean(list(per.values()))) if per else None
    return out


def morph_report_files(pred: str | Path, truth: str | Path,
                       class_column: str = "rlnClassNumber", datadir=None,
                       pca: bool = True) -> dict:
    """:func:`morph_report` for two STAR files ({} when TRUTH has no ``cryolatentMorph``).
    With ``pca`` the particle images of PRED are read (stacks looked up as everywhere,
    ``datadir`` first); when they cannot be found the baseline is None and a warning says
    why."""
    pred, truth = Path(pred), Path(truth)
    T = _particles_table(truth, (class_column,))
    if MORPH_COLUMN not in T.columns:
        return {}
    P = _particles_table(pred)
    ps = None
    if pca:
        from .io import load_particles

        try:
            ps = load_particles(pred, datadir=datadir)
        except InputError as e:
            logging.getLogger("cryolatent").warning(
                "morph: no PCA baseline, the particle images of %s cannot be read (%s)",
                pred, e)
    return morph_report(P, T, class_column, particles=ps, pred_label=str(pred),
                        truth_label=str(truth))
