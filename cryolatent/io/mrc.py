"""MRC / MRCS image stacks: tolerant header parsing, memory-mapped batched reads, streaming writes.

Reading never loads a whole stack: :func:`open_stack` memory-maps the data (``np.memmap``,
cached per file in a bounded LRU), :func:`read_images` reads the requested sections sorted by
index and returns float32 ``(n, ny, nx)`` in the orientation mrcfile gives (row = y).

The header parser accepts what real tools write: modes 0 (int8), 1 (int16), 2 (float32),
6 (uint16), 12 (float16); little- or big-endian (machine stamp, or guessed from plausible
dimensions when the stamp is missing); any MAP ID, space group or voxel size (a voxel size of
0 means "unknown"). Anything else raises :class:`InputError` naming the file.

Writing: :class:`MRCStackWriter` streams float32 (mode 2) images into a ``.mrcs`` marked as
an image stack (ispg 0, mz = 1, like mrcfile's ``set_image_stack``), voxel size = apix; the
header (nz, statistics) is fixed up at close and the file is renamed into place atomically.
"""

from __future__ import annotations

import mmap as _mmap
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..utils import atomic_path

__all__ = ["MRCHeader", "read_header", "open_stack", "read_images", "release_pages",
           "MRCStackWriter", "write_mrcs", "check_finite", "clear_cache"]

_MODES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
_MAX_DIM = 1 << 16


@dataclass(frozen=True)
class MRCHeader:
    """What a reader needs from an MRC header. ``n_complete``: sections actually in the file."""

    path: Path
    nx: int
    ny: int
    nz: int
    mode: int
    dtype: np.dtype
    offset: int
    apix: float  # Å/px from cella.x / mx; 0.0 when unknown
    n_complete: int
    file_size: int


def _parse(raw: bytes, order: str):
    h = np.frombuffer(raw, dtype=order + "i4", count=56)
    f = np.frombuffer(raw, dtype=order + "f4", count=56)
    nx, ny, nz, mode = (int(v) for v in h[:4])
    mx = int(h[7])
    cella_x = float(f[10])
    nsymbt = int(h[23])
    return nx, ny, nz, mode, mx, cella_x, nsymbt


def _plausible(p) -> bool:
    nx, ny, nz, mode, _, _, nsymbt = p
    return (mode in _MODES and 0 < nx <= _MAX_DIM and 0 < ny <= _MAX_DIM and 0 <= nz < 1 << 31
            and 0 <= nsymbt < 1 << 31)


def read_header(path: str | os.PathLike) -> MRCHeader:
    """Parse an MRC header tolerantly. Raises InputError naming the file when unusable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(1024)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < 1024:
        raise InputError(f"{path}: not an MRC file (only {len(raw)} bytes, header needs 1024)")
    stamp = raw[212]
    first = ">" if stamp == 0x11 else "<"
    orders = [first, ">" if first == "<" else "<"]
    parsed = None
    for order in orders:
        p = _parse(raw, order)
        if _plausible(p):
            parsed, used = p, order
            break
    if parsed is None:
        nx, ny, nz, mode, *_ = _parse(raw, first)
        if mode not in _MODES and _parse(raw, orders[1])[3] not in _MODES:
            raise InputError(f"{path}: unsupported MRC mode {mode} (readable: 0, 1, 2, 6, 12)")
        raise InputError(f"{path}: not a usable MRC header (nx={nx}, ny={ny}, nz={nz})")
    nx, ny, nz, mode, mx, cella_x, nsymbt = parsed
    dtype = np.dtype(used + _MODES[mode])
    offset = 1024 + nsymbt
    sec = nx * ny * dtype.itemsize
    n_complete = max(0, (size - offset) // sec) if size > offset else 0
    apix = cella_x / mx if (mx > 0 and np.isfinite(cella_x) and cella_x > 0) else 0.0
    return MRCHeader(path, nx, ny, nz, mode, dtype, offset, float(apix), int(min(n_complete, nz)),
                     size)


# ------------------------------------------------------------------------------- memmap cache
_CACHE: "OrderedDict[str, tuple[np.memmap, MRCHeader]]" = OrderedDict()
_CACHE_MAX = 64
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Drop every cached memory map (closes the files)."""
    with _LOCK:
        _CACHE.clear()


