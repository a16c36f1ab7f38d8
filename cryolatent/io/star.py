"""STAR files: a fast reader for every data block and a RELION 3.1 writer.

Reading
    :func:`read_star` returns ``{block name: DataFrame}`` for every ``data_`` block of a file
    (``data_`` alone gives the name ``""``; a repeated name gets ``#2``, ``#3`` … appended; a
    second loop inside one block is ``name#2``). Column names lose their leading underscore
    (``rlnImageName``). Loops are one row per line; a key/value block becomes a one-row frame.
    Loop bodies are parsed with pandas' C engine on whitespace (no per-line Python loop); a
    body that contains quotes or comment lines falls back to a per-line tokenizer that follows
    the STAR quoting rule (a quote closes only before whitespace or the end of the line).
    UTF-8 BOM, CRLF/CR line ends, comments, empty loops and single-line loops are accepted.
    Numbers become int64/float64, text stays text (``rlnImageName`` etc. are never numbers).

Writing
    :func:`write_star` writes RELION 3.1 layout: ``# version 30001``, ``data_optics`` then
    ``data_particles``, LF line ends, no blank line inside a loop, shortest round-tripping
    float text (``repr``), values with whitespace quoted, missing values as ``nan`` / ``""``
    (never ``<NA>``). The file is written through :func:`cryolatent.utils.atomic_path`.

RELION 3.0 → 3.1
    :func:`upgrade_relion30` does what RELION 3.1's ``StarConverter`` (``relion_convert_star``)
    does to a 3.0 particle table: optics columns move to an optics table with one group per
    distinct combination of values, pixel size = 1e4 × rlnDetectorPixelSize / rlnMagnification,
    rlnOriginX/Y (px) → rlnOriginXAngst/YAngst (Å), rlnOpticsGroup appended.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from ..errors import InputError
from ..utils import atomic_path

__all__ = ["read_star", "write_star", "write_star_blocks", "upgrade_relion30", "STRING_COLUMNS",
           "NUMERIC_COLUMNS", "OPTICS_COLUMNS_30"]

#: RELION labels whose values are text even when they look like numbers.
STRING_COLUMNS = frozenset({
    "rlnImageName", "rlnImageOriginalName", "rlnMicrographName", "rlnMicrographOriginalName",
    "rlnMicrographMovieName", "rlnMicrographNameNoDW", "rlnMicrographMetadata",
    "rlnOpticsGroupName", "rlnMtfFileName", "rlnCtfImage", "rlnReconstructImageName",
    "rlnReferenceImage", "rlnSymmetryGroup", "rlnMaskName", "rlnGroupName", "rlnCtfPowerSpectrum",
    "rlnMicrographGainName", "rlnMicrographDefectFile", "rlnOriginalParticleName",
    "rlnTomoName", "rlnTomoParticleName", "rlnPipeLineProcessName", "rlnPipeLineNodeName",
    "rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeToNode", "rlnPipeLineEdgeProcess",
    "rlnPipeLineProcessAlias", "rlnImageNameNoDW",
})

#: RELION particle/optics labels that must hold numbers (checked by load_particles).
NUMERIC_COLUMNS = frozenset({
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
    "rlnAmplitudeContrast", "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor",
    "rlnImagePixelSize", "rlnDetectorPixelSize", "rlnMagnification", "rlnImageSize",
    "rlnImageDimensionality", "rlnOpticsGroup", "rlnAnglePsi", "rlnAngleRot", "rlnAngleTilt",
    "rlnOriginX", "rlnOriginY", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber",
    "rlnCoordinateX", "rlnCoordinateY", "rlnGroupNumber", "rlnRandomSubset",
    "rlnMicrographOriginalPixelSize", "rlnBeamTiltX", "rlnBeamTiltY",
})

#: the optics labels RELION 3.1 moves out of a 3.0 particle table, in RELION's order
OPTICS_COLUMNS_30 = ("rlnAmplitudeContrast", "rlnBeamTiltX", "rlnBeamTiltY",
                     "rlnSphericalAberration", "rlnVoltage", "rlnDetectorPixelSize",
                     "rlnMagnification")

_STRUCT = re.compile(rb"\n[ \t]*(?=data_|loop_|_)")
_NONSPACE = re.compile(rb"\S")
_TOKEN = re.compile(r"""\s*(?:"(.*?)"(?=\s|$)|'(.*?)'(?=\s|$)|(\S+))""")


# --------------------------------------------------------------------------------------- read
def _normalize(data: bytes) -> bytes:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return b"\n" + data + b"\n"


def _tokens(line: str, path, lineno) -> list[str]:
    out = []
    pos = 0
    n = len(line)
    while pos < n:
        m = _TOKEN.match(line, pos)
        if m is None or m.end() == pos:
            if line[pos:].strip() == "":
                break
            raise InputError(f"{path}: line {lineno}: cannot parse {line.strip()!r}")
        pos = m.end()
        if m.group(1) is not None:
            out.append(m.group(1))
        elif m.group(2) is not None:
            out.append(m.group(2))
        elif m.group(3) is not None:
            out.append(m.group(3))
        else:
            break
    return out


def _is_blank_or_comment(gap: bytes) -> bool:
    m = _NONSPACE.search(gap)
    if m is None:
        return True
    if gap[m.start():m.start() + 1] != b"#":
        return False
    for line in gap.split(b"\n"):
        s = line.strip()
        if s and not s.startswith(b"#"):
            return False
    return True


def _fix_types(df: pd.DataFrame) -> pd.DataFrame:
    """Strings that are all numbers (``nan``, ``inf`` included) -> float; bools -> text."""
    for c in df.columns:
        s = df[c]
        if c in STRING_COLUMNS:
            if s.dtype == object or not pd.api.types.is_string_dtype(s.dtype):
                df[c] = s.astype(str)
            continue
        if s.dtype == bool:
            df[c] = s.map({True: "True", False: "False"}).astype(str)
        elif s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
            if len(s) == 0:
                continue
            arr = s.to_numpy(dtype=object)
            try:
                iv = arr.astype(np.int64)
                if all(str(v).lstrip("+-").isdigit() for v in arr[:1000]) and \
                        np.array_equal(iv.astype(str), np.char.lstrip(arr.astype(str), "+")):
                    df[c] = iv
                    continue
            except (ValueError, TypeError, OverflowError):
                pass
            try:
                df[c] = arr.astype(np.float64)
            except (ValueError, TypeError):
                if s.dtype == object:
                    df[c] = s.astype(str)
    return df


def _parse_loop_body(body: bytes, labels: list[str], path, first_line: int) -> pd.DataFrame:
    if _NONSPACE.search(body) is None:
        return pd.DataFrame({c: pd.Series([], dtype=str if c in STRING_COLUMNS else object)
                             for c in labels})[labels] if len(set(labels)) == len(labels) \
            else pd.DataFrame(columns=labels)
    if b'"' in body or b"'" in body or b"#" in body:
        return _parse_loop_body_python(body, labels, path, first_line)
    dtype = {c: str for c in labels if c in STRING_COLUMNS}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(io.BytesIO(body), sep=r"\s+", header=None, names=labels,
                             dtype=dtype, index_col=False, keep_default_na=False,
                             na_values=[""], engine="c", quoting=csv.QUOTE_NONE,
                             skip_blank_lines=True, low_memory=False)
    except pd.errors.ParserWarning:
        raise InputError(f"{path}: line {first_line}: a row of this loop has more values than "
                         f"its {len(labels)} columns") from None
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m:
            raise InputError(f"{path}: line {first_line + int(m.group(2)) - 1}: {m.group(3)} "
                             f"values where the loop has {len(labels)} columns") from None
        raise InputError(f"{path}: cannot parse loop starting at line {first_line}: {e}") \
            from None
    except ValueError as e:
        raise InputError(f"{path}: cannot parse loop starting at line {first_line}: {e}") \
            from None
    na = df.isna().to_numpy()
    if na.any():
        row = int(np.nonzero(na.any(axis=1))[0][0])
        raise InputError(f"{path}: row {row + 1} of the loop starting at line {first_line} has "
                         f"fewer values than the loop's {len(labels)} columns")
    return _fix_types(df)


def _parse_loop_body_python(body: bytes, labels, path, first_line) -> pd.DataFrame:
    rows = []
    text = body.decode("utf-8", errors="replace")
    for i, line in enumerate(text.split("\n")):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        toks = _tokens(line, path, first_line + i)
        if len(toks) != len(labels):
            raise InputError(f"{path}: line {first_line + i}: {len(toks)} values where the loop "
                             f"has {len(labels)} columns")
        rows.append(toks)
    cols = list(zip(*rows)) if rows else [[] for _ in labels]
    df = pd.DataFrame({j: pd.Series(list(c), dtype=object) for j, c in enumerate(cols)})
    df.columns = labels
    return _fix_types(df)


def _kv_frame(items: list[tuple[str, str]]) -> pd.DataFrame:
    df = pd.DataFrame({k: pd.Series([v], dtype=object) for k, v in items})
    return _fix_types(df)


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Every data block of a STAR file as ``{name: DataFrame}`` (names without ``data_``).

    Raises :class:`InputError` naming the file and line for unparsable input.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    return parse_star_bytes(raw, path)


def parse_star_bytes(raw: bytes, path="<star>") -> dict[str, pd.DataFrame]:
    """:func:`read_star` on bytes already in memory."""
    data = _normalize(raw)
    starts = [m.start() + 1 for m in _STRUCT.finditer(data)]  # offset of each structural line
    # line numbers of structural lines (1-based in the original file; data has a leading \n)
    blocks: dict[str, pd.DataFrame] = {}
    counts: dict[str, int] = {}

    def unique(name: str) -> str:
        counts[name] = counts.get(name, 0) + 1
        return name if counts[name] == 1 else f"{name}#{counts[name]}"

    # preamble before the first structural line may hold only comments / blank lines
    if starts and not _is_blank_or_comment(data[:starts[0]]):
        raise InputError(f"{path}: text before the first data_ block: not a STAR file")
    if not starts:
        if _NONSPACE.search(data) is None:
            raise InputError(f"{path}: empty file")
        raise InputError(f"{path}: no data_ block: not a STAR file")

    line_of = _LineCounter(data)
    block_name: str | None = None
    kv: list[tuple[str, str]] = []
    loop_labels: list[str] | None = None  # collecting labels of the current loop
    pending: list[tuple[str, pd.DataFrame]] = []

    def flush_block():
        nonlocal kv
        if block_name is None:
            return
        if kv:
            pending.insert(0, (block_name, _kv_frame(kv)))
        if not pending:
            blocks[unique(block_name)] = pd.DataFrame()
        for nm, df in pending:
            blocks[unique(nm)] = df
        pending.clear()
        kv = []

    n = len(starts)
    for k, s in enumerate(starts):
        eol = data.find(b"\n", s)
        line = data[s:eol].decode("utf-8", errors="replace").strip()
        nxt = starts[k + 1] if k + 1 < n else len(data)
        gap = data[eol + 1:nxt]
        lineno = line_of(s)
        if line.startswith("data_"):
            if loop_labels is not None:
                _finish_loop_empty(loop_labels, pending, block_name)
                loop_labels = None
            flush_block()
            block_name = line[5:].split()[0] if len(line) > 5 else ""
            if not _is_blank_or_comment(gap):
                raise InputError(f"{path}: line {lineno + 1}: unexpected text after data_")
            continue
        if block_name is None:
            raise InputError(f"{path}: line {lineno}: {line.split()[0]!r} before any data_ block")
        if line.startswith("loop_"):
            if loop_labels is not None:
                _finish_loop_empty(loop_labels, pending, block_name)
            loop_labels = []
            if line[5:].strip() and not line[5:].strip().startswith("#"):
                raise InputError(f"{path}: line {lineno}: unexpected text after loop_")
            if not _is_blank_or_comment(gap):
                raise InputError(f"{path}: line {lineno + 1}: loop_ without column labels")
            continue
        # a label or a key/value line
        if loop_labels is not None:
            toks = line.split()
            loop_labels.append(toks[0][1:])
            if not _is_blank_or_comment(gap):
                # this was the last label: the gap is the loop body
                if len(set(loop_labels)) != len(loop_labels):
                    dup = [c for c in loop_labels if loop_labels.count(c) > 1][0]
                    raise InputError(f"{path}: column {dup} appears twice in one loop")
                df = _parse_loop_body(gap, loop_labels, path, lineno + 1)
                pending.append((block_name if not pending else f"{block_name}#{len(pending) + 1}",
                                df))
                loop_labels = None
            elif k + 1 == n or not data[nxt:nxt + 1 + 64].lstrip(b" \t").startswith(b"_"):
                # next structural line is not a label: loop with no rows
                _finish_loop_empty(loop_labels, pending, block_name)
                loop_labels = None
            continue
        toks = _tokens(line, path, lineno)
        key = toks[0][1:]
        if len(toks) == 2:
            kv.append((key, toks[1]))
        elif len(toks) == 1:
            raise InputError(f"{path}: line {lineno}: {toks[0]} has no value")
        else:
            raise InputError(f"{path}: line {lineno}: {toks[0]} has {len(toks) - 1} values; "
                             "quote values that contain spaces")
        if not _is_blank_or_comment(gap):
            raise InputError(f"{path}: line {lineno + 1}: unexpected text after {toks[0]}")
    if loop_labels is not None:
        _finish_loop_empty(loop_labels, pending, block_name)
    flush_block()
    return blocks


def _finish_loop_empty(labels, pending, block_name):
    df = pd.DataFrame({c: pd.Series([], dtype=str if c in STRING_COLUMNS else np.float64)
                       for c in labels})
    pending.append((block_name if not pending else f"{block_name}#{len(pending) + 1}", df))


class _LineCounter:
    """Line number (1-based, in the original file) of a byte offset; counts incrementally."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.line = data, 0, 0

    def __call__(self, off: int) -> int:
        if off >= self.pos:
            self.line += self.data.count(b"\n", self.pos, off)
        else:
            self.line = self.data.count(b"\n", 0, off)
        self.pos = off
        return self.line  # data starts with an added "\n", so this is already 1-based


