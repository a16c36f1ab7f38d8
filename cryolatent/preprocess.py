"""Particle preprocessing: Fourier cropping, RELION-style normalisation, contrast inversion and
phase flipping, plus :func:`preprocess`, which streams a whole particle set through them.

All image transforms are pure functions on ``(n, D, D)`` arrays (numpy or torch; the result
has the input's type). Frequencies follow ``torch.fft`` ordering; the real-space centre of an
image is ``(D//2, D//2)`` (RELION's convention).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import CryolatentError, InputError

__all__ = ["fourier_crop", "normalize", "invert", "phase_flip", "preprocess",
           "PreprocessResult", "background_mask"]

log = logging.getLogger("cryolatent")


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.from_numpy(np.ascontiguousarray(x)), True


def _back(t: torch.Tensor, was_numpy: bool):
    return t.numpy() if was_numpy else t


def _crop_spectrum(images: torch.Tensor, d: int, sign: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Core of :func:`fourier_crop` (and of the phase flip inside :func:`preprocess`).

    images: (n, D, D) real; d: new box (<= D); sign: optional (n, d, d//2+1) multiplier applied
    to the cropped half-spectrum (rfft layout on the d-grid). Returns (n, d, d) real.
    """
    n, D, D2 = images.shape
    if D != D2:
        raise ValueError(f"images must be square, got {D}x{D2}")
    if d > D or d < 1:
        raise ValueError(f"new box {d} must lie in 1..{D}")
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(work)
    h = d // 2
    ncol = h + 1 if d % 2 == 0 else (d + 1) // 2
    # 1. real FFT along x (columns), keep only the columns the d-grid needs
    fx = torch.fft.rfft(x, dim=-1)[..., :ncol]                      # (n, D, ncol)
    # 2. complex FFT along y (rows), keep rows 0..h-1 and -h..-1 (+h folded onto -h for even d)
    fy = torch.fft.fft(fx, dim=-2)                                  # (n, D, ncol)
    if d == D:
        g = fy
    elif d % 2 == 0:
        g = torch.cat([fy[:, :h], fy[:, D - h:]], dim=1)            # (n, d, ncol)
        # the d-grid's Nyquist row holds both +h and -h of the finer grid (they alias)
        g[:, h] += fy[:, h]
    else:
        g = torch.cat([fy[:, :h + 1], fy[:, D - h:]], dim=1)
    if d % 2 == 0 and d < D:
        # same for the Nyquist column; irfft reads it once (real part), while the finer grid
        # holds +h and -h = conj(+h) for a real image: double it
        g[..., h] *= 2
    if sign is not None:
        g = g * sign
    out = torch.fft.irfft(torch.fft.ifft(g, dim=-2), n=d, dim=-1)  # (n, d, d)
    if d != D:
        out.mul_((d / D) ** 2)
    return out


def fourier_crop(images, new_box: int):
    """Fourier-crop (downsample) ``images`` (n, D, D) to ``(n, d, d)``, d = ``new_box`` <= D.

    Keeps the frequencies of the d-grid, so the pixel size becomes ``apix * D / d``; values are
    scaled so a constant image keeps its constant value, and a band-limited image (frequencies
    ``|k| <= d/2`` on the D-grid) comes out equal to the same function sampled on the d-grid.
    For even d the d-grid's Nyquist row/column (where +d/2 and -d/2 alias) receives the sum of
    the finer grid's +d/2 and -d/2 components, i.e. the exact sample values, not half of them.
    Works on numpy arrays or torch tensors (float32 stays float32, float64 stays float64).
    """
    t, was_np = _as_tensor(images)
    squeeze = t.ndim == 2
    if squeeze:
        t = t[None]
    if new_box == t.shape[-1]:
        out = t.clone()
    else:
        out = _crop_spectrum(t, int(new_box)).to(t.dtype if t.is_floating_point() else torch.float32)
    if squeeze:
        out = out[0]
    return _back(out, was_np)


def background_mask(box: int, diameter_fraction: float = 0.75) -> np.ndarray:
    """(box, box) bool: True outside the circle of diameter ``diameter_fraction * box``
    centred on pixel (box//2, box//2) (RELION's background for normalisation)."""
    r = diameter_fraction * box / 2.0
    c = np.arange(box) - box // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) > r * r


def normalize(images, diameter_fraction: float = 0.75):
    """RELION-style normalisation: per image, subtract the mean and divide by the standard
    deviation (population, ddof=0) of the background, the pixels outside a circle of diameter
    ``diameter_fraction * box`` centred at (box//2, box//2).

    images: (n, D, D) (or (D, D)); returns the same shape and type. An image with a constant
    background is only shifted (its standard deviation is taken as 1).
    """
    t, was_np = _as_tensor(images)
    squeeze = t.ndim == 2
    if squeeze:
        t = t[None]
    box = t.shape[-1]
    mask = torch.from_numpy(background_mask(box, diameter_fraction)).to(t.device)
    if not bool(mask.any()):
        raise ValueError(f"no background pixels outside a circle of diameter "
                         f"{diameter_fraction} x {box}")
    bg = t[:, mask].to(torch.float64)                  # (n, m)
    mean = bg.mean(dim=1)
    sd = bg.std(dim=1, correction=0)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    out = (t - mean.to(t.dtype).view(-1, 1, 1)) / sd.to(t.dtype).view(-1, 1, 1)
    if squeeze:
        out = out[0]
    return _back(out, was_np)


