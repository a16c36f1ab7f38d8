"""``cryolatent embed``: run a trained model over a particle set and write poses, latents, classes.

Library entry point: :func:`embed` (callable from a notebook; the click command in
``cryolatent/commands/embed.py`` only parses options).

What it does, for ``embed(rundir, input, out)``:

1. loads the run (``cryolatent.train.load_run``) and the geometry of its training images
   (box ``d`` and pixel size, read from the training set the run's ``config.json`` names);
2. streams INPUT in batches (``ParticleSet.iter_batches``), bringing each batch to what the
   model saw at training time (:class:`InputAdapter`: Fourier crop to ``d`` when INPUT's box
   differs, then the training set's normalisation), and runs ``model.infer`` on the GPU when
   there is one, in a background-prefetched loop, with a progress bar;
3. converts the model's pose (RELION convention, pixels of the model's input) to INPUT's Å
   (:func:`model_pose_to_input`), writes the latent means straight into ``OUT.z.npy`` (a
   memory-mapped ``.npy``: never all images, never more than one batch of them in memory);
4. optionally clusters the latent means (:func:`cryolatent.analysis.cluster.cluster_latents`);
5. writes ``OUT.star`` (every input column and row, in order, plus ``rlnAnglePsi``,
   ``rlnOriginXAngst``, ``rlnOriginYAngst``, ``cryolatentZ1..D``, and with clusters
   ``rlnClassNumber``), and when INPUT is ``.cs`` also ``OUT.cs`` (every original field and
   uid, plus ``alignments2D/{pose,shift,psize_A,class,...}``, cryoSPARC's convention).

Every file goes through :func:`cryolatent.utils.atomic_path`; an output that would overwrite
INPUT is refused.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import CryolatentError, InputError
from .utils import resolve_device

__all__ = [
    "embed", "model_pose_to_input", "output_paths", "EmbedOutputs", "InputAdapter",
    "TrainingGeometry", "relion_columns", "cs_with_alignments",
    "background_stats",
]

log = logging.getLogger("cryolatent")

#: columns ``embed`` writes (besides ``cryolatentZ*`` and, with clusters, ``rlnClassNumber``)
POSE_COLUMNS = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


# ============================================================================ pose units

def model_pose_to_input(psi_deg, shift_px, box_model: int, box_input: int,
                        apix_input) -> tuple[np.ndarray, np.ndarray]:
    """Pose from the model's input pixels to RELION columns of INPUT (degrees, Å).

    The models return the pose in RELION's convention (``Inference``: ``psi_deg`` (N,),
    ``shift_px`` (N, 2) = (rlnOriginX, rlnOriginY) in pixels of the ``box_model`` × ``box_model``
    image they were given). When INPUT's images (box D = ``box_input``, pixel size
    ``apix_input``) were Fourier-cropped to d = ``box_model`` on the way in, the model saw
    pixels of size

        apix_model = apix_input × D / d

    and a Fourier crop keeps the physical image, its axes and its centre
    (``cryolatent.preprocess.fourier_crop`` maps the rotation centre (D//2, D//2) onto
    (d//2, d//2) for even and odd boxes). With x the coordinate relative to the original
    centre and x' the one relative to the cropped centre, the crop maps x' = x·d/D. The
    model's statement aligned(R(ψ)(x' + t)) = cropped(x') then reads, in the original's
    coordinates, A(R(ψ)(x + t·D/d)) = particle(x) with A the (rescaled) canonical image. So,
    exactly:

        rlnAnglePsi      = psi_deg                              (unchanged)
        rlnOriginXYAngst = shift_px × apix_model                (= t_in × apix_input)

    i.e. the same physical shift: read with INPUT's pixel size it is t·D/d pixels of the
    unbinned particle, so the pose stays right for the original particles. Without a crop
    (D == d) this is just ``shift_px × apix_input``.

    psi_deg: (N,) degrees; shift_px: (N, 2); apix_input: scalar or (N,) (per-particle pixel
    size, e.g. from several optics groups). Returns ``psi_deg`` (N,) float64 wrapped to
    (-180, 180] as RELION writes it, and ``origin_angst`` (N, 2) float64 =
    (rlnOriginXAngst, rlnOriginYAngst).
    """
    psi = np.asarray(psi_deg, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift_px, dtype=np.float64).reshape(-1, 2)
    if len(psi) != len(shift):
        raise ValueError(f"psi ({len(psi)}) and shift ({len(shift)}) lengths differ")
    if box_model < 1 or box_input < 1:
        raise ValueError("boxes must be >= 1")
    apix_model = np.asarray(apix_input, dtype=np.float64) * (box_input / box_model)
    origin = shift * (apix_model[:, None] if apix_model.ndim == 1 else apix_model)
    from .pose import wrap_deg_180

    return np.asarray(wrap_deg_180(psi), dtype=np.float64), origin


# ============================================================================ output files

@dataclass
class EmbedOutputs:
    """The files :func:`embed` writes (``cs`` only for ``.cs`` input)."""

    star: Path
    z: Path
    cs: Path | None = None


def output_paths(out: str | Path, input_path: str | Path, input_kind: str) -> EmbedOutputs:
    """``OUT.star`` -> (``OUT.star``, ``OUT.z.npy``, ``OUT.cs`` when INPUT is .cs).

    ``out`` may end in ``.star`` or ``.cs`` (then the STAR is written beside it with the same
    stem); anything else gets ``.star`` appended. Refuses any output that is INPUT itself.
    """
    out = Path(out)
    if out.suffix.lower() in (".star", ".cs"):
        base = out.with_suffix("")
    else:
        base = out
    if out.suffix.lower() == ".cs" and input_kind != "cs":
        raise CryolatentError(f"-o {out}: a .cs is written only when INPUT is .cs; "
                              "give a .star name")
    res = EmbedOutputs(star=base.with_name(base.name + ".star"),
                       z=base.with_name(base.name + ".z.npy"),
                       cs=base.with_name(base.name + ".cs") if input_kind == "cs" else None)
    src = Path(input_path).resolve()
    for p in (res.star, res.z, res.cs):
        if p is not None and p.resolve() == src:
            raise CryolatentError(f"-o {out}: would overwrite the input {input_path}; "
                                  "choose another output name")
    return res


# ============================================================================ preprocessing

def background_stats(images: np.ndarray, diameter_frac: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd (n,) of each image's (n, D, D) pixels outside a circle of diameter
    ``diameter_frac`` × D centred at (D//2, D//2) (RELION's normalisation background)."""
    d = images.shape[-1]
    yy, xx = np.mgrid[:d, :d] - d // 2
    bg = (xx ** 2 + yy ** 2) > (diameter_frac * d / 2) ** 2
    v = np.asarray(images)[:, bg].astype(np.float64)
    return v.mean(1), v.std(1)


def _looks_normalized(images: np.ndarray) -> bool:
    """True when the images' backgrounds are mean ~0, sd ~1 (RELION-normalised)."""
    m, s = background_stats(images)
    return bool(abs(np.median(m)) < 0.1 and abs(np.median(s) - 1.0) < 0.1)


def _median_apix(ps) -> float:
    return float(np.median(ps.apix_per_particle))


@dataclass
class TrainingGeometry:
    """What the model saw at training time.

    box: image size d the model was built for; apix: their pixel size (Å, None if unknown);
    normalized: the training images had RELION-normalised backgrounds (mean 0, sd 1 outside
    the 0.75 × box circle), judged from up to 64 of them; phase_flipped: the training set's
    optics say ``rlnCtfDataArePhaseFlipped`` = 1 (``cryolatent preprocess --phase-flip``);
    particles: the training ParticleSet when it could be opened (for calibration), else None.
    """

    box: int
    apix: float | None = None
    normalized: bool = False
    phase_flipped: bool = False
    source: str | None = None
    particles: Any = None


def _training_input(cfg, rundir=None) -> str:
    """The run's training set path: as recorded, else relative to the run folder's parent
    (a relative path recorded by a run started in a RELION-style project folder)."""
    p = Path(cfg.input)
    if not p.exists() and not p.is_absolute() and rundir is not None:
        cwd0 = (getattr(cfg, "extra", None) or {}).get("cwd")   # where the training ran
        for base in ([Path(cwd0)] if cwd0 else []) + [Path(rundir).parent, Path(rundir)]:
            if (base / p).exists():
                return str(base / p)
    return str(cfg.input)


def training_geometry(cfg, model=None, particles=None, rundir=None) -> TrainingGeometry:
    """Box, pixel size, normalisation and phase flipping of the run's training images.

    Read from the training set named in the run's config (``cfg.input``, ``cfg.datadir``),
    or from ``particles`` when that is the training set already opened. When it cannot be opened any more, falls back to what the run recorded (``cfg.extra``
    keys ``box``/``apix``/``normalized``/``phase_flipped``) or the model's ``box`` attribute,
    and warns.
    """
    from .io import load_particles

    extra = dict(getattr(cfg, "extra", {}) or {})
    try:
        # ``particles``: the training set, already open (INPUT is the training set)
        tps = particles if particles is not None else load_particles(
            _training_input(cfg, rundir), datadir=cfg.datadir)
        n = min(len(tps), 64)
        idx = np.unique(np.linspace(0, len(tps) - 1, n).round().astype(np.int64))
        normalized = _looks_normalized(tps.images(idx)) if n else False
        return TrainingGeometry(box=int(tps.box), apix=_median_apix(tps),
                                normalized=normalized, phase_flipped=bool(tps.optics_flag("rlnCtfDataArePhaseFlipped").any()),
                                source=str(tps.source), particles=tps)
    except (CryolatentError, OSError) as e:
        box = extra.get("box") or getattr(model, "box", None)
        if box is None:
            raise CryolatentError(f"cannot open the run's training set {cfg.input!r} ({e}) "
                                  "and the run does not record its image size")
        log.warning("training set %s cannot be opened (%s); using the run's recorded box %s",
                    cfg.input, e, box)
        return TrainingGeometry(box=int(box), apix=extra.get("apix"),
                                normalized=bool(extra.get("normalized", False)),
                                phase_flipped=bool(extra.get("phase_flipped", False)),
                                source=cfg.input)


class InputAdapter:
    """Brings batches of INPUT images to what the model saw at training time.

    ``adapter(images (n, D_in, D_in) float32 numpy, idx (n,)) -> torch (n, d, d) float32``,
    in the order of ``cryolatent preprocess`` (so that INPUT = the original of a preprocessed
    training set gives the training images back):

    1. Fourier crop (``cryolatent.preprocess.fourier_crop``) to the training box d when the
       boxes differ (INPUT is then taken as the unbinned set the training data came from;
       its effective pixel size apix_in × D_in / d is compared with the training one and a
       mismatch > 1 % is warned about);
    2. phase flip with INPUT's CTF at the cropped pixel size, when the training set was
       phase-flipped and INPUT is not;
    3. contrast inversion when calibration found INPUT inverted relative to training;
    4. RELION normalisation (background outside 0.75 × d to mean 0, sd 1) when the training
       images were normalised (idempotent on already normalised images).

    Calibration (:meth:`calibrate`): when the training set was made by ``cryolatent
    preprocess`` from INPUT (its ``rlnImageOriginalName`` are INPUT's ``rlnImageName``), a
    few matching particles are passed through steps 1–4 and compared with the training
    images: a correlation near -1 turns on the inversion; anything below 0.9 is warned about.

    ``same_as_training`` (INPUT is the training set itself): images go through unchanged.
    """

    def __init__(self, ps, geom: TrainingGeometry, same_as_training: bool = False):
        self.box_in = int(ps.box)
        self.box = int(geom.box)
        self.geom = geom
        self.ps = ps
        self.same = same_as_training
        if self.box_in < self.box:
            raise CryolatentError(
                f"{ps.source}: box {self.box_in} px is smaller than the model's {self.box} px; "
                "embed the original (larger) particles or the training set itself")
        if same_as_training and self.box_in != self.box:
            raise CryolatentError(f"{ps.source}: box {self.box_in} differs from the model's "
                                  f"{self.box}")
        self.crop = self.box_in != self.box
        self.apix_model = ps.apix_per_particle * (self.box_in / self.box)
        self.flip = (not same_as_training) and geom.phase_flipped and not ps.optics_flag("rlnCtfDataArePhaseFlipped").any()
        self.ctf = None
        if self.flip:
            self.ctf = ps.ctf()
            if self.ctf is None:
                raise CryolatentError(f"the model was trained on phase-flipped images, but "
                                      f"{ps.source} has no CTF parameters to flip {ps.source}")
        self.invert = False
        self.normalize = (not same_as_training) and geom.normalized
        self.calibration: float | None = None
        if geom.apix is not None and not same_as_training:
            eff = float(np.median(self.apix_model))
            if abs(eff / geom.apix - 1.0) > 0.01:
                log.warning("%s: pixel size %.4g Å × box %d / %d = %.4g Å differs from the "
                            "training images' %.4g Å; the model may see the wrong scale",
                            ps.source, _median_apix(ps), self.box_in, self.box, eff, geom.apix)

    def describe(self) -> str:
        if self.same:
            return "as stored (the training set)"
        parts = []
        if self.crop:
            parts.append(f"Fourier crop {self.box_in} -> {self.box} px")
        if self.flip:
            parts.append("phase flip")
        if self.invert:
            parts.append("invert")
        if self.normalize:
            parts.append("normalise")
        s = ", ".join(parts) or "as stored"
        if self.calibration is not None:
            s += f" (matches the training images: r = {self.calibration:.3f})"
        return s

    def __call__(self, images: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        from . import preprocess as pp

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if self.same:
            return x
        if self.crop:
            x = pp.fourier_crop(x, self.box)
        if self.flip:
            from .ctf import compute_ctf

            idx = np.asarray(idx)
            ctf = torch.empty((len(idx), self.box, self.box), dtype=torch.float32)
            a = self.apix_model[idx]
            for v in np.unique(a):
                sel = np.flatnonzero(a == v)
                ctf[torch.from_numpy(sel)] = compute_ctf(self.ctf, self.box, float(v),
                                                         idx=idx[sel]).float()
            x = pp.phase_flip(x, ctf)
        if self.invert:
            x = pp.invert(x)
        if self.normalize:
            x = pp.normalize(x)
        return x.float().contiguous()

    def calibrate(self, n: int = 8) -> None:
        """Compare INPUT particles with their preprocessed copies in the training set."""
        tps = self.geom.particles
        if self.same or tps is None or "rlnImageOriginalName" not in tps.table.columns \
                or "rlnImageName" not in self.ps.table.columns:
            return
        import pandas as pd

        def key(names):
            # "000012@Particles/x.mrcs" and "12@/abs/Particles/x.mrcs" are the same image
            s = pd.Series(np.asarray(names, dtype=str))
            num = s.str.extract(r"^0*(\d+)@", expand=False).fillna("1")
            base = s.str.replace(r"^\d+@", "", regex=True).str.replace(r".*/", "", regex=True)
            return (num + "@" + base).to_numpy()

        def nth(keys):
            # a repeated name: its k-th row pairs with its k-th row in the other set
            s = pd.Series(keys)
            k = s.groupby(s.to_numpy(), sort=False).cumcount().astype(str)
            return (s + "\x00" + k).to_numpy()

        inp = pd.Index(nth(key(self.ps.table["rlnImageName"].to_numpy())))
        orig = nth(key(tps.table["rlnImageOriginalName"].to_numpy()[: 50 * n]))
        pos = inp.get_indexer(orig)
        rows = np.flatnonzero(pos >= 0)[:n]
        if len(rows) == 0:
            return
        mine = self(self.ps.images(pos[rows]), pos[rows]).double().numpy()
        theirs = tps.images(rows).astype(np.float64)
        r = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(mine, theirs)])
        r = float(np.median(r))
        if r < -0.9:
            self.invert = True
            r = -r
            log.info("INPUT has the opposite contrast of the training images: inverting")
        self.calibration = r
        if r < 0.9:
            log.warning("INPUT particles, cropped and normalised, differ from their training "
                        "copies (correlation %.2f): the training set was preprocessed in a "
                        "way embed does not reproduce", r)


# ============================================================================ the batch loop

def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run iterator ``it`` in a background thread, ``depth`` items ahead (I/O + crop overlap
    the model). Exceptions are re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="cryolatent-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


@dataclass
class _Results:
    psi: np.ndarray          # (N,) float64
    shift: np.ndarray        # (N, 2) float64, model pixels
    confidence: np.ndarray   # (N,) float32
    z: np.ndarray            # (N, D) float32 memmap


def run_model(model, ps, adapter: Callable[[np.ndarray, np.ndarray], torch.Tensor], z_out: Path,
              z_dim: int, batch_size: int, device: torch.device) -> _Results:
    """Infer every particle of ``ps`` in batches; latents go into the .npy file ``z_out``.

    Returns poses (model pixels), confidences and the (N, D) memmap of ``z_out``.
    """
    n = len(ps)
    psi = np.empty(n, np.float64)
    shift = np.empty((n, 2), np.float64)
    conf = np.empty(n, np.float32)
    z = np.lib.format.open_memmap(z_out, mode="w+", dtype=np.float32, shape=(n, z_dim))
    pin = device.type == "cuda"

    release = getattr(ps, "release", None)

    def batches():
        for idx, imgs in ps.iter_batches(batch_size):
            if release is not None:   # one pass: drop the batch's mapped pages (bounded RSS)
                release(idx)
            x = adapter(imgs, idx)
            if pin:
                x = x.pin_memory()
            yield np.asarray(idx), x

    from .utils import progress

    def store(idx, inf, bar):
        zb = inf.z_mean.detach().float().cpu().numpy()
        if zb.ndim != 2 or zb.shape[1] != z_dim:
            raise CryolatentError(f"the model returned latents of shape {tuple(zb.shape)}, "
                                  f"expected (batch, {z_dim})")
        z[idx] = zb
        psi[idx] = inf.psi_deg.detach().double().cpu().numpy()
        shift[idx] = inf.shift_px.detach().double().cpu().numpy().reshape(-1, 2)
        conf[idx] = inf.confidence.detach().float().cpu().numpy()
        bar.update(len(idx))

    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode(), progress(total=n, desc="embed", unit="particle") as bar:
        # the host copy of batch i waits until batch i+1 has been queued on the device,
        # so a GPU never idles on the device->host copy
        pending = None
        for idx, x in _prefetch(batches()):
            inf = model.infer(x.to(device, non_blocking=True))
            if pending is not None:
                store(*pending, bar)
            pending = (idx, inf)
        if pending is not None:
            store(*pending, bar)
    dt = time.perf_counter() - t0
    log.info("embedded %d particles in %.1f s (%.0f particles/s)", n, dt, n / max(dt, 1e-9))
    if not (np.isfinite(psi).all() and np.isfinite(shift).all()):
        bad = int(np.flatnonzero(~(np.isfinite(psi) & np.isfinite(shift).all(1)))[0])
        raise CryolatentError(f"the model returned a non-finite pose for particle {bad} "
                              f"({ps.names[bad]})")
    z.flush()
    return _Results(psi, shift, conf, z)


# ============================================================================ output tables

def relion_columns(psi_deg: np.ndarray, origin_angst: np.ndarray, z: np.ndarray,
                   labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Column name -> (N,) array of what embed adds to the particle table.

    labels: 0-based class labels or None; written 1-based as ``rlnClassNumber``.
    """
    cols: dict[str, np.ndarray] = {
        "rlnAnglePsi": np.asarray(psi_deg, np.float64),
        "rlnOriginXAngst": np.asarray(origin_angst[:, 0], np.float64),
        "rlnOriginYAngst": np.asarray(origin_angst[:, 1], np.float64),
    }
    if labels is not None:
        cols["rlnClassNumber"] = np.asarray(labels, np.int64) + 1
    for j in range(z.shape[1]):
        cols[f"cryolatentZ{j + 1}"] = np.array(z[:, j], np.float32)
    return cols


def _add_columns(df, cols: dict[str, np.ndarray]):
    """Set columns in place: existing ones keep their position, new ones are appended."""
    import pandas as pd

    new = {k: v for k, v in cols.items() if k not in df.columns}
    for k, v in cols.items():
        if k in df.columns:
            df[k] = v
    if new:
        df = pd.concat([df, pd.DataFrame(new, index=df.index)], axis=1)
    return df


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


# ============================================================================ entry point

def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def embed(rundir: str | Path, input: str | Path, out: str | Path, clusters: int | None = None,
          cluster_method: str = "kmeans", batch_size: int | None = None,
          device: str = "auto", datadir: str | Path | None = None, seed: int = 0,
          checkpoint: str = "best", centre: bool = True, trust: bool = True) -> Path:
    """Embed every particle of ``input`` with the model of ``rundir``; returns OUT.star's path.

    rundir: a ``cryolatent train`` run folder; input: .star / .cs / .mrcs; out: OUT.star
    (also writes OUT.z.npy, the (N, D) float32 latent means in STAR row order, and OUT.cs for
    .cs input); clusters: K classes from the latent means (``rlnClassNumber`` 1..K) with
    ``cluster_method`` (kmeans | agglomerative | gmm, seeded by ``seed``); batch_size:
    particles per forward pass (default: the run's training batch size); device: auto | cpu |
    cuda | cuda:N; datadir: where INPUT's relative stack paths are looked up; checkpoint:
    "best" (lowest validation loss) or "last"; centre: move each class's canonical frame
    (all particles' one without ``clusters``) to where its shifts are smallest
    (:func:`cryolatent.pose.centre_class_frames`); trust: write the trust signals to
    ``OUT_summary.json`` (:func:`cryolatent.analysis.trust.embed_report`).
    """
    from .analysis.cluster import METHODS, cluster_latents
    from .io import load_particles, write_star
    from .utils import atomic_path

    if cluster_method not in METHODS:
        raise CryolatentError(f"--cluster-method {cluster_method!r}: choose from "
                              f"{', '.join(METHODS)}")
    if clusters is not None and clusters < 1:
        raise CryolatentError(f"--clusters {clusters}: must be >= 1")
    if batch_size is not None and batch_size < 1:
        raise CryolatentError(f"--batch-size {batch_size}: must be >= 1")
    rundir = Path(rundir)
    if not rundir.is_dir():
        raise CryolatentError(f"{rundir}: not a run folder (no such directory)")
    dev = resolve_device(device)

    ps = load_particles(input, datadir=datadir)
    outs = output_paths(out, input, ps.kind)
    n = len(ps)
    if n == 0:
        raise InputError(f"{input}: no particles")
    if clusters is not None and clusters > n:
        raise CryolatentError(f"--clusters {clusters}: more classes than particles ({n})")

    model, cfg = _load_run(rundir, dev, checkpoint)
    same = _is_training_set(ps, cfg, rundir)
    geom = training_geometry(cfg, model, particles=ps if same else None, rundir=rundir)
    adapter = InputAdapter(ps, geom, same_as_training=same)
    adapter.calibrate()
    geom.particles = None          # free the training set's tables before the long loop
    bs = int(batch_size or getattr(cfg, "batch_size", 0) or 256)
    z_dim = int(getattr(cfg, "z_dim", 0) or getattr(model, "z_dim"))
    log.info("embed: %d particles of %s (box %d, %.4g Å/px) with %s model of %s on %s, "
             "batch %d; input: %s", n, input, ps.box, _median_apix(ps),
             getattr(cfg, "model", "?"), rundir, dev, bs, adapter.describe())

    with atomic_path(outs.z) as ztmp:
        res = run_model(model, ps, adapter, ztmp, z_dim, bs, dev)
        psi, origin = model_pose_to_input(res.psi, res.shift, adapter.box, ps.box,
                                          ps.apix_per_particle)
        labels = None
        if clusters is not None:
            log.info("clustering %d latents into %d classes (%s)", n, clusters, cluster_method)
            labels = cluster_latents(np.asarray(res.z), clusters, cluster_method, seed=seed)
        if centre:
            from .pose import centre_class_frames

            origin, offs = centre_class_frames(psi, origin, labels)
            log.info("centred the frames: offsets (Å) %s",
                     "; ".join(f"{x:+.2f}, {y:+.2f}" for x, y in offs[:20]))
        cols = relion_columns(psi, origin, res.z, labels)
        for j, ax in enumerate("XY"):   # stale pixel origins (relion_project-style 3.1 files)
            if f"rlnOrigin{ax}" in ps.table.columns:
                cols[f"rlnOrigin{ax}"] = origin[:, j] / ps.apix_per_particle
        del res.z  # close the memmap before the rename
        _warn_kept_columns(ps.table, clusters is not None)
        if ps.kind == "mrcs":
            # a bare stack has no original names: relative to the current directory (RELION
            # resolves names from its working folder) when the stack lies below it, else
            # absolute
            from .utils import relion_path

            stack = relion_path(ps.stack_paths[0])
            cols["rlnImageName"] = np.array([f"{i + 1:06d}@{stack}"
                                             for i in np.asarray(ps.image_index)], dtype=object)
        table = _add_columns(ps.table, cols)

        write_star(outs.star, table, ps.optics)       # bounded memory (row chunks)
        if outs.cs is not None:
            from .io import write_cs

            if ps.cs_array is None:
                raise CryolatentError(f"{input}: the original .cs fields are not available")
            write_cs(outs.cs, cs_with_alignments(ps.cs_array, psi, origin,
                                                 ps.apix_per_particle, labels,
                                                 res.confidence))
    log.info("wrote %s, %s%s", outs.star, outs.z, f", {outs.cs}" if outs.cs else "")
    if trust:  # half-set resolution per class, shift edge, latent use (docs/trust.md)
        from .analysis.trust import embed_report_safe

        embed_report_safe(outs.star, ps, table, labels, model, res.psi, res.shift,
                          np.load(outs.z, mmap_mode="r"), rundir, seed, bs, dev,
                          adapter=adapter)
    return outs.star


def _is_training_set(ps, cfg, rundir=None) -> bool:
    return bool(getattr(cfg, "input", "")) and _same_file(ps.source,
                                                          _training_input(cfg, rundir))


def _warn_kept_columns(df, clustering: bool) -> None:
    kept = [c for c in ("rlnAngleRot", "rlnAngleTilt") if c in df.columns]
    if kept:
        log.warning("INPUT has %s from an earlier refinement; kept as they are (only "
                    "rlnAnglePsi and the origins are replaced)", ", ".join(kept))
    if not clustering and "rlnClassNumber" in df.columns:
        log.warning("INPUT has rlnClassNumber; kept as it is (give --clusters K to replace it)")


def _load_run(rundir: Path, device: torch.device, checkpoint: str = "best"):
    """(model on ``device`` in eval mode, TrainConfig) of a run folder."""
    from . import train

    if checkpoint not in ("best", "last"):
        raise CryolatentError(f"--checkpoint {checkpoint!r}: choose best or last")
    ckdir = Path(rundir) / "checkpoints"
    if not (ckdir / "best.pt").exists() and not (ckdir / "last.pt").exists():
        raise CryolatentError(f"{rundir}: no checkpoints/best.pt or last.pt (not a finished "
                              "cryolatent train run?)")
    model, cfg = train.load_run(rundir, device, which=checkpoint)
    model.eval()
    return model, cfg