# -------------------------------------------------------------------------------------- write
_NEEDS_QUOTE = re.compile(r"""(?:\s|^$|^["'_#;$]|^data_|^loop_|^save_|^global_|^stop_)""")


def _quote(v: str) -> str:
    if not _NEEDS_QUOTE.search(v):
        return v
    if "\n" in v or "\r" in v:
        raise InputError(f"STAR value {v!r} contains a line break and cannot be written")
    for q in ('"', "'"):
        if not re.search(re.escape(q) + r"(?:\s|$)", v):
            return f"{q}{v}{q}"
    raise InputError(f"STAR value {v!r} contains both quote characters before whitespace and "
                     "cannot be written")


def _column_text(s: pd.Series) -> list[str]:
    """Text of one column: shortest round-tripping floats (repr), ints, quoted strings."""
    dt = s.dtype
    if pd.api.types.is_bool_dtype(dt) and not s.isna().any():
        return ["1" if v else "0" for v in s.to_numpy()]
    if pd.api.types.is_integer_dtype(dt) and not s.isna().any():
        return list(map(str, s.to_numpy().astype(np.int64).tolist()))
    if pd.api.types.is_float_dtype(dt):
        a = s.to_numpy(dtype=np.float64, na_value=np.nan) if dt != np.float32 else s.to_numpy()
        if a.dtype == np.float32:
            return a.astype(str).tolist()  # shortest text that round-trips the float32
        return list(map(repr, a.tolist()))
    if pd.api.types.is_integer_dtype(dt):  # nullable ints with NA
        return ["nan" if pd.isna(v) else str(int(v)) for v in s]
    vals = s.tolist()
    txt = pd.Series(vals, dtype=object).map(
        lambda v: v if isinstance(v, str) else ("" if v is None or v is pd.NA or
                                                  (isinstance(v, float) and np.isnan(v))
                                                  else v.decode() if isinstance(v, bytes)
                                                  else repr(float(v)) if isinstance(v, float)
                                                  else str(v))) \
        if not all(type(v) is str for v in vals[:1000]) or \
        any(type(v) is not str for v in vals) else pd.Series(vals, dtype=object)
    out = txt.tolist()
    special = ('"', "'", "_", "#", ";", "$", "data_", "loop_", "save_", "global_", "stop_")
    for j, v in enumerate(out):
        if len(v.split()) != 1 or v != v.strip() or v.startswith(special):
            out[j] = _quote(v)
    return out


