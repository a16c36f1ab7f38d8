"""Build the ``cryolatent report`` page: one self-contained HTML file.

Inputs (:func:`classify_inputs`): one particle STAR with latents (``embed``'s ``OUT.star``,
or ``refine``'s, which keeps them; ``OUT.z.npy`` beside it when the STAR has no
``cryolatentZ`` columns), and optionally a training run folder (the generator: denoised
images at each class's latent centre and traversals along the principal axes of z) and a
``classes`` output folder (aligned and denoised class averages, its trust report).

What goes into the page (:func:`make_report`):

- the latent map (PCA of z, and UMAP unless ``umap=False``) as a Bokeh WebGL scatter, its
  BokehJS inline; the first map's coordinates go into the Bokeh document as float32 arrays
  (base64), every other array into ``<script type="application/octet-stream">`` blocks,
  base64 of little-endian typed arrays, decoded by the page only when asked for: the other
  map (uint16 per coordinate), each numeric STAR column to colour by (uint8 codes of 255
  levels over its 0.5–99.5 percentile range, or exact small integers; 255 = not a number),
  and the particle names (image number uint32 + stack code, or the names as JSON when they
  do not follow ``N@stack``);
- the class gallery: per class its size, images (``OUT_classes.mrcs`` beside the STAR from
  ``refine``; ``aligned_averages.mrcs`` / ``denoised_averages.mrcs`` of a classes folder; the
  generator at the class's latent centre when a run is given and no classes folder has
  them), half-set resolution and the trust report's warnings (``OUT_summary.json`` beside
  the STAR, else the classes folder's ``summary.json``; used only when its class sizes match
  the STAR), and ``select --auto``'s verdict;
- the traversals (run folder given), images as PNG data URIs;
- the page's own CSS and JavaScript (:mod:`cryolatent.report.page`): colouring, map switch,
  class clicks, and the *Save selection* button (:mod:`cryolatent.report.selection`).

Nothing is fetched from the network: no ``src``/``href`` points outside the file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError

log = logging.getLogger("cryolatent")

#: columns never offered for colouring (identifiers, not quantities)
SKIP_COLUMNS = ("rlnImageName", "rlnMicrographName", "rlnOpticsGroupName")
#: colour maps by column (a cyclic one for angles)
CYCLIC = ("rlnAnglePsi", "rlnAngleRot", "rlnAngleTilt", "rlnDefocusAngle")
#: the uint8 code of a missing (non-finite) value
NAN_CODE = 255
#: image shown per gallery card at most this many px (larger averages are binned)
MAX_IMAGE_PX = 128
#: URLs from which BokehJS would load code for features a report does not use (LaTeX
#: labels: MathJax; GMapPlot: Google Maps; TablerIcon: a web font); blanked in the page so
#: that nothing in it can reach the network
VENDOR_URLS = ("https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-svg.js",
               "https://maps.googleapis.com/maps/api/js",
               "https://cdn.jsdelivr.net/npm/@tabler/icons-webfont@latest")


def offline(page_html: str) -> str:
    """``page_html`` with :data:`VENDOR_URLS` replaced by ``about:blank``."""
    for u in VENDOR_URLS:
        page_html = page_html.replace(u, "about:blank")
    return page_html


@dataclass
class Inputs:
    star: Path
    rundir: Path | None = None
    classes_dir: Path | None = None


def classify_inputs(paths) -> Inputs:
    """Sort the command's arguments: exactly one ``.star`` file; at most one training run
    folder (``config.json`` + ``checkpoints/``) and one ``classes`` output folder
    (``aligned_averages.mrcs`` or ``class_counts.csv``). One-line errors otherwise."""
    star = rundir = classes = None
    for p in map(Path, paths):
        if p.is_dir():
            if (p / "config.json").is_file() and (p / "checkpoints").is_dir():
                if rundir is not None:
                    raise InputError(f"{p}: a second run folder (already {rundir})")
                rundir = p
            elif (p / "aligned_averages.mrcs").is_file() or (p / "class_counts.csv").is_file():
                if classes is not None:
                    raise InputError(f"{p}: a second classes folder (already {classes})")
                classes = p
            else:
                raise InputError(f"{p}: neither a training run folder (config.json, "
                                 "checkpoints/) nor a classes folder (aligned_averages.mrcs)")
        elif p.is_file():
            if p.suffix.lower() != ".star":
                raise InputError(f"{p}: report reads a particle .star (embed's or refine's "
                                 "output), a run folder and a classes folder")
            if star is not None:
                raise InputError(f"{p}: a second STAR (already {star}); give one")
            star = p
        else:
            raise InputError(f"{p}: no such file or folder")
    if star is None:
        raise InputError("give the particle STAR with latents (embed's or refine's output), "
                         "e.g. cryolatent report run1 embedded.star -o report.html")
    return Inputs(star, rundir, classes)


# ------------------------------------------------------------------------------ encoding
def b64(arr: np.ndarray) -> str:
    """Base64 of ``arr``'s bytes, little-endian."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return base64.b64encode(a.tobytes()).decode("ascii")