def open_stack(path: str | os.PathLike, header: MRCHeader | None = None):
    """``(memmap (n_complete, ny, nx), header)`` for a stack, cached (bounded LRU)."""
    key = os.fspath(path)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    h = header if header is not None else read_header(path)
    if h.n_complete == 0:
        mm = np.zeros((0, h.ny, h.nx), dtype=h.dtype)
    else:
        try:
            mm = np.memmap(path, dtype=h.dtype, mode="r", offset=h.offset,
                           shape=(h.n_complete, h.ny, h.nx))
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot memory-map the images ({e})") from None
    with _LOCK:
        _CACHE[key] = (mm, h)
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return mm, h


def read_images(path: str | os.PathLike, indices, header: MRCHeader | None = None,
                names=None) -> np.ndarray:
    """Sections ``indices`` (0-based, any order, repeats allowed) as float32 ``(n, ny, nx)``.

    Reads in increasing index order from the memory map (one pass over the file), then puts
    the images back in the order asked. ``names``: particle names for error messages.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    mm, h = open_stack(path, header)
    out = np.empty((len(idx), h.ny, h.nx), dtype=np.float32)
    if len(idx) == 0:
        return out
    bad = (idx < 0) | (idx >= mm.shape[0])
    if bad.any():
        j = int(np.nonzero(bad)[0][0])
        who = f"particle {names[j]}" if names is not None else f"image {idx[j] + 1}"
        raise InputError(f"{who}: index {idx[j] + 1} is beyond the end of {path}, which holds "
                         f"{mm.shape[0]} complete images (header says {h.nz})")
    order = np.argsort(idx, kind="stable")
    sidx = idx[order]
    # contiguous runs are read as slices, the rest by fancy indexing on the sorted indices
    if sidx[-1] - sidx[0] + 1 == len(sidx) and np.all(np.diff(sidx) == 1):
        block = mm[sidx[0]:sidx[-1] + 1]
    else:
        block = mm[sidx]
    out[order] = block  # converts to float32 (and native byte order)
    return out


def release_pages(path: str | os.PathLike, indices, header: MRCHeader | None = None) -> bool:
    """Drop the memory-mapped pages of sections ``indices`` (0-based) from this process.

    ``madvise(MADV_DONTNEED)`` on the span ``min(indices) .. max(indices)`` of the stack's
    memory map: the data stay in the kernel's page cache (a later read is cheap), but they no
    longer count in this process's resident set, so one pass over a stack larger than the RAM
    does not grow the process to the size of the stack. The map is read-only, so nothing is
    lost. Returns True when pages were released, False when the platform cannot (no
    ``MADV_DONTNEED``, an empty or non-mapped stack); never raises for that reason.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    adv = getattr(_mmap, "MADV_DONTNEED", None)
    if adv is None or len(idx) == 0:
        return False
    mm, _ = open_stack(path, header)
    m = getattr(mm, "_mmap", None)  # numpy keeps the mmap object of a memmap here
    if not isinstance(m, _mmap.mmap) or mm.shape[0] == 0:
        return False
    lo_i, hi_i = int(idx.min()), int(idx.max())
    if lo_i < 0 or hi_i >= mm.shape[0]:
        return False
    sec = int(mm.strides[0])
    # numpy maps from the allocation-granularity boundary below the data offset
    start = int(mm.offset) % _mmap.ALLOCATIONGRANULARITY
    page = _mmap.PAGESIZE
    lo = ((start + lo_i * sec) // page) * page
    hi = min(len(m), start + (hi_i + 1) * sec)
    if hi <= lo:
        return False
    try:
        m.madvise(adv, lo, hi - lo)
    except (OSError, ValueError):
        return False
    return True


def check_finite(images: np.ndarray, indices, source) -> None:
    """Raise InputError naming the first particle whose pixels contain NaN or Inf.

    images: ``(n, box, box)``; indices: ``(n,)`` particle indices (or names); source: a
    ParticleSet (its ``names`` are used) or a file name.
    """
    a = np.asarray(images)
    if a.size == 0:
        return
    finite = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    if finite.all():
        return
    j = int(np.nonzero(~finite)[0][0])
    ids = np.asarray(indices).reshape(-1)
    i = ids[j]
    names = getattr(source, "names", None)
    if names is not None and np.issubdtype(np.asarray(i).dtype, np.integer):
        who = f"particle {names[int(i)]} (#{int(i) + 1})"
        where = getattr(source, "source", source)
    else:
        who, where = f"particle {i}", source
    raise InputError(f"{where}: {who} has NaN or Inf pixel values")


# -------------------------------------------------------------------------------------- write
def _header_bytes(nx: int, ny: int, nz: int, apix: float, dmin: float, dmax: float,
                  dmean: float, rms: float) -> bytes:
    """A 1024-byte little-endian MRC2014 header for a float32 image stack."""
    words = np.zeros(256, dtype="<i4")
    flt = words.view("<f4")
    byt = words.view("u1")
    words[0:3] = (nx, ny, nz)
    words[3] = 2                      # mode 2: float32
    words[7:10] = (nx, ny, 1)         # mx, my, mz = 1: an image stack (mrcfile set_image_stack)
    flt[10:13] = (nx * apix, ny * apix, apix)  # cella (Å) -> voxel size = apix
    flt[13:16] = 90.0
    words[16:19] = (1, 2, 3)
    flt[19:22] = (dmin, dmax, dmean)
    words[22] = 0                     # ispg 0: image stack
    words[23] = 0                     # no extended header
    words[27] = 20140                 # nversion
    byt[208:212] = np.frombuffer(b"MAP ", dtype="u1")
    byt[212:214] = 0x44               # machine stamp: little-endian
    flt[54] = rms
    return words.tobytes()


class MRCStackWriter:
    """Stream float32 images into an ``.mrcs`` stack; atomic (temp file renamed at close).

    ``with MRCStackWriter(path, box, apix) as w: w.write(batch)`` — batch ``(n, box, box)``.
    The header (nz, min/max/mean/rms) is written at close; on an exception nothing is left.
    """

    def __init__(self, path: str | os.PathLike, box: int, apix: float):
        self.path = Path(path)
        self.box = int(box)
        self.apix = float(apix)
        self.n = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self._min = np.inf
        self._max = -np.inf
        self._ctx = None
        self._fh = None

    def __enter__(self) -> "MRCStackWriter":
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._fh = open(tmp, "wb")
        self._fh.write(_header_bytes(self.box, self.box, 0, self.apix, 0, 0, 0, 0))
        return self

    def write(self, images) -> None:
        """Append images ``(n, box, box)`` (or one ``(box, box)``) as float32."""
        a = np.asarray(images, dtype=np.float32)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[1:] != (self.box, self.box):
            raise ValueError(f"expected (n, {self.box}, {self.box}) images, got {a.shape}")
        if len(a) == 0:
            return
        a = np.ascontiguousarray(a, dtype="<f4")
        self._fh.write(a.tobytes())
        a64 = a.astype(np.float64)
        self._sum += float(a64.sum())
        self._sumsq += float((a64 * a64).sum())
        self._min = min(self._min, float(a.min()))
        self._max = max(self._max, float(a.max()))
        self.n += len(a)

    def close(self, exc: BaseException | None = None) -> None:
        if self._fh is None:
            return
        try:
            if exc is None:
                npx = self.n * self.box * self.box
                mean = self._sum / npx if npx else 0.0
                rms = float(np.sqrt(max(self._sumsq / npx - mean * mean, 0.0))) if npx else 0.0
                mn = self._min if npx else 0.0
                mx = self._max if npx else 0.0
                self._fh.seek(0)
                self._fh.write(_header_bytes(self.box, self.box, self.n, self.apix, mn, mx,
                                             mean, rms))
            self._fh.close()
        finally:
            self._fh = None
            ctx, self._ctx = self._ctx, None
            if exc is None:
                ctx.__exit__(None, None, None)
            else:
                ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __exit__(self, et, ev, tb):
        self.close(ev if ev is not None else (et() if et is not None else None))
        return False


def write_mrcs(path: str | os.PathLike, images, apix: float) -> Path:
    """Write float32 images ``(n, box, box)`` as an ``.mrcs`` image stack; atomic."""
    a = np.asarray(images)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"expected (n, box, box) images, got {a.shape}")
    with MRCStackWriter(path, a.shape[1], apix) as w:
        for s in range(0, len(a), 4096):
            w.write(a[s:s + 4096])
    return Path(path)

