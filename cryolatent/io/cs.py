"""cryoSPARC ``.cs`` particle files (NumPy structured arrays saved with ``np.save``).

:func:`cs_to_relion` converts the fields a particle set needs into RELION 3.1 columns the way
pyem's ``csparc2star`` does (image name ``%06d@path`` from ``blob/idx`` + 1 and ``blob/path``
without its leading ``>``; ``rlnAnglePsi`` = degrees(``alignments2D/pose``); origins in Å =
``alignments2D/shift`` (px) × ``blob/psize_A``; defocus/astigmatism/phase shift from ``ctf/*``
(radians → degrees); ``rlnClassNumber`` = ``alignments2D/class`` + 1; optics table with
voltage, pixel size, Cs, amplitude contrast, group, image size). ``location/*`` fields, when
present, give ``rlnMicrographName`` and ``rlnCoordinateX/Y`` (pixels of the micrograph).
``alignments3D`` poses are not converted (not needed for in-plane work).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..utils import atomic_path

__all__ = ["read_cs", "cs_to_relion", "write_cs", "cs_paths", "cs_with_alignments",
           "CS_ALIGN2D"]


def read_cs(path: str | os.PathLike) -> np.ndarray:
    """Load a ``.cs`` file as a structured array (no pickles)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            arr = np.load(f, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a cryoSPARC .cs file ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None:
        raise InputError(f"{path}: not a cryoSPARC .cs file (no named fields)")
    return arr


def _text(col: np.ndarray) -> np.ndarray:
    """Decode a bytes/str field to str, stripping cryoSPARC's leading '>'."""
    s = pd.Series(col.astype(str) if col.dtype.kind == "U" else
                  np.char.decode(col.astype(bytes), "utf-8"), dtype=str)
    return s.str.replace(r"^>", "", regex=True).to_numpy(dtype=object)


def cs_paths(arr: np.ndarray, source="<cs>") -> np.ndarray:
    """``blob/path`` as str without the leading ``>`` (object array)."""
    if "blob/path" not in (arr.dtype.names or ()):
        raise InputError(f"{source}: no blob/path field: this .cs has no particle images")
    return _text(arr["blob/path"])


def cs_to_relion(arr: np.ndarray, source="<cs>") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(particles, optics)`` RELION 3.1 tables from a cryoSPARC particle array (see module)."""
    names = arr.dtype.names or ()
    n = len(arr)
    if n == 0:
        raise InputError(f"{source}: the .cs file holds no particles (0 rows)")
    if "blob/path" not in names:
        raise InputError(f"{source}: no blob/path field: this .cs has no particle images")
    if "blob/idx" not in names:
        raise InputError(f"{source}: no blob/idx field: cannot locate the particle images")
    paths = cs_paths(arr, source)
    idx = arr["blob/idx"].astype(np.int64)
    num = pd.Series(idx + 1).map("{:06d}".format).to_numpy(dtype=object)
    image_names = (pd.Series(num, dtype=str) + "@" + pd.Series(paths, dtype=str)).astype(str)
    p = pd.DataFrame({"rlnImageName": image_names})
    f64 = lambda k: arr[k].astype(np.float64)  # noqa: E731
    if "location/micrograph_path" in names:
        p["rlnMicrographName"] = pd.Series(_text(arr["location/micrograph_path"]), dtype=str)
        if "location/center_x_frac" in names and "location/micrograph_shape" in names:
            shp = arr["location/micrograph_shape"].astype(np.float64)
            p["rlnCoordinateX"] = f64("location/center_x_frac") * shp[:, 1]
            p["rlnCoordinateY"] = f64("location/center_y_frac") * shp[:, 0]
    apix = f64("blob/psize_A") if "blob/psize_A" in names else np.full(n, np.nan)
    if "alignments2D/pose" in names:
        p["rlnAnglePsi"] = np.degrees(f64("alignments2D/pose"))
    if "alignments2D/shift" in names:
        sh = arr["alignments2D/shift"].astype(np.float64)
        p["rlnOriginXAngst"] = sh[:, 0] * apix
        p["rlnOriginYAngst"] = sh[:, 1] * apix
    if "ctf/df1_A" in names:
        p["rlnDefocusU"] = f64("ctf/df1_A")
        p["rlnDefocusV"] = f64("ctf/df2_A") if "ctf/df2_A" in names else f64("ctf/df1_A")
        p["rlnDefocusAngle"] = np.degrees(f64("ctf/df_angle_rad")) \
            if "ctf/df_angle_rad" in names else 0.0
        p["rlnPhaseShift"] = np.degrees(f64("ctf/phase_shift_rad")) \
            if "ctf/phase_shift_rad" in names else 0.0
        if "ctf/bfactor" in names:
            p["rlnCtfBfactor"] = f64("ctf/bfactor")
    # optics groups: distinct (exp group, pixel size, voltage, Cs, Q0, box), first-seen order
    keys = {}
    for k, col in (("ctf/exp_group_id", "grp"), ("blob/psize_A", "apix"), ("ctf/accel_kv", "kv"),
                   ("ctf/cs_mm", "cs"), ("ctf/amp_contrast", "q0")):
        if k in names:
            keys[col] = arr[k].astype(np.float64)
    if "blob/shape" in names:
        keys["box"] = np.asarray(arr["blob/shape"]).reshape(n, -1)[:, -1].astype(np.float64)
    kdf = pd.DataFrame(keys) if keys else pd.DataFrame({"one": np.zeros(n)})
    codes, uniq = pd.MultiIndex.from_frame(kdf).factorize() if len(kdf.columns) > 1 else \
        pd.factorize(kdf.iloc[:, 0])
    group = codes.astype(np.int64) + 1
    first = np.array([np.argmax(group == g) for g in range(1, int(group.max()) + 1)])
    p["rlnOpticsGroup"] = group
    if "alignments2D/class" in names:
        p["rlnClassNumber"] = arr["alignments2D/class"].astype(np.int64) + 1
    o = pd.DataFrame(index=range(len(first)))
    if "ctf/accel_kv" in names:
        o["rlnVoltage"] = f64("ctf/accel_kv")[first]
    if "blob/psize_A" in names:
        o["rlnImagePixelSize"] = apix[first]
    if "ctf/cs_mm" in names:
        o["rlnSphericalAberration"] = f64("ctf/cs_mm")[first]
    if "ctf/amp_contrast" in names:
        o["rlnAmplitudeContrast"] = f64("ctf/amp_contrast")[first]
    o["rlnOpticsGroup"] = np.arange(1, len(first) + 1, dtype=np.int64)
    if "blob/shape" in names:
        o["rlnImageSize"] = keys["box"][first].astype(np.int64)
        o["rlnImageDimensionality"] = np.full(len(first), 2, dtype=np.int64)
    o["rlnOpticsGroupName"] = pd.Series([f"opticsGroup{g}" for g in o["rlnOpticsGroup"]],
                                        dtype=str)
    return p, o.reset_index(drop=True)


def write_cs(path: str | os.PathLike, structured_array: np.ndarray) -> Path:
    """Save a structured array as a cryoSPARC ``.cs`` file (``np.save`` format), atomically."""
    arr = np.asarray(structured_array)
    if arr.dtype.names is None:
        raise ValueError("write_cs needs a structured array (named fields)")
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    return path


#: the alignments2D fields cryoSPARC writes (2D classification), with neutral defaults
CS_ALIGN2D: tuple[tuple[str, str, tuple, Any], ...] = (
    ("alignments2D/split", "<u4", (), 0),
    ("alignments2D/shift", "<f4", (2,), 0.0),
    ("alignments2D/pose", "<f4", (), 0.0),
    ("alignments2D/psize_A", "<f4", (), 1.0),
    ("alignments2D/error", "<f4", (), 0.0),
    ("alignments2D/error_min", "<f4", (), 0.0),
    ("alignments2D/resid_pow", "<f4", (), 0.0),
    ("alignments2D/slice_pow", "<f4", (), 0.0),
    ("alignments2D/image_pow", "<f4", (), 0.0),
    ("alignments2D/cross_cor", "<f4", (), 0.0),
    ("alignments2D/alpha", "<f4", (), 1.0),
    ("alignments2D/alpha_min", "<f4", (), 0.0),
    ("alignments2D/weight", "<f4", (), 1.0),
    ("alignments2D/pose_ess", "<f4", (), 0.0),
    ("alignments2D/shift_ess", "<f4", (), 0.0),
    ("alignments2D/class_posterior", "<f4", (), 1.0),
    ("alignments2D/class", "<u4", (), 0),
    ("alignments2D/class_ess", "<f4", (), 1.0),
)


def cs_with_alignments(cs: np.ndarray, psi_deg: np.ndarray, origin_angst: np.ndarray,
                       apix: np.ndarray | float, labels: np.ndarray | None,
                       confidence: np.ndarray | None = None) -> np.ndarray:
    """A copy of the cryoSPARC structured array ``cs`` (N,) with 2-D alignments set.

    cryoSPARC's 2-D convention as pyem's ``csparc2star`` reads it (the same as RELION's):
    ``alignments2D/pose`` = radians(rlnAnglePsi) in [0, 2π), ``alignments2D/shift`` =
    (rlnOriginXAngst, rlnOriginYAngst) / ``alignments2D/psize_A`` in pixels, with psize_A =
    the particles' pixel size (``blob/psize_A``); ``alignments2D/class`` = class - 1
    (0-based; without labels an existing class is kept, a new field is 0). Every original
    field, ``uid`` included, is kept in order; missing alignments2D fields are appended with
    neutral values. ``class_posterior`` gets the model's pose confidence when given.
    """
    n = len(cs)
    have = set(cs.dtype.names or ())
    extra = [(name, dt, shape) for name, dt, shape, _ in CS_ALIGN2D if name not in have]
    out = np.zeros(n, dtype=np.dtype(cs.dtype.descr + [(nm, dt, sh) if sh else (nm, dt)
                                                       for nm, dt, sh in extra]))
    for name in cs.dtype.names:
        out[name] = cs[name]
    for name, _, _, default in CS_ALIGN2D:
        if name not in have:
            out[name] = default
    apix = np.broadcast_to(np.asarray(apix, np.float64), (n,))
    out["alignments2D/pose"] = np.deg2rad(np.mod(psi_deg, 360.0))
    out["alignments2D/psize_A"] = apix
    out["alignments2D/shift"] = np.asarray(origin_angst, np.float64) / apix[:, None]
    if labels is not None:
        out["alignments2D/class"] = np.asarray(labels, np.int64)
    if confidence is not None:
        out["alignments2D/class_posterior"] = confidence
    return out
