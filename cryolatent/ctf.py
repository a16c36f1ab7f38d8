"""Contrast transfer function, as RELION defines it (``src/ctf.h``, ``src/ctf.cpp``, 3.1).

RELION's definition, with defocus U, V in Å (positive = underfocus), the astigmatism angle
``rlnDefocusAngle`` (degrees, from the x axis = image columns towards y = rows), Cs in mm,
voltage in kV, amplitude contrast Q and phase shift in degrees::

    lambda = 12.2643247 / sqrt(V * (1 + V * 0.978466e-6))        # Å, V in volts
    K1 = pi * lambda ;  K2 = pi / 2 * Cs[Å] * lambda**3
    K3 = atan(Q / sqrt(1 - Q**2)) ;  K5 = radians(phase_shift)
    deltaf(X, Y) = -[ (U+V)/2 + (U-V)/2 * cos(2 (atan2(Y, X) - angle)) ]   # RELION's sign
    gamma = K1 * deltaf * s**2 + K2 * s**4 - K5 - K3
    CTF = -sin(gamma)

so with the positive defocus Δf = -deltaf: ``CTF = sin(K1 Δf s² - K2 s⁴ + K5 + K3)``.
At the origin (s = 0) the CTF equals ``sin(K3 + K5)``: ``+Q`` for no phase shift
(RELION's CTF is positive at low frequency for an underfocused image). RELION's B-factor,
scale and anisotropic magnification terms are not modelled (B = 0, scale = 1, no mag matrix).

Frequencies: the image is ``(box, box)`` indexed ``[row, col]``; X is the column frequency,
Y the row frequency, ``X = fftfreq(box)[col] / apix`` in 1/Å. :func:`compute_ctf` returns the
unshifted FFT layout (``torch.fft.fft2`` ordering) unless ``centered=True`` (``fftshift``-ed,
zero frequency at ``[box//2, box//2]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .errors import InputError

__all__ = ["CTFParams", "compute_ctf", "ctf_params_tensor", "ctf_from_params", "apply_ctf",
           "electron_wavelength", "RELION_COLUMNS", "N_CTF_PARAMS"]

#: CTFParams field -> RELION column
RELION_COLUMNS: dict[str, str] = {
    "defocus_u": "rlnDefocusU",
    "defocus_v": "rlnDefocusV",
    "astigmatism": "rlnDefocusAngle",
    "voltage": "rlnVoltage",
    "cs": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
    "phase_shift": "rlnPhaseShift",
}


def electron_wavelength(voltage_kv: float | np.ndarray) -> float | np.ndarray:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (RELION's formula).

    ``electron_wavelength(300) = 0.019687 Å``.
    """
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    lam = 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))
    return float(lam) if lam.ndim == 0 else lam


