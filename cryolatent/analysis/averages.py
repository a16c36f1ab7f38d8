"""Aligned class averages: the particles of each class aligned by their poses and averaged.

Every particle of class k is aligned with its inferred pose by
:func:`cryolatent.pose.align_particles` (RELION's ``--apply_transformation``, the function
``embed`` uses) and averaged, at the resolution of the particle set given (the unbinned set
gives full-resolution averages: shifts in Å are converted with that set's pixel size).
Particles are streamed in batches; memory is bounded by the accumulators,
``K × D × (D//2+1)`` complex128 plus as much real float64 (≈ 24·K·D²/2 bytes: 100 classes
of 512 px ≈ 310 MB), whatever the number of particles.

With CTF parameters the averages are CTF-corrected by a Wiener filter, as RELION's class
averages are::

    A_k(f) = Σ_i c_i(f) F_i(f) / (Σ_i c_i(f)² + 1/SNR)

where F_i is the Fourier transform of the *aligned* particle i of class k and c_i its CTF
in the aligned frame (rotating an image by R(ψ) rotates its CTF: the astigmatism angle
becomes ``rlnDefocusAngle + ψ``; shifts do not change c_i). ``1/SNR`` is the Wiener
regulariser: SNR is the per-particle spectral signal-to-noise ratio, assumed the same at
every frequency (``wiener_snr``, default 0.1, a typical value for cryo-EM particles;
RELION estimates it per resolution shell instead). It keeps CTF zeros from blowing up and
damps frequencies that few particles measure; for classes with Σc² ≫ 1/SNR the average
tends to the full CTF correction. The result has no CTF phase flips. Particles that were
phase-flipped already (optics ``rlnCtfDataArePhaseFlipped`` = 1) use |c_i| in the
numerator; CTF-premultiplied ones (``rlnCtfDataAreCtfPremultiplied`` = 1) use F_i alone.
Without CTF parameters the average is the plain mean of the aligned particles.

Used by ``classes`` (:mod:`cryolatent.analysis.class_averages`) and by the trust checks
(:func:`cryolatent.analysis.trust.half_set_averages`), so both judge the same averages.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from ..ctf import compute_ctf
from ..errors import CryolatentError
from ..pose import POSE_COLUMNS, align_particles
from ..utils import progress

__all__ = ["WIENER_SNR", "class_labels", "table_poses", "aligned_class_averages"]

log = logging.getLogger("cryolatent")

#: default per-particle spectral SNR of the Wiener filter (regulariser 1/SNR)
WIENER_SNR = 0.1


def class_labels(table, source: str = "table") -> np.ndarray:
    """(N,) int64 class numbers (1-based) from ``rlnClassNumber``; one-line error otherwise."""
    if "rlnClassNumber" not in table:
        raise CryolatentError(f"{source}: no rlnClassNumber column; run `cryolatent embed "
                              f"--clusters K` to assign classes")
    lab = _numbers(table["rlnClassNumber"])
    bad = ~np.isfinite(lab) | (lab != np.round(lab))
    if bad.any():
        raise CryolatentError(f"{source}: rlnClassNumber of particle {int(np.flatnonzero(bad)[0])} "
                              f"(0-based) is not an integer")
    return lab.astype(np.int64)


def _numbers(col) -> np.ndarray:
    """(N,) float64 of a table column; text becomes NaN (reported by the caller)."""
    return pd.to_numeric(pd.Series(col), errors="coerce").to_numpy(dtype=np.float64)


def table_poses(table, source: str) -> tuple[np.ndarray, np.ndarray]:
    """psi (N,) degrees and shift (N, 2) Å from the pose columns."""
    for c in POSE_COLUMNS:
        if c not in table:
            raise CryolatentError(f"{source}: no {c} column; run `cryolatent embed` first")
    psi = _numbers(table["rlnAnglePsi"])
    shift = np.stack([_numbers(table["rlnOriginXAngst"]),
                      _numbers(table["rlnOriginYAngst"])], axis=1)
    bad = ~(np.isfinite(psi) & np.isfinite(shift).all(axis=1))
    if bad.any():
        raise CryolatentError(f"{source}: pose of particle {int(np.flatnonzero(bad)[0])} "
                              f"(0-based) is not a finite number")
    return psi, shift


def aligned_class_averages(particle_set, table=None, *, n_classes: int | None = None,
                           batch_size: int = 256, ctf: bool | str = "auto",
                           wiener_snr: float = WIENER_SNR, device: str | torch.device = "cpu",
                           method: str = "bilinear", show_progress: bool = True
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Average the aligned particles of each class (CTF-corrected when the set has a CTF).

    particle_set: a :class:`cryolatent.io.ParticleSet` (box D, pixel size ``apix`` Å).
    table: DataFrame with one row per particle of the set, in the set's order, holding
    ``rlnAnglePsi`` (°), ``rlnOriginXAngst``/``YAngst`` (Å) and ``rlnClassNumber``; default
    ``particle_set.table``. Rows with a class number < 1 are left out.
    ctf: ``"auto"`` (Wiener-correct when the set has CTF parameters), True (require them) or
    False (plain mean). wiener_snr: the SNR of the regulariser 1/SNR (module docstring).
    Returns ``(averages (K, D, D) float32, counts (K,) int64)``; class k is ``averages[k-1]``,
    K = ``n_classes`` or the largest class number.
    """
    table = particle_set.table if table is None else table
    n = len(particle_set)
    if len(table) != n:
        raise CryolatentError(f"{len(table)} pose rows for {n} particles")
    src = str(getattr(particle_set, "source", "particles"))
    labels = class_labels(table, src)
    psi, shift_A = table_poses(table, src)
    shift_px = shift_A / particle_set.apix_per_particle[:, None]
    K = int(n_classes if n_classes is not None else max(int(labels.max(initial=0)), 0))
    if K < 1:
        raise CryolatentError(f"{src}: no particle has a class number >= 1")
    keep = np.flatnonzero((labels >= 1) & (labels <= K))
    D = int(particle_set.box)
    apix = float(particle_set.apix)
    dev = torch.device(device)

    params = particle_set.ctf_params() if ctf in ("auto", True) else None
    if ctf is True and params is None:
        raise CryolatentError(f"{src}: CTF correction asked for but the particles have no "
                              f"CTF parameters")
    flipped = premult = None
    if params is not None:
        if wiener_snr <= 0:
            raise CryolatentError("--wiener-snr must be > 0")
        flipped = particle_set.optics_flag("rlnCtfDataArePhaseFlipped")
        premult = particle_set.optics_flag("rlnCtfDataAreCtfPremultiplied")
        log.info("CTF-corrected class averages (Wiener, 1/SNR = %g)", 1.0 / wiener_snr)
        params_aligned = params.subset(slice(None))
        # the CTF in the aligned frame: rotating by R(psi) turns the astigmatism by +psi
        params_aligned.astigmatism = params.astigmatism + psi
        num = torch.zeros((K, D, D // 2 + 1), dtype=torch.complex128, device=dev)
        den = torch.zeros((K, D, D // 2 + 1), dtype=torch.float64, device=dev)
    else:
        acc = torch.zeros((K, D, D), dtype=torch.float64, device=dev)
    counts = np.bincount(labels[keep] - 1, minlength=K).astype(np.int64)

    bar = progress(total=len(keep), desc="class averages", unit="particle",
                   disable=None if show_progress else True)
    for idx, imgs in particle_set.iter_batches(batch_size, indices=keep, prefetch=2):
        idx = np.asarray(idx, dtype=np.int64)
        x = torch.as_tensor(np.asarray(imgs, dtype=np.float32), device=dev)
        al = align_particles(x, torch.as_tensor(psi[idx]), torch.as_tensor(shift_px[idx]),
                             method=method).to(torch.float64)
        lab = torch.as_tensor(labels[idx] - 1, device=dev)
        if params is None:
            acc.index_add_(0, lab, al)
        else:
            c = compute_ctf(params_aligned, D, apix, idx=idx, device=dev,
                            dtype=torch.float64)[..., : D // 2 + 1]
            f = torch.fft.rfft2(al)
            w = c
            if flipped is not None and flipped[idx].any():
                fl = torch.as_tensor(flipped[idx], device=dev)[:, None, None]
                w = torch.where(fl, c.abs(), c)
            if premult is not None and premult[idx].any():
                pm = torch.as_tensor(premult[idx], device=dev)[:, None, None]
                w = torch.where(pm, torch.ones_like(c), w)
            num.index_add_(0, lab, f * w)
            den.index_add_(0, lab, c * c)
        bar.update(len(idx))
    bar.close()

    if params is None:
        avg = acc / torch.as_tensor(np.maximum(counts, 1), dtype=torch.float64,
                                    device=dev)[:, None, None]
    else:
        avg = torch.fft.irfft2(num / (den + 1.0 / wiener_snr), s=(D, D))
        avg[torch.as_tensor(counts == 0, device=dev)] = 0.0
    return avg.float().cpu().numpy(), counts
