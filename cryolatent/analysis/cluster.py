"""Classes: clustering latent vectors (``embed --clusters K``, ``--cluster-method``) and
selecting particles by class (``cryolatent select``: chosen classes, :func:`select_classes`,
or with ``--auto`` those that pass the trust report's checks, :func:`select_auto`).

:func:`cluster_latents` takes the latent means ``z`` (N, D) and returns 0-based labels (N,).
Every method is deterministic for a given ``seed``, and the labels are renumbered so that
class 0 is the most populated one (ties: the class whose first member comes first), which makes
the output independent of the arbitrary order a clustering algorithm returns its clusters in.

Methods
-------
``kmeans``         k-means++ with 10 restarts (sklearn ``KMeans``); above ``MINIBATCH_ABOVE``
                   points, ``MiniBatchKMeans`` (batches of 4096, 3 restarts), so 10^6 × D costs
                   seconds and O(N·D) memory.
``agglomerative``  Ward linkage (sklearn ``AgglomerativeClustering``), the criterion of the
                   TARGET-VAE and IRL-INR papers' clustering tables. Ward needs O(n²) memory
                   (the condensed distance matrix: 10^4 points = 0.4 GB), so above
                   ``max_ward`` points it is fitted on a random subsample of ``max_ward``
                   points (seeded); those keep their Ward label and every other point goes to
                   the nearest centroid (Euclidean) of the subsample's clusters.
``gmm``            Gaussian mixture, full covariances, k-means initialisation, 3 restarts
                   (sklearn ``GaussianMixture``); above ``max_gmm_fit`` points it is fitted on
                   a seeded subsample and every point is assigned its most probable component.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from ..errors import CryolatentError

__all__ = ["METHODS", "cluster_latents", "relabel_by_size", "parse_classes", "select_classes",
           "select_auto", "judge_classes", "default_max_resolution", "selection_report_path"]

METHODS = ("kmeans", "agglomerative", "gmm")

#: above this many points, k-means switches to MiniBatchKMeans
MINIBATCH_ABOVE = 200_000


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber 0-based labels (N,) so that 0 is the largest class, 1 the next, ...

    Ties are broken by the position of each class's first member. Returns int64 (N,).
    """
    labels = np.asarray(labels)
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))          # primary: size desc, then first occurrence
    new = np.empty(len(uniq), dtype=np.int64)
    new[order] = np.arange(len(uniq))
    return new[np.searchsorted(uniq, labels)]