def _f64(x: Any, n: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if n is not None and a.size == 1 and n != 1:
        a = np.full(n, a[0])
    return a


@dataclass
class CTFParams:
    """Per-particle CTF parameters, each an ``(N,)`` float64 array.

    defocus_u, defocus_v: Å (``rlnDefocusU/V``); astigmatism: degrees (``rlnDefocusAngle``);
    voltage: kV; cs: mm; amplitude_contrast: fraction (0..1); phase_shift: degrees.
    Scalars are broadcast to the common length.
    """

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    astigmatism: np.ndarray
    voltage: np.ndarray
    cs: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift: np.ndarray

    def __post_init__(self) -> None:
        vals = {f.name: np.asarray(getattr(self, f.name), dtype=np.float64).reshape(-1)
                for f in fields(self)}
        n = max(v.size for v in vals.values())
        for name, v in vals.items():
            if v.size == 1 and n != 1:
                v = np.full(n, v[0])
            if v.size != n:
                raise ValueError(f"CTFParams.{name} has {v.size} values, expected {n}")
            object.__setattr__(self, name, v)

    def __len__(self) -> int:
        return int(self.defocus_u.size)

    def subset(self, idx) -> "CTFParams":
        """The parameters of particles ``idx`` (int, slice, int array or boolean mask)."""
        if isinstance(idx, (int, np.integer)):
            idx = [int(idx)]
        return CTFParams(**{f.name: np.asarray(getattr(self, f.name)[idx]).reshape(-1)
                            for f in fields(self)})

    def to_relion_columns(self) -> dict[str, np.ndarray]:
        """``{rlnDefocusU: (N,), rlnDefocusV, rlnDefocusAngle, rlnVoltage,
        rlnSphericalAberration, rlnAmplitudeContrast, rlnPhaseShift}``."""
        return {col: getattr(self, name).copy() for name, col in RELION_COLUMNS.items()}

    @classmethod
    def from_relion(cls, table: Any, optics: Any = None) -> "CTFParams":
        """From a RELION particle table (DataFrame or mapping of column -> (N,) values).

        Columns missing from ``table`` are looked up in ``optics`` (the optics table) through
        ``rlnOpticsGroup`` when given (voltage, Cs and Q usually live there in RELION 3.1).
        ``rlnDefocusV`` defaults to U, ``rlnDefocusAngle`` and ``rlnPhaseShift`` to 0;
        ``rlnDefocusU``, ``rlnVoltage``, ``rlnSphericalAberration`` and
        ``rlnAmplitudeContrast`` are required.
        """
        if hasattr(table, "columns"):  # DataFrame
            n = len(table)
        else:
            keys = list(table.keys())
            n = len(np.atleast_1d(table[keys[0]])) if keys else 0

        def get(col: str):
            if col in table:
                return _f64(table[col], n)
            if optics is not None and col in optics:
                if "rlnOpticsGroup" in table and "rlnOpticsGroup" in optics:
                    groups = np.asarray(optics["rlnOpticsGroup"]).astype(np.int64)
                    vals = _f64(optics[col])
                    lut = dict(zip(groups.tolist(), vals.tolist()))
                    pg = np.asarray(table["rlnOpticsGroup"]).astype(np.int64)
                    missing = set(pg.tolist()) - set(lut)
                    if missing:
                        raise InputError(f"optics group {sorted(missing)[0]} used by particles "
                                         f"is not in the optics table")
                    return np.array([lut[g] for g in pg.tolist()], dtype=np.float64)
                vals = _f64(optics[col])
                if vals.size == 1:
                    return np.full(n, vals[0])
            return None

        out: dict[str, np.ndarray] = {}
        for name, col in RELION_COLUMNS.items():
            v = get(col)
            if v is None:
                if name == "defocus_v":
                    v = out["defocus_u"]
                elif name in ("astigmatism", "phase_shift"):
                    v = np.zeros(n)
                else:
                    raise InputError(f"CTF column {col} is missing from the particle table")
            out[name] = v
        return cls(**out)

    @classmethod
    def from_cryosparc(cls, arr: np.ndarray) -> "CTFParams":
        """From a cryoSPARC ``.cs`` structured array (``ctf/df1_A``, ``ctf/df2_A``,
        ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``,
        ``ctf/phase_shift_rad``; the ``ctf/`` prefix is optional). Radians become degrees.
        """
        names = arr.dtype.names or ()

        def get(key: str, required: bool = True):
            for k in (f"ctf/{key}", key):
                if k in names:
                    return np.asarray(arr[k], dtype=np.float64).reshape(-1)
            if required:
                raise InputError(f"cryoSPARC field ctf/{key} is missing")
            return None

        n = len(arr)
        df1 = get("df1_A")
        df2 = get("df2_A", False)
        ang = get("df_angle_rad", False)
        ps = get("phase_shift_rad", False)
        return cls(
            defocus_u=df1,
            defocus_v=df1 if df2 is None else df2,
            astigmatism=np.zeros(n) if ang is None else np.degrees(ang),
            voltage=get("accel_kv"),
            cs=get("cs_mm"),
            amplitude_contrast=get("amp_contrast"),
            phase_shift=np.zeros(n) if ps is None else np.degrees(ps),
        )


def _coefficients(params: CTFParams) -> np.ndarray:
    """(n, 5) float64 per-particle coefficients of the CTF phase in 1/Å units:
    ``sin(c0 X² + c1 XY + c2 Y² + c3 s⁴ + c4)`` (module docstring)."""
    p = params
    # per-particle constants, float64 numpy
    lam = np.asarray(electron_wavelength(p.voltage), dtype=np.float64).reshape(-1)
    if np.any(~(p.amplitude_contrast >= 0)) or np.any(~(p.amplitude_contrast <= 1)):
        raise InputError("amplitude contrast must lie in [0, 1]")
    k1 = math.pi * lam
    k2 = math.pi / 2.0 * (p.cs * 1e7) * lam ** 3
    k3 = np.arctan2(p.amplitude_contrast, np.sqrt(1.0 - p.amplitude_contrast ** 2))
    k5 = np.radians(p.phase_shift)
    az = np.radians(p.astigmatism)
    c, s = np.cos(az), np.sin(az)
    u, v = p.defocus_u, p.defocus_v
    # positive defocus as a quadratic form: Δf s² = U (Xc+Ys)² + V (Yc-Xs)²
    axx = u * c * c + v * s * s
    axy = (u - v) * c * s
    ayy = u * s * s + v * c * c
    # gamma' = -gamma = K1 (axx X² + 2 axy XY + ayy Y²) - K2 s⁴ + K5 + K3 ; CTF = sin(gamma')
    return np.stack([k1 * axx, 2.0 * k1 * axy, k1 * ayy, -k2, k5 + k3], axis=1)  # (n, 5)


#: columns of a CTF parameter tensor (:func:`ctf_params_tensor`)
N_CTF_PARAMS = 6


def ctf_params_tensor(params: CTFParams, apix: float, idx=None, device=None) -> torch.Tensor:
    """The CTF of each particle as a (n, 6) float64 tensor of parameters, from which
    :func:`ctf_from_params` makes the (n, box, box) CTF on the device, per batch.

    Columns: the phase ``c0 X² + c1 XY + c2 Y² + c3 s⁴ + c4`` (X, Y, s in 1/Å, the
    coefficients :func:`compute_ctf` uses), then the pixel size in Å. 48 bytes per particle
    instead of 4 box² for the CTF image; the box is given to :func:`ctf_from_params`.
    """
    p = params if idx is None else params.subset(idx)
    coef = _coefficients(p)
    out = np.empty((len(p), N_CTF_PARAMS), dtype=np.float64)
    out[:, :5] = coef
    out[:, 5] = float(apix)
    return torch.as_tensor(out, dtype=torch.float64, device=device)


def ctf_from_params(params: torch.Tensor, box: int, dtype: torch.dtype = torch.float32,
                    half: bool = False) -> torch.Tensor:
    """The (n, box, box) CTF (unshifted FFT layout, as :func:`compute_ctf`) from a (n, 6)
    parameter tensor (:func:`ctf_params_tensor`), on the parameters' device without a host
    synchronisation. ``half``: only the columns ``0..box//2`` that ``rfft2`` keeps
    ((n, box, box//2 + 1)). The phase is evaluated in float64 (at least as accurate as
    :func:`compute_ctf`'s float32 phase; the two agree to ~1e-5)."""
    p = params.to(torch.float64)
    n, dev = p.shape[0], p.device
    k = torch.arange(box, dtype=torch.float64, device=dev)
    k = torch.where(k >= (box + 1) // 2, k - box, k)                # fftfreq(box) * box
    kx = k[: box // 2 + 1] if half else k                            # rfft keeps columns 0..box//2
    ky, kx = k[:, None], kx[None, :]
    inv = 1.0 / (box * p[:, 5])                                      # 1/Å per integer frequency
    s2, s4 = (inv * inv).view(n, 1, 1), (inv ** 4).view(n, 1, 1)
    c = p[:, :5].reshape(n, 5, 1, 1)
    gam = ((c[:, 0] * (kx * kx) + c[:, 1] * (kx * ky) + c[:, 2] * (ky * ky)) * s2
           + c[:, 3] * (kx * kx + ky * ky) ** 2 * s4 + c[:, 4])
    return torch.sin(gam).to(dtype)


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """``images`` (B, N, N) (real space) multiplied by the CTF in Fourier space: ``ctf``
    (B, N, N) unshifted layout (:func:`compute_ctf`) or its ``rfft2`` half (B, N, N//2 + 1)
    (:func:`ctf_from_params` with ``half``). Returns (B, N, N) float32 (float64 for float64
    images). The one place the models convolve with the CTF."""
    n = images.shape[-1]
    x = images if images.dtype == torch.float64 else images.float()
    return torch.fft.irfft2(torch.fft.rfft2(x) * ctf[..., : n // 2 + 1].to(x.dtype), s=(n, n))


def _freq_grids(box: int, apix: float, device, dtype):
    """X (column) and Y (row) frequency grids in 1/Å, each (box, box), unshifted layout."""
    f = torch.fft.fftfreq(box, d=float(apix), dtype=torch.float64, device=device)
    Y, X = torch.meshgrid(f, f, indexing="ij")
    return X, Y


def compute_ctf(params: CTFParams, box: int, apix: float, idx=None, device=None,
                dtype: torch.dtype = torch.float32, centered: bool = False) -> torch.Tensor:
    """RELION's CTF for each particle.

    params: (N,) parameters; ``idx`` (int array / slice) selects a subset of them first.
    box: image size in pixels; apix: pixel size in Å.
    Returns a ``(n, box, box)`` tensor of ``dtype`` on ``device``; element ``[i, r, c]`` is the
    CTF of particle i at frequency (X, Y) = (fftfreq(box)[c], fftfreq(box)[r]) / apix,
    or, with ``centered=True``, the ``fftshift``-ed layout (zero frequency at
    ``[box//2, box//2]``).

    The per-particle coefficients are formed in float64 and the phase is evaluated
    elementwise (no matrix products, so TF32 settings cannot degrade it).
    """
    p = params if idx is None else params.subset(idx)
    n = len(p)
    coef = _coefficients(p)

    work = torch.float64 if dtype == torch.float64 else torch.float32
    X, Y = _freq_grids(box, apix, device, torch.float64)
    s2 = X * X + Y * Y
    basis = torch.stack([X * X, X * Y, Y * Y, s2 * s2], dim=0).to(work)  # (4, box, box)
    cf = torch.as_tensor(coef, dtype=torch.float64, device=basis.device).to(work)
    gam = cf[:, 4].view(n, 1, 1).expand(n, box, box).clone()
    for j in range(4):
        gam.add_(cf[:, j].view(n, 1, 1) * basis[j])
    out = torch.sin_(gam)
    if centered:
        out = torch.fft.fftshift(out, dim=(-2, -1))
    return out.to(dtype)
