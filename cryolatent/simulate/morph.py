"""Continuous motion for ``simulate cryoem --morph A.pdb B.pdb``: two models of one protein,
matched atom by atom, and the conformations between them.

* Matching: an atom is named by (chain, residue number, insertion code, atom name) after
  waters and hydrogens are removed (the first model of each file; of atoms with the same name,
  alternative conformations, the first). Atoms of A and B with the same name are matched when
  their residue names agree too; the others are dropped (counted and logged). Fewer matched
  atoms than half of the smaller model is a one-line error (the models are not of the same
  protein, or their chains or residues are numbered differently).
* Frame: both models are centred on the mass-weighted centre of their matched atoms, and B is
  superposed on A by the mass-weighted least-squares rotation (Kabsch) over them, so that
  the motion is the change of shape, not the two files' different frames.
* Conformation at λ ∈ [0, 1]: each atom at ``(1 - λ) r_A + λ r_B`` (linear interpolation of
  the superposed coordinates; λ = 0 is A, 1 is B); weights Z from A. Its centre of mass stays
  at the origin for every λ.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger("cryolatent")

#: matched atoms needed, as a fraction of the smaller model
MIN_MATCHED_FRACTION = 0.5


@dataclass
class MorphPair:
    """Two matched, superposed conformations: coords_a / coords_b (n_atoms, 3) Å about the
    common centre of mass, weights (n_atoms,) = Z. ``coords(lam)`` interpolates."""

    name: str
    coords_a: np.ndarray
    coords_b: np.ndarray
    weights: np.ndarray
    rmsd: float = 0.0

    @property
    def radius(self) -> float:
        """Largest atom distance from the centre over both ends (and so over every λ)."""
        return float(max(np.sqrt((self.coords_a ** 2).sum(1)).max(),
                         np.sqrt((self.coords_b ** 2).sum(1)).max()))

    def coords(self, lam: float) -> np.ndarray:
        """(n_atoms, 3) Å: the conformation at fraction ``lam`` from A to B."""
        lam = float(lam)
        return (1.0 - lam) * self.coords_a + lam * self.coords_b


def kabsch(P: np.ndarray, Q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The proper rotation R (3, 3) minimising Σ w_i |R q_i - p_i|² for centred P, Q (n, 3)."""
    H = (Q * w[:, None]).T @ P
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T)) or 1.0
    return Vt.T @ np.diag([1.0, 1.0, d]) @ U.T


def match_atoms(keys_a: list, res_a: list, keys_b: list, res_b: list
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Indices (ia, ib) of the atoms of A and B with the same (chain, residue number,
    insertion code, atom name) and the same residue name, in A's order; ``info``: counts
    ``matched``, ``a``, ``b`` (atoms of each), ``duplicate_a`` / ``_b`` (later alternative
    conformations, not used) and ``residue_differs`` (same name, other residue)."""
    first_b: dict = {}
    dup_b = 0
    for j, k in enumerate(keys_b):
        if k in first_b:
            dup_b += 1
        else:
            first_b[k] = j
    seen: set = set()
    ia, ib = [], []
    dup_a = differs = 0
    for i, k in enumerate(keys_a):
        if k in seen:
            dup_a += 1
            continue
        seen.add(k)
        j = first_b.get(k)
        if j is None:
            continue
        if res_a[i] != res_b[j]:
            differs += 1
            continue
        ia.append(i)
        ib.append(j)
    info = {"matched": len(ia), "a": len(keys_a), "b": len(keys_b), "duplicate_a": dup_a,
            "duplicate_b": dup_b, "residue_differs": differs}
    return np.asarray(ia, np.int64), np.asarray(ib, np.int64), info


def load_morph(path_a: str | os.PathLike, path_b: str | os.PathLike) -> MorphPair:
    """Read, match and superpose two models of one protein (module docstring)."""
    from .atoms import read_atoms

    pa, pb = Path(path_a), Path(path_b)
    A = read_atoms(pa)
    B = read_atoms(pb)
    ia, ib, info = match_atoms(A["keys"], A["resnames"], B["keys"], B["resnames"])
    m = info["matched"]
    need = MIN_MATCHED_FRACTION * min(info["a"], info["b"])
    if m < need:
        hint = (f"; {info['residue_differs']} more have the same name but another residue"
                if info["residue_differs"] else "")
        raise InputError(
            f"--morph {pa.name} {pb.name}: only {m} of {info['a']} / {info['b']} atoms match by "
            f"chain, residue number and atom name{hint} (need at least half of the smaller "
            f"model): are both models of the same protein, with the same chain names and "
            f"residue numbering?")
    log.info("morph %s -> %s: %d atoms matched; dropped %d of A and %d of B that have no "
             "partner (%d with the same name but another residue)", pa.stem, pb.stem, m,
             info["a"] - m, info["b"] - m, info["residue_differs"])
    xa, xb = A["xyz"][ia], B["xyz"][ib]
    mass = A["mass"][ia]
    xa = xa - (xa * mass[:, None]).sum(0) / mass.sum()
    xb = xb - (xb * mass[:, None]).sum(0) / mass.sum()
    R = kabsch(xa, xb, mass)
    xb = xb @ R.T
    rmsd = float(np.sqrt((mass * ((xa - xb) ** 2).sum(1)).sum() / mass.sum()))
    log.info("morph: B superposed on A, mass-weighted RMSD %.2f Å over the matched atoms",
             rmsd)
    return MorphPair(f"{pa.stem}~{pb.stem}", xa, xb, A["z"][ia].astype(np.float64), rmsd)
