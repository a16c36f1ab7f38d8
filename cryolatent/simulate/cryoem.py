"""Cryo-EM-like particles: projections of atomic models with known pose, CTF and noise.

Model (see ``docs/conventions.md``):

* Atoms: the first model of a PDB / mmCIF file (gemmi), waters and hydrogens removed, centred
  on the centre of mass (atomic masses). Each atom is a 3D Gaussian of weight Z (atomic
  number, a simple stand-in for its low-resolution scattering amplitude) and standard
  deviation ``blur`` Å (default max(1 Å, 1 px)); its projection is the 2D Gaussian of the same
  weight and width, integral = Z, evaluated analytically at pixel centres.
* Pose (RELION): the projected position of atom r is ``(A(rot, tilt, psi) r)[:2] / apix - t``
  pixels from the centre (N//2, N//2), with A RELION's ZYZ Euler matrix (``euler.cpp``,
  ``Euler_angles2matrix``) and t = (rlnOriginX, rlnOriginY) px. Since
  ``A(rot, tilt, psi) = Rz(psi) A(rot, tilt, 0)`` and the in-plane part ``Rz(psi)`` is
  ``R(psi)^T`` on (x, y), this is exactly
  ``particle(x) = canonical(R(psi)(x + t))`` with canonical = projection at (rot, tilt, 0)
  centred on the box centre: :func:`cryolatent.pose.align_particles` with the truth recovers
  it (rendering is analytic, not interpolated).
* Views: uniform on the sphere (rot ~ U(0, 360), cos(tilt) ~ U(-1, 1)), or with ``views=K`` K
  fixed directions on a Fibonacci sphere (deterministic), one drawn at random per particle;
  psi ~ U(0, 360), shifts ~ N(0, shift_sd²) px per axis.
* CTF: RELION's (:func:`cryolatent.ctf.compute_ctf`), 300 kV, Cs 2.7 mm, Q 0.1, mean defocus
  ~ U(defocus_min, defocus_max) Å, astigmatism ΔU-V ~ U(0, astigmatism) Å
  (U = mean + Δ/2, V = mean - Δ/2), angle ~ U(0, 180)°; applied by multiplication in Fourier
  space on a 2× zero-padded canvas (no wrap-around), then cropped. Protein is white, as in
  particles RELION extracts with contrast inverted.
* Scale and noise: the clean (CTF-modulated) images are scaled so that their pixel variance
  inside the particle mask is 1 on average, then white Gaussian noise of variance 1/snr is
  added. The mask is the disc of radius min(r_max / apix, box/2) about the box centre, r_max
  the largest atom distance from the centre of mass over all structures; the scale is fixed
  from the first chunk (256 particles) and used for the whole set, so the noise level is the
  same for every particle.
* Junk (``junk`` > 0): round(junk · n) rows are picks that are not particles
  (:mod:`cryolatent.simulate.junk`: ice, carbon edges, empty, overlapping pairs,
  aggregates), with their row's CTF, the same scale and noise; rlnClassNumber 0 and
  cryolatentJunkKind. The scale is fixed from every first-chunk row's own particle, so it
  and the particles' images are those of the same set without junk.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gemmi
import numpy as np
import pandas as pd
import torch

from ..ctf import CTFParams, compute_ctf
from ..errors import CryolatentError, InputError
from ..pose import wrap_deg_180
from . import (AMPLITUDE_CONTRAST, CS_MM, VOLTAGE_KV, chunk_slices, resolve_device,
               rng_streams, write_particle_set)
from .junk import (JUNK_KINDS, JUNK_STREAM, NOT_JUNK, carbon_edge, cluster_members, ice_blob,
                   junk_generator, junk_rows, junk_variance)

log = logging.getLogger("cryolatent")

CHUNK = 256
#: each atom's Gaussian is evaluated out to TRUNCATE standard deviations (exp(-8) = 3e-4)
TRUNCATE = 4.0
DEFAULT_STRUCTURES = ("3O21_GluA3_NTD_tetramer_xray.cif", "3P3W_GluA3_NTD_dimeric_xray.pdb")


@dataclass
class Structure:
    """Atoms of one model: coords (A, 3) Å centred on the centre of mass, weights (A,) = Z."""

    name: str
    coords: np.ndarray
    weights: np.ndarray

    @property
    def radius(self) -> float:
        """Largest atom distance from the centre of mass, Å."""
        return float(np.sqrt((self.coords ** 2).sum(1)).max())


def load_structure(path: str | os.PathLike) -> Structure:
    """Read a PDB / mmCIF file with gemmi: first model, no waters, no hydrogens, centred on
    the mass-weighted centre; weights = atomic numbers."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: structure file not found")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise InputError(f"{path}: not a readable PDB/mmCIF file ({e})") from None
    if len(st) == 0:
        raise InputError(f"{path}: no model in the file")
    st.setup_entities()
    st.remove_waters()
    st.remove_hydrogens()
    xyz, z, mass = [], [], []
    for ch in st[0]:
        for res in ch:
            for at in res:
                xyz.append(at.pos.tolist())
                z.append(at.element.atomic_number)
                mass.append(at.element.weight)
    if not xyz:
        raise InputError(f"{path}: no atoms in the first model")
    xyz = np.asarray(xyz, dtype=np.float64)
    mass = np.asarray(mass, dtype=np.float64)
    com = (xyz * mass[:, None]).sum(0) / mass.sum()
    return Structure(path.stem, xyz - com, np.asarray(z, dtype=np.float64))