def quantize_column(v: np.ndarray, cyclic: bool = False) -> tuple[np.ndarray, dict]:
    """uint8 codes of a numeric column and how to read them back: value = offset + code ×
    scale, code 255 = missing. Whole numbers spanning < 255 values are exact; others take
    255 levels over their 0.5–99.5 percentile range (values beyond it get the end codes:
    the colours are not washed out by a few outliers), angles (``cyclic``) over -180..180."""
    v = np.asarray(v, dtype=np.float64)
    fin = np.isfinite(v)
    codes = np.full(len(v), NAN_CODE, np.uint8)
    if not fin.any():
        return codes, {"offset": 0.0, "scale": 1.0, "lo": 0.0, "hi": 1.0, "exact": True}
    f = v[fin]
    lo, hi = float(f.min()), float(f.max())
    if np.all(f == np.round(f)) and hi - lo < NAN_CODE:
        codes[fin] = (f - lo).astype(np.uint8)
        return codes, {"offset": lo, "scale": 1.0, "lo": lo, "hi": max(hi, lo + 1),
                       "exact": True}
    if cyclic and lo >= -360 and hi <= 360:
        lo, hi = -180.0, 180.0
        f = (f + 180.0) % 360.0 - 180.0
    elif len(f) > 200:
        lo, hi = (float(x) for x in np.percentile(f, [0.5, 99.5]))
        if not hi > lo:
            lo, hi = float(f.min()), float(f.max())
    scale = (hi - lo) / (NAN_CODE - 1)
    codes[fin] = np.clip(np.round((f - lo) / scale), 0, NAN_CODE - 1).astype(np.uint8)
    return codes, {"offset": lo, "scale": scale, "lo": lo, "hi": hi, "exact": False}