def _nearest_centroid(z: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index (N,) of the nearest centroid (K, D) of each row of z (N, D), in chunks."""
    out = np.empty(len(z), dtype=np.int64)
    c2 = (centroids.astype(np.float64) ** 2).sum(1)
    for s in range(0, len(z), chunk):
        b = z[s:s + chunk].astype(np.float64)
        d = c2[None, :] - 2.0 * b @ centroids.T.astype(np.float64)  # + |b|² (constant per row)
        out[s:s + chunk] = d.argmin(1)
    return out


def cluster_latents(z: np.ndarray, k: int, method: str = "kmeans", seed: int = 0,
                    max_ward: int = 10_000, max_gmm_fit: int = 200_000) -> np.ndarray:
    """Cluster latent vectors into ``k`` classes.

    z: (N, D) float array (the latent means); k: number of classes, 1 <= k <= N;
    method: one of :data:`METHODS`. Returns int64 labels (N,) in 0..k-1, class 0 the largest
    (see :func:`relabel_by_size`). Deterministic for a given ``seed``.
    """
    if method not in METHODS:
        raise CryolatentError(f"--cluster-method {method!r}: choose from {', '.join(METHODS)}")
    z = np.asarray(z)
    if z.ndim != 2:
        raise CryolatentError(f"latents must be a 2-D array (N, D), got shape {z.shape}")
    n = len(z)
    if k < 1:
        raise CryolatentError(f"--clusters {k}: must be >= 1")
    if k > n:
        raise CryolatentError(f"--clusters {k}: more classes than particles ({n})")
    if not np.all(np.isfinite(z)):
        bad = int(np.flatnonzero(~np.isfinite(z).all(1))[0])
        raise CryolatentError(f"latent vector of particle {bad} (row {bad + 1}) is not finite")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    z = z.astype(np.float32, copy=False)
    rng = np.random.default_rng(seed)

    if method == "kmeans":
        if n > MINIBATCH_ABOVE:
            from sklearn.cluster import MiniBatchKMeans

            km = MiniBatchKMeans(n_clusters=k, batch_size=4096, n_init=3, random_state=seed)
        else:
            from sklearn.cluster import KMeans

            km = KMeans(n_clusters=k, n_init=10, random_state=seed)
        km.fit(z)
        labels = _nearest_centroid(z, km.cluster_centers_) if n > MINIBATCH_ABOVE \
            else km.labels_
    elif method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        if n <= max_ward:
            labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z)
        else:
            sub = np.sort(rng.choice(n, size=max_ward, replace=False))
            sub_labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z[sub])
            centroids = np.stack([z[sub][sub_labels == c].mean(0) for c in range(k)])
            labels = _nearest_centroid(z, centroids)
            labels[sub] = sub_labels
    else:  # gmm
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(n_components=k, covariance_type="full", n_init=3,
                             reg_covar=1e-5, random_state=seed)
        if n <= max_gmm_fit:
            labels = gm.fit_predict(z)
        else:
            sub = np.sort(rng.choice(n, size=max_gmm_fit, replace=False))
            gm.fit(z[sub])
            labels = np.concatenate([gm.predict(z[s:s + 65536]) for s in range(0, n, 65536)])
    return relabel_by_size(np.asarray(labels))


# ============================================================================ select

def parse_classes(text: str) -> list[int]:
    """``"1,3,5-7"`` -> ``[1, 3, 5, 6, 7]`` (1-based class numbers, as rlnClassNumber)."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise CryolatentError(f"--classes {text!r}: use class numbers like 1,3 or 2-5")
        lo = int(m.group(1))
        out.extend(range(lo, int(m.group(2)) + 1) if m.group(2) is not None else [lo])
    if not out:
        raise CryolatentError("--classes: give at least one class number (e.g. 1,3)")
    bad = [c for c in out if c < 1]
    if bad:
        raise CryolatentError(f"--classes: class numbers start at 1 (got {bad[0]})")
    return sorted(set(out))


def _check_paths(input: Path, out: Path) -> str:
    """The input's kind (``.star`` / ``.cs``) after the checks of every selection: the input
    exists, the output has its format and is not the input. One-line errors."""
    if not input.is_file():
        raise CryolatentError(f"{input}: no such file")
    kind = input.suffix.lower()
    if kind not in (".star", ".cs"):
        raise CryolatentError(f"{input}: select reads a .star or .cs particle file")
    if out.suffix.lower() != kind:
        raise CryolatentError(f"-o {out}: the output of a {kind} input must end in {kind}")
    if out.resolve() == input.resolve():
        raise CryolatentError(f"-o {out}: would overwrite the input; choose another name")
    return kind


def _read_classed(input: Path, kind: str):
    """``(data, optics, number)``: the particle rows of ``input`` (a .cs record array or a
    STAR particle table, RELION 3.0 upgraded to 3.1 as RELION does), its optics table (None
    for .cs) and each row's 1-based class number (N,) int64."""
    from ..io import read_cs, read_star, upgrade_relion30   # (pandas: not for `embed --help`)
    from ..io.particles import particle_block

    optics = None
    if kind == ".cs":
        arr = read_cs(input)
        names = arr.dtype.names or ()
        field = next((f for f in ("alignments2D/class", "alignments3D/class") if f in names),
                     None)
        if field is None:
            raise CryolatentError(f"{input}: no alignments2D/class field (run cryolatent embed "
                                  "--clusters K on it first)")
        return arr, None, arr[field].astype(np.int64) + 1
    blocks = read_star(input)
    key, table = particle_block(blocks, input)
    optics = blocks.get("optics")
    if key != "particles":   # RELION 3.0 (or older writers): upgraded as RELION does
        table, optics = upgrade_relion30(table)
    if "rlnClassNumber" not in table.columns:
        raise CryolatentError(f"{input}: column rlnClassNumber is missing (run cryolatent "
                              "embed --clusters K first)")
    try:
        number = table["rlnClassNumber"].to_numpy(dtype=np.float64).astype(np.int64)
    except (TypeError, ValueError):
        raise CryolatentError(f"{input}: rlnClassNumber holds non-numbers")
    return table, optics, number


def _write_rows(kind: str, data, optics, keep: np.ndarray, input: Path, out: Path,
                datadir) -> None:
    """Write the rows ``keep`` (bool (N,)) of ``data`` to ``out`` in the input's format."""
    from ..io import write_cs, write_star
    from ..io.particles import image_names_from_cwd

    if kind == ".cs":
        write_cs(out, data[keep])
    else:
        kept = data.iloc[np.flatnonzero(keep)].reset_index(drop=True)
        write_star(out, image_names_from_cwd(kept, input, datadir), optics)


def select_classes(input: str | Path, classes, out: str | Path, invert: bool = False,
                   datadir: str | Path | None = None) -> Path:
    """Keep (``invert``: drop) the particles of ``classes`` (1-based) and write them to ``out``.

    input: a particle STAR with ``rlnClassNumber`` (e.g. ``cryolatent embed --clusters``
    output, or a RELION Class2D ``_data.star``), or a cryoSPARC ``.cs`` with
    ``alignments2D/class`` (0-based there: class c of ``--classes`` is ``alignments2D/class``
    = c - 1). The output has the input's format (``out`` must end in ``.star`` / ``.cs``
    accordingly): every column / field, the kept rows in input order, and for STAR the optics
    table as it is (RELION 3.0 input is written in 3.1 layout, upgraded as RELION does).
    A STAR's ``rlnImageName`` names each stack from the current directory (relative below
    it, else absolute: :func:`cryolatent.io.particles.image_names_from_cwd`; stacks looked up
    in ``datadir``, beside ``input``, the current directory), as RELION run from here finds
    them. Refuses to overwrite ``input`` and to write an empty selection. Returns ``out``.
    """
    log = logging.getLogger("cryolatent")
    input, out = Path(input), Path(out)
    if isinstance(classes, str):
        classes = parse_classes(classes)
    classes = sorted({int(c) for c in classes})
    kind = _check_paths(input, out)
    data, optics, number = _read_classed(input, kind)

    present = set(np.unique(number).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        log.warning("%s: no particle in class %s", input, ", ".join(map(str, missing)))
    keep = np.isin(number, classes)
    if invert:
        keep = ~keep
    nk = int(keep.sum())
    if nk == 0:
        have = sorted(present)
        have_s = ",".join(map(str, have[:12])) + (",..." if len(have) > 12 else "")
        raise CryolatentError(f"{input}: the selection is empty ({'dropping' if invert else 'keeping'}"
                              f" classes {','.join(map(str, classes))}; the file has classes "
                              f"{have_s})")
    _write_rows(kind, data, optics, keep, input, out, datadir)
    log.info("%s: kept %d of %d particles (%s classes %s) -> %s", input, nk, len(keep),
             "dropped" if invert else "kept", ",".join(map(str, classes)), out)
    return out


# ============================================================================ select --auto

#: the default --max-resolution asks a class's half-set FRC to stay above 0.143 out to this
#: Fourier ring of its box (or to half the Nyquist frequency in boxes under 4 × this px):
#: see :func:`default_max_resolution`
AUTO_MIN_RING = 8


def selection_report_path(out: str | Path) -> Path:
    """``SUBSET_select.json`` beside ``SUBSET.star`` (or ``.cs``): what ``select --auto`` kept
    and dropped, and why."""
    out = Path(out)
    return out.with_name(out.stem + "_select.json")


def default_max_resolution(report: dict) -> tuple[float, str]:
    """The default resolution limit of ``select --auto`` for a trust report: ``(Å, rule)``.

    ``max(box · apix / 8, 4 · apix)``, box and apix those of the class averages (``apix``;
    the box from the length, box/2 + 1, of the classes' ``frc`` curves): the half-set FRC
    must stay above 0.143 out to Fourier ring 8 (8 resolution elements across the box), or,
    in boxes under 32 px, out to half the Nyquist frequency. A blob's spectrum dies out
    within a few rings: a blob as wide as a particle (ice, an aggregate, what noise aligned
    to itself averages to) in a box 1.5–2 × the particle's diameter has a spectral standard
    deviation of about 1 ring, so its FRC falls below 0.143 by ring 4–5 however many
    picks are averaged, while a particle's class holds detail far beyond (the demo's: rings
    18–19 of 24; 8–9 Å in a 48-px box of 3.2 Å/px, whose limit is 19 Å). The limit is in rings
    of the box, not a fraction of the Nyquist frequency: the class averages are made from
    the original particles, often sampled far finer than the poses were found at, so classes
    of good particles rarely reach near their Nyquist; and a class at Nyquist is the best
    resolved, not junk. Without FRC curves (box unknown) the limit is 4 · apix."""
    try:
        apix = float(report.get("apix"))
    except (TypeError, ValueError):
        apix = math.nan
    if not (math.isfinite(apix) and apix > 0):
        raise CryolatentError("the trust report has no pixel size (apix): give "
                              "--max-resolution")
    curves = [c.get("frc") for c in report.get("classes") or [] if isinstance(c, dict)]
    n = max((len(f) for f in curves if isinstance(f, list)), default=0)
    floor = 4.0 * apix
    if n < 2:
        return floor, (f"4 × {apix:.4g} Å/px = half the Nyquist frequency of the class "
                       "averages (the report has no FRC curves to give their box)")
    box = 2 * (n - 1)
    ring = box * apix / AUTO_MIN_RING
    if ring >= floor:
        return ring, (f"{box} px × {apix:.4g} Å/px / {AUTO_MIN_RING}: the half-set FRC must "
                      f"stay above 0.143 out to Fourier ring {AUTO_MIN_RING} of the class "
                      "averages' box")
    return floor, (f"4 × {apix:.4g} Å/px: half the Nyquist frequency of the class averages "
                   f"(their {box}-px box has fewer than {4 * AUTO_MIN_RING} px)")


def judge_classes(report: dict, max_resolution_A: float | None = None) -> dict:
    """Which classes of a trust report (``OUT_summary.json`` of ``embed`` / ``refine``:
    :mod:`cryolatent.analysis.trust`) ``select --auto`` keeps, and why it drops the others.

    A class is dropped (each failed check gives one reason) when it has fewer than 2
    particles (no half-set check is possible), no resolved signal (``resolution_A`` null:
    the FRC of its half-set averages is below 0.143 from the lowest frequency), is no better
    than noise aligned the same way (``beats_aligned_noise`` false), or its ``resolution_A``
    is worse (larger) than ``max_resolution_A`` (default :func:`default_max_resolution`).
    The first three are the junk-like checks: such an average is what pure noise or
    unaligned junk gives. Classes with no particles are listed but neither kept nor dropped.
    Returns ``{"max_resolution_A", "max_resolution_rule", "checks_skipped", "classes":
    [{"class", "size", "resolution_A", "beats_aligned_noise", "kept", "reasons"}],
    "kept", "dropped"}`` (class numbers).
    """
    rows = report.get("classes")
    if not isinstance(rows, list) or not rows:
        raise CryolatentError("the trust report has no per-class list (classes)")
    if max_resolution_A is None:
        lim, rule = default_max_resolution(report)
    else:
        lim, rule = float(max_resolution_A), "--max-resolution"
        if not lim > 0:
            raise CryolatentError(f"--max-resolution must be positive, got {max_resolution_A}")
    skipped = []
    out_rows = []
    for c in rows:
        k, size = int(c["class"]), int(c.get("size", 0))
        res, beats = c.get("resolution_A"), c.get("beats_aligned_noise")
        reasons: list[str] = []
        if size == 0:
            out_rows.append({"class": k, "size": 0, "resolution_A": None,
                             "beats_aligned_noise": None, "kept": False,
                             "reasons": ["no particles"]})
            continue
        if size < 2:
            reasons.append("fewer than 2 particles: no half-set check possible")
        elif res is None:
            reasons.append("no resolved signal (the FRC of its half-set averages is below "
                           "0.143 from the lowest frequency)")
        else:
            if beats is False:
                m, need = c.get("log_snr_above_aligned_noise"), c.get("log_snr_margin")
                how = (f" (log spectral-SNR ratio to that noise {m:.2f}, needs more than "
                       f"{need:.2f})" if isinstance(m, (int, float))
                       and isinstance(need, (int, float)) else "")
                reasons.append("no better than pure noise aligned the same way" + how)
            elif beats is None and "beats_aligned_noise" not in skipped:
                skipped.append("beats_aligned_noise")
            if float(res) > lim:
                reasons.append(f"resolution {float(res):.3g} Å is worse than {lim:.3g} Å")
        out_rows.append({"class": k, "size": size, "resolution_A": res,
                         "beats_aligned_noise": beats, "kept": not reasons,
                         "reasons": reasons})
    return {"max_resolution_A": lim, "max_resolution_rule": rule, "checks_skipped": skipped,
            "classes": out_rows,
            "kept": [r["class"] for r in out_rows if r["kept"]],
            "dropped": [r["class"] for r in out_rows if r["size"] > 0 and not r["kept"]]}


def _read_report(input: Path, report: Path | None) -> tuple[Path, dict]:
    """The trust report beside ``input`` (or ``report``), parsed; one-line errors."""
    import json

    if report is None:
        from ..utils import summary_path_for

        report = summary_path_for(input)
    report = Path(report)
    if not report.is_file():
        raise CryolatentError(f"{input}: no trust report {report} beside it (embed and refine "
                              "write OUT_summary.json beside OUT.star); select --auto needs "
                              "it, or choose classes with --classes")
    try:
        rep = json.loads(report.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CryolatentError(f"{report}: not a readable trust report ({e})") from None
    if not isinstance(rep, dict) or not isinstance(rep.get("classes"), list):
        raise CryolatentError(f"{report}: not a trust report (no per-class list 'classes')")
    return report, rep


def select_auto(input: str | Path, out: str | Path, max_resolution_A: float | None = None,
                datadir: str | Path | None = None, report: str | Path | None = None) -> dict:
    """``select --auto``: keep the particles of the classes that pass the trust checks.

    The checks (:func:`judge_classes`) read ``input``'s trust report, ``OUT_summary.json``
    beside ``OUT.star`` (:func:`cryolatent.utils.summary_path_for`; written by
    ``embed`` and ``refine``), or ``report``. It must describe ``input``: the same classes
    with the same numbers of particles, else a one-line error (the STAR was edited, or the
    report belongs to another run). Logs one line per dropped class with its reasons and
    writes the subset as :func:`select_classes` does (every column, the optics table) plus
    ``SUBSET_select.json`` (:func:`selection_report_path`): the limit used, every class with
    its size, resolution, whether it beat aligned noise, kept or not and why. Nothing is
    written when no class passes (one-line error). Returns that JSON's content.
    """
    import json

    from ..utils import atomic_path

    log = logging.getLogger("cryolatent")
    input, out = Path(input), Path(out)
    kind = _check_paths(input, out)
    report_path, rep = _read_report(input, None if report is None else Path(report))
    data, optics, number = _read_classed(input, kind)
    have = dict(zip(*(v.tolist() for v in np.unique(number, return_counts=True))))
    try:
        said = {int(c["class"]): int(c.get("size", 0)) for c in rep["classes"]}
    except (KeyError, TypeError, ValueError):
        raise CryolatentError(f"{report_path}: a class entry lacks its number or size")
    said = {k: v for k, v in said.items() if v > 0}
    if have != said:
        diff = sorted(set(have) | set(said))
        k = next(c for c in diff if have.get(c, 0) != said.get(c, 0))
        raise CryolatentError(
            f"{report_path} does not describe {input}: class {k} has {have.get(k, 0)} "
            f"particles in {input.name} and {said.get(k, 0)} in the report (edited or "
            f"another run's); run embed or refine again, or choose classes with --classes")
    verdict = judge_classes(rep, max_resolution_A)
    for what in verdict["checks_skipped"]:
        log.warning("WARNING: select --auto: %s: the report has no %s; that check is skipped",
                    report_path, what)
    for r in verdict["classes"]:
        if r["size"] and not r["kept"]:
            log.info("select --auto: dropping class %d (%d particle%s): %s", r["class"],
                     r["size"], "" if r["size"] == 1 else "s", "; ".join(r["reasons"]))
    kept = verdict["kept"]
    if not kept:
        raise CryolatentError(f"select --auto: no class of {input} passes the checks of "
                              f"{report_path} (reasons above); nothing written")
    keep = np.isin(number, kept)
    nk = int(keep.sum())
    js = selection_report_path(out)
    doc = {"input": str(input), "output": str(out), "report": str(report_path),
           "report_kind": rep.get("kind"), "particles_in": int(len(number)),
           "particles_kept": nk, **verdict}
    _write_rows(kind, data, optics, keep, input, out, datadir)
    with atomic_path(js) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    log.info("select --auto: kept classes %s: %d of %d particles (%.1f%%) -> %s; resolution "
             "limit %.3g Å (%s); reasons in %s", ",".join(map(str, kept)), nk, len(number),
             100.0 * nk / len(number), out, verdict["max_resolution_A"],
             verdict["max_resolution_rule"], js)
    return doc