#: values formatted at once by :func:`_write_loop` (~130 bytes of Python text each: a chunk
#: of 2^20 cells, e.g. 25k rows × 41 columns, peaks near 80–140 MB whatever the table's size)
CHUNK_CELLS = 1 << 20


def _write_loop(f, name: str, df: pd.DataFrame, chunk: int | None = None) -> None:
    """Write one block as a loop, formatting ``chunk`` rows at a time (bounded memory).

    ``chunk`` defaults to :data:`CHUNK_CELLS` // number of columns; the text does not depend
    on it.
    """
    f.write(f"# version 30001\n\ndata_{name}\n\nloop_\n")
    f.write("".join(f"_{str(c).lstrip('_')} #{i + 1}\n" for i, c in enumerate(df.columns)))
    if len(df.columns):
        if chunk is None:
            chunk = max(1, CHUNK_CELLS // len(df.columns))
        for s in range(0, len(df), chunk):
            part = df.iloc[s:s + chunk]
            cols = [_column_text(part[c]) for c in df.columns]
            f.write("\n".join(map(" ".join, zip(*cols))))
            f.write("\n")
            del part, cols     # before the next chunk is formatted
    f.write("\n")


def write_star_blocks(path: str | os.PathLike, blocks: Mapping[str, pd.DataFrame]) -> Path:
    """Write ``{name: DataFrame}`` as loops (in the given order), atomically. Returns path."""
    path = Path(path)
    for name, df in blocks.items():
        if df is None:
            continue
        dup = df.columns[df.columns.duplicated()]
        if len(dup):
            raise InputError(f"{path}: column {dup[0]} appears twice in block {name}")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n")
            for n, df in blocks.items():
                if df is not None:
                    _write_loop(f, n, df)
    return path


def write_star(path: str | os.PathLike, particles_df: pd.DataFrame,
               optics_df: pd.DataFrame | None) -> Path:
    """Write a RELION 3.1 particle STAR: ``data_optics`` (if given) then ``data_particles``.

    Every column and row is written in the order given; atomic. Returns ``path``.
    """
    blocks = {}
    if optics_df is not None:
        blocks["optics"] = optics_df
    blocks["particles"] = particles_df
    return write_star_blocks(path, blocks)


# ------------------------------------------------------------------------------- 3.0 -> 3.1
def upgrade_relion30(df: pd.DataFrame, image_size: Iterable[int] | None = None,
                     fallback_apix: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Upgrade a RELION 3.0 particle table the way RELION 3.1's StarConverter does.

    Returns ``(particles, optics)``. ``image_size``: per optics group box (from the stacks) to
    set rlnImageSize / rlnImageDimensionality as RELION does by reading one header per group;
    ``None`` leaves them out (RELION's behaviour when it cannot find the images).
    ``fallback_apix``: pixel size to use when the table has no rlnDetectorPixelSize /
    rlnMagnification (RELION has none to use then; we need one to convert rlnOriginX/Y).
    """
    present = [c for c in OPTICS_COLUMNS_30 if c in df.columns]
    n = len(df)
    if present:
        vals = df[present].to_numpy(dtype=np.float64)
        _, first, inv = np.unique(vals, axis=0, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        order = np.argsort(first)  # groups numbered by first appearance, as RELION does
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        group = rank[inv] + 1
        group_rows = np.sort(first)
    else:
        group = np.ones(n, dtype=np.int64)
        group_rows = np.array([0]) if n else np.array([], dtype=np.int64)
    parts = df.drop(columns=present).copy()
    parts["rlnOpticsGroup"] = group.astype(np.int64)
    ng = len(group_rows)
    optics = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, ng + 1, dtype=np.int64),
        "rlnOpticsGroupName": pd.Series([f"opticsGroup{g}" for g in range(1, ng + 1)], dtype=str),
    })
    for c in present:
        optics[c] = df[c].to_numpy(dtype=np.float64)[group_rows] if n else np.nan
    if "rlnDetectorPixelSize" in optics and "rlnMagnification" in optics:
        optics["rlnImagePixelSize"] = 1e4 * optics["rlnDetectorPixelSize"] / optics["rlnMagnification"]
        optics = optics.drop(columns=["rlnDetectorPixelSize", "rlnMagnification"])
    elif "rlnImagePixelSize" in parts.columns:
        # not a 3.0 label, but some tools write it into a single table
        optics["rlnImagePixelSize"] = [parts["rlnImagePixelSize"].to_numpy(np.float64)[
            np.argmax(group == g)] for g in optics["rlnOpticsGroup"]]
    elif fallback_apix is not None:
        optics["rlnImagePixelSize"] = float(fallback_apix)
    apix_g = optics["rlnImagePixelSize"].to_numpy(np.float64) if "rlnImagePixelSize" in optics \
        else None
    pairs = [("rlnOriginX", "rlnOriginXAngst"), ("rlnOriginY", "rlnOriginYAngst"),
             ("rlnOriginZ", "rlnOriginZAngst"), ("rlnOriginXPrior", "rlnOriginXPriorAngst"),
             ("rlnOriginYPrior", "rlnOriginYPriorAngst"), ("rlnOriginZPrior", "rlnOriginZPriorAngst"),
             ("rlnHelicalTrackLength", "rlnHelicalTrackLengthAngst")]
    if apix_g is not None:
        ap = apix_g[group - 1] if n else np.zeros(0)
        for old, new in pairs:
            if old in parts.columns:
                parts[new] = parts[old].to_numpy(np.float64) * ap
        parts = parts.drop(columns=[o for o, _ in pairs if o in parts.columns])
    if image_size is not None:
        sizes = list(image_size)
        optics["rlnImageSize"] = np.asarray(sizes, dtype=np.int64)
        optics["rlnImageDimensionality"] = np.full(len(optics), 2, dtype=np.int64)
    return parts.reset_index(drop=True), optics