def euler_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's Euler_angles2matrix (ZYZ; degrees): (N,) × 3 -> (N, 3, 3) float64.

    A = Rz(psi) Ry(tilt) Rz(rot) with Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]] and
    Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]; a point r of the model projects to
    (A r)[:2] in the image, the projection direction (A's third row) is
    (sin tilt cos rot, sin tilt sin rot, cos tilt).
    """
    a, b, g = (np.radians(np.asarray(v, dtype=np.float64).reshape(-1)) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty((a.size, 3, 3))
    A[:, 0, 0] = cg * cc - sg * sa
    A[:, 0, 1] = cg * cs + sg * ca
    A[:, 0, 2] = -cg * sb
    A[:, 1, 0] = -sg * cc - cg * sa
    A[:, 1, 1] = -sg * cs + cg * ca
    A[:, 1, 2] = sg * sb
    A[:, 2, 0] = sc
    A[:, 2, 1] = ss
    A[:, 2, 2] = cb
    return A


def fibonacci_views(k: int) -> tuple[np.ndarray, np.ndarray]:
    """K near-uniform projection directions (Fibonacci sphere): rot (K,), tilt (K,) degrees."""
    if k < 1:
        raise CryolatentError(f"--views must be at least 1, got {k}")
    i = np.arange(k, dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / k
    rot = np.mod(np.degrees(i * math.pi * (3.0 - math.sqrt(5.0))), 360.0)
    return rot, np.degrees(np.arccos(z))


def render_projections(coords: np.ndarray, weights: np.ndarray, rot, tilt, psi, shift_px,
                       box: int, apix: float, blur: float, device=None):
    """Analytic projections of Gaussian atoms in RELION's pose convention.

    coords: (A, 3) Å about the rotation centre; weights: (A,); rot, tilt, psi: (B,) degrees;
    shift_px: (B, 2) (rlnOriginX, rlnOriginY) px; blur: Gaussian sd in Å.
    Returns a float32 torch tensor (B, box, box): pixel [row, col] =
    sum_a w_a / (2 pi s^2) exp(-((col - c - x_a)^2 + (row - c - y_a)^2) / (2 s^2)),
    c = box//2, (x_a, y_a) = (A r_a)[:2] / apix - t, s = blur / apix, evaluated exactly at
    the pixel centres within TRUNCATE·s pixels of each atom (per axis) and scattered.
    """
    A = euler_matrix(rot, tilt, psi)                        # (B, 3, 3)
    t = np.asarray(shift_px, dtype=np.float64).reshape(-1, 2)
    B = A.shape[0]
    xy = np.einsum("bij,aj->bai", A[:, :2, :], coords) / apix - t[:, None, :]   # (B, A, 2)
    s = blur / apix
    K = int(math.ceil(TRUNCATE * s))
    offs = torch.arange(-K, K + 1, device=device)
    w = torch.as_tensor(weights / (2.0 * math.pi * s * s), dtype=torch.float32, device=device)
    pos = torch.as_tensor(xy + box // 2, dtype=torch.float64, device=device)  # (col, row) px
    inv = -0.5 / (s * s)
    out = torch.zeros((B, box * box), dtype=torch.float32, device=device)
    nA = len(weights)
    step = max(1, int(5e6 // max(1, nA * (2 * K + 1) ** 2)))  # ~0.2 GB of temporaries
    for a in range(0, B, step):
        p = pos[a:a + step]                                   # (b, A, 2)
        c = torch.round(p)
        idx = c.long()[..., None] + offs                      # (b, A, 2, 2K+1) pixel indices
        d = (c - p)[..., None] + offs                         # distances, exact offsets
        g = torch.exp(inv * d * d).to(torch.float32)          # (b, A, 2, 2K+1)
        g = torch.where((idx >= 0) & (idx < box), g, torch.zeros((), device=device))
        vals = (g[:, :, 1, :, None] * g[:, :, 0, None, :]) * w[None, :, None, None]
        flat = (idx[:, :, 1, :, None].clamp(0, box - 1) * box
                + idx[:, :, 0, None, :].clamp(0, box - 1))      # (b, A, 2K+1, 2K+1)
        b = p.shape[0]
        out[a:a + b].scatter_add_(1, flat.reshape(b, -1), vals.reshape(b, -1))
    return out.reshape(B, box, box)


def apply_ctf(images, ctf_params, apix: float, pad: int = 2):
    """Multiply each image's Fourier transform by its CTF on a ``pad``× zero-padded canvas.

    images: (B, D, D) torch; ctf_params: CTFParams of B particles. Returns (B, D, D).
    The rotation centre (D//2) stays at the padded canvas's centre (P//2).
    """
    B, D, _ = images.shape
    P = pad * D
    off = P // 2 - D // 2
    canvas = torch.zeros((B, P, P), dtype=images.dtype, device=images.device)
    canvas[:, off:off + D, off:off + D] = images
    ctf = compute_ctf(ctf_params, P, apix, device=images.device, dtype=images.dtype)
    out = torch.fft.ifft2(torch.fft.fft2(canvas) * ctf).real
    return out[:, off:off + D, off:off + D].contiguous()


def default_structures() -> list[Path]:
    repo = Path(__file__).resolve().parents[2]
    for base in (os.environ.get("CRYOLATENT_SHARED_DATA"), repo.parent / "shared" / "data"):
        if base:
            ps = [Path(base) / "structures" / f for f in DEFAULT_STRUCTURES]
            if all(p.is_file() for p in ps):
                return ps
    raise CryolatentError("no default structures found (../shared/data/structures): "
                          "give --structure FILE (PDB or mmCIF), repeatable")


def mask_disc(box: int, radius_px: float) -> np.ndarray:
    """(box, box) bool: pixels within radius_px of (box//2, box//2)."""
    r = np.arange(box) - box // 2
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius_px ** 2


#: the first junk code made of particles (pair, then aggregate)
PAIR_CODE = JUNK_KINDS.index("pair") + 1


def _add_junk(img, idx: np.ndarray, kinds: np.ndarray, seed: int, models, t: np.ndarray,
              ctfp, apix: float, blur: float, r_px: float, views, mask, scale: float) -> None:
    """Make the junk rows of one chunk, in place (:mod:`cryolatent.simulate.junk`).

    img: (B, D, D) torch, the rows ``idx`` (B,) of the set with their own particles rendered
    and the CTF applied, before the set's ``scale``; kinds: (n,) codes of the whole set;
    t: (n, 2) shifts px; ctfp: the set's CTFParams or None; mask: (D, D) bool torch, the
    particle disc; views: (rot (K,), tilt (K,)) or None. Pairs and aggregates add their other
    particles (same scale, the row's CTF); ice and carbon replace the row by their object,
    made on a 2D-px canvas (so that it continues beyond the box under the CTF), put through
    the row's CTF, cropped to the box and scaled to the variance :func:`junk_variance` drew;
    empty rows become 0.
    """
    B, D, _ = img.shape
    dev = img.device
    P = 2 * D
    wide_rows, wide, target = [], [], []
    mem_rows, mem = [], []
    for b in np.nonzero(kinds[idx] > 0)[0]:
        i = int(idx[b])
        kind = JUNK_KINDS[kinds[i] - 1]
        rng = junk_generator(seed, i)
        if kind in ("ice", "carbon"):
            obj, _ = (ice_blob if kind == "ice" else carbon_edge)(rng, P, r_px)
            wide_rows.append(b)
            wide.append(obj)
            target.append(junk_variance(rng, kind))
        elif kind == "empty":
            img[int(b)] = 0.0
        else:
            m = cluster_members(rng, kind, len(models), r_px, views)
            m["shift"] = t[i][None, :] - m["offset_px"]
            mem_rows += [b] * len(m["psi"])
            mem.append(m)
    if mem:
        rows = np.asarray(mem_rows)
        cat = {k: np.concatenate([m[k] for m in mem]) for k in
               ("structure", "rot", "tilt", "psi", "shift")}
        ex = torch.zeros((len(rows), D, D), dtype=torch.float32, device=dev)
        for k, st in enumerate(models):
            sel = np.nonzero(cat["structure"] == k)[0]
            if len(sel):
                ex[torch.as_tensor(sel, device=dev)] = render_projections(
                    st.coords, st.weights, cat["rot"][sel], cat["tilt"][sel], cat["psi"][sel],
                    cat["shift"][sel], D, apix, blur, device=dev)
        urows, inv = np.unique(rows, return_inverse=True)
        acc = torch.zeros((len(urows), D, D), dtype=torch.float32, device=dev)
        acc.index_add_(0, torch.as_tensor(inv, device=dev), ex)
        if ctfp is not None:
            acc = apply_ctf(acc, ctfp.subset(idx[urows]), apix)
        img[torch.as_tensor(urows, device=dev)] += acc
    if wide:
        rows = np.asarray(wide_rows)
        obj = torch.as_tensor(np.stack(wide), dtype=torch.float32, device=dev)
        if ctfp is not None:
            obj = apply_ctf(obj, ctfp.subset(idx[rows]), apix)
        off = P // 2 - D // 2
        obj = obj[:, off:off + D, off:off + D]
        var = obj[:, mask].double().var(dim=1, correction=0)
        want = torch.as_tensor(target, dtype=torch.float64, device=dev)
        f = torch.where(var > 0, torch.sqrt(want / var.clamp_min(1e-300)), 0.0) / scale
        img[torch.as_tensor(rows, device=dev)] = (obj.double() * f[:, None, None]).float()


def simulate_cryoem(outdir: str | os.PathLike,
                    structures: Sequence[str | os.PathLike | Structure] | None = None,
                    n: int = 1000, box: int = 128, apix: float | None = None,
                    snr: float | None = 0.1, seed: int = 0, views: int | None = None,
                    shift_sd: float = 3.0, defocus_min: float = 10000.0,
                    defocus_max: float = 25000.0, astigmatism: float = 500.0,
                    ctf: bool = True, centered: bool = False, blur: float | None = None,
                    device: str | None = "cpu", junk: float = 0.0) -> Path:
    """Write projections of atomic models with their ground truth; returns particles.star.

    structures: PDB/mmCIF paths or :class:`Structure` objects (e.g. the built-in
    :func:`cryolatent.simulate.synthetic.hinge_pair`), one class each (rlnClassNumber =
    1 + index); default the
    GluA3 NTD pair 3O21 / 3P3W. apix: default so that the largest structure's diameter spans
    70 % of the box. snr: None or inf = no noise. views: K fixed directions
    (column cryolatentViewNumber = 1..K) instead of uniform random ones.
    junk: the fraction of the n picks that are junk (:mod:`cryolatent.simulate.junk`):
    rlnClassNumber 0 and column cryolatentJunkKind (``none`` for the particles); 0 (the
    default) writes exactly what a set without junk is.
    Columns: rlnAngleRot, rlnAngleTilt, rlnAnglePsi, rlnOriginXAngst, rlnOriginYAngst,
    rlnClassNumber, [cryolatentViewNumber], [cryolatentJunkKind], [rlnDefocusU, rlnDefocusV,
    rlnDefocusAngle, rlnPhaseShift].
    """
    if n < 1:
        raise CryolatentError(f"--n must be positive, got {n}")
    if box < 8:
        raise CryolatentError(f"--box must be at least 8, got {box}")
    if snr is not None and not snr > 0:
        raise CryolatentError(f"--snr must be positive, got {snr}")
    if ctf and not (0 < defocus_min <= defocus_max):
        raise CryolatentError(f"need 0 < --defocus-min <= --defocus-max, got {defocus_min}, "
                              f"{defocus_max}")
    if astigmatism < 0:
        raise CryolatentError(f"--astigmatism must be >= 0, got {astigmatism}")
    if not 0.0 <= junk <= 1.0:
        raise CryolatentError(f"--junk must be a fraction in [0, 1], got {junk}")
    sources = list(structures) if structures else default_structures()
    models = [p if isinstance(p, Structure) else load_structure(Path(p)) for p in sources]
    r_max = max(m.radius for m in models)
    if apix is None:
        apix = math.ceil(2.0 * r_max / (0.7 * box) * 1000.0) / 1000.0
        log.info("pixel size %.3f Å (largest structure radius %.1f Å, box %d)", apix, r_max, box)
    if apix <= 0:
        raise CryolatentError(f"--apix must be positive, got {apix}")
    if blur is None:
        blur = max(1.0, apix)
    for m in models:
        if m.radius / apix > box / 2:
            log.warning("%s: radius %.1f Å is more than half the box (%.1f Å): it will be cut",
                        m.name, m.radius, box * apix / 2)
    dev = resolve_device(device)

    r_cls, r_view, r_tilt, r_psi, r_t, r_df, r_ast, r_ang = rng_streams(seed, 8)
    cls = r_cls.integers(0, len(models), n)
    if views:
        vrot, vtilt = fibonacci_views(views)
        view = r_view.integers(0, views, n)
        rot, tilt = vrot[view], vtilt[view]
    else:
        view = None
        rot = r_view.uniform(0.0, 360.0, n)
        tilt = np.degrees(np.arccos(r_tilt.uniform(-1.0, 1.0, n)))
    psi = r_psi.uniform(0.0, 360.0, n)
    t = r_t.normal(0.0, shift_sd, (n, 2))
    if centered:
        t = np.zeros((n, 2))
    dmean = r_df.uniform(defocus_min, defocus_max, n) if ctf else None
    dastig = r_ast.uniform(0.0, astigmatism, n) if ctf else None
    dangle = r_ang.uniform(0.0, 180.0, n) if ctf else None
    noise_rng = np.random.default_rng([seed, 99])

    cols = {
        "rlnAngleRot": wrap_deg_180(rot), "rlnAngleTilt": tilt, "rlnAnglePsi": wrap_deg_180(psi),
        "rlnOriginXAngst": t[:, 0] * apix, "rlnOriginYAngst": t[:, 1] * apix,
        "rlnClassNumber": cls + 1,
    }
    if view is not None:
        cols["cryolatentViewNumber"] = view + 1
    kinds = None
    if junk > 0:
        kinds = junk_rows(np.random.default_rng([seed, JUNK_STREAM]), n, junk)
        cols["rlnClassNumber"] = np.where(kinds > 0, 0, cls + 1)
        cols["cryolatentJunkKind"] = np.array((NOT_JUNK,) + JUNK_KINDS)[kinds]
        log.info("junk: %d of %d picks (%s)", int((kinds > 0).sum()), n, ", ".join(
            f"{k} {int((kinds == i + 1).sum())}" for i, k in enumerate(JUNK_KINDS)))
    ctfp = None
    if ctf:
        ctfp = CTFParams(defocus_u=dmean + dastig / 2, defocus_v=dmean - dastig / 2,
                         astigmatism=dangle, voltage=VOLTAGE_KV, cs=CS_MM,
                         amplitude_contrast=AMPLITUDE_CONTRAST, phase_shift=0.0)
        cols.update({"rlnDefocusU": ctfp.defocus_u, "rlnDefocusV": ctfp.defocus_v,
                     "rlnDefocusAngle": ctfp.astigmatism, "rlnPhaseShift": ctfp.phase_shift})
    table = pd.DataFrame(cols)
    mask = torch.as_tensor(mask_disc(box, min(r_max / apix, box / 2)), device=dev)
    scale: list[float] = []

    r_px = min(r_max / apix, box / 2)
    junk_views = (vrot, vtilt) if views else None

    def chunks():
        for sl in chunk_slices(n, CHUNK):
            idx = np.arange(sl.start, sl.stop)
            img = torch.empty((len(idx), box, box), dtype=torch.float32, device=dev)
            # the rows' own particles: every row's in the first chunk (it fixes the scale, so
            # the scale is the one of the same set without junk), later not for the junk
            # that holds no particle (ice, carbon, empty; zero until _add_junk fills them)
            own = np.ones(len(idx), dtype=bool)
            if kinds is not None:
                img.zero_()
                if scale:
                    own = (kinds[idx] == 0) | (kinds[idx] >= PAIR_CODE)
            for k, m in enumerate(models):
                sel = np.nonzero((cls[idx] == k) & own)[0]
                if len(sel):
                    g = idx[sel]
                    img[torch.as_tensor(sel, device=dev)] = render_projections(
                        m.coords, m.weights, rot[g], tilt[g], psi[g],
                        t[g], box, apix, blur, device=dev)
            if ctfp is not None:
                img = apply_ctf(img, ctfp.subset(idx), apix)
            if not scale:
                v = img[:, mask]
                var = float(v.var(dim=1, correction=0).mean())
                scale.append(1.0 / math.sqrt(var) if var > 0 else 1.0)
            if kinds is not None:
                _add_junk(img, idx, kinds, seed, models, t, ctfp, apix, blur, r_px,
                          junk_views, mask, scale[0])
            img = (img * scale[0]).cpu().numpy()
            if snr is not None and np.isfinite(snr):
                img += noise_rng.normal(0.0, 1.0 / math.sqrt(snr), img.shape).astype(np.float32)
            yield img

    return write_particle_set(outdir, chunks(), table, box, apix, desc="cryoem")
