"""Cryo-EM-like particles: projections of atomic models with known pose, CTF and noise.

Model (see ``docs/conventions.md``):

* Atoms: the first model of a PDB / mmCIF file (gemmi), waters and hydrogens removed, centred
  on the centre of mass (atomic masses). Each atom is a 3D Gaussian of weight Z (atomic
  number, a simple stand-in for its low-resolution scattering amplitude) and standard
  deviation ``blur`` Å (default max(1 Å, 1 px)); its projection is the 2D Gaussian of the same
  weight and width, integral = Z, evaluated at pixel centres
  (:func:`render_projections`, the analytic reference). The simulator renders it fast
  (:mod:`cryolatent.simulate.render`): fixed views from each view's canonical projection,
  rendered once exactly on a 4× finer grid and interpolated (bilinear) at R(psi)(x + t);
  random views and morph conformations by gridding the atoms on a 4× finer grid and blurring
  to the pixel centres. Both are within ~1e-3 (protein-like models; < 1e-2 for isolated
  point atoms) of the analytic image.
* Pose (RELION): the projected position of atom r is ``(A(rot, tilt, psi) r)[:2] / apix - t``
  pixels from the centre (N//2, N//2), with A RELION's ZYZ Euler matrix (``euler.cpp``,
  ``Euler_angles2matrix``) and t = (rlnOriginX, rlnOriginY) px. Since
  ``A(rot, tilt, psi) = Rz(psi) A(rot, tilt, 0)`` and the in-plane part ``Rz(psi)`` is
  ``R(psi)^T`` on (x, y), this is exactly
  ``particle(x) = canonical(R(psi)(x + t))`` with canonical = projection at (rot, tilt, 0)
  centred on the box centre: :func:`cryolatent.pose.align_particles` with the truth recovers
  it.
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
  from the own particles of the first min(n, 256) rows (whatever the chunk size) and used for
  the whole set, so the noise level is the same for every particle.
* Junk (``junk`` > 0): round(junk · n) rows are picks that are not particles
  (:mod:`cryolatent.simulate.junk`: ice, carbon edges, empty, overlapping pairs,
  aggregates), with their row's CTF, the same scale and noise; rlnClassNumber 0 and
  cryolatentJunkKind. The scale is fixed from those rows' own particles, junk or not, so it
  and the particles' images are those of the same set without junk.
* Morph (``morph=(A, B)``, :mod:`cryolatent.simulate.morph`): class 1; each particle is the
  conformation (1 - λ) A + λ B of the matched, superposed models, λ ~ U(0, 1) per particle
  from its own stream (``[seed, 8]``), rendered particle by particle (λ is not quantised);
  truth column cryolatentMorph (-1 on the rows of the other structures).
* Determinism: an image depends only on its row's parameters, never on the chunk it is made
  in (``chunk``) or the number of threads (``tests/test_simulate_speed_equivalence.py``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..ctf import CTFParams, compute_ctf
from ..errors import CryolatentError
from ..pose import wrap_deg_180
from . import (AMPLITUDE_CONTRAST, CS_MM, VOLTAGE_KV, chunk_slices, resolve_device,
               rng_streams, write_particle_set)
from .junk import (JUNK_KINDS, JUNK_STREAM, NOT_JUNK, carbon_edge, cluster_members, ice_blob,
                   junk_generator, junk_rows, junk_variance)
from .atoms import read_atoms
from .morph import MorphPair, load_morph
from .render import (FineBlur, ViewCache, ctf_filter, ctf_filter_canvas, ctf_half, group_rows,
                     one_thread, render_splat)

log = logging.getLogger("cryolatent")

CHUNK = 256
#: the first rows whose own particles fix the set's scale (signal variance 1 in the disc)
SCALE_ROWS = 256
#: the canonical images of fixed views are kept when they take at most this much memory
CACHE_BYTES = 256 * 2 ** 20
#: the seed tail of the morph fractions λ (rng_streams uses 0..7, the noise 99, junk 100)
MORPH_STREAM = 8
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
    a = read_atoms(path)
    xyz, mass = a["xyz"], a["mass"]
    com = (xyz * mass[:, None]).sum(0) / mass.sum()
    return Structure(path.stem, xyz - com, a["z"])


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


class _Renderer:
    """Clean images (before the CTF) of particles given as parallel arrays: model index k,
    rot, tilt, psi (degrees), shift t (px) and morph fraction lam.

    Discrete structures in fixed views (``views`` given, and their canonical images fit
    :data:`CACHE_BYTES`) come from :class:`~cryolatent.simulate.render.ViewCache`; a morph
    (every particle its own conformation) and random views are rendered particle by particle
    with :func:`~cryolatent.simulate.render.render_splat`. Either way each image depends on
    its own parameters only.
    """

    def __init__(self, models, box: int, apix: float, blur: float, fixed_views: bool, dev):
        self.models, self.box, self.apix, self.dev = models, box, apix, dev
        self.fine = FineBlur(box, blur / apix, device=dev)
        n_discrete = sum(not isinstance(m, MorphPair) for m in models)
        self.cache = None
        if fixed_views and n_discrete:
            cache = ViewCache(box, apix, blur, max(m.radius for m in models) / apix,
                              device=dev)
            self.cache = cache
        self.cache_views = fixed_views

    def enable_cache(self, n_views: int) -> bool:
        """Keep the cache only when every (structure, view) canonical fits CACHE_BYTES."""
        if self.cache is None:
            return False
        n = n_views * sum(not isinstance(m, MorphPair) for m in self.models)
        if n * self.cache.nbytes_per_view() > CACHE_BYTES:
            log.info("rendering every particle: %d canonical views of %d px would take %.0f MB "
                     "(> %d MB)", n, self.cache.size, n * self.cache.nbytes_per_view() / 2 ** 20,
                     CACHE_BYTES // 2 ** 20)
            self.cache = None
            return False
        return True

    def __call__(self, k, rot, tilt, psi, t, lam) -> torch.Tensor:
        # one switch to one thread per call, not one per particle (switching costs ~7 ms of
        # spinning OpenMP threads each time)
        with one_thread():
            return self._render(k, rot, tilt, psi, t, lam)

    def _render(self, k, rot, tilt, psi, t, lam) -> torch.Tensor:
        k = np.asarray(k, np.int64)
        m = len(k)
        out = torch.zeros((m, self.box, self.box), dtype=torch.float32, device=self.dev)
        if m == 0:
            return out
        A = euler_matrix(rot, tilt, psi)
        keys = []
        for i in range(m):
            model = self.models[k[i]]
            if self.cache is not None and not isinstance(model, MorphPair):
                keys.append((int(k[i]), float(rot[i]), float(tilt[i])))
                continue
            keys.append(None)
            coords = model.coords(lam[i]) if isinstance(model, MorphPair) else model.coords
            out[i] = render_splat(coords, model.weights, A[i], t[i], self.fine, self.apix)
        if self.cache is not None:
            for key, rows in group_rows(keys).items():
                if key is None:
                    continue
                kk, r, tl = key
                model = self.models[kk]
                can = self.cache.canonical(key, model.coords, model.weights,
                                           euler_matrix(r, tl, 0.0)[0])
                out[torch.as_tensor(rows, device=self.dev)] = self.cache.particles(
                    can, psi[rows], t[rows])
        return out


def _junk_objects(idx: np.ndarray, kinds: np.ndarray, seed: int, n_models: int, r_px: float,
                  views, P: int, morph_models: set):
    """The junk of one chunk (:mod:`cryolatent.simulate.junk`), from each row's own stream.

    Returns (members, wide): members = {"row" (m,) positions in the chunk, "structure",
    "rot", "tilt", "psi", "offset_px", "lam"} of the particles that pairs and aggregates add;
    wide = [(position, object (P, P) float64, target variance)] for ice and carbon. Empty
    rows need nothing (they stay 0)."""
    rows, mem, wide = [], [], []
    for b in np.nonzero(kinds[idx] > 0)[0]:
        i = int(idx[b])
        kind = JUNK_KINDS[kinds[i] - 1]
        rng = junk_generator(seed, i)
        if kind in ("ice", "carbon"):
            obj, _ = (ice_blob if kind == "ice" else carbon_edge)(rng, P, r_px)
            wide.append((int(b), obj, junk_variance(rng, kind)))
        elif kind in ("pair", "aggregate"):
            mm = cluster_members(rng, kind, n_models, r_px, views)
            # a morph member's own conformation (drawn last: the draws above are unchanged)
            mm["lam"] = (rng.uniform(0.0, 1.0, len(mm["psi"])) if morph_models
                         else np.zeros(len(mm["psi"])))
            rows += [int(b)] * len(mm["psi"])
            mem.append(mm)
    members = None
    if mem:
        members = {k: np.concatenate([m[k] for m in mem]) for k in
                   ("structure", "rot", "tilt", "psi", "offset_px", "lam")}
        members["row"] = np.asarray(rows, np.int64)
    return members, wide


def simulate_cryoem(outdir: str | os.PathLike,
                    structures: Sequence[str | os.PathLike | Structure] | None = None,
                    n: int = 1000, box: int = 128, apix: float | None = None,
                    snr: float | None = 0.1, seed: int = 0, views: int | None = None,
                    shift_sd: float = 3.0, defocus_min: float = 10000.0,
                    defocus_max: float = 25000.0, astigmatism: float = 500.0,
                    ctf: bool = True, centered: bool = False, blur: float | None = None,
                    device: str | None = "cpu", junk: float = 0.0,
                    morph: Sequence[str | os.PathLike] | MorphPair | None = None,
                    chunk: int = CHUNK) -> Path:
    """Write projections of atomic models with their ground truth; returns particles.star.

    structures: PDB/mmCIF paths or :class:`Structure` objects (e.g. the built-in
    :func:`cryolatent.simulate.synthetic.hinge_pair`), one class each (rlnClassNumber =
    1 + index); default the
    GluA3 NTD pair 3O21 / 3P3W (not with ``morph``). apix: default so that the largest
    structure's diameter spans 70 % of the box. snr: None or inf = no noise. views: K fixed
    directions (column cryolatentViewNumber = 1..K) instead of uniform random ones.
    junk: the fraction of the n picks that are junk (:mod:`cryolatent.simulate.junk`):
    rlnClassNumber 0 and column cryolatentJunkKind (``none`` for the particles); 0 (the
    default) writes exactly what a set without junk is.
    morph: two models (A, B) of one protein (:mod:`cryolatent.simulate.morph`) or a
    :class:`~cryolatent.simulate.morph.MorphPair`: class 1, each particle at its own
    conformation λ ~ U(0, 1) between them (column cryolatentMorph; -1 on the rows of the
    other structures, which are classes 2, 3, ...).
    chunk: particles per batch written (memory; the output does not depend on it).
    Columns: rlnAngleRot, rlnAngleTilt, rlnAnglePsi, rlnOriginXAngst, rlnOriginYAngst,
    rlnClassNumber, [cryolatentViewNumber], [cryolatentJunkKind], [cryolatentMorph],
    [rlnDefocusU, rlnDefocusV, rlnDefocusAngle, rlnPhaseShift].
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
    if chunk < 1:
        raise CryolatentError(f"chunk must be positive, got {chunk}")
    models: list = []
    if morph is not None:
        if isinstance(morph, MorphPair):
            models.append(morph)
        else:
            pair = list(morph)
            if len(pair) != 2:
                raise CryolatentError(f"--morph takes two models, got {len(pair)}")
            models.append(load_morph(*pair))
    sources = list(structures) if structures else ([] if models else default_structures())
    models += [p if isinstance(p, Structure) else load_structure(Path(p)) for p in sources]
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

    nd = n
    r_cls, r_view, r_tilt, r_psi, r_t, r_df, r_ast, r_ang = rng_streams(seed, 8)
    cls = r_cls.integers(0, len(models), nd)
    if views:
        vrot, vtilt = fibonacci_views(views)
        view = r_view.integers(0, views, nd)
        rot, tilt = vrot[view], vtilt[view]
    else:
        view = None
        rot = r_view.uniform(0.0, 360.0, nd)
        tilt = np.degrees(np.arccos(r_tilt.uniform(-1.0, 1.0, nd)))
    psi = r_psi.uniform(0.0, 360.0, nd)
    t = r_t.normal(0.0, shift_sd, (nd, 2))
    if centered:
        t = np.zeros((nd, 2))
    morph_models = {k for k, m in enumerate(models) if isinstance(m, MorphPair)}
    lam = np.zeros(nd)
    if morph_models:
        lam = np.random.default_rng([int(seed), MORPH_STREAM]).uniform(0.0, 1.0, nd)
    noise_rng = np.random.default_rng([seed, 99])

    cols = {
        "rlnAngleRot": wrap_deg_180(rot[:n]), "rlnAngleTilt": tilt[:n],
        "rlnAnglePsi": wrap_deg_180(psi[:n]),
        "rlnOriginXAngst": t[:n, 0] * apix, "rlnOriginYAngst": t[:n, 1] * apix,
        "rlnClassNumber": cls[:n] + 1,
    }
    if view is not None:
        cols["cryolatentViewNumber"] = view[:n] + 1
    kinds = None
    if junk > 0:
        kinds = junk_rows(np.random.default_rng([seed, JUNK_STREAM]), n, junk)
        cols["rlnClassNumber"] = np.where(kinds > 0, 0, cls[:n] + 1)
        cols["cryolatentJunkKind"] = np.array((NOT_JUNK,) + JUNK_KINDS)[kinds]
        log.info("junk: %d of %d picks (%s)", int((kinds > 0).sum()), n, ", ".join(
            f"{k} {int((kinds == i + 1).sum())}" for i, k in enumerate(JUNK_KINDS)))
    if morph_models:
        cols["cryolatentMorph"] = np.where(np.isin(cls[:n], list(morph_models)), lam[:n], -1.0)
    ctfp = None
    if ctf:
        dmean = r_df.uniform(defocus_min, defocus_max, nd)
        dastig = r_ast.uniform(0.0, astigmatism, nd)
        dangle = r_ang.uniform(0.0, 180.0, nd)
        ctfp = CTFParams(defocus_u=dmean + dastig / 2, defocus_v=dmean - dastig / 2,
                         astigmatism=dangle, voltage=VOLTAGE_KV, cs=CS_MM,
                         amplitude_contrast=AMPLITUDE_CONTRAST, phase_shift=0.0)
        cols.update({"rlnDefocusU": ctfp.defocus_u[:n], "rlnDefocusV": ctfp.defocus_v[:n],
                     "rlnDefocusAngle": ctfp.astigmatism[:n],
                     "rlnPhaseShift": np.zeros(n)})
    table = pd.DataFrame(cols)
    r_px = min(r_max / apix, box / 2)
    mask = mask_disc(box, r_px)
    P = 2 * box
    render = _Renderer(models, box, apix, blur, bool(views), dev)
    cached = render.enable_cache(views or 0)
    log.info("rendering: %s%s", "each fixed view once, the particles interpolated from it"
             if cached else "each particle from its atoms (gridded)",
             "; the morph's particles each from their own conformation" if
             cached and morph_models else "")
    junk_views = (vrot, vtilt) if views else None

    def clean(idx: np.ndarray, own: np.ndarray) -> torch.Tensor:
        """The chunk's rows before the set's scale: their own particles (where ``own``) and
        the particles pairs and aggregates add, through the CTF; ice and carbon at their
        drawn variance (already divided by the scale, ``scale`` set); empty rows 0."""
        img = torch.zeros((len(idx), box, box), dtype=torch.float32, device=dev)
        sel = np.nonzero(own)[0]
        if len(sel):
            g = idx[sel]
            img[torch.as_tensor(sel, device=dev)] = render(cls[g], rot[g], tilt[g], psi[g],
                                                           t[g], lam[g])
        wide = []
        if kinds is not None and scale:
            members, wide = _junk_objects(idx, kinds, seed, len(models), r_px, junk_views, P,
                                          morph_models)
            if members is not None:
                rows = members["row"]
                shift = t[idx[rows]] - members["offset_px"]
                ex = render(members["structure"], members["rot"], members["tilt"],
                            members["psi"], shift, members["lam"])
                img.index_add_(0, torch.as_tensor(rows, device=dev), ex)
        ctf_chunk = ctf_half(ctfp.subset(idx), P, apix, device=dev) if ctfp is not None \
            else None
        if ctf_chunk is not None:
            img = ctf_filter(img, ctf_chunk)
        if wide:
            pos = np.asarray([w[0] for w in wide])
            obj = torch.as_tensor(np.stack([w[1] for w in wide]), dtype=torch.float32,
                                  device=dev)
            if ctf_chunk is not None:
                obj = ctf_filter_canvas(obj, ctf_chunk[torch.as_tensor(pos, device=dev)], box)
            else:
                off = P // 2 - box // 2
                obj = obj[:, off:off + box, off:off + box]
            o = obj.double().cpu().numpy()
            var = o[:, mask].var(axis=1)
            want = np.asarray([w[2] for w in wide], np.float64)
            f = np.where(var > 0, np.sqrt(want / np.maximum(var, 1e-300)), 0.0) / scale[0]
            img[torch.as_tensor(pos, device=dev)] = torch.as_tensor(
                o * f[:, None, None], dtype=torch.float32, device=dev)
        return img

    # the scale: from the first SCALE_ROWS rows' own particles (every row's, junk or not: it
    # is the scale of the same set without junk), whatever the chunk size
    scale: list[float] = []
    acc, cnt = 0.0, 0
    for sl in chunk_slices(min(n, SCALE_ROWS), chunk):
        idx = np.arange(sl.start, sl.stop)
        v = clean(idx, np.ones(len(idx), bool)).double().cpu().numpy()[:, mask]
        acc += float(v.var(axis=1).sum())
        cnt += len(idx)
    var = acc / cnt
    scale.append(1.0 / math.sqrt(var) if var > 0 else 1.0)

    def chunks():
        for sl in chunk_slices(n, chunk):
            idx = np.arange(sl.start, sl.stop)
            own = np.ones(len(idx), bool)
            if kinds is not None:   # no particle of its own under ice, carbon, empty
                own = (kinds[idx] == 0) | (kinds[idx] >= PAIR_CODE)
            img = (clean(idx, own) * scale[0]).cpu().numpy()
            if snr is not None and np.isfinite(snr):
                img += noise_rng.normal(0.0, 1.0 / math.sqrt(snr), img.shape).astype(np.float32)
            yield img

    return write_particle_set(outdir, chunks(), table, box, apix, desc="cryoem")