def invert(images):
    """Contrast inversion: ``-images`` (same shape and type)."""
    return -images


def phase_flip(images, ctf):
    """Multiply each image's Fourier transform by sign(CTF) (RELION: CTF < 0 -> -1, else +1).

    images: (n, D, D) real; ctf: (n, D, D) or (D, D) CTF values on the *unshifted* FFT grid
    (as :func:`cryolatent.ctf.compute_ctf` returns them by default). Returns (n, D, D), real
    part of the inverse transform. Flipping twice gives the image back.
    """
    t, was_np = _as_tensor(images)
    c, _ = _as_tensor(ctf)
    D = t.shape[-1]
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    sign = torch.where(c[..., : D // 2 + 1] < 0, -1.0, 1.0).to(work)
    f = torch.fft.rfft2(t.to(work))
    out = torch.fft.irfft2(f * sign, s=(D, D)).to(t.dtype)
    return _back(out, was_np)


# --------------------------------------------------------------------------------------------
# streaming over a particle set


@dataclass
class PreprocessResult:
    star: Path
    stacks: list[Path]
    n: int
    box: int
    apix: float
    seconds: float


def _rfft_sign(params, idx: np.ndarray, d: int, apix_new: np.ndarray) -> torch.Tensor:
    """(n, d, d//2+1) float32 sign(CTF) on the cropped grid (rfft layout), RELION's rule."""
    from .ctf import compute_ctf

    out = torch.empty((len(idx), d, d // 2 + 1), dtype=torch.float32)
    for a in np.unique(apix_new):
        sel = np.nonzero(apix_new == a)[0]
        c = compute_ctf(params, d, float(a), idx=idx[sel])[..., : d // 2 + 1]
        out[torch.from_numpy(sel)] = torch.where(c < 0, -1.0, 1.0)
    return out


def _process_chunk(imgs: np.ndarray, d: int, do_norm: bool, do_invert: bool,
                   sign: torch.Tensor | None, diameter_fraction: float) -> np.ndarray:
    """(n, D, D) float32 -> (n, d, d) float32: crop (+ flip), invert, normalise."""
    t = torch.from_numpy(imgs)
    D = t.shape[-1]
    if d == D and sign is None:
        out = t.clone() if not imgs.flags.writeable else t
    else:
        out = _crop_spectrum(t, d, sign=sign)
    if do_invert:
        out = out.neg_()
    if do_norm:
        out = normalize(out, diameter_fraction)
    return out.to(torch.float32).numpy()


def _resolve_stacks(ps) -> set[Path]:
    """Best effort: the files the particle set reads (so outputs never overwrite them)."""
    files: set[Path] = {Path(ps.source).resolve()}
    for attr in ("stack_paths", "stacks", "paths", "files"):
        v = getattr(ps, attr, None)
        if v is None:
            continue
        try:
            vals = list(v.values()) if isinstance(v, dict) else list(v)
            for p in vals:
                if isinstance(p, (str, os.PathLike)):
                    files.add(Path(p).resolve())
        except TypeError:
            pass
    return files


def preprocess(input: str | os.PathLike, outdir: str | os.PathLike, box: int | None = None,
               normalize: bool = True, invert: bool = False, phase_flip: bool = False,
               datadir: str | os.PathLike | None = None, apix: float | None = None,
               chunk: int | None = None, workers: int | None = None,
               diameter_fraction: float = 0.75, stack_name: str = "particles.mrcs",
               star_name: str = "particles.star") -> PreprocessResult:
    """Read a particle set (``.star``, ``.cs``, ``.mrcs``), Fourier-crop to ``box``, optionally
    phase-flip, invert and normalise, and write ``outdir/particles.mrcs`` +
    ``outdir/particles.star`` (RELION 3.1).

    Streams in chunks of ``chunk`` images (default: about 64 MB of input per chunk), with
    ``workers`` chunks processed concurrently (default 2), so memory stays bounded whatever the
    number of particles. Every output image is checked to be finite; the first particle that
    is not is named in the error, and no ``particles.star`` is written. Every input column and
    row is kept; ``rlnImageName`` points to the new stack and the input's name moves to
    ``rlnImageOriginalName`` (kept as it is when it already exists); the optics table's
    ``rlnImagePixelSize`` and ``rlnImageSize`` are updated, and ``rlnCtfDataArePhaseFlipped``
    is set to 1 after phase flipping.
    """
    from . import utils
    from .io import MRCStackWriter, load_particles, write_star

    t0 = time.perf_counter()
    outdir = Path(outdir)
    ps = load_particles(input, datadir=datadir, apix=apix)
    N, D = len(ps), int(ps.box)
    d = D if box is None else int(box)
    if d > D:
        raise InputError(f"--box {d} is larger than the particles' box {D} (only cropping)")
    if d < 2:
        raise InputError(f"--box {d} is too small")
    if d % 2 or D % 2:
        log.warning("odd box size (%d -> %d): RELION expects even boxes", D, d)
    if N == 0:
        raise InputError(f"{input}: no particles")
    apix_in = np.asarray(getattr(ps, "apix_per_particle", None)
                         if getattr(ps, "apix_per_particle", None) is not None
                         else np.full(N, float(ps.apix)), dtype=np.float64).reshape(-1)
    if apix_in.size == 1:
        apix_in = np.full(N, apix_in[0])
    if not np.all(np.isfinite(apix_in) & (apix_in > 0)):
        raise InputError(f"{input}: unknown or invalid pixel size (give --apix)")
    factor = D / d
    apix_out = apix_in * factor

    params = None
    if phase_flip:
        params = ps.ctf()
        if params is None:
            raise InputError(f"{input}: --phase-flip needs CTF parameters (rlnDefocusU, ...), "
                             f"which this particle set does not have")

    # never write over an input file
    outdir.mkdir(parents=True, exist_ok=True)
    star_path, stack_path = outdir / star_name, outdir / stack_name
    inputs = _resolve_stacks(ps)
    for p in (star_path, stack_path):
        if p.resolve() in inputs:
            raise InputError(f"{p}: output would overwrite an input file; choose another -o")

    if chunk is None:
        chunk = max(16, min(4096, (64 << 20) // (4 * D * D)))
    workers = max(1, int(workers if workers is not None else min(2, os.cpu_count() or 1)))
    log.info("preprocess %s: %d particles, box %d -> %d, pixel %.4g -> %.4g A%s%s%s",
             input, N, D, d, float(apix_in[0]), float(apix_out[0]),
             ", normalise" if normalize else "", ", invert" if invert else "",
             ", phase flip" if phase_flip else "")

    names = np.asarray(ps.names)
    starts = list(range(0, N, chunk))

    def job(s: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(s, min(N, s + chunk))
        imgs = ps.images(idx)
        sign = _rfft_sign(params, idx, d, apix_out[idx]) if params is not None else None
        out = _process_chunk(np.asarray(imgs, dtype=np.float32), d, normalize, invert, sign,
                             diameter_fraction)
        return idx, out

    # one intra-op thread per worker when several chunks run at once
    prev_threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(max(1, prev_threads // workers))
    try:
        with MRCStackWriter(stack_path, d, float(apix_out[0])) as w, \
                cf.ThreadPoolExecutor(max_workers=workers) as pool, \
                utils.progress(total=N, desc="preprocess", unit="img") as bar:
            pending: list[cf.Future] = []
            it = iter(starts)
            for s in it:
                pending.append(pool.submit(job, s))
                if len(pending) >= workers + 1:
                    break
            while pending:
                idx, out = pending.pop(0).result()
                bad = ~np.isfinite(out).all(axis=(1, 2))
                if bad.any():
                    i = int(idx[np.argmax(bad)])
                    for f in pending:
                        f.cancel()
                    raise InputError(f"particle {names[i]} (#{i + 1}) has non-finite pixel "
                                     f"values (NaN or Inf)")
                w.write(out)
                bar.update(len(idx))
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(job, nxt))
    finally:
        torch.set_num_threads(prev_threads)

    particles, optics = _output_tables(ps, stack_name, d, factor, phase_flip)
    write_star(star_path, particles, optics)
    dt = time.perf_counter() - t0
    log.info("wrote %s and %s (%d particles, %.1f s)", star_path, stack_path, N, dt)
    return PreprocessResult(star_path, [stack_path], N, d, float(apix_out[0]), dt)


def _output_tables(ps, stack_name: str, d: int, factor: float, flipped: bool):
    import pandas as pd

    N = len(ps)
    particles = ps.table.copy()
    new_names = [f"{i + 1:06d}@{stack_name}" for i in range(N)]
    if "rlnImageName" in particles.columns:
        if "rlnImageOriginalName" not in particles.columns:
            pos = particles.columns.get_loc("rlnImageName") + 1
            particles.insert(pos, "rlnImageOriginalName", particles["rlnImageName"].values)
        particles["rlnImageName"] = new_names
    else:
        particles["rlnImageName"] = new_names
    optics = ps.optics.copy() if getattr(ps, "optics", None) is not None else None
    if optics is None or len(optics) == 0:
        optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1]})
        apix0 = float(ps.apix)
        optics["rlnImagePixelSize"] = apix0
        if "rlnOpticsGroup" not in particles.columns:
            particles["rlnOpticsGroup"] = 1
    if "rlnImagePixelSize" not in optics.columns:
        optics["rlnImagePixelSize"] = float(ps.apix)
    optics["rlnImagePixelSize"] = optics["rlnImagePixelSize"].astype(float) * factor
    optics["rlnImageSize"] = int(d)
    if "rlnImageDimensionality" not in optics.columns:
        optics["rlnImageDimensionality"] = 2
    if flipped:
        optics["rlnCtfDataArePhaseFlipped"] = 1
    return particles, optics
