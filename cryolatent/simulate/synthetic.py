"""Built-in pseudo-atomic models, so that the demo and the tests need no downloaded structure.

:func:`hinge_pair` makes two conformations of one made-up two-domain "protein": a large body
domain and an arm joined at a hinge, the arm swung by ``angle`` degrees in the second
conformation. Atoms are carbon-like (weight Z = 6) points filling ellipsoids, so projections
look like low-resolution protein densities; the shape is chiral and has no in-plane symmetry,
so its in-plane angle is well defined in every view.
"""

from __future__ import annotations

import numpy as np

from .cryoem import Structure


def _ellipsoid(rng: np.random.Generator, n: int, axes, centre) -> np.ndarray:
    """(n, 3) points uniform inside an ellipsoid with semi-axes ``axes`` (Å) at ``centre``."""
    p = rng.normal(size=(n, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    p *= rng.uniform(0, 1, (n, 1)) ** (1 / 3)
    return p * np.asarray(axes, float) + np.asarray(centre, float)


def _rot_z(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def _centred(name: str, xyz: np.ndarray) -> Structure:
    """Centred on the centre of mass, with the arm's swing plane (built as x-y) turned to face
    the beam along x: (x, y, z) -> (z, x, y), a proper rotation. Along x is the direction of
    the single view of ``simulate --views 1`` (rot 0, tilt 90), so that view shows the two
    conformations side by side rather than edge-on."""
    w = np.full(len(xyz), 6.0)
    xyz = xyz[:, [2, 0, 1]]
    return Structure(name=name, coords=xyz - xyz.mean(0), weights=w)


def hinge_pair(angle: float = 70.0, atoms: int = 3000, seed: int = 7) -> list[Structure]:
    """Two conformations (closed, open) of a two-domain pseudo-protein, about 90 Å across.

    The body (two thirds of the atoms: a flattened ellipsoid plus a small knob that breaks its
    symmetry) is the same in both; the arm (an elongated ellipsoid) turns by ``angle`` degrees
    about a hinge at the body's edge; the swing plane faces the beam of the view along x
    (rot 0, tilt 90: ``simulate --views 1``), which shows the difference best. Both are
    centred on their own centre of mass.
    """
    rng = np.random.default_rng(seed)
    n_body = atoms * 2 // 3
    body = np.concatenate([
        _ellipsoid(rng, n_body - n_body // 6, (28, 18, 14), (0, 0, 0)),
        _ellipsoid(rng, n_body // 6, (8, 8, 8), (-14, 16, 4)),   # knob: breaks the symmetry
    ])
    hinge = np.array([24.0, -6.0, 0.0])
    arm = _ellipsoid(rng, atoms - n_body, (22, 7, 7), (0, 0, 0))
    arm[:, 0] += 22.0                                             # arm points away from the hinge
    closed = np.concatenate([body, arm @ _rot_z(-35).T + hinge])
    opened = np.concatenate([body, arm @ _rot_z(-35 + angle).T + hinge])
    return [_centred("synthetic_closed", closed), _centred("synthetic_open", opened)]
