"""ParticleSet: one view over a RELION STAR, a cryoSPARC .cs or a bare .mrcs stack.

``load_particles(path, datadir=None, apix=None)`` checks everything it can up front (stacks
exist, indices in range, one box size, a known pixel size, numeric columns are numbers,
unique particle names) and raises :class:`InputError` with one line naming the file, particle
or column. Images are then read lazily from memory-mapped stacks in batches.

Stack paths: ``N@path`` (1-based N, any zero padding; a name without ``@`` is image 1 of a
single-image file). A relative path is looked up in ``datadir`` (also by its bare file name
there) when given, else beside the STAR/.cs file, else in the current directory.
``ParticleSet.table`` names each stack as every STAR that cryolatent writes does (SPEC):
relative to the current directory when the stack lies below it, absolute otherwise
(:func:`cwd_stack_name`), so the STARs written from it resolve from the folder the command
ran in, as RELION resolves them; ``ParticleSet.names`` keeps the names as written.
Pixel size: ``apix`` when given (overrides the files); else ``rlnImagePixelSize`` of the
particle's optics group (RELION 3.0: 1e4 × rlnDetectorPixelSize / rlnMagnification), or
``blob/psize_A`` for .cs; else the stack header's voxel size; 0 or missing everywhere is an
error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ..errors import InputError
from ..utils import prefetch as prefetch_items
from .cs import cs_to_relion, read_cs
from .mrc import (MRCHeader, check_finite, open_stack, read_header, read_images,
                  release_pages)
from .star import NUMERIC_COLUMNS, read_star, upgrade_relion30

__all__ = ["ParticleSet", "load_particles", "read_particle_table", "particle_keys", "nth_keys",
           "particle_block", "image_names_from_cwd", "cwd_stack_name"]

log = logging.getLogger("cryolatent")


class ParticleSet:
    """Particles with their metadata; images are read on demand.

    Attributes: ``table`` (particle rows, RELION 3.1 columns, input order; ``rlnImageName``
    naming the stacks from the current directory, :func:`cwd_stack_name`), ``optics`` (one
    row per optics group), ``names`` (N,) str (the image names as written), ``box`` int, ``apix`` float (common value),
    ``apix_per_particle`` (N,) float64, ``source`` Path, ``kind`` "star" | "cs" | "mrcs",
    ``cs_array`` (structured array for .cs input, else None), ``stack_paths`` (resolved
    stack files), ``stack_index`` (N,) which stack, ``image_index`` (N,) 0-based section.
    """

    def __init__(self, table: pd.DataFrame, optics: pd.DataFrame, names: np.ndarray,
                 stack_paths: list[Path], headers: list[MRCHeader], stack_index: np.ndarray,
                 image_index: np.ndarray, apix_per_particle: np.ndarray, source: Path,
                 kind: str, cs_array: np.ndarray | None = None):
        self.table = table
        self.optics = optics
        self.names = names
        self.stack_paths = stack_paths
        self._headers = headers
        self.stack_index = stack_index
        self.image_index = image_index
        self.apix_per_particle = np.asarray(apix_per_particle, dtype=np.float64).reshape(-1)
        self.source = Path(source)
        self.kind = kind
        self.cs_array = cs_array
        self.box = int(headers[0].nx) if headers else 0

    # ------------------------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return (f"ParticleSet({self.kind} {self.source}, n={len(self)}, box={self.box}, "
                f"apix={self.apix_per_particle[0] if len(self) else None:g}, "
                f"stacks={len(self.stack_paths)})")

    @property
    def apix(self) -> float:
        """The pixel size (Å) common to all particles; InputError if they differ."""
        a = self.apix_per_particle
        lo, hi = float(np.min(a)), float(np.max(a))
        if hi - lo > 1e-6 * hi:
            raise InputError(f"{self.source}: particles have different pixel sizes "
                             f"({lo:g} to {hi:g} Å); use apix_per_particle")
        return float(a[0])

    def optics_value(self, col: str) -> np.ndarray:
        """``(N,)`` values of an optics column looked up through rlnOpticsGroup.

        A column that is in the particle table itself is returned from there.
        """
        if col in self.table.columns:
            return self.table[col].to_numpy()
        if self.optics is None or col not in self.optics.columns:
            raise KeyError(col)
        return _lookup_optics(self.table, self.optics, col, self.source)

    def optics_flag(self, col: str) -> np.ndarray:
        """``(N,)`` bool of a 0/1 flag column such as rlnCtfDataArePhaseFlipped or
        rlnCtfDataAreCtfPremultiplied (particle table or optics); all False when absent."""
        try:
            v = pd.to_numeric(pd.Series(self.optics_value(col)), errors="coerce").to_numpy()
        except KeyError:
            return np.zeros(len(self), dtype=bool)
        return np.nan_to_num(v.astype(np.float64), nan=0.0) > 0.5

    def shifts_angst(self) -> np.ndarray:
        """``(N, 2)`` float64 origin (rlnOriginXAngst, rlnOriginYAngst) in Å.

        Falls back to rlnOriginX/Y (px) × pixel size (some 3.1 writers, e.g. relion_project,
        keep pixel columns), and to zeros when there is no origin.
        """
        out = np.zeros((len(self), 2))
        for j, ax in enumerate("XY"):
            if f"rlnOrigin{ax}Angst" in self.table:
                out[:, j] = self.table[f"rlnOrigin{ax}Angst"].to_numpy(np.float64)
            elif f"rlnOrigin{ax}" in self.table:
                out[:, j] = self.table[f"rlnOrigin{ax}"].to_numpy(np.float64) * \
                    self.apix_per_particle
        return out

    def ctf_params(self):
        """The particles' CTF parameters: :class:`cryolatent.ctf.CTFParams` of (N,) arrays,
        or None without rlnDefocusU. (The CTF images are
        :func:`cryolatent.ctf.compute_ctf` of these.)"""
        if "rlnDefocusU" not in self.table.columns:
            return None
        from ..ctf import CTFParams  # lazy: ctf pulls in torch

        n = len(self)
        t = self.table

        def col(name, default=None, required=False):
            try:
                return np.asarray(self.optics_value(name), dtype=np.float64)
            except KeyError:
                if required:
                    raise InputError(f"{self.source}: column {name} is missing (needed for "
                                     "the CTF)") from None
                return np.full(n, default, dtype=np.float64)

        du = t["rlnDefocusU"].to_numpy(np.float64)
        dv = t["rlnDefocusV"].to_numpy(np.float64) if "rlnDefocusV" in t else du.copy()
        if "rlnAmplitudeContrast" not in t.columns and (
                self.optics is None or "rlnAmplitudeContrast" not in self.optics.columns):
            log.warning("%s: no rlnAmplitudeContrast; using 0.1", self.source)
        return CTFParams(defocus_u=du, defocus_v=dv,
                         astigmatism=col("rlnDefocusAngle", 0.0),
                         voltage=col("rlnVoltage", required=True),
                         cs=col("rlnSphericalAberration", required=True),
                         amplitude_contrast=col("rlnAmplitudeContrast", 0.1),
                         phase_shift=col("rlnPhaseShift", 0.0))

    def ctf(self):
        """Deprecated name of :meth:`ctf_params` (it returns parameters, not CTF images)."""
        warnings.warn("ParticleSet.ctf() is deprecated: use ctf_params()", DeprecationWarning,
                      stacklevel=2)
        return self.ctf_params()

    # ------------------------------------------------------------------------------- images
    def _as_indices(self, idx) -> tuple[np.ndarray, bool]:
        n = len(self)
        if isinstance(idx, slice):
            return np.arange(n)[idx], False
        if np.isscalar(idx) and not isinstance(idx, (str, bytes)):
            i = int(idx)
            if i < -n or i >= n:
                raise IndexError(f"particle index {i} out of range for {n} particles")
            return np.array([i % n]), True
        a = np.asarray(idx)
        if a.dtype == bool:
            if a.shape != (n,):
                raise IndexError(f"boolean mask of shape {a.shape} for {n} particles")
            return np.nonzero(a)[0], False
        a = a.astype(np.int64).reshape(-1)
        if len(a) and (a.min() < -n or a.max() >= n):
            raise IndexError(f"particle indices out of range for {n} particles")
        return a % n if len(a) else a, False

    def images(self, idx, check: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """float32 ``(n, box, box)`` images of particles ``idx`` (int, slice, array, mask).

        An int gives ``(1, box, box)``. Reads are batched per stack, sorted by section.
        ``check``: raise :class:`InputError` naming the first particle whose pixels contain
        NaN or Inf (the default; one vectorised pass over the batch). ``check=False`` returns
        them as stored. ``out``: a C-contiguous float32 ``(n, box, box)`` array to fill and
        return (no allocation; a single native float32 stack is gathered straight from its
        memory map, the fastest path for training batches).
        """
        ii, _ = self._as_indices(idx)
        return self._read(ii, check, out)

    def __getitem__(self, idx) -> np.ndarray:
        """Like :meth:`images`, but an int gives one ``(box, box)`` image (NumPy style)."""
        ii, scalar = self._as_indices(idx)
        out = self._read(ii, True)
        return out[0] if scalar else out

    def _read(self, ii: np.ndarray, check: bool = True,
              out: np.ndarray | None = None) -> np.ndarray:
        shape = (len(ii), self.box, self.box)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 {shape}, got {out.dtype} "
                             f"{out.shape}")
        if len(ii) == 0:
            return out
        if len(self.stack_paths) == 1:
            mm, _ = open_stack(self.stack_paths[0], self._headers[0])
            rows = self.image_index[ii]
            if mm.dtype == np.float32 and mm.dtype.isnative and rows.max() < mm.shape[0]:
                np.take(mm, rows, axis=0, out=out)
                if check:
                    check_finite(out, ii, self)
                return out
        st = self.stack_index[ii]
        order = np.argsort(st, kind="stable")
        sst = st[order]
        bounds = np.flatnonzero(np.diff(sst)) + 1
        for pos in np.split(order, bounds):
            s = int(st[pos[0]])
            sel = ii[pos]
            out[pos] = read_images(self.stack_paths[s], self.image_index[sel],
                                   self._headers[s], names=self.names[sel])
        if check:
            check_finite(out, ii, self)
        return out

    def release(self, idx) -> None:
        """Release the memory-mapped pages holding particles ``idx`` from this process.

        For one streaming pass over a set larger than the RAM (``cryolatent preprocess``):
        after a chunk has been read, its pages are dropped from the process's resident set
        (they stay in the kernel's page cache, nothing is lost, later reads still work). A
        no-op where the platform cannot do it. See :func:`cryolatent.io.mrc.release_pages`.
        """
        ii, _ = self._as_indices(idx)
        if len(ii) == 0:
            return
        st = self.stack_index[ii]
        for s in np.unique(st):
            release_pages(self.stack_paths[int(s)], self.image_index[ii[st == s]],
                          self._headers[int(s)])

    def iter_batches(self, batch_size: int, indices=None, check: bool = True,
                     prefetch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices (n,), images (n, box, box) float32)`` in order, n <= batch_size.

        ``check`` as in :meth:`images`. ``prefetch``: read that many batches ahead in a
        background thread (:func:`cryolatent.utils.prefetch`; 0: read each when asked)."""
        ii = np.arange(len(self)) if indices is None else self._as_indices(indices)[0]
        bs = max(1, int(batch_size))
        batches = ((ii[s:s + bs], self._read(ii[s:s + bs], check))
                   for s in range(0, len(ii), bs))
        return prefetch_items(batches, prefetch) if prefetch > 0 else batches


# ------------------------------------------------------------------------------------ helpers
def _lookup_optics(table: pd.DataFrame, optics: pd.DataFrame, col: str, source) -> np.ndarray:
    vals = optics[col].to_numpy()
    if "rlnOpticsGroup" not in table.columns or "rlnOpticsGroup" not in optics.columns:
        if len(optics) == 1:
            return np.repeat(vals, len(table))
        raise InputError(f"{source}: particles have no rlnOpticsGroup but data_optics has "
                         f"{len(optics)} groups")
    groups = optics["rlnOpticsGroup"].to_numpy()
    pg = table["rlnOpticsGroup"].to_numpy()
    pos = pd.Index(groups).get_indexer(pg)
    if (pos < 0).any():
        j = int(np.nonzero(pos < 0)[0][0])
        raise InputError(f"{source}: particle {_name_of(table, j)} refers to optics group "
                         f"{pg[j]}, which data_optics does not define")
    return vals[pos]


def _name_of(table: pd.DataFrame, j: int) -> str:
    if "rlnImageName" in table.columns:
        return f"{table['rlnImageName'].iloc[j]} (row {j + 1})"
    return f"#{j + 1}"


def _is_numeric_label(c: str) -> bool:
    return c in NUMERIC_COLUMNS or (c.startswith("cryolatentZ") and c[11:].isdigit())


def _check_numeric(df: pd.DataFrame, source, what: str, extra=()) -> None:
    """InputError naming the column, particle (row) and value of the first non-number in a
    column that must hold numbers (RELION's numeric labels, cryolatentZ*, ``extra``)."""
    for c in df.columns:
        if (_is_numeric_label(c) or c in extra) and \
                not pd.api.types.is_numeric_dtype(df[c].dtype):
            vals = pd.to_numeric(df[c], errors="coerce")
            j = int(np.nonzero(vals.isna().to_numpy() & df[c].notna().to_numpy())[0][0]) \
                if (vals.isna() & df[c].notna()).any() else 0
            raise InputError(f"{source}: column {c} in {what} must be numeric, but "
                             f"{_name_of(df, j) if what == 'particles' else f'row {j + 1}'} "
                             f"has {df[c].iloc[j]!r}")


def particle_block(blocks: dict[str, pd.DataFrame], path) -> tuple[str, pd.DataFrame]:
    """``(name, table)`` of the particle table among a STAR file's blocks
    (:func:`cryolatent.io.read_star`'s dict), the one rule of every reader: ``data_particles``
    (RELION 3.1), else ``data_images`` or ``data_`` (older writers, RELION 3.0), else the
    first other block with ``rlnImageName``; a block without columns does not count.
    InputError naming ``path`` when there is none."""
    for name in ("particles", "images", ""):
        if name in blocks and len(blocks[name].columns):
            return name, blocks[name]
    for name, df in blocks.items():
        if name != "optics" and "rlnImageName" in df.columns:
            return name, df
    raise InputError(f"{path}: no particle table (no data_particles block)")


def read_particle_table(path: str | os.PathLike, numeric=(), allow_empty: bool = False,
                        unique: bool = True) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``(particles, optics)`` of a particle STAR without opening any image stack.

    For commands that need only the metadata (select, evaluate, plot, classes): the particle
    table is :func:`particle_block`'s; ``optics`` is ``data_optics`` or None (RELION 3.0). Checked, each with an
    :class:`InputError` naming the file and the particle/column: a missing file, no particle
    table, zero rows (unless ``allow_empty``), a non-number in a numeric column (RELION's
    numeric labels, ``cryolatentZ*`` and the labels in ``numeric``). With ``unique``,
    repeated rlnImageName values are warned about (count and first pair; every row is kept;
    pass ``unique=False`` where names are not used to match rows: a symmetry-expanded set
    legitimately repeats them).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    blocks = read_star(path)
    key, table = particle_block(blocks, path)
    if len(table) == 0 and not allow_empty:
        raise InputError(f"{path}: data_{key} has no particles (empty loop)")
    table = table.reset_index(drop=True)
    _check_numeric(table, path, "particles", extra=tuple(numeric))
    optics = blocks.get("optics")
    if optics is not None:
        _check_numeric(optics, path, "data_optics")
    if unique and "rlnImageName" in table.columns:
        _check_unique(table["rlnImageName"].astype(str).to_numpy(dtype=object), path)
    return table, optics


#: further folders where relative stack paths are looked up (after --datadir, beside the
#: file and the current directory): commands given a run folder add the folders of the run's
#: recorded training input (:func:`stack_search_dirs`)
_EXTRA_DIRS: list[Path] = []


@contextlib.contextmanager
def stack_search_dirs(dirs) -> Iterator[None]:
    """Inside the block, relative stack paths are also looked up in ``dirs`` (after
    ``--datadir``, beside the STAR/.cs and the current directory)."""
    added = [Path(d) for d in dirs if d is not None]
    _EXTRA_DIRS.extend(added)
    try:
        yield
    finally:
        for d in added:
            _EXTRA_DIRS.remove(d)


def _resolve(rel: str, source: Path, datadir) -> Path | None:
    """One rule for every command: an absolute path as it is; a relative one in
    ``--datadir``, then beside the STAR/.cs, then in the current directory (a RELION
    project's layout), then in the folders of :func:`stack_search_dirs`; last, the file name
    alone in ``--datadir``, beside the STAR/.cs and in those folders (a moved project)."""
    p = Path(rel)
    if p.is_absolute():
        return p if p.exists() else None
    dirs = ([Path(datadir)] if datadir is not None else []) + [source.parent, Path.cwd()] \
        + list(_EXTRA_DIRS)
    cands = [d / p for d in dirs] + [d / p.name for d in dirs if d != Path.cwd()]
    for c in cands:
        if c.is_file():
            return c
    return None


def _where(source: Path, datadir) -> str:
    """The folders :func:`_resolve` looked in, for error messages."""
    beside = [] if os.path.abspath(source.parent) == os.getcwd() else [f"{source.parent}"]
    parts = ([f"--datadir {datadir}"] if datadir is not None else []) + beside + \
        ["the current directory"] + [str(d) for d in _EXTRA_DIRS]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _parse_names(image_names: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``N@path`` -> (has_at, index text as written, path text), each (N,)."""
    parts = image_names.astype(str).str.partition("@")
    has_at = (parts[1] == "@").to_numpy()
    idx_txt = np.where(has_at, parts[0].to_numpy(dtype=object), "1")
    path_txt = np.where(has_at, parts[2].to_numpy(dtype=object), parts[0].to_numpy(dtype=object))
    return has_at, idx_txt, path_txt


def cwd_stack_name(written: str, path: str | os.PathLike) -> str:
    """How a STAR that cryolatent writes names the stack ``path`` (found by :func:`_resolve`)
    that its input named ``written``: relative to the current directory when the stack lies
    below it, absolute otherwise (RELION resolves image names from the folder it runs in).
    ``written`` itself when it already is such a name of the same file (a RELION project's
    names, run from the project directory; an absolute name of a file outside it); else
    :func:`cryolatent.utils.relion_path` of ``path``."""
    from ..utils import relion_path

    w = Path(written)
    with contextlib.suppress(OSError):
        if w.is_absolute():
            if os.path.samefile(w, path) and Path(relion_path(w)).is_absolute():
                return written
        elif ".." not in w.parts and w.is_file() and os.path.samefile(w, path):
            return written
    return relion_path(path)


def _renamed(has_at: np.ndarray, idx_txt: np.ndarray, code: np.ndarray, written, new
             ) -> pd.Series | None:
    """The image names with stack k's path ``written[k]`` replaced by ``new[k]`` (the index
    kept as written, zero padding included); None when no name changes."""
    if all(str(a) == str(b) for a, b in zip(written, new)):
        return None
    prefix = np.where(has_at, idx_txt.astype(object) + "@", "")
    return pd.Series(prefix + np.asarray(list(new), dtype=object)[code], dtype=object)


def image_names_from_cwd(table: pd.DataFrame, source: str | os.PathLike, datadir=None
                         ) -> pd.DataFrame:
    """``table`` (a particle table read from ``source``) with ``rlnImageName`` as every STAR
    cryolatent writes names images (:func:`cwd_stack_name`), for writers that do not open
    the stacks (``select``): the stacks are looked up by the one rule of every reader
    (``datadir``, beside ``source``, the current directory, ...); one that is not found keeps
    its name as written, with a warning. A copy when a name changes, else ``table`` itself.
    :func:`load_particles` gives ``ParticleSet.table`` these names already."""
    if "rlnImageName" not in table.columns or len(table) == 0:
        return table
    source = Path(source)
    has_at, idx_txt, path_txt = _parse_names(table["rlnImageName"])
    code, uniq = pd.factorize(pd.Series(path_txt, dtype=object))
    new = []
    for rel in uniq:
        p = _resolve(str(rel), source, datadir)
        if p is None:
            log.warning("%s: stack %s not found (looked in %s); its image names are kept as "
                        "written", source, rel, _where(source, datadir))
            new.append(str(rel))
        else:
            new.append(cwd_stack_name(str(rel), p))
    col = _renamed(has_at, idx_txt, code.astype(np.int64), list(map(str, uniq)), new)
    if col is None:
        return table
    table = table.copy()
    table["rlnImageName"] = col.to_numpy(dtype=object)
    return table


def _stacks_from_names(image_names: pd.Series, source: Path, datadir, names_for_errors):
    """Parse ``N@path``; resolve paths; read headers. Returns (paths, headers, code, idx0,
    names): ``names`` the image names as :func:`cwd_stack_name` writes them, or None when
    they are the names as written."""
    has_at, idx_txt, path_txt = _parse_names(image_names)
    idx = pd.to_numeric(pd.Series(idx_txt, dtype=object).str.strip(), errors="coerce").to_numpy()
    bad = ~np.isfinite(idx) | (idx < 1) | (idx != np.round(idx)) | (pd.Series(path_txt) == "").to_numpy()
    if bad.any():
        j = int(np.nonzero(bad)[0][0])
        raise InputError(f"{source}: particle {names_for_errors(j)}: rlnImageName must be "
                         f"N@stack.mrcs with N >= 1")
    idx0 = idx.astype(np.int64) - 1
    code, uniq = pd.factorize(pd.Series(path_txt, dtype=object))
    code = code.astype(np.int64)
    paths, headers = [], []
    first_row = pd.Series(np.arange(len(code))).groupby(code).first().to_numpy()
    for k, rel in enumerate(uniq):
        p = _resolve(str(rel), source, datadir)
        if p is None:
            where = _where(source, datadir)
            raise InputError(f"{source}: stack {rel} not found (looked in {where}); first "
                             f"referenced by particle {names_for_errors(int(first_row[k]))}")
        try:
            h = read_header(p)
        except InputError as e:
            raise InputError(f"{e} (stack of particle {names_for_errors(int(first_row[k]))})") \
                from None
        if h.nx != h.ny:
            raise InputError(f"{p}: images are {h.nx} x {h.ny} px; only square images are "
                             "supported")
        paths.append(p)
        headers.append(h)
    boxes = np.array([h.nx for h in headers])
    if len(set(boxes.tolist())) > 1:
        a = int(np.nonzero(boxes != boxes[0])[0][0])
        raise InputError(f"{source}: two box sizes in one set: {paths[0]} has {boxes[0]} px, "
                         f"{paths[a]} has {boxes[a]} px (particle "
                         f"{names_for_errors(int(first_row[a]))})")
    ncomp = np.array([h.n_complete for h in headers], dtype=np.int64)
    nz = np.array([h.nz for h in headers], dtype=np.int64)
    over = idx0 >= ncomp[code]
    if over.any():
        j = int(np.nonzero(over)[0][0])
        h = headers[code[j]]
        if idx0[j] < h.nz:
            raise InputError(f"{source}: particle {names_for_errors(j)}: stack {h.path} is "
                             f"shorter than its header says ({h.nz} images in the header, "
                             f"{h.n_complete} complete in the file)")
        raise InputError(f"{source}: particle {names_for_errors(j)}: index {idx0[j] + 1} is "
                         f"beyond the end of stack {h.path} ({h.nz} images)")
    short = ncomp < nz
    for k in np.nonzero(short)[0]:
        log.warning("%s is shorter than its header says (%d of %d images); the particles "
                    "used are all present", paths[k], ncomp[k], nz[k])
    names = _renamed(has_at, idx_txt, code, list(map(str, uniq)),
                     [cwd_stack_name(str(rel), p) for rel, p in zip(uniq, paths)])
    return paths, headers, code, idx0, names


# ------------------------------------------------------------------------- particle names
def particle_keys(names) -> np.ndarray:
    """(N,) str keys under which particle names from different files compare: the image
    index without its zero padding, the stack's file name without its folders.

    ``000012@Particles/stack.mrcs``, `` 12@/abs/Particles/stack.mrcs`` and
    ``12@C:\\data\\stack.mrcs`` all give ``12@stack.mrcs``; a name without ``@`` is image 1
    of a single-image file (``img.mrc`` -> ``1@img.mrc``); an index that is not a number is
    kept as written. The one rule of every command that pairs particles of two files by name
    (``embed``'s calibration, ``classes --particles``, ``evaluate``): exact names first,
    these keys when the folders differ.
    """
    s = pd.Series(np.asarray(names, dtype=object).reshape(-1), dtype=object).astype(str)
    if len(s) == 0:
        return np.empty(0, dtype=object)
    parts = s.str.strip().str.partition("@")
    has_at = parts[1] == "@"
    idx = parts[0].where(has_at, "1").str.strip()
    idx = idx.where(~idx.str.fullmatch(r"\d+"), idx.str.replace(r"^0+(?=\d)", "", regex=True))
    path = parts[2].where(has_at, parts[0])
    base = path.str.replace("\\", "/", regex=False).str.rsplit("/", n=1).str[-1]
    return (idx + "@" + base).to_numpy(dtype=object)


def nth_keys(keys) -> np.ndarray:
    """(N,) unique keys ``key\\x00k`` for the k-th occurrence (0-based) of each key: a
    repeated name (a joined or re-extracted set) pairs its k-th row in one file with its
    k-th row in the other, i.e. by position; unique names keep their meaning."""
    s = pd.Series(np.asarray(keys, dtype=object).reshape(-1), dtype=object).astype(str)
    k = s.groupby(s.to_numpy(), sort=False).cumcount().astype(str)
    return (s + "\x00" + k).to_numpy(dtype=object)


def duplicate_names(names) -> tuple[int, tuple[str, int, int] | None]:
    """(count, first pair): how many rows repeat an earlier row's name, and the first
    repeated name with its first two rows (0-based), or (0, None)."""
    s = pd.Series(np.asarray(names, dtype=object)).astype(str)
    again = s.duplicated(keep="first").to_numpy()
    if not again.any():
        return 0, None
    dup = s.duplicated(keep=False).to_numpy()
    first = np.nonzero(dup)[0][0]
    rows = np.nonzero(dup & (s == s.iloc[first]).to_numpy())[0][:2]
    return int(again.sum()), (str(s.iloc[first]), int(rows[0]), int(rows[1]))


def _check_unique(names: np.ndarray, source, what: str = "image names") -> None:
    """Warn about repeated names (RELION and cryoDRGN read such files; joined or re-extracted
    sets have them): the count and the first pair. Every row is kept, and commands that
    match rows by name pair the k-th row of a repeated name with the k-th row of the other
    file (i.e. by position)."""
    count, pair = duplicate_names(names)
    if count:
        name, r0, r1 = pair
        log.warning("%s: %d duplicate %s, first %s (rows %d and %d); all rows kept", source,
                    count, what, name, r0 + 1, r1 + 1)


def _final_apix(apix_arg, table_apix: np.ndarray | None, headers, code, source) -> np.ndarray:
    n = len(code)
    hdr = np.array([h.apix for h in headers], dtype=np.float64)[code]
    if apix_arg is not None:
        a = float(apix_arg)
        if not np.isfinite(a) or a <= 0:
            raise InputError(f"apix={apix_arg}: the pixel size must be a positive number")
        if table_apix is not None and np.all(np.isfinite(table_apix) & (table_apix > 0)) and \
                np.any(np.abs(table_apix - a) > 1e-3 * a):
            log.warning("%s: apix=%g given; the file says %g Å", source, a, table_apix[0])
        return np.full(n, a)
    if table_apix is not None:
        ap = np.asarray(table_apix, dtype=np.float64)
        ap = np.where(np.isfinite(ap) & (ap > 0), ap, hdr)
    else:
        ap = hdr
    bad = ~np.isfinite(ap) | (ap <= 0)
    if bad.any():
        j = int(np.nonzero(bad)[0][0])
        raise InputError(f"{source}: unknown or zero pixel size for particle #{j + 1} (no "
                         f"rlnImagePixelSize, and the header of {headers[code[j]].path} says "
                         f"{headers[code[j]].apix:g}); give apix")
    if table_apix is not None:
        d = np.abs(hdr - ap) > 1e-2 * ap
        d &= hdr > 0
        if d.any():
            j = int(np.nonzero(d)[0][0])
            log.warning("%s: pixel size %g Å from the metadata, %g Å in the header of %s; "
                        "using the metadata", source, ap[j], hdr[j], headers[code[j]].path)
    return ap


# ---------------------------------------------------------------------------------- loaders
def load_particles(path: str | os.PathLike, datadir: str | os.PathLike | None = None,
                   apix: float | None = None) -> ParticleSet:
    """Open a particle set from a ``.star``, ``.cs``, ``.mrcs`` or ``.mrc`` file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    suf = path.suffix.lower()
    if suf == ".cs":
        return _load_cs(path, datadir, apix)
    if suf in (".mrcs", ".mrc", ".st", ".map"):
        return _load_stack(path, apix)
    if suf == ".star":
        return _load_star(path, datadir, apix)
    raise InputError(f"{path}: unknown particle file type {suf!r} (use .star, .cs or .mrcs)")


def _load_star(path: Path, datadir, apix) -> ParticleSet:
    blocks = read_star(path)
    optics = blocks.get("optics")
    key, table = particle_block(blocks, path)
    if "rlnImageName" not in table.columns:
        raise InputError(f"{path}: data_{key} has no rlnImageName column")
    if len(table) == 0:
        raise InputError(f"{path}: data_{key} has no particles (empty loop)")
    table = table.reset_index(drop=True)
    names = table["rlnImageName"].astype(str).to_numpy(dtype=object)
    nm = lambda j: f"{names[j]} (row {j + 1})"  # noqa: E731
    _check_numeric(table, path, "particles")
    if optics is not None:
        _check_numeric(optics, path, "data_optics")
    _check_unique(names, path)
    paths, headers, code, idx0, cwd_names = _stacks_from_names(table["rlnImageName"], path,
                                                                 datadir, nm)
    if optics is None:
        # RELION 3.0: upgrade as relion_convert_star does, image sizes from the stacks
        fb = apix if apix is not None else (headers[0].apix or None)
        table, optics = upgrade_relion30(table, None, fallback_apix=fb)
        g = table["rlnOpticsGroup"].to_numpy()
        first = [int(np.argmax(g == k)) for k in optics["rlnOpticsGroup"]]
        optics["rlnImageSize"] = np.array([headers[code[j]].nx for j in first], dtype=np.int64)
        optics["rlnImageDimensionality"] = np.full(len(optics), 2, dtype=np.int64)
    table_apix = None
    if "rlnImagePixelSize" in optics.columns:
        table_apix = _lookup_optics(table, optics, "rlnImagePixelSize", path).astype(np.float64)
    elif "rlnOpticsGroup" in table.columns or len(optics) == 1:
        _lookup_optics(table, optics, optics.columns[0], path)  # group check
    ap = _final_apix(apix, table_apix, headers, code, path)
    if "rlnImageSize" in optics.columns:
        sz = _lookup_optics(table, optics, "rlnImageSize", path)
        if np.any(sz != headers[0].nx):
            log.warning("%s: rlnImageSize %s differs from the stacks' box %d; using %d", path,
                        sz[np.argmax(sz != headers[0].nx)], headers[0].nx, headers[0].nx)
    if cwd_names is not None:   # every STAR written from this set names what it resolved
        table["rlnImageName"] = cwd_names.to_numpy(dtype=object)   # (messages: as written)
    return ParticleSet(table, optics, names, paths, headers, code, idx0, ap, path, "star")


def _load_cs(path: Path, datadir, apix) -> ParticleSet:
    arr = read_cs(path)
    table, optics = cs_to_relion(arr, path)
    names = pd.Series(arr["uid"]).astype(str).to_numpy(dtype=object) if "uid" in \
        arr.dtype.names else table["rlnImageName"].to_numpy(dtype=object)
    _check_unique(names, path, "particle uids" if "uid" in arr.dtype.names else "image names")
    img = table["rlnImageName"].to_numpy(dtype=object)
    nm = lambda j: f"{img[j]} (uid {names[j]}, row {j + 1})"  # noqa: E731
    paths, headers, code, idx0, cwd_names = _stacks_from_names(table["rlnImageName"], path,
                                                                 datadir, nm)
    table_apix = _lookup_optics(table, optics, "rlnImagePixelSize", path).astype(np.float64) \
        if "rlnImagePixelSize" in optics.columns else None
    ap = _final_apix(apix, table_apix, headers, code, path)
    if cwd_names is not None:
        table["rlnImageName"] = cwd_names.to_numpy(dtype=object)
    return ParticleSet(table, optics, names, paths, headers, code, idx0, ap, path, "cs",
                       cs_array=arr)


def _load_stack(path: Path, apix) -> ParticleSet:
    h = read_header(path)
    if h.nx != h.ny:
        raise InputError(f"{path}: images are {h.nx} x {h.ny} px; only square images are "
                         "supported")
    if h.nz == 0:
        raise InputError(f"{path}: the stack holds no images")
    if h.n_complete < h.nz:
        raise InputError(f"{path}: particle {h.n_complete + 1:06d}@{path.name}: the stack is "
                         f"shorter than its header says ({h.nz} images in the header, "
                         f"{h.n_complete} complete in the file)")
    n = h.nz
    numbers = pd.Series(np.arange(1, n + 1)).map("{:06d}".format).astype(str) + "@"
    names = (numbers + path.name).to_numpy(dtype=object)
    # the table (what a STAR written from this set holds) names the stack from the current
    # directory; ``names`` (particle identity, messages) by its file name
    from ..utils import relion_path

    table = pd.DataFrame({"rlnImageName": (numbers + relion_path(path)).astype(str),
                          "rlnOpticsGroup": np.ones(n, dtype=np.int64)})
    code = np.zeros(n, dtype=np.int64)
    ap = _final_apix(apix, None, [h], code, path)
    optics = pd.DataFrame({"rlnOpticsGroup": [1],
                           "rlnOpticsGroupName": pd.Series(["opticsGroup1"], dtype=str),
                           "rlnImagePixelSize": [float(ap[0])], "rlnImageSize": [h.nx],
                           "rlnImageDimensionality": [2]})
    return ParticleSet(table, optics, names, [path], [h], code, np.arange(n, dtype=np.int64),
                       ap, path, "mrcs")
