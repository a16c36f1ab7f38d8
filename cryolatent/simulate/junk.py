"""Junk picks for ``cryolatent simulate cryoem --junk FRACTION``: images that are not particles.

Real particle sets hold picks a particle picker got wrong. Each junk row of a simulated set is
one of five kinds (the truth STAR's ``cryolatentJunkKind``; its ``rlnClassNumber`` is 0):

``ice``        smooth, large, low-contrast blobs of density (ice contamination, thick ice);
``carbon``     the edge of a carbon film: density 1 on one side of a straight line through the
               particle disc, 0 on the other, with a linear ramp between, at a random angle and
               position;
``empty``      nothing: the pick holds only the noise;
``pair``       two particles of the set's structures, the second's centre 0.5–1.5 particle
               radii from the first's, so that they overlap;
``aggregate``  3–6 particles clumped: the others' centres uniform in a disc of 1.2 particle
               radii about the first's.

The simulator draws every junk row's parameters from that row's own generator
(:func:`junk_generator`), puts each junk object through the row's CTF and adds the same
noise as to the particles (``docs/conventions.md``). Pairs and aggregates are particles at
the particles' own scale (a pair carries twice a particle's density, as a real one does);
ice and carbon are scaled so that their pixel variance in the particle disc, after the CTF,
is drawn from :data:`JUNK_VARIANCE` (the particles' mean is 1), so brightness alone does not
tell them apart.

Every function here is a pure function of a ``numpy.random.Generator`` (and its arguments).
Images are float64 ``(size, size)`` arrays whose centre is pixel ``(size//2, size//2)``;
``x`` is the column and ``y`` the row, both counted from the centre (``y`` points down), as
in :mod:`cryolatent.pose`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import CryolatentError

__all__ = ["JUNK_KINDS", "NOT_JUNK", "JUNK_VARIANCE", "junk_rows", "junk_generator",
           "junk_variance", "ice_blob", "carbon_edge", "empty_image", "cluster_members"]

#: the kinds, in the order of their codes 1..5 (:func:`junk_rows`)
JUNK_KINDS = ("ice", "carbon", "empty", "pair", "aggregate")
#: ``cryolatentJunkKind`` of a real particle
NOT_JUNK = "none"
#: pixel variance in the particle disc, after the CTF and the set's scale, drawn log-uniform
#: in these bounds (the particles' mean is 1): ice is fainter than a particle, carbon about as
#: strong
JUNK_VARIANCE = {"ice": (0.25, 1.0), "carbon": (0.5, 2.0)}
#: members of an aggregate (inclusive)
AGGREGATE_SIZE = (3, 6)
#: distance of a pair's second centre from the first, in particle radii
PAIR_DISTANCE = (0.5, 1.5)
#: an aggregate's other centres lie uniformly in a disc of this many particle radii
AGGREGATE_SPREAD = 1.2
#: the seed tail of the junk streams (other quantities use 0..99)
JUNK_STREAM = 100


def junk_rows(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """Which of ``n`` picks are junk, and of which kind: (n,) int64 codes, 0 = a particle,
    k = 1..5 = ``JUNK_KINDS[k - 1]``. Exactly ``round(fraction · n)`` rows are junk, chosen
    uniformly at random; each one's kind is drawn uniformly among the five."""
    if not 0.0 <= fraction <= 1.0:
        raise CryolatentError(f"--junk must be a fraction in [0, 1], got {fraction}")
    m = int(round(fraction * n))
    codes = np.zeros(n, dtype=np.int64)
    if m:
        rows = rng.choice(n, size=m, replace=False)
        codes[rows] = rng.integers(1, len(JUNK_KINDS) + 1, m)
    return codes


def junk_generator(seed: int, row: int) -> np.random.Generator:
    """The generator of junk row ``row`` (0-based) of a set made with ``seed``: independent of
    the set's size and of how it is chunked."""
    return np.random.default_rng([int(seed), JUNK_STREAM, int(row)])


