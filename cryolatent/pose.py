"""RELION's in-plane pose convention, as pure (batched) torch image transforms.

Convention (SPEC.md, RELION's ``relion_stack_create --apply_transformation``):

* An image is an array ``img[row, col]``; pixel (0, 0) is the top-left (first pixel in the MRC
  file), ``x`` is the column, ``y`` the row. Coordinates are taken relative to the rotation
  centre ``(N//2, N//2)`` (for even N the pixel right/below the geometric middle, for odd N
  the middle pixel): ``x = col - N//2``, ``y = row - N//2``.
* ``R(psi) = [[cos psi, -sin psi], [sin psi, cos psi]]`` acts on column vectors ``(x, y)``.
  (With y pointing down, a positive psi turns an image content clockwise on screen.)
* ``t = (rlnOriginX, rlnOriginY)`` in pixels (``rlnOriginXAngst / pixel size``).
* RELION aligns a particle by shifting it by ``+t`` and then rotating it by ``R(psi)``::

      aligned(R(psi) (x + t)) = particle(x)

  so a particle is made from the aligned (canonical) image by
  ``particle(x) = canonical(R(psi)(x + t))`` and the particle's centre sits at ``-t``.

Interpolation
-------------
``method="bilinear"`` (default): every output pixel centre is mapped to a point of the input
and the input is bilinearly interpolated there (``torch.nn.functional.grid_sample`` with
``align_corners=True``: normalised coordinate -1 is the centre of pixel 0 and +1 the centre of
pixel N-1, so pixel centres map exactly onto pixel centres). Points outside the input read 0
(``padding_mode="zeros"``; within one pixel of the border the zero pixels outside take part in
the interpolation, where RELION writes 0 as soon as a point leaves the last pixel centre —
the two differ only in the outermost pixel ring). Source coordinates are computed in float64;
when every one of them is an integer (multiples of 90° with integer shifts, the identity) the
images are gathered instead of interpolated, so those transforms are exact.

``method="fourier"``: the shift is applied as a Fourier phase ramp (exact for band-limited
images, periodic: what leaves one side enters at the other) and the rotation bilinearly, in
RELION's order (align: shift then rotate; transform_to_particle: rotate then shift).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Method = Literal["bilinear", "fourier"]

#: the STAR columns of a particle's in-plane pose: psi (degrees) and the origin (Å)
POSE_COLUMNS = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")

__all__ = [
    "POSE_COLUMNS", "rotation_matrix", "wrap_deg", "wrap_deg_180", "px_to_angstrom", "angstrom_to_px",
    "centre_offsets_px", "transform_to_particle", "align_particles", "fourier_shift",
    "rotate_images", "model_pose_to_input", "shift_ramp",
]


# ----------------------------------------------------------------------------- helpers

def _as_tensor(a, like: torch.Tensor | None = None, dtype=torch.float64) -> torch.Tensor:
    device = like.device if like is not None else None
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=dtype, device=device)


def _cos_sin_deg(psi_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angles in degrees (float64), exact (0, ±1) at multiples of 90°."""
    psi = psi_deg.to(torch.float64)
    rad = torch.deg2rad(psi)
    c, s = torch.cos(rad), torch.sin(rad)
    q = psi / 90.0
    exact = torch.isclose(q, torch.round(q), rtol=0.0, atol=1e-12)
    k = torch.remainder(torch.round(q), 4)
    c_ex = torch.where(k == 0, 1.0, torch.where(k == 2, -1.0, 0.0)).to(torch.float64)
    s_ex = torch.where(k == 1, 1.0, torch.where(k == 3, -1.0, 0.0)).to(torch.float64)
    return torch.where(exact, c_ex, c), torch.where(exact, s_ex, s)


def rotation_matrix(psi_deg) -> torch.Tensor:
    """R(psi) = [[cos, -sin], [sin, cos]] acting on (x, y) column vectors.

    psi_deg: (...,) degrees (tensor, array or float) -> (..., 2, 2) float64 (exact at
    multiples of 90°).
    """
    psi = _as_tensor(psi_deg) if not isinstance(psi_deg, torch.Tensor) else psi_deg
    c, s = _cos_sin_deg(psi)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def wrap_deg(a):
    """Angles (degrees) wrapped to [0, 360). Works on floats, numpy arrays and tensors."""
    if isinstance(a, torch.Tensor):
        r = torch.remainder(a, 360.0)
        return torch.where(r >= 360.0, r - 360.0, r)
    r = np.mod(np.asarray(a, dtype=np.float64), 360.0)
    r = np.where(r >= 360.0, r - 360.0, r)
    return float(r) if np.ndim(r) == 0 else r


