"""Selection files: the particles chosen in a ``cryolatent report`` page.

The page's *Save selection* button writes ``STEM_selection.json``::

    {
      "format": "cryolatent-selection", "version": 1,
      "star": "/abs/path/refined.star",     # the STAR the report was made from
      "star_particles": 6000,               # its number of rows
      "how": "box/lasso in the UMAP map; classes 2, 5",
      "count": 123,
      "rlnImageName": ["000012@Extract/job7/a.mrcs", ...],   # the particles, as written there
      "occurrence": [0, ...],               # only when that STAR repeats names: the k-th row
                                            #   (0-based) bearing the name
      "rows": [11, ...]                     # their 0-based rows there (informative)
    }

A particle's identity is its ``rlnImageName`` (plus its occurrence when a STAR repeats
names, e.g. after symmetry expansion), not its row: ``select --selection`` applies the file
to any STAR holding those particles (the report's STAR, the ``embed`` input, a later
``refine`` output), the rows kept in that STAR's order. Names are compared exactly first,
then by :func:`cryolatent.io.particle_keys` (stack file name and image number, folders
ignored) when the stacks were moved, the one rule of every command that pairs particles of
two files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

log = logging.getLogger("cryolatent")

FORMAT = "cryolatent-selection"
VERSION = 1


def read_selection(path: str | Path) -> dict:
    """Parse and check a selection file; returns ``{"names": (n,) object, "occurrence": (n,)
    int64, "star": str | None, "how": str}``. One-line :class:`InputError` when the file is
    missing, not JSON, or malformed (no names, a name that is not text, lengths that differ,
    a particle listed twice)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--selection {path}: no such file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"--selection {path}: not a JSON selection file ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"--selection {path}: not a selection file (a JSON object with "
                         "rlnImageName is expected; cryolatent report saves one)")
    fmt = doc.get("format", FORMAT)
    if fmt != FORMAT:
        raise InputError(f"--selection {path}: format {fmt!r} is not {FORMAT!r}")
    try:
        version = int(doc.get("version", VERSION))
    except (TypeError, ValueError):
        raise InputError(f"--selection {path}: version {doc.get('version')!r} is not a "
                         "number") from None
    if version > VERSION:
        raise InputError(f"--selection {path}: version {version} is newer than this "
                         f"cryolatent reads ({VERSION}); update cryolatent")
    names = doc.get("rlnImageName")
    if not isinstance(names, list):
        raise InputError(f"--selection {path}: no list rlnImageName (the selected particles)")
    if not names:
        raise InputError(f"--selection {path}: the selection is empty")
    bad = next((i for i, v in enumerate(names) if not isinstance(v, str) or not v.strip()),
               None)
    if bad is not None:
        raise InputError(f"--selection {path}: rlnImageName entry {bad + 1} is "
                         f"{names[bad]!r}, not a particle name")
    occ = doc.get("occurrence")
    if occ is None:
        occ_arr = np.zeros(len(names), np.int64)
    else:
        if not isinstance(occ, list) or len(occ) != len(names) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in occ):
            raise InputError(f"--selection {path}: occurrence must list one whole number >= 0 "
                             f"per name ({len(names)})")
        occ_arr = np.asarray(occ, np.int64)
    if "count" in doc and doc["count"] != len(names):
        raise InputError(f"--selection {path}: count says {doc['count']!r} particles but "
                         f"rlnImageName lists {len(names)}")
    names_arr = np.asarray(names, dtype=object)
    keys = pd.Series(names_arr).astype(str) + "\x00" + pd.Series(occ_arr).astype(str)
    dup = keys.duplicated().to_numpy()
    if dup.any():
        j = int(np.flatnonzero(dup)[0])
        raise InputError(f"--selection {path}: particle {names[j]} is listed twice")
    star = doc.get("star")
    return {"names": names_arr, "occurrence": occ_arr,
            "star": star if isinstance(star, str) else None,
            "how": str(doc.get("how", ""))}


def _nth(keys: np.ndarray) -> np.ndarray:
    """``key\\x00k`` for the k-th (0-based) row bearing each key."""
    s = pd.Series(np.asarray(keys, dtype=object), dtype=object).astype(str)
    return (s + "\x00" + s.groupby(s.to_numpy(), sort=False).cumcount().astype(str)
            ).to_numpy(dtype=object)


