"""Particle preprocessing: Fourier cropping, RELION-style normalisation, contrast inversion and
phase flipping, plus :func:`preprocess`, which streams a whole particle set through them.

:class:`Preprocessing` describes what was done to the original particles to make a set of
images (box, pixel size, the steps) and applies it (:meth:`Preprocessing.apply`, the one
pipeline of ``preprocess``, ``embed`` and ``classes``). ``preprocess`` writes it into its
output's optics table (``cryolatent*`` columns, which RELION's tools keep); ``train`` records
the description of its training images in ``config.json`` and the checkpoints
(:func:`describe_particles`), so ``embed`` never needs the training set again.

All image transforms are pure functions on ``(n, D, D)`` arrays, numpy or torch (the result
has the input's type and floating dtype; integer input becomes float32). The numpy path never
imports torch, so ``cryolatent preprocess`` without ``--phase-flip`` starts fast. Frequencies
follow ``numpy.fft`` / ``torch.fft`` ordering; the real-space centre of an image is
``(D//2, D//2)`` (RELION's convention).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import utils
from .errors import InputError
from .io import MRCStackWriter, load_particles, write_star

__all__ = ["fourier_crop", "normalize", "invert", "phase_flip", "preprocess", "crop_matrix",
           "PreprocessResult", "background_mask", "background_stats", "looks_normalized",
           "Preprocessing", "describe_particles", "OPTICS_COLUMNS"]

log = logging.getLogger("cryolatent")


def _is_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _float_np(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    return a


def _float_batch(images):
    """``(x, squeeze, tensor)``: ``images`` (n, D, D) or (D, D) as a floating (n, D, D)
    tensor (a torch input) or numpy array (anything else; integers become float32), whether a
    (D, D) input was given a batch axis, and whether x is a tensor. Raises ValueError for
    non-square images."""
    tensor = _is_tensor(images)
    if tensor:
        x = images if images.is_floating_point() else images.float()
    else:
        x = _float_np(images)
    squeeze = x.ndim == 2
    x = x[None] if squeeze else x
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"images must be square, got {tuple(x.shape[-2:])}")
    return x, squeeze, tensor


def _centre_phase(D: int, d: int, k: np.ndarray) -> np.ndarray:
    """exp(2πi·k·s), s = (D//2)/D − (d//2)/d: the phase that moves the FFT origin of both
    grids to their centres (RELION's CenterFFT on the D-grid before the crop and on the d-grid
    after it), so the sample at D//2 lands on d//2. All ones when D and d are both even."""
    s = (D // 2) / D - (d // 2) / d
    return np.exp(2j * np.pi * np.asarray(k, dtype=np.float64) * s)


@functools.lru_cache(maxsize=16)
def crop_matrix(D: int, d: int) -> np.ndarray:
    """The 1-D Fourier-crop operator as a real ``(d, D)`` float64 matrix ``A``.

    ``A @ v`` keeps the frequencies ``|k| <= d/2`` of the length-D signal v and samples its
    band-limited interpolant f on the d-grid, centre on centre: output j = f(D//2 +
    (j − d//2)·D/d) (so input position x goes to (x − D//2)·d/D + d//2, for even and odd
    boxes), scaled so a constant stays the same constant. For even d < D the d-grid's Nyquist
    bin receives the +d/2 and -d/2 components together (they alias there). The 2-D crop is
    separable: ``A @ x @ A.T``.
    """
    if not 1 <= d <= D:
        raise ValueError(f"new box {d} must lie in 1..{D}")
    if d == D:
        return np.eye(D)
    k = np.fft.fftfreq(D, 1.0 / D)                         # signed frequency of each row
    F = np.fft.fft(np.eye(D), axis=0) * _centre_phase(D, d, k)[:, None]   # (D, D)
    h = d // 2
    G = np.zeros((d, D), dtype=np.complex128)
    if d % 2 == 0:
        G[:h] = F[:h]                                      # 0 .. h-1
        G[h + 1:] = F[D - h + 1:]                          # -(h-1) .. -1
        G[h] = F[h] + F[D - h]                             # +h and -h alias on the d-grid
    else:
        G[:h + 1] = F[:h + 1]
        G[h + 1:] = F[D - h:]
    # the kept frequencies are conjugate-symmetric, so the samples are real (up to rounding)
    return np.fft.ifft(G, axis=0).real * (d / D)


def _crop_np(x: np.ndarray, d: int) -> np.ndarray:
    """(n, D, D) float32/64 -> (n, d, d): ``A @ x @ A.T`` as two large GEMMs."""
    n, D, _ = x.shape
    At = np.ascontiguousarray(crop_matrix(D, d).T, dtype=x.dtype)     # (D, d)
    y = (np.ascontiguousarray(x).reshape(n * D, D) @ At).reshape(n, D, d)
    z = np.ascontiguousarray(y.transpose(0, 2, 1)).reshape(n * d, D) @ At
    return np.ascontiguousarray(z.reshape(n, d, d).transpose(0, 2, 1))


def _crop_torch(x, d: int):
    """torch version: GEMMs on the CPU; on accelerators FFTs (TF32 matrix products would lose
    precision). Same result as :func:`_crop_np`."""
    import torch

    n, D, _ = x.shape
    if x.device.type == "cpu":
        At = torch.from_numpy(np.ascontiguousarray(crop_matrix(D, d).T)).to(x.dtype)
        y = (x.reshape(n * D, D) @ At).view(n, D, d)
        z = y.transpose(1, 2).reshape(n * d, D) @ At
        return z.view(n, d, d).transpose(1, 2).contiguous()
    return _crop_torch_fft(x, d)


def _crop_torch_fft(x, d: int):
    """FFT crop, (n, D, D) real tensor -> (n, d, d); equals ``A @ x @ A.T``."""
    import torch

    D = x.shape[-1]
    h = d // 2
    ncol = h + 1 if d % 2 == 0 else (d + 1) // 2
    fy = torch.fft.fft(torch.fft.rfft(x, dim=-1)[..., :ncol], dim=-2)   # (n, D, ncol)
    if (D % 2, d % 2) != (0, 0):       # centre on centre (no-op between even boxes)
        ctype = fy.dtype
        rows = torch.from_numpy(_centre_phase(D, d, np.fft.fftfreq(D, 1.0 / D)))
        cols = torch.from_numpy(_centre_phase(D, d, np.arange(ncol)))
        fy = fy * rows.to(fy.device, ctype)[:, None] * cols.to(fy.device, ctype)
    if d % 2 == 0:
        g = torch.cat([fy[:, :h], fy[:, D - h:]], dim=1)              # (n, d, ncol)
        g[:, h] += fy[:, h]      # the d-grid's Nyquist row holds +h and -h (they alias)
    else:
        g = torch.cat([fy[:, :h + 1], fy[:, D - h:]], dim=1)
    g = torch.fft.ifft(g, dim=-2)
    if d % 2 == 0:
        # the Nyquist column holds +h and -h = conj(+h): 2 Re(+h), given to irfft as real
        g[..., h] = torch.complex(2 * g[..., h].real, torch.zeros_like(g[..., h].real))
    return torch.fft.irfft(g, n=d, dim=-1).mul_((d / D) ** 2)


def fourier_crop(images, new_box: int):
    """Fourier-crop (downsample) ``images`` (n, D, D) (or (D, D)) to ``(n, d, d)``,
    d = ``new_box`` <= D.

    Keeps the frequencies of the d-grid, so the pixel size becomes ``apix * D / d``; values are
    scaled so a constant image keeps its constant value, and a band-limited image (frequencies
    ``|k| <= d/2`` on the D-grid) comes out equal to the same function sampled on the d-grid.
    The grids are aligned on RELION's centre: input pixel (D//2, D//2) goes to output pixel
    (d//2, d//2), and input position x to (x − D//2)·d/D + d//2, for even and odd boxes alike
    (the phase origin of both FFTs is the image centre, as with RELION's CenterFFT), so a
    rotation centre and origins in Å stay valid after the crop.
    For even d the d-grid's Nyquist row/column (where +d/2 and -d/2 alias) receives the sum of
    the finer grid's +d/2 and -d/2 components, i.e. the exact sample values. numpy or torch
    in, same out; float32 stays float32, float64 stays float64.
    """
    d = int(new_box)
    x, squeeze, tensor = _float_batch(images)
    D = x.shape[-1]
    if not 1 <= d <= D:
        raise ValueError(f"new box {d} must lie in 1..{D}")
    if d == D:
        out = x.clone() if tensor else x.copy()
    else:
        out = _crop_torch(x, d) if tensor else _crop_np(x, d)
    return out[0] if squeeze else out


def background_mask(box: int, diameter_fraction: float = 0.75) -> np.ndarray:
    """(box, box) bool: True outside the circle of diameter ``diameter_fraction * box``
    centred on pixel (box//2, box//2) (RELION's background for normalisation)."""
    from .masks import circular_mask_np

    return circular_mask_np(box, diameter_fraction * box / 2.0, outside=True)


def normalize(images, diameter_fraction: float = 0.75):
    """RELION-style normalisation: per image, subtract the mean and divide by the standard
    deviation (population, ddof=0) of the background, the pixels outside a circle of diameter
    ``diameter_fraction * box`` centred at (box//2, box//2).

    images: (n, D, D) (or (D, D)), numpy or torch; returns the same shape and type. Statistics
    are accumulated in float64. An image with a constant background is only shifted (its
    standard deviation is taken as 1).
    """
    box = images.shape[-1]
    mask = background_mask(box, diameter_fraction)
    if not mask.any():
        raise ValueError(f"no background pixels outside a circle of diameter "
                         f"{diameter_fraction} x {box}")
    x, squeeze, tensor = _float_batch(images)
    if tensor:
        import torch

        bg = x[:, torch.from_numpy(mask).to(x.device)].to(torch.float64)   # (n, m)
        mean = bg.mean(dim=1)
        sd = bg.std(dim=1, correction=0)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        out = (x - mean.to(x.dtype).view(-1, 1, 1)) / sd.to(x.dtype).view(-1, 1, 1)
    else:
        bg = x[:, mask]                                                    # (n, m)
        mean = bg.mean(axis=1, dtype=np.float64)
        sd = bg.std(axis=1, dtype=np.float64)
        sd[~(sd > 0)] = 1.0
        out = (x - mean.astype(x.dtype)[:, None, None]) * \
            (1.0 / sd).astype(x.dtype)[:, None, None]
    return out[0] if squeeze else out


def invert(images):
    """Contrast inversion: ``-images`` (same shape and type)."""
    return -images


def _sign(ctf_half):
    """RELION's phase-flip rule on CTF values: -1 where CTF < 0, else +1."""
    if _is_tensor(ctf_half):
        import torch

        return torch.where(ctf_half < 0, -1.0, 1.0)
    return np.where(np.asarray(ctf_half) < 0, -1.0, 1.0)


def phase_flip(images, ctf):
    """Multiply each image's Fourier transform by sign(CTF) (RELION: CTF < 0 -> -1, else +1).

    images: (n, D, D) real, numpy or torch; ctf: (n, D, D) or (D, D) CTF values on the
    *unshifted* FFT grid (as :func:`cryolatent.ctf.compute_ctf` returns them by default).
    Returns (n, D, D) of the images' type. Flipping twice gives the image back.
    """
    D = images.shape[-1]
    if _is_tensor(images):
        import torch

        t = images if images.is_floating_point() else images.float()
        c = torch.as_tensor(ctf, device=t.device)
        sign = _sign(c[..., : D // 2 + 1]).to(t.dtype)
        return torch.fft.irfft2(torch.fft.rfft2(t) * sign, s=(D, D)).to(t.dtype)
    a = _float_np(images)
    c = ctf.detach().cpu().numpy() if _is_tensor(ctf) else np.asarray(ctf)
    sign = _sign(c[..., : D // 2 + 1]).astype(a.dtype)
    return np.fft.irfft2(np.fft.rfft2(a) * sign, s=(D, D)).astype(a.dtype, copy=False)


def background_stats(images, diameter_fraction: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (n,) float64 (ddof 0) of each image's background: the
    pixels of ``images`` (n, D, D) (numpy or torch) outside :func:`background_mask`."""
    x = images.detach().cpu().numpy() if _is_tensor(images) else np.asarray(images)
    x = x[None] if x.ndim == 2 else x
    v = x[:, background_mask(x.shape[-1], diameter_fraction)].astype(np.float64)
    return v.mean(1), v.std(1)


def looks_normalized(images, diameter_fraction: float = 0.75) -> bool:
    """True when the images' backgrounds are RELION-normalised (median mean ~0, sd ~1)."""
    m, s = background_stats(images, diameter_fraction)
    return bool(len(m)) and bool(abs(np.median(m)) < 0.1 and abs(np.median(s) - 1.0) < 0.1)


def _flip_rfft(x, sign: np.ndarray):
    """(n, d, d) real images times ``sign`` (n, d, d//2+1) in the rfft layout (numpy or torch;
    the images' type and dtype)."""
    d = x.shape[-1]
    if _is_tensor(x):
        import torch

        s = torch.from_numpy(np.ascontiguousarray(sign)).to(x.device, x.dtype)
        return torch.fft.irfft2(torch.fft.rfft2(x) * s, s=(d, d)).to(x.dtype)
    return np.fft.irfft2(np.fft.rfft2(x) * sign.astype(x.dtype, copy=False),
                         s=(d, d)).astype(x.dtype, copy=False)


#: the optics columns in which ``preprocess`` records its :class:`Preprocessing` (RELION's
#: tools keep unknown labels: relion_star_handler "will ignore (but maintain)" them)
OPTICS_COLUMNS = {"original_box": "cryolatentOriginalImageSize",
                  "phase_flip": "cryolatentPhaseFlipped",
                  "invert": "cryolatentInverted",
                  "normalize": "cryolatentNormalized",
                  "diameter_fraction": "cryolatentNormalizeDiameter"}

#: where a description comes from (:attr:`Preprocessing.source`)
SOURCES = ("preprocess", "stored", "inferred")


@dataclass(frozen=True)
class Preprocessing:
    """What makes a set of images (a run's training images) from the original particles.

    box: the images' box (px); apix: their pixel size (Å, the median over optics groups;
    None when unknown); original_box: the box of the particles they were made from (None:
    not recorded). The steps, in the order :meth:`apply` runs them (``preprocess``'s): a
    Fourier crop to ``box`` (whenever the input's box is larger), ``phase_flip`` (each
    image's Fourier transform times the sign of its CTF at the cropped pixel size, RELION's
    rule), ``invert`` (contrast), ``normalize`` (RELION background normalisation outside the
    circle of diameter ``diameter_fraction`` × box).

    source: "preprocess" (written by ``cryolatent preprocess``: the steps it ran), "stored"
    (a set not made by ``preprocess``, used as stored (``train``'s loader only converts to
    float32): the flags say what the images are, judged when the run was trained:
    ``rlnCtfDataArePhaseFlipped``, RELION-normalised backgrounds), "inferred" (a run that
    recorded none: judged from its training set when it was embedded).

    Only plain values: :meth:`to_dict` goes into ``config.json`` and the checkpoints (which
    load with ``torch.load(weights_only=True)``).
    """

    box: int
    apix: float | None = None
    original_box: int | None = None
    phase_flip: bool = False
    invert: bool = False
    normalize: bool = False
    diameter_fraction: float = 0.75
    source: str = "preprocess"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """From :meth:`to_dict`'s dict (unknown keys are ignored); ValueError when malformed."""
        try:
            known = {f.name for f in fields(cls)}
            v = {k: d[k] for k in known if k in d}
            out = cls(box=int(v.pop("box")),
                      apix=None if v.get("apix") is None else float(v.pop("apix")),
                      original_box=None if v.get("original_box") is None
                      else int(v.pop("original_box")),
                      **{k: bool(v[k]) for k in ("phase_flip", "invert", "normalize") if k in v},
                      **({"diameter_fraction": float(v["diameter_fraction"])}
                         if "diameter_fraction" in v else {}),
                      **({"source": str(v["source"])} if "source" in v else {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not a preprocessing description: {d!r} ({e})") from None
        if out.box < 1:
            raise ValueError(f"not a preprocessing description: box {out.box}")
        return out

    def steps(self, box_in: int | None = None) -> list[str]:
        """The steps :meth:`apply` runs on images of box ``box_in``, in words."""
        b = self.original_box if box_in is None else box_in
        out = [f"Fourier crop {b} -> {self.box} px"] if b and b != self.box else []
        out += [w for w, on in (("phase flip", self.phase_flip), ("invert", self.invert),
                                ("normalise", self.normalize)) if on]
        return out

    def then(self, later: "Preprocessing") -> "Preprocessing":
        """The description of ``later`` run on images this one describes (``preprocess`` of a
        preprocessed set). Exact unless this one normalises and ``later`` does not (a crop
        or flip of normalised images is not normalised any more): then a warning."""
        if self.normalize and not later.normalize and (later.box != self.box
                                                       or later.phase_flip):
            log.warning("the input was normalised and is now cropped or flipped without "
                        "--normalize: embed will normalise the originals after the crop")
        return replace(later, original_box=self.original_box or later.original_box,
                       phase_flip=self.phase_flip != later.phase_flip,
                       invert=self.invert != later.invert,
                       normalize=self.normalize or later.normalize,
                       diameter_fraction=(later.diameter_fraction if later.normalize
                                          else self.diameter_fraction))

    def apply(self, images, apix=None, ctf=None, idx=None):
        """``images`` (n, D, D) (or (D, D)), numpy or torch, made into this description's
        images: Fourier crop to ``box`` when D > box, then phase flip, invert and normalise
        where they are on. The one pipeline of ``preprocess``, ``embed`` and ``classes``.

        apix: the input's pixel size in Å, scalar or (n,), and ctf: the particle set's
        :class:`cryolatent.ctf.CTFParams`, with idx (n,) the images' rows in it (default
        0..n-1): needed only for the phase flip (each CTF at the cropped pixel size
        apix × D / box). Same type out; numpy float32 stays float32, integers become
        float32; an input that needs no step is returned as it is.
        """
        x, squeeze, tensor = _float_batch(images)
        n, D, d = x.shape[0], x.shape[-1], int(self.box)
        if D < d:
            raise ValueError(f"images of box {D} px are smaller than the {d} px to make")
        out = x if D == d else (_crop_torch(x, d) if tensor else _crop_np(x, d))
        if self.phase_flip:
            if ctf is None or apix is None:
                raise ValueError("the phase flip needs the particles' CTF and pixel size")
            rows = np.arange(n) if idx is None else np.asarray(idx).reshape(-1)
            apix_new = np.broadcast_to(np.asarray(apix, dtype=np.float64) * (D / d), (n,))
            out = _flip_rfft(out, _rfft_sign(ctf, rows, d, apix_new))
        if self.invert:
            if out is x:
                out = -out
            elif tensor:
                out.neg_()
            else:
                np.negative(out, out=out)
        if self.normalize:
            out = normalize(out, self.diameter_fraction)
        return out[0] if squeeze else out

    def to_optics(self, optics):
        """``optics`` (DataFrame) with this description's :data:`OPTICS_COLUMNS` set."""
        o = optics.copy()
        for k, col in OPTICS_COLUMNS.items():
            v = getattr(self, k)
            o[col] = (float(v) if k == "diameter_fraction" else
                      int(v) if v is not None else int(self.box))
        return o


def _optics_description(ps) -> Preprocessing | None:
    """The description ``preprocess`` wrote into ``ps``'s optics table, or None."""
    optics = getattr(ps, "optics", None)
    if optics is None or OPTICS_COLUMNS["normalize"] not in getattr(optics, "columns", ()):
        return None
    try:
        v = {k: ps.optics_value(col)[0] for k, col in OPTICS_COLUMNS.items()
             if col in optics.columns}
        return Preprocessing(
            box=int(ps.box), apix=float(np.median(ps.apix_per_particle)),
            original_box=int(float(v.get("original_box", ps.box))),
            **{k: float(v[k]) > 0.5 for k in ("phase_flip", "invert", "normalize") if k in v},
            diameter_fraction=float(v.get("diameter_fraction", 0.75)), source="preprocess")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        log.warning("%s: unreadable cryolatent preprocessing columns (%s); ignored",
                    getattr(ps, "source", "particles"), e)
        return None


def describe_particles(ps, sample: int = 64, source: str = "stored") -> Preprocessing:
    """The :class:`Preprocessing` of a particle set ``ps`` (a ParticleSet, or anything with
    ``images(idx)``, ``box`` and ``len``, e.g. :class:`cryolatent.data.ParticleData`).

    The one ``preprocess`` wrote into its optics table when there is one; otherwise what the
    images are as stored (``source``): their box and pixel size, phase-flipped when
    ``rlnCtfDataArePhaseFlipped`` says so, normalised when up to ``sample`` of them (evenly
    spread) have RELION-normalised backgrounds (:func:`looks_normalized`).
    """
    desc = _optics_description(ps)
    if desc is not None:
        return desc
    n = len(ps)
    k = min(n, int(sample))
    idx = np.unique(np.linspace(0, n - 1, k).round().astype(np.int64)) if k else \
        np.zeros(0, np.int64)
    normed = looks_normalized(np.asarray(ps.images(idx))) if k else False
    apix = getattr(ps, "apix_per_particle", None)
    if apix is not None:
        apix = float(np.median(apix))
    else:
        apix = getattr(ps, "apix", None)
        apix = float(apix) if apix is not None else None
    flag = getattr(ps, "optics_flag", None)
    flipped = bool(flag("rlnCtfDataArePhaseFlipped").any()) if flag is not None else False
    return Preprocessing(box=int(ps.box), apix=apix, phase_flip=flipped, normalize=normed,
                         source=source)


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
    preprocessing: Preprocessing | None = None    # recorded in the output's optics table


def _rfft_sign(params, idx: np.ndarray, d: int, apix_new: np.ndarray) -> np.ndarray:
    """(n, d, d//2+1) float32 sign(CTF) on the cropped grid (rfft layout), RELION's rule."""
    from .ctf import compute_ctf

    out = np.empty((len(idx), d, d // 2 + 1), dtype=np.float32)
    for a in np.unique(apix_new):
        sel = np.nonzero(apix_new == a)[0]
        c = compute_ctf(params, d, float(a), idx=idx[sel])[..., : d // 2 + 1].numpy()
        out[sel] = np.where(c < 0, -1.0, 1.0)
    return out


def _blas_threads(n: int):
    """Limit BLAS/OpenMP threads while ``workers`` chunks run at once (no oversubscription)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=n)


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
        params = ps.ctf_params()
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
    ncpu = utils.current_threads()   # -j/--threads, else the cores this process may use
    workers = max(1, int(workers if workers is not None else min(2, ncpu)))
    log.info("preprocess %s: %d particles, box %d -> %d, pixel %.4g -> %.4g Å%s%s%s",
             input, N, D, d, float(apix_in[0]), float(apix_out[0]),
             ", normalise" if normalize else "", ", invert" if invert else "",
             ", phase flip" if phase_flip else "")

    names = np.asarray(ps.names)
    starts = list(range(0, N, chunk))
    # what this run does, and what the output is relative to the input's originals (an input
    # made by preprocess already), recorded in the output's optics table
    steps = Preprocessing(box=d, apix=float(np.median(apix_out)), original_box=D,
                          phase_flip=phase_flip, invert=invert, normalize=normalize,
                          diameter_fraction=diameter_fraction)
    before = _optics_description(ps)
    record = before.then(steps) if before is not None else steps

    def job(s: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(s, min(N, s + chunk))
        imgs = ps.images(idx)        # InputError naming a particle with NaN/Inf pixels
        release = getattr(ps, "release", None)
        if release is not None:      # one pass: drop the chunk's mapped pages (bounded RSS)
            release(idx)
        out = steps.apply(np.asarray(imgs, dtype=np.float32), apix_in[idx], params, idx)
        return idx, np.asarray(out, dtype=np.float32)

    # the threads are shared among the workers (one BLAS thread each on 2 cores)
    # The STAR is written to its temporary name before the stack is renamed into place, so a
    # failure anywhere (bad particle, full disk, Ctrl-C) leaves both previous files as they
    # were, and a finished run never pairs a new stack with an old STAR.
    # image names relative to the current directory (RELION's project directory) when the
    # stack lies below it, else absolute
    particles, optics = _output_tables(ps, utils.relion_path(stack_path), d, factor,
                                       phase_flip)
    optics = record.to_optics(optics)
    with _blas_threads(max(1, ncpu // workers)), utils.atomic_path(star_path) as star_tmp:
        with MRCStackWriter(stack_path, d, float(apix_out[0])) as w, \
                cf.ThreadPoolExecutor(max_workers=workers) as pool, \
                utils.progress(total=N, desc="preprocess", unit="img") as bar:
            pending: list[cf.Future] = []
            it = iter(starts)
            for s in it:
                pending.append(pool.submit(job, s))
                if len(pending) >= workers + 1:
                    break
            try:
                while pending:
                    idx, out = pending.pop(0).result()
                    bad = ~np.isfinite(out).all(axis=(1, 2))
                    if bad.any():
                        i = int(idx[np.argmax(bad)])
                        raise InputError(f"{input}: particle {names[i]} (#{i + 1}) has "
                                         f"non-finite pixel values (NaN or Inf) after "
                                         f"preprocessing")
                    w.write(out)
                    bar.update(len(idx))
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(job, nxt))
            except BaseException:
                for f in pending:  # stop queued chunks; the writer then removes its temp file
                    f.cancel()
                raise
            write_star(star_tmp, particles, optics)

    dt = time.perf_counter() - t0
    log.info("wrote %s and %s (%d particles, %.1f s)", star_path, stack_path, N, dt)
    return PreprocessResult(star_path, [stack_path], N, d, float(apix_out[0]), dt, record)


def _output_tables(ps, stack_name: str, d: int, factor: float, flipped: bool):
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
