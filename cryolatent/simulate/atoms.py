"""Atoms of an atomic model (PDB / mmCIF, read with gemmi), below the renderers and the morph
that use them."""

from __future__ import annotations

import os
from pathlib import Path

import gemmi
import numpy as np

from ..errors import InputError


def read_atoms(path: str | os.PathLike) -> dict:
    """The atoms of a PDB / mmCIF file (gemmi): first model, no waters, no hydrogens.

    Returns {"xyz" (n, 3) Å, "z" (n,) atomic numbers, "mass" (n,), "keys": [(chain, residue
    number, insertion code, atom name)], "resnames": [residue name]} (keys and resnames in
    file order, for :mod:`cryolatent.simulate.morph`). A missing or unreadable file, or one
    without atoms, is a one-line InputError.
    """
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
    xyz, z, mass, keys, resnames = [], [], [], [], []
    for ch in st[0]:
        for res in ch:
            for at in res:
                xyz.append(at.pos.tolist())
                z.append(at.element.atomic_number)
                mass.append(at.element.weight)
                keys.append((ch.name, res.seqid.num, res.seqid.icode, at.name))
                resnames.append(res.name)
    if not xyz:
        raise InputError(f"{path}: no atoms in the first model")
    return {"xyz": np.asarray(xyz, dtype=np.float64), "z": np.asarray(z, dtype=np.float64),
            "mass": np.asarray(mass, dtype=np.float64), "keys": keys, "resnames": resnames}