def match_selection(table_names, sel: dict, input, selection) -> np.ndarray:
    """Bool (N,) mask of the rows of a particle table (``table_names``: its rlnImageName)
    that the selection names: exact names first, then :func:`particle_keys` for the names
    not found (stacks moved). :class:`InputError` naming the first particle that is in
    neither way."""
    from ..io import particle_keys

    tnames = np.asarray(table_names, dtype=object).astype(str)
    occ = sel["occurrence"].astype(str)
    want = (pd.Series(sel["names"]).astype(str) + "\x00" + occ).to_numpy(dtype=object)
    pos = pd.Series(np.arange(len(tnames)), index=_nth(tnames))
    rows = np.array(pos.reindex(want).to_numpy(), dtype=np.float64)   # NaN: not found
    miss = np.isnan(rows)
    if miss.any():   # moved stacks: compare by stack file name and image number
        kpos = pd.Series(np.arange(len(tnames)), index=_nth(particle_keys(tnames)))
        kwant = (pd.Series(particle_keys(sel["names"][miss])).astype(str) + "\x00"
                 + occ[miss]).to_numpy(dtype=object)
        rows[miss] = kpos.reindex(kwant).to_numpy()
        miss = np.isnan(rows)
    if miss.any():
        j = int(np.flatnonzero(miss)[0])
        k = int(sel["occurrence"][j])
        which = f" (occurrence {k + 1} of that name)" if k else ""
        made = f"; it was saved from {sel['star']}" if sel.get("star") else ""
        raise InputError(f"--selection {selection}: {int(miss.sum())} of its {len(miss)} "
                         f"particles are not in {input}, first {sel['names'][j]}{which}{made}")
    rows = rows.astype(np.int64)
    if len(np.unique(rows)) != len(rows):
        raise InputError(f"--selection {selection}: two of its particles match the same row "
                         f"of {input} (names differing only by folder); give the STAR the "
                         "report was made from")
    keep = np.zeros(len(tnames), bool)
    keep[rows] = True
    return keep


def select_selection(input: str | Path, selection: str | Path, out: str | Path,
                     invert: bool = False, datadir: str | Path | None = None) -> Path:
    """``cryolatent select IN.star --selection FILE -o SUBSET.star``: keep (``invert``: drop)
    the particles a selection file names.

    The output holds exactly those rows of ``input``, in its order, every column, and every
    other data block (optics, ...) as it is; a RELION 3.0 input is written in 3.1 layout
    (upgraded as RELION does), as the other select modes do. Image names are written from
    the current directory as every STAR cryolatent writes (stacks looked up in ``datadir``,
    beside ``input``, the current directory). One-line :class:`InputError` for a malformed
    file, a particle that is not in ``input``, or an empty result. Returns ``out``.
    """
    from ..analysis.cluster import _check_paths
    from ..io import particle_block, read_star, upgrade_relion30, write_star_blocks
    from ..io.particles import image_names_from_cwd

    input, out, selection = Path(input), Path(out), Path(selection)
    kind = _check_paths(input, out)
    if kind != ".star":
        raise InputError(f"{input}: select --selection reads a particle STAR (the report "
                         "names particles by rlnImageName)")
    sel = read_selection(selection)
    blocks = read_star(input)
    key, table = particle_block(blocks, input)
    if "rlnImageName" not in table.columns:
        raise InputError(f"{input}: column rlnImageName is missing; the selection names "
                         "particles by it")
    table = table.reset_index(drop=True)
    keep = match_selection(table["rlnImageName"].to_numpy(dtype=object), sel, input,
                           selection)
    if invert:
        keep = ~keep
    nk = int(keep.sum())
    if nk == 0:
        raise InputError(f"{input}: the selection is empty (dropping all {len(keep)} "
                         f"particles that {selection} names)")
    if key != "particles":   # RELION 3.0 (or older writers): upgraded as RELION does
        table, optics = upgrade_relion30(table)
        blocks = {"optics": optics, "particles": table}
        key = "particles"
    sub = table.iloc[np.flatnonzero(keep)].reset_index(drop=True)
    sub = image_names_from_cwd(sub, input, datadir)
    write_star_blocks(out, {k: (sub if k == key else v) for k, v in blocks.items()})
    log.info("%s: %s %d of %d particles (%s %s) -> %s", input,
             "dropped" if invert else "kept", len(keep) - nk if invert else nk, len(keep),
             selection, sel["how"] or "selection", out)
    return out
