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
           "cluster_accuracy", "match_particles", "junk_report", "evaluate_tables"]


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
