"""Classes: clustering latent vectors (``embed --clusters K``, ``--cluster-method``) and
selecting particles by class (``cryolatent select``).

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
import re
from pathlib import Path

import numpy as np

from ..errors import CryolatentError
from ..io import read_cs, read_star, upgrade_relion30, write_cs, write_star
from ..io.particles import particle_block

__all__ = ["METHODS", "cluster_latents", "relabel_by_size", "parse_classes", "select_classes"]

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
    if not input.is_file():
        raise CryolatentError(f"{input}: no such file")
    kind = input.suffix.lower()
    if kind not in (".star", ".cs"):
        raise CryolatentError(f"{input}: select reads a .star or .cs particle file")
    if out.suffix.lower() != kind:
        raise CryolatentError(f"-o {out}: the output of a {kind} input must end in {kind}")
    if out.resolve() == input.resolve():
        raise CryolatentError(f"-o {out}: would overwrite the input; choose another name")

    if kind == ".cs":
        arr = read_cs(input)
        names = arr.dtype.names or ()
        field = next((f for f in ("alignments2D/class", "alignments3D/class") if f in names),
                     None)
        if field is None:
            raise CryolatentError(f"{input}: no alignments2D/class field (run cryolatent embed "
                                  "--clusters K on it first)")
        number = arr[field].astype(np.int64) + 1
    else:
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
    if kind == ".cs":
        write_cs(out, arr[keep])
    else:
        from ..io.particles import image_names_from_cwd

        kept = table.iloc[np.flatnonzero(keep)].reset_index(drop=True)
        write_star(out, image_names_from_cwd(kept, input, datadir), optics)
    log.info("%s: kept %d of %d particles (%s classes %s) -> %s", input, nk, len(keep),
             "dropped" if invert else "kept", ",".join(map(str, classes)), out)
    return out