def wrap_deg_180(a):
    """Angles (degrees) wrapped to (-180, 180] (how RELION writes rlnAnglePsi)."""
    w = wrap_deg(a)
    if isinstance(w, torch.Tensor):
        return torch.where(w > 180.0, w - 360.0, w)
    r = np.where(np.asarray(w) > 180.0, np.asarray(w) - 360.0, w)
    return float(r) if np.ndim(r) == 0 else r


def px_to_angstrom(px, apix: float):
    """Pixels -> Å (``rlnOriginX`` -> ``rlnOriginXAngst``)."""
    return px * apix


def angstrom_to_px(angst, apix: float):
    """Å -> pixels (``rlnOriginXAngst`` -> ``rlnOriginX``)."""
    return angst / apix


def centre_offsets_px(n: int, device=None, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) offsets of every pixel from the rotation centre (n//2, n//2), in pixels.

    Returns two (n, n) tensors: ``x[row, col] = col - n//2``, ``y[row, col] = row - n//2``.
    (The models' coordinates, :func:`cryolatent.models.blocks.pixel_coordinates`, are one
    (n*n, 2) tensor in half-box units.)
    """
    r = torch.arange(n, device=device, dtype=dtype) - (n // 2)
    y, x = torch.meshgrid(r, r, indexing="ij")
    return x, y


# ----------------------------------------------------------------------------- sampling

def _sample(images: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling, zero outside.

    images: (B, H, W); sx, sy: (B, H', W') float64 source coordinates in pixel *index* units
    (column, row). Returns (B, H', W') in images' dtype.
    """
    B, H, W = images.shape
    rx, ry = torch.round(sx), torch.round(sy)
    if bool(((sx - rx).abs() < 1e-9).all() and ((sy - ry).abs() < 1e-9).all()):
        ix, iy = rx.long(), ry.long()
        inside = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
        flat = (iy.clamp(0, H - 1) * W + ix.clamp(0, W - 1)).reshape(B, -1)
        out = torch.gather(images.reshape(B, -1), 1, flat).reshape(sx.shape)
        return torch.where(inside, out, torch.zeros((), dtype=images.dtype, device=images.device))
    gx = sx * (2.0 / max(W - 1, 1)) - 1.0
    gy = sy * (2.0 / max(H - 1, 1)) - 1.0
    work = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    grid = torch.stack([gx, gy], -1).to(work)
    out = F.grid_sample(images.unsqueeze(1).to(work), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out.squeeze(1).to(images.dtype)


def _prep(images, psi_deg, shift_px):
    if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (B, D, D), got {tuple(images.shape)}")
    B, D, _ = images.shape
    psi = _as_tensor(psi_deg, images).reshape(-1)
    if psi.numel() == 1 and B != 1:
        psi = psi.expand(B)
    t = _as_tensor(shift_px, images).reshape(-1, 2)
    if t.shape[0] == 1 and B != 1:
        t = t.expand(B, 2)
    if psi.shape[0] != B or t.shape[0] != B:
        raise ValueError(f"need {B} angles and shifts, got {psi.shape[0]} and {t.shape[0]}")
    return B, D, psi, t


def shift_ramp(D: int, shift_px: torch.Tensor) -> torch.Tensor:
    """(B, D, D//2+1) complex128 phase ramps exp(-2πi f·s) in ``rfft2`` layout: multiplying an
    image's ``rfft2`` by ramp b moves its content by +s_b. shift_px: (B, 2) (sx, sy) pixels
    (float64 tensor, on the device the ramps are wanted)."""
    ky = torch.fft.fftfreq(D, device=shift_px.device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(D, device=shift_px.device, dtype=torch.float64)
    s = shift_px.to(torch.float64)
    phase = -2.0 * math.pi * (kx[None, None, :] * s[:, 0, None, None]
                              + ky[None, :, None] * s[:, 1, None, None])
    return torch.polar(torch.ones_like(phase), phase)


def fourier_shift(images: torch.Tensor, shift_px) -> torch.Tensor:
    """out(x) = images(x - s): moves the content by +s (periodic), via a Fourier phase ramp.

    images: (B, D, D) real; shift_px: (B, 2) or (2,) as (sx, sy) pixels. Returns (B, D, D).
    Exact (to rounding) for integer shifts; for even D the Nyquist terms keep their real part.
    """
    B, D, _ = images.shape
    s = _as_tensor(shift_px, images).reshape(-1, 2)
    if s.shape[0] == 1 and B != 1:
        s = s.expand(B, 2)
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    ramp = shift_ramp(D, s).to(torch.complex128 if work == torch.float64 else torch.complex64)
    f = torch.fft.rfft2(images.to(work))
    return torch.fft.irfft2(f * ramp, s=(D, D)).to(images.dtype)


def rotate_images(images: torch.Tensor, psi_deg) -> torch.Tensor:
    """out(x) = images(R(psi) x) about (D//2, D//2), bilinear (exact at multiples of 90°).

    images: (B, D, D); psi_deg: (B,) or scalar. Returns (B, D, D).
    """
    return transform_to_particle(images, psi_deg, torch.zeros(2))


# ----------------------------------------------------------------------------- transforms

def transform_to_particle(canonical: torch.Tensor, psi_deg, shift_px,
                          method: Method = "bilinear") -> torch.Tensor:
    """Make particles from canonical (aligned) images: particle(x) = canonical(R(psi)(x + t)).

    canonical: (B, D, D) float tensor (CPU or GPU).
    psi_deg: (B,) degrees (rlnAnglePsi); shift_px: (B, 2) pixels (rlnOriginX, rlnOriginY),
    i.e. rlnOriginX/YAngst divided by the pixel size. A scalar / single row is broadcast.
    Returns (B, D, D), same dtype and device. The canonical centre ends at -t in the particle.
    """
    B, D, psi, t = _prep(canonical, psi_deg, shift_px)
    x, y = centre_offsets_px(D, device=canonical.device)
    c, s = _cos_sin_deg(psi)
    c, s = c[:, None, None], s[:, None, None]
    if method == "bilinear":
        u = x[None] + t[:, 0, None, None]
        v = y[None] + t[:, 1, None, None]
        sx, sy = c * u - s * v, s * u + c * v
        return _sample(canonical, sx + D // 2, sy + D // 2)
    if method == "fourier":
        rot = _sample(canonical, c * x - s * y + D // 2, s * x + c * y + D // 2)
        return fourier_shift(rot, -t)  # particle(x) = rot(x + t)
    raise ValueError(f"unknown interpolation method {method!r}")


def align_particles(particles: torch.Tensor, psi_deg, shift_px,
                    method: Method = "bilinear") -> torch.Tensor:
    """Align particles with their poses (RELION ``relion_stack_create --apply_transformation``).

    aligned(y) = particle(R(-psi) y - t), the inverse of :func:`transform_to_particle`.
    particles: (B, D, D); psi_deg: (B,) degrees; shift_px: (B, 2) pixels (rlnOriginX/Y).
    Returns (B, D, D), same dtype and device.
    """
    B, D, psi, t = _prep(particles, psi_deg, shift_px)
    x, y = centre_offsets_px(D, device=particles.device)
    c, s = _cos_sin_deg(psi)
    c, s = c[:, None, None], s[:, None, None]
    # R(-psi) y = (c x + s y, -s x + c y)
    rx, ry = c * x + s * y, -s * x + c * y
    if method == "bilinear":
        return _sample(particles, rx - t[:, 0, None, None] + D // 2,
                       ry - t[:, 1, None, None] + D // 2)
    if method == "fourier":
        shifted = fourier_shift(particles, t)  # shifted(u) = particle(u - t)
        return _sample(shifted, rx + D // 2, ry + D // 2)
    raise ValueError(f"unknown interpolation method {method!r}")


def centre_class_frames(psi_deg, origin, labels=None, prior_count: float = 50.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Move each class's canonical frame so that its particles' shifts are smallest.

    An unsupervised model fixes its canonical image only up to where the object sits in it:
    if class k's canonical object is centred at c (its frame's coordinates), every particle
    of the class carries t = t_true + R(-psi) c — an error that turns with psi. With
    particle(x) = A(R(psi)(x + t)) and A(y) = A0(y - c), the recentred pose is
    t' = t - R(-psi) c, and the c that minimises sum_i |t'_i|^2 (the zero-mean shift prior's
    choice, as RELION's offset prior keeps its class averages centred) is

        c_k = mean over the class of R(psi_i) t_i.

    This assumes the true shifts do not depend on the in-plane angle (true of picking).
    A small class is pulled towards the all-particle estimate:
    c_k = (n_k m_k + prior_count c_all) / (n_k + prior_count).

    psi_deg: (N,) degrees; origin: (N, 2) (rlnOriginX, rlnOriginY), any length unit;
    labels: (N,) class labels or None (one class). Returns (origin' (N, 2) float64, offsets
    (K, 2) float64 in the unit of ``origin``, one row per sorted unique label).
    """
    psi = np.deg2rad(np.asarray(psi_deg, dtype=np.float64).reshape(-1))
    t = np.asarray(origin, dtype=np.float64).reshape(-1, 2)
    lab = np.zeros(len(psi), dtype=np.int64) if labels is None else np.asarray(labels)
    if not (len(psi) == len(t) == len(lab)):
        raise ValueError("psi, origin and labels lengths differ")
    if len(psi) == 0:
        return t.copy(), np.zeros((0, 2))
    c, s = np.cos(psi), np.sin(psi)
    rt = np.stack([c * t[:, 0] - s * t[:, 1], s * t[:, 0] + c * t[:, 1]], -1)  # R(psi) t
    c_all = rt.mean(0)
    uniq, inv = np.unique(lab, return_inverse=True)
    n_k = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    sums = np.stack([np.bincount(inv, rt[:, j], minlength=len(uniq)) for j in (0, 1)], -1)
    offs = (sums + prior_count * c_all) / (n_k + prior_count)[:, None]
    oc = offs[inv]
    back = np.stack([c * oc[:, 0] + s * oc[:, 1], -s * oc[:, 0] + c * oc[:, 1]], -1)  # R(-psi) c
    return t - back, offs


# ----------------------------------------------------------------------------- units

def model_pose_to_input(psi_deg, shift_px, box_model: int, box_input: int,
                        apix_input) -> tuple[np.ndarray, np.ndarray]:
    """Pose from the model's input pixels to RELION columns of INPUT (degrees, Å).

    The models return the pose in RELION's convention (``Inference``: ``psi_deg`` (N,),
    ``shift_px`` (N, 2) = (rlnOriginX, rlnOriginY) in pixels of the ``box_model`` × ``box_model``
    image they were given). When INPUT's images (box D = ``box_input``, pixel size
    ``apix_input``) were Fourier-cropped to d = ``box_model`` on the way in, the model saw
    pixels of size

        apix_model = apix_input × D / d

    and a Fourier crop keeps the physical image, its axes and its centre
    (``cryolatent.preprocess.fourier_crop`` maps the rotation centre (D//2, D//2) onto
    (d//2, d//2) for even and odd boxes). With x the coordinate relative to the original
    centre and x' the one relative to the cropped centre, the crop maps x' = x·d/D. The
    model's statement aligned(R(ψ)(x' + t)) = cropped(x') then reads, in the original's
    coordinates, A(R(ψ)(x + t·D/d)) = particle(x) with A the (rescaled) canonical image. So,
    exactly:

        rlnAnglePsi      = psi_deg                              (unchanged)
        rlnOriginXYAngst = shift_px × apix_model                (= t_in × apix_input)

    i.e. the same physical shift: read with INPUT's pixel size it is t·D/d pixels of the
    unbinned particle, so the pose stays right for the original particles. Without a crop
    (D == d) this is just ``shift_px × apix_input``.

    psi_deg: (N,) degrees; shift_px: (N, 2); apix_input: scalar or (N,) (per-particle pixel
    size, e.g. from several optics groups). Returns ``psi_deg`` (N,) float64 wrapped to
    (-180, 180] as RELION writes it, and ``origin_angst`` (N, 2) float64 =
    (rlnOriginXAngst, rlnOriginYAngst).
    """
    psi = np.asarray(psi_deg, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift_px, dtype=np.float64).reshape(-1, 2)
    if len(psi) != len(shift):
        raise ValueError(f"psi ({len(psi)}) and shift ({len(shift)}) lengths differ")
    if box_model < 1 or box_input < 1:
        raise ValueError("boxes must be >= 1")
    apix_model = np.asarray(apix_input, dtype=np.float64) * (box_input / box_model)
    origin = shift * (apix_model[:, None] if apix_model.ndim == 1 else apix_model)
    return np.asarray(wrap_deg_180(psi), dtype=np.float64), origin