def quantize_coords(xy: np.ndarray) -> tuple[np.ndarray, dict]:
    """uint16 codes of 2-D coordinates (65,535 levels across each axis: below a pixel of
    any screen) and their offsets/scales."""
    xy = np.asarray(xy, np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    scale = np.where(hi > lo, (hi - lo) / 65535.0, 1.0)
    q = np.round((xy - lo) / scale).astype(np.uint16)
    return q, {"offset": lo.tolist(), "scale": scale.tolist()}


def encode_names(names: np.ndarray, blobs: dict) -> dict:
    """Compact particle names for the page: ``N@stack`` with N written at one zero-padded
    width (RELION's ``%06d``, or unpadded) become an image number (uint32) and a stack code
    (uint16/uint32) into a list of stacks, reproduced exactly by the page; anything else is
    stored as JSON text. Repeated names add the occurrence of each row (uint16)."""
    s = pd.Series(np.asarray(names, dtype=object)).astype(str)
    parts = s.str.partition("@")
    idx_txt, at, path = parts[0], parts[1], parts[2]
    info: dict[str, Any] = {}
    compact = bool((at == "@").all()) and bool(idx_txt.str.fullmatch(r"\d{1,10}").all())
    if compact:
        num = idx_txt.astype(np.int64).to_numpy()
        width = int(idx_txt.str.len().min())
        compact = num.max(initial=0) < 2 ** 32 and bool(
            (pd.Series(num).astype(str).str.zfill(width) == idx_txt).all())
    if compact:
        code, stacks = pd.factorize(path)
        blobs["names-num"] = b64(num.astype("<u4"))
        dtype = "<u2" if len(stacks) < 65536 else "<u4"
        blobs["names-stack"] = b64(code.astype(dtype))
        info.update(kind="compact", width=width, stacks=[str(x) for x in stacks],
                    stack_dtype="u16" if dtype == "<u2" else "u32")
    else:
        blobs["names-json"] = base64.b64encode(
            json.dumps(s.tolist()).encode("utf-8")).decode("ascii")
        info.update(kind="json")
    dup = s.duplicated(keep=False).to_numpy()
    if dup.any():
        occ = s.groupby(s.to_numpy(), sort=False).cumcount().to_numpy()
        blobs["names-occ"] = b64(np.minimum(occ, 65535).astype("<u2"))
        info["occurrence"] = True
        log.warning("%d particles share their names with others: the selection file records "
                    "which occurrence of each name was chosen", int(dup.sum()))
    return info


def png_uri(img: np.ndarray, lo: float | None = None, hi: float | None = None) -> str:
    """A 2-D image as a grey PNG data URI (1st..99th percentile, or ``lo``..``hi``, to
    black..white; images larger than :data:`MAX_IMAGE_PX` are binned)."""
    from PIL import Image

    a = np.asarray(img, np.float64)
    f = max(1, int(np.ceil(max(a.shape) / MAX_IMAGE_PX)))
    if f > 1:
        h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
        a = a[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    if lo is None or hi is None:
        fin = a[np.isfinite(a)]
        lo, hi = (np.percentile(fin, [1, 99]) if fin.size else (0.0, 1.0))
    a = np.nan_to_num((a - lo) / (hi - lo if hi > lo else 1.0), nan=0.0)
    u8 = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, "L").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -------------------------------------------------------------------------------- inputs
def read_latents(star: Path) -> tuple[pd.DataFrame, np.ndarray, str]:
    """The particle table of ``star`` and its latents (N, D): the ``cryolatentZ`` columns,
    else ``OUT.z.npy`` beside it (as ``embed`` writes both). Returns (table, z, where)."""
    from ..analysis.plots import latent_columns
    from ..io import read_particle_table

    table, _ = read_particle_table(star, unique=False)
    cols = latent_columns(table)
    if cols:
        z = table[cols].to_numpy(dtype=np.float64)
        where = f"{star.name} ({cols[0]}..{cols[-1]})"
    else:
        zf = star.with_name(star.stem + ".z.npy")
        if not zf.is_file():
            raise InputError(f"{star}: no cryolatentZ columns and no {zf.name} beside it; "
                             f"run cryolatent embed RUNDIR INPUT -o {star.name} first")
        z = np.load(zf, mmap_mode="r")
        if z.ndim != 2 or len(z) != len(table):
            raise InputError(f"{zf}: {z.shape[0] if z.ndim else 0} latents for the "
                             f"{len(table)} particles of {star}")
        z = np.asarray(z, np.float64)
        where = zf.name
    bad = ~np.all(np.isfinite(z), axis=1)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise InputError(f"{star}: the latent of particle {j + 1} is not finite")
    return table, z, where


def _class_numbers(table: pd.DataFrame) -> np.ndarray | None:
    if "rlnClassNumber" not in table.columns:
        return None
    c = pd.to_numeric(table["rlnClassNumber"], errors="coerce").to_numpy(np.float64)
    if not np.all(np.isfinite(c)) or np.any(c != np.round(c)) or c.min() < 0 or c.max() > 65535:
        log.warning("rlnClassNumber is not a whole number 0..65535 everywhere: no class "
                    "gallery")
        return None
    return c.astype(np.int64)


def _read_stack(path: Path, k: int) -> np.ndarray | None:
    from ..io import read_header, read_images

    try:
        h = read_header(path)
        if h.nz < k:
            log.warning("%s: %d images for %d classes; not shown", path, h.nz, k)
            return None
        return read_images(path, np.arange(k), h)
    except Exception as e:  # noqa: BLE001 - a picture is not worth failing the report
        log.warning("%s: not read (%s); not shown", path, e)
        return None


def _classes_dir_matches(folder: Path, sizes: dict[int, int]) -> bool:
    """Whether a ``classes`` output folder was made from these classes (its
    ``class_counts.csv`` gives the same size to every class); warns when not."""
    f = folder / "class_counts.csv"
    try:
        counts = pd.read_csv(f)
        said = {int(k): int(v) for k, v in zip(counts["class"], counts["count"]) if int(v) > 0}
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:
        log.warning("%s: not readable (%s); the folder's class averages are not shown", f, e)
        return False
    if said != {k: v for k, v in sizes.items() if v > 0 and k >= 1}:
        log.warning("%s was made from other classes than the STAR's (its class_counts.csv "
                    "differs; e.g. embed's classes, not refine's): its class averages are not "
                    "shown", folder)
        return False
    return True


def _read_summary(path: Path, sizes: dict[int, int]) -> dict | None:
    """A trust report, if it exists and describes these classes (same sizes)."""
    if not path.is_file():
        return None
    try:
        rep = json.loads(path.read_text())
        said = {int(c["class"]): int(c.get("size", 0)) for c in rep["classes"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: not a readable trust report (%s); not shown", path, e)
        return None
    said = {k: v for k, v in said.items() if v > 0}
    have = {k: v for k, v in sizes.items() if v > 0}
    if said != have:
        log.warning("%s describes other classes than the STAR (edited, or from another "
                    "run); not shown", path)
        return None
    rep["_path"] = str(path)
    return rep


def _class_notes(rep: dict | None) -> tuple[dict[int, dict], list[str], str | None]:
    """Per class: resolution text, warnings; the report's global warnings; its path."""
    if rep is None:
        return {}, [], None
    notes: dict[int, dict] = {}
    verdict = None
    try:
        from ..analysis.cluster import judge_classes

        verdict = {r["class"]: r for r in judge_classes(rep)["classes"]}
    except Exception as e:  # noqa: BLE001 - no pixel size etc.: verdicts not shown
        log.info("select --auto verdicts not shown (%s)", e)
    pairs = rep.get("indistinguishable_pairs") or []
    groups = rep.get("same_view_groups") or []
    for c in rep.get("classes", []):
        k = int(c["class"])
        r = c.get("resolution_A")
        res = ("no signal" if r is None else
               f"{'≤ ' if c.get('limited_by_nyquist') else ''}{float(r):.3g} Å")
        warn = []
        if c.get("beats_aligned_noise") is False:
            warn.append("no better than noise aligned the same way")
        twins = sorted({int(x) for p in pairs for x in p.get("classes", []) if
                        k in p.get("classes", []) and int(x) != k})
        if twins:
            warn.append("indistinguishable from class " + ", ".join(map(str, twins)))
        for g in groups:
            if k in g:
                warn.append("same view as class " + ", ".join(str(x) for x in g if x != k))
        kept = None
        if verdict and k in verdict:
            kept = bool(verdict[k]["kept"])
            if not kept and verdict[k]["size"] > 0:
                warn.append("select --auto drops it: " + "; ".join(verdict[k]["reasons"]))
        notes[k] = {"resolution": res, "warnings": warn, "auto_kept": kept}
    return notes, [str(w) for w in rep.get("warnings", [])], rep.get("_path")


# ---------------------------------------------------------------------------- the model
def _generator_images(rundir: Path, z: np.ndarray, classes: np.ndarray | None, K: int,
                      device: str, want_denoised: bool, steps: int = 7,
                      n_axes: int = 2) -> tuple[np.ndarray | None, dict | None]:
    """(denoised (K, s, s) or None, traversal dict or None) from the run's generator."""
    from ..analysis.class_averages import denoised_class_averages, latent_traversal
    from ..run import load_run

    model, _ = load_run(rundir, device)
    model.eval()
    den = None
    if want_denoised and classes is not None and K > 0:
        den = denoised_class_averages(model, z, classes, n_classes=K)
    trav = None
    if len(z) >= 2:
        t = latent_traversal(model, z, n_axes=n_axes, steps=steps)
        lo, hi = np.percentile(t.images, [1, 99])
        rows = []
        for a in range(t.images.shape[0]):
            rows.append({"axis": a + 1, "explained": float(t.explained[a]),
                         "offsets": [float(x) for x in t.offsets[a]],
                         "images": [png_uri(im, lo, hi) for im in t.images[a]]})
        trav = {"rows": rows}
    return den, trav


# ------------------------------------------------------------------------------ the page
def _palettes() -> dict[str, list[str]]:
    from ..analysis.plots import PSI_CMAP, _mpl

    matplotlib, _ = _mpl()
    from matplotlib.colors import to_hex

    out = {}
    for name in ("viridis", PSI_CMAP):
        cmap = matplotlib.colormaps[name]
        out[name] = [to_hex(cmap(i / 255.0)) for i in range(256)]
    out["cyclic"] = out.pop(PSI_CMAP)
    return out


def _class_palette(lo: int, hi: int, present) -> list[str]:
    from matplotlib.colors import to_hex

    from ..analysis.plots import class_colors

    cols = class_colors(sorted(present))
    return [to_hex(cols[k]) if k in cols else "#bbbbbb" for k in range(lo, hi + 1)]


def _colour_columns(table: pd.DataFrame, classes: np.ndarray | None, blobs: dict,
                    columns=None) -> list[dict]:
    """Every numeric, non-constant column (or those named in ``columns``), plus the mean
    defocus; each's codes as a blob ``col-i``."""
    out: list[dict] = []
    if classes is not None:
        present = sorted(np.unique(classes).tolist())
        lo, hi = present[0], present[-1]
        blobs["col-class"] = b64(classes.astype("<u2"))
        out.append({"name": "rlnClassNumber", "label": "class (rlnClassNumber)",
                    "blob": "col-class", "dtype": "u16", "kind": "class", "lo": lo - 0.5,
                    "hi": hi + 0.5, "offset": 0.0, "scale": 1.0,
                    "palette": _class_palette(lo, hi, present)})
    cand: list[tuple[str, np.ndarray]] = []
    if {"rlnDefocusU", "rlnDefocusV"} <= set(table.columns):
        du = pd.to_numeric(table["rlnDefocusU"], errors="coerce").to_numpy(np.float64)
        dv = pd.to_numeric(table["rlnDefocusV"], errors="coerce").to_numpy(np.float64)
        cand.append(("defocus", (du + dv) / 2))
    for c in table.columns:
        if c in SKIP_COLUMNS or c == "rlnClassNumber":
            continue
        v = pd.to_numeric(table[c], errors="coerce").to_numpy(np.float64)
        if np.isfinite(v).mean() < 0.5:
            continue   # text
        cand.append((str(c), v))
    if columns:
        wanted = list(columns)
        have = {n for n, _ in cand}
        miss = [c for c in wanted if c not in have and c != "rlnClassNumber"]
        if miss:
            raise InputError(f"--color-by {miss[0]}: not a numeric column of the STAR (have "
                             f"{', '.join(sorted(have)[:12])}{', ...' if len(have) > 12 else ''})")
        cand = [(n, v) for n, v in cand if n in wanted]
    for n, v in cand:
        fin = v[np.isfinite(v)]
        if fin.size == 0 or fin.min() == fin.max():
            continue   # constant: nothing to see
        codes, q = quantize_column(v, cyclic=n in CYCLIC)
        key = f"col-{len(out)}"
        blobs[key] = b64(codes)
        label = "defocus (mean of rlnDefocusU, V; Å)" if n == "defocus" else n
        out.append({"name": n, "label": label, "blob": key, "dtype": "u8",
                    "kind": "cyclic" if n in CYCLIC else "linear",
                    "palette": "cyclic" if n in CYCLIC else "viridis", **q})
    return out


def _maps(z: np.ndarray, umap: bool, umap_sample: int, seed: int) -> list[dict]:
    from ..analysis.plots import pca_2d, umap_2d

    maps = []
    if umap and len(z) >= 10:
        t0 = time.perf_counter()
        xy = umap_2d(z, sample=umap_sample, seed=seed)
        maps.append({"name": "UMAP", "labels": ["UMAP 1", "UMAP 2"], "xy": xy})
        log.info("UMAP of %d latents: %.0f s", len(z), time.perf_counter() - t0)
    elif umap:
        log.warning("only %d particles: no UMAP, PCA only", len(z))
    xy, expl = pca_2d(z)
    maps.append({"name": "PCA", "labels": [f"PC 1 ({100 * expl[0]:.0f} % of the variance)",
                                           f"PC 2 ({100 * expl[1]:.0f} %)"], "xy": xy})
    return maps


def _figure(xy: np.ndarray, c0: np.ndarray, col0: dict, labels, n: int, palettes):
    from bokeh.models import (BoxSelectTool, ColorBar, ColumnDataSource, CustomJS,
                              LassoSelectTool, LinearColorMapper)
    from bokeh.plotting import figure

    src = ColumnDataSource({"x": xy[:, 0].astype("<f4"), "y": xy[:, 1].astype("<f4"),
                            "c": c0}, name="cl-points")
    pal = col0["palette"]
    mapper = LinearColorMapper(palette=palettes[pal] if isinstance(pal, str) else pal,
                               low=col0["lo"], high=col0["hi"], nan_color="#bbbbbb",
                               name="cl-mapper")
    p = figure(output_backend="webgl", tools="pan,wheel_zoom,reset", name="cl-plot",
               sizing_mode="stretch_both", min_width=400, min_height=400,
               x_axis_label=labels[0], y_axis_label=labels[1], toolbar_location="above")
    box, lasso = BoxSelectTool(), LassoSelectTool()
    p.add_tools(box, lasso)
    p.toolbar.active_drag = box
    p.toolbar.logo = None
    size = float(np.clip(14.0 / np.log10(max(n, 10)), 2.0, 6.0))
    alpha = float(np.clip(3e4 / max(n, 1), 0.25, 0.9))
    p.scatter("x", "y", source=src, size=size, line_color=None, name="cl-scatter",
              fill_color={"field": "c", "transform": mapper}, fill_alpha=alpha,
              nonselection_fill_alpha=alpha * 0.12, selection_fill_alpha=min(1.0, alpha * 1.5))
    cb = ColorBar(color_mapper=mapper, title=col0["label"], name="cl-colorbar",
                  title_text_font_size="11px")
    p.add_layout(cb, "right")
    src.selected.js_on_change("indices", CustomJS(
        code="if (window.cryolatentReport) window.cryolatentReport.onSelect();"))
    return p


def make_report(inputs, out: str | Path, umap: bool = True, umap_sample: int = 50_000,
                seed: int = 0, device: str = "auto", color_by=None, title: str | None = None,
                steps: int = 7) -> dict:
    """Write the report page to ``out`` (see the module docstring). ``inputs``: the
    command's arguments (:func:`classify_inputs`). Returns ``{"path", "particles",
    "bytes", "maps", "columns", "classes", "traversal"}``."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    from ..utils import atomic_path, summary_path_for
    from . import page

    t0 = time.perf_counter()
    ins = classify_inputs(inputs)
    out = Path(out)
    table, z, zwhere = read_latents(ins.star)
    n = len(table)
    log.info("report: %d particles, latents of dimension %d from %s", n, z.shape[1], zwhere)
    if "rlnImageName" not in table.columns:
        raise InputError(f"{ins.star}: column rlnImageName is missing (selections name "
                         "particles by it)")
    blobs: dict[str, str] = {}
    classes = _class_numbers(table)

    # --- maps
    maps = _maps(z, umap, umap_sample, seed)
    map_meta = []
    for i, m in enumerate(maps):
        entry = {"name": m["name"], "labels": m["labels"]}
        if i > 0:
            q, info = quantize_coords(m["xy"])
            blobs[f"map-{i}"] = b64(q.astype("<u2"))
            entry.update(blob=f"map-{i}", **info)
        map_meta.append(entry)

    # --- colours
    palettes = _palettes()
    cols = _colour_columns(table, classes, blobs, color_by)
    if not cols:
        raise InputError(f"{ins.star}: no numeric column to colour the map by")
    col0 = cols[0]
    if col0["kind"] == "class":
        c0 = classes.astype("<u2")
    else:
        c0 = None   # decoded below from its codes, as the page does
        codes = np.frombuffer(base64.b64decode(blobs[col0["blob"]]), np.uint8)
        c0 = np.where(codes == NAN_CODE, np.nan,
                      col0["offset"] + codes * col0["scale"]).astype("<f4")

    # --- names
    names_meta = encode_names(table["rlnImageName"].to_numpy(dtype=object), blobs)

    # --- classes: sizes, images, trust notes
    gallery: dict[str, Any] = {"classes": [], "images": [], "warnings": [], "report": None}
    K = 0
    den_needed = True
    if classes is not None:
        K = int(classes.max(initial=0))
        sizes = {k: int((classes == k).sum()) for k in range(0, K + 1)}
        images: list[tuple[str, np.ndarray]] = []
        refined = ins.star.with_name(ins.star.stem + "_classes.mrcs")
        if refined.is_file() and K:
            st = _read_stack(refined, K)
            if st is not None:
                images.append(("refine's average", st))
        if ins.classes_dir is not None and K and _classes_dir_matches(ins.classes_dir, sizes):
            for fname, what in (("aligned_averages.mrcs", "aligned average"),
                                ("denoised_averages.mrcs", "generator")):
                if (ins.classes_dir / fname).is_file():
                    st = _read_stack(ins.classes_dir / fname, K)
                    if st is not None:
                        images.append((what, st))
                        den_needed &= what != "generator"
        rep = _read_summary(summary_path_for(ins.star), sizes)
        if rep is None and ins.classes_dir is not None:
            rep = _read_summary(ins.classes_dir / "summary.json", sizes)
        notes, warnings, rep_path = _class_notes(rep)
        gallery.update(warnings=warnings, report=rep_path)
        gallery["_images"] = images
        gallery["_sizes"] = sizes
        gallery["_notes"] = notes

    # --- the generator
    traversal = None
    if ins.rundir is not None:
        try:
            den, traversal = _generator_images(ins.rundir, z, classes, K, device,
                                               want_denoised=den_needed and K > 0,
                                               steps=steps)
            if den is not None:
                gallery["_images"].append(("generator", den))
            if traversal is not None:
                traversal["run"] = str(ins.rundir)
        except Exception as e:  # noqa: BLE001 - the map is still worth having
            if isinstance(e, KeyboardInterrupt):
                raise
            log.warning("WARNING: %s: the generator could not be run (%s: %s); no "
                        "traversals in the report", ins.rundir, type(e).__name__, e)
    if classes is not None:
        gallery["image_kinds"] = [w for w, _ in gallery["_images"]]
        for k in range(0 if gallery["_sizes"].get(0) else 1, K + 1):
            size = gallery["_sizes"][k]
            entry = {"class": k, "size": size, "fraction": size / n,
                     "images": [png_uri(st[k - 1]) if k >= 1 else None
                                for _, st in gallery["_images"]]}
            entry.update(gallery["_notes"].get(k, {}))
            gallery["classes"].append(entry)
        for key in ("_images", "_sizes", "_notes"):
            gallery.pop(key)

    meta = {
        "title": title or f"cryolatent report: {ins.star.name}",
        "star": str(ins.star.resolve()), "star_name": ins.star.name, "n": n,
        "z_dim": int(z.shape[1]), "z_from": zwhere, "maps": map_meta, "columns": cols,
        "palettes": palettes, "names": names_meta,
        "gallery": gallery if classes is not None else None, "traversal": traversal,
        "run": str(ins.rundir) if ins.rundir else None,
        "classes_dir": str(ins.classes_dir) if ins.classes_dir else None,
        "selection_file": ins.star.stem + "_selection.json",
        "made": time.strftime("%Y-%m-%d %H:%M"),
    }
    from .. import __version__

    meta["version"] = __version__
    fig = _figure(maps[0]["xy"], c0, col0, maps[0]["labels"], n, palettes)
    html_text = file_html(fig, INLINE, title=meta["title"], template=page.template(),
                          template_variables={"report_css": page.CSS, "report_js": page.JS,
                                              "meta_json": page.script_json(meta),
                                              "blobs": page.blob_tags(blobs),
                                              "title_html": html.escape(meta["title"])})
    html_text = offline(html_text)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(html_text, encoding="utf-8")
    nbytes = out.stat().st_size
    log.info("report: %s (%.1f MB, %d particles, maps %s, %d colourings, %d classes%s) in "
             "%.0f s", out, nbytes / 1e6, n, "/".join(m["name"] for m in maps), len(cols),
             len(gallery["classes"]) if classes is not None else 0,
             ", traversals" if traversal else "", time.perf_counter() - t0)
    return {"path": out, "particles": n, "bytes": nbytes,
            "maps": [m["name"] for m in maps], "columns": [c["name"] for c in cols],
            "classes": len(gallery["classes"]) if classes is not None else 0,
            "traversal": traversal is not None}


__all__ = ["make_report", "classify_inputs", "read_latents", "encode_names",
           "quantize_column", "quantize_coords"]
