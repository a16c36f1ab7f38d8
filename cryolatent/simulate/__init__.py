"""Synthetic particle sets with ground truth: MNIST(U)/(N) and cryo-EM projections of atomic models.

Every simulator writes ``OUTDIR/particles.mrcs`` (streamed in chunks) and then, last and
atomically, ``OUTDIR/particles.star`` (RELION 3.1 layout) whose columns hold the truth in
RELION's convention (see :mod:`cryolatent.pose` and ``docs/conventions.md``):
``rlnAnglePsi`` (degrees, (-180, 180]), ``rlnOriginXAngst`` / ``rlnOriginYAngst`` (Å) such
that :func:`cryolatent.pose.align_particles` with them recovers the canonical image, and
``rlnClassNumber`` (1-based) for the true class.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from ..io import MRCStackWriter, write_star
from ..utils import progress, relion_path
from ..utils import resolve_device  # noqa: F401  (used by mnist.py / cryoem.py)

log = logging.getLogger("cryolatent")

STACK_NAME = "particles.mrcs"
STAR_NAME = "particles.star"

#: electron-optical constants written to the optics table (and used for the CTF)
VOLTAGE_KV = 300.0
CS_MM = 2.7
AMPLITUDE_CONTRAST = 0.1


def optics_table(box: int, apix: float) -> pd.DataFrame:
    """The one-row RELION 3.1 optics table of a simulated set."""
    return pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnOpticsGroup": [1],
        "rlnMicrographOriginalPixelSize": [float(apix)],
        "rlnVoltage": [VOLTAGE_KV],
        "rlnSphericalAberration": [CS_MM],
        "rlnAmplitudeContrast": [AMPLITUDE_CONTRAST],
        "rlnImagePixelSize": [float(apix)],
        "rlnImageSize": [int(box)],
        "rlnImageDimensionality": [2],
    })


def image_names(n: int, stack: str = STACK_NAME) -> list[str]:
    """RELION image names ``000001@particles.mrcs`` … (1-based; ``stack`` as given)."""
    return [f"{i + 1:06d}@{stack}" for i in range(n)]


def write_particle_set(outdir: str | os.PathLike, chunks: Iterable[np.ndarray],
                       table: pd.DataFrame, box: int, apix: float,
                       desc: str = "simulate") -> Path:
    """Stream image chunks to ``outdir/particles.mrcs``, then write ``outdir/particles.star``.

    chunks: iterable of (n_i, box, box) float32 arrays whose n_i add up to ``len(table)``,
    in the table's row order. table: the particle rows (truth columns); ``rlnImageName`` and
    ``rlnOpticsGroup`` are added first. The STAR is written only after the stack is complete,
    so an interrupted run never leaves a STAR pointing at a partial stack.
    Returns the STAR path.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(table)
    table = table.copy()
    # relative to the current directory (RELION's project directory) when the stack lies
    # below it, else absolute
    table.insert(0, "rlnImageName", image_names(n, relion_path(out / STACK_NAME)))
    table.insert(1, "rlnOpticsGroup", np.ones(n, dtype=np.int64))
    done = 0
    with MRCStackWriter(out / STACK_NAME, box, apix) as w, \
            progress(total=n, desc=desc, unit="particle") as bar:
        for imgs in chunks:
            imgs = np.asarray(imgs, dtype=np.float32)
            w.write(imgs)
            done += len(imgs)
            bar.update(len(imgs))
    if done != n:  # pragma: no cover - internal consistency
        raise RuntimeError(f"wrote {done} images for {n} rows")
    star = out / STAR_NAME
    write_star(star, table, optics_table(box, apix))
    log.info("wrote %d particles (%d px, %.4g Å/px) to %s", n, box, apix, star)
    return star


def rng_streams(seed: int, k: int) -> list[np.random.Generator]:
    """k independent generators from one seed (one per drawn quantity, so that the first m
    particles of a set of n are the same for every n >= m)."""
    return [np.random.default_rng([int(seed), i]) for i in range(k)]


def chunk_slices(n: int, chunk: int) -> Iterator[slice]:
    for a in range(0, n, chunk):
        yield slice(a, min(n, a + chunk))


from .mnist import simulate_mnist  # noqa: E402
from .cryoem import simulate_cryoem  # noqa: E402

__all__ = ["simulate_mnist", "simulate_cryoem", "write_particle_set", "optics_table",
           "image_names"]