def junk_variance(rng: np.random.Generator, kind: str) -> float | None:
    """The pixel variance in the particle disc (after CTF and the set's scale) of a junk image
    of ``kind``: log-uniform in :data:`JUNK_VARIANCE`; None for kinds made of particles
    (``pair``, ``aggregate``) or of nothing (``empty``)."""
    if kind not in JUNK_VARIANCE:
        return None
    lo, hi = JUNK_VARIANCE[kind]
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every pixel of a (size, size) image, from its centre: two (size, size)."""
    r = np.arange(size, dtype=np.float64) - size // 2
    y, x = np.meshgrid(r, r, indexing="ij")
    return x, y


def _disc_points(rng: np.random.Generator, radius: float, k: int) -> np.ndarray:
    """k points uniform in the disc of ``radius`` about (0, 0): (k, 2) (x, y)."""
    rho = radius * np.sqrt(rng.uniform(0.0, 1.0, k))
    phi = rng.uniform(0.0, 2.0 * math.pi, k)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi)], axis=1)


def ice_blob(rng: np.random.Generator, size: int, radius_px: float
             ) -> tuple[np.ndarray, dict[str, Any]]:
    """A smooth, large blob of density (ice): ``(image (size, size) float64, params)``.

    1–3 isotropic 2D Gaussians: standard deviations U(0.5, 1) × ``radius_px`` (the particle
    radius in px: each blob is as wide as a particle or wider), centres within 0.5
    ``radius_px`` of a common point that lies within 0.5 ``radius_px`` of the image centre,
    weights U(0.5, 1); the sum is scaled to a maximum of 1 (its contrast is set later, after
    the CTF). Everything is positive and smooth: each Gaussian's spectrum has a standard
    deviation of 1 / (2π sd) ≤ 1 / (π radius_px) cycles per pixel.
    params: ``centres_px`` (k, 2) (x, y) from the centre, ``sd_px`` (k,), ``weights`` (k,).
    """
    r = max(float(radius_px), 1.0)
    k = int(rng.integers(1, 4))
    c0 = _disc_points(rng, 0.5 * r, 1)
    centres = c0 + _disc_points(rng, 0.5 * r, k)
    sd = rng.uniform(0.5, 1.0, k) * r
    w = rng.uniform(0.5, 1.0, k)
    x, y = _grid(size)
    img = np.zeros((size, size))
    for (cx, cy), s, a in zip(centres, sd, w):
        img += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * s * s))
    img /= img.max()
    return img, {"centres_px": centres, "sd_px": sd, "weights": w}


def carbon_edge(rng: np.random.Generator, size: int, radius_px: float
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """The edge of a carbon film across the pick: ``(image (size, size) float64, params)``.

    With ``s = x cos(angle) + y sin(angle) - offset`` (the signed distance of a pixel from the
    edge, along the edge's normal), the image is ``clip(s / width + 1/2, 0, 1)``: 1 (carbon)
    where s ≥ width/2, 0 (hole) where s ≤ -width/2, a linear ramp between. It is constant
    along the edge (direction (-sin angle, cos angle)) and rises monotonically along the
    normal. angle ~ U(0, 360)° (from +x towards +y, i.e. clockwise on screen); offset ~
    U(-0.8, 0.8) × ``radius_px`` px, so the edge crosses the particle disc; width ~ U(1,
    max(1, radius_px / 4)) px.
    params: ``angle_deg``, ``offset_px``, ``width_px``.
    """
    r = max(float(radius_px), 1.0)
    angle = float(rng.uniform(0.0, 360.0))
    offset = float(rng.uniform(-0.8, 0.8) * r)
    width = float(rng.uniform(1.0, max(1.0, 0.25 * r)))
    x, y = _grid(size)
    a = math.radians(angle)
    s = x * math.cos(a) + y * math.sin(a) - offset
    img = np.clip(s / width + 0.5, 0.0, 1.0)
    return img, {"angle_deg": angle, "offset_px": offset, "width_px": width}


def empty_image(size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """An empty pick: ``(zeros (size, size) float64, {})`` (only the noise is added)."""
    return np.zeros((size, size)), {}


def cluster_members(rng: np.random.Generator, kind: str, n_structures: int,
                    radius_px: float, views: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> dict[str, np.ndarray]:
    """The particles a ``pair`` or an ``aggregate`` adds to the row's own particle.

    m = 1 for a pair, U{2, ..., 5} for an aggregate (3–6 particles in all). Each added
    particle has a structure U{0 .. n_structures-1}, a view (uniform on the sphere, or one of
    the fixed ``views`` = (rot (K,), tilt (K,)) degrees, as the set's particles), psi
    U(0, 360)° and a centre ``offset_px`` (x, y) px from the first particle's centre: at a
    distance U(0.5, 1.5) × ``radius_px`` in a uniform direction for a pair (the two overlap),
    uniform in the disc of 1.2 ``radius_px`` for an aggregate. The first particle's centre
    lies at ``-t`` (its shift t, RELION's convention), so an added one's shift is
    ``t - offset_px``.
    Returns ``{"structure" (m,) int64, "rot" (m,), "tilt" (m,), "psi" (m,), "offset_px"
    (m, 2)}``.
    """
    if kind not in ("pair", "aggregate"):
        raise ValueError(f"cluster_members: kind must be 'pair' or 'aggregate', got {kind!r}")
    r = max(float(radius_px), 1.0)
    lo, hi = AGGREGATE_SIZE
    m = 1 if kind == "pair" else int(rng.integers(lo - 1, hi))
    structure = rng.integers(0, n_structures, m).astype(np.int64)
    if views is None:
        rot = rng.uniform(0.0, 360.0, m)
        tilt = np.degrees(np.arccos(rng.uniform(-1.0, 1.0, m)))
    else:
        v = rng.integers(0, len(views[0]), m)
        rot, tilt = np.asarray(views[0])[v], np.asarray(views[1])[v]
    psi = rng.uniform(0.0, 360.0, m)
    if kind == "pair":
        rho = rng.uniform(*PAIR_DISTANCE) * r
        phi = rng.uniform(0.0, 2.0 * math.pi)
        offset = np.array([[rho * math.cos(phi), rho * math.sin(phi)]])
    else:
        offset = _disc_points(rng, AGGREGATE_SPREAD * r, m)
    return {"structure": structure, "rot": np.asarray(rot, np.float64),
            "tilt": np.asarray(tilt, np.float64), "psi": psi, "offset_px": offset}
