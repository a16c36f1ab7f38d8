"""``cryolatent embed``: run a trained model over a particle set and write poses, latents, classes.

Library entry point: :func:`embed` (callable from a notebook; the click command in
``cryolatent/commands/embed.py`` only parses options).

What it does, for ``embed(rundir, input, out)``:

1. loads the run (:mod:`cryolatent.run`) and the preprocessing of its training images that
   ``train`` recorded (:class:`cryolatent.preprocess.Preprocessing`: box ``d``, pixel size,
   phase flip, inversion, normalisation); the training set itself is not needed (a run
   of an older cryolatent, which recorded none, has it judged from the training set, with
   a warning: :func:`cryolatent.run.run_preprocessing`);
2. streams INPUT in batches (``ParticleSet.iter_batches``), bringing each batch to what the
   model saw at training time (:class:`InputAdapter`: the recorded preprocessing applied,
   with a Fourier crop to ``d`` when INPUT's box is larger), and runs ``model.infer`` on the
   GPU when there is one, in a background-prefetched loop (:func:`cryolatent.utils.prefetch`),
   with a progress bar;
3. converts the model's pose (RELION convention, pixels of the model's input) to INPUT's Å
   (:func:`cryolatent.pose.model_pose_to_input`), writes the latent means straight into ``OUT.z.npy`` (a
   memory-mapped ``.npy``: never all images, never more than one batch of them in memory);
4. optionally clusters the latent means (:func:`cryolatent.analysis.cluster.cluster_latents`);
5. writes ``OUT.star`` (every input column and row, in order, plus ``rlnAnglePsi``,
   ``rlnOriginXAngst``, ``rlnOriginYAngst``, ``cryolatentZ1..D``, and with clusters
   ``rlnClassNumber``), and when INPUT is ``.cs`` also ``OUT.cs`` (every original field and
   uid, plus ``alignments2D/{pose,shift,psize_A,class,...}``, cryoSPARC's convention:
   :func:`cryolatent.io.cs.cs_with_alignments`).

Every file goes through :func:`cryolatent.utils.atomic_path`; an output that would overwrite
INPUT is refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .analysis.cluster import METHODS, cluster_latents
from .analysis.trust import embed_report_safe
from .errors import CryolatentError, InputError
from .io import load_particles, write_cs, write_star
from .io.cs import CS_ALIGN2D, cs_with_alignments  # noqa: F401 (re-exported)
from .io.particles import nth_keys, particle_keys
from .pose import POSE_COLUMNS, centre_class_frames, model_pose_to_input
from .preprocess import Preprocessing, describe_particles
from .run import RunDir, run_preprocessing, training_set_path
from .utils import atomic_path, prefetch, progress, resolve_device

__all__ = [
    "embed", "model_pose_to_input", "output_paths", "EmbedOutputs", "InputAdapter",
    "relion_columns", "cs_with_alignments",
]

log = logging.getLogger("cryolatent")


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

def _median_apix(ps) -> float:
    return float(np.median(ps.apix_per_particle))


def _same_steps(a: Preprocessing, b: Preprocessing) -> bool:
    """Whether two descriptions make the same images from the same originals."""
    return (a.box, a.original_box, a.phase_flip, a.invert, a.normalize) == \
        (b.box, b.original_box, b.phase_flip, b.invert, b.normalize) and \
        (not a.normalize or a.diameter_fraction == b.diameter_fraction)


class InputAdapter:
    """Brings batches of INPUT images to what the model saw at training time.

    ``adapter(images (n, D_in, D_in) float32 numpy, idx (n,)) -> torch (n, d, d) float32``:
    the run's :class:`cryolatent.preprocess.Preprocessing` ``prep`` applied
    (:meth:`~cryolatent.preprocess.Preprocessing.apply`, ``preprocess``'s pipeline, so
    that INPUT = the originals of a preprocessed training set gives the training images):

    1. Fourier crop to the training box d when the boxes differ (INPUT is then taken as the
       unbinned set the training data came from; its effective pixel size apix_in × D_in / d
       is compared with the training one and a mismatch > 1 % is warned about);
    2. phase flip with INPUT's CTF at the cropped pixel size, when the training images were
       phase-flipped and INPUT is not (``rlnCtfDataArePhaseFlipped``);
    3. contrast inversion when the training images were inverted and INPUT is not;
    4. RELION normalisation when the training images were normalised.

    INPUT made by ``preprocess`` itself (its optics table describes it) has the steps it
    already had left out; with the same description as the training images (the training
    set, moved or copied) its images go through unchanged, as with ``same_as_training``
    (INPUT is the training set's file).

    ``training``: the training ParticleSet, only for runs that recorded no preprocessing
    (:meth:`calibrate`).
    """

    def __init__(self, ps, prep: Preprocessing, same_as_training: bool = False,
                 training=None):
        self.box_in = int(ps.box)
        self.box = int(prep.box)
        self.prep = prep
        self.ps = ps
        self.training = training
        if self.box_in < self.box:
            raise CryolatentError(
                f"{ps.source}: box {self.box_in} px is smaller than the model's {self.box} px; "
                "embed the original (larger) particles or the training set itself")
        if same_as_training and self.box_in != self.box:
            raise CryolatentError(f"{ps.source}: box {self.box_in} differs from the model's "
                                  f"{self.box}")
        mine = None
        if not same_as_training and getattr(ps, "optics", None) is not None:
            mine = describe_particles(ps, sample=0)
            mine = mine if mine.source == "preprocess" else None
            if mine is not None and _same_steps(mine, prep):
                same_as_training = True      # the training images, wherever they now are
        self.same = same_as_training
        self.crop = self.box_in != self.box
        self.apix_model = ps.apix_per_particle * (self.box_in / self.box)
        flipped = bool(ps.optics_flag("rlnCtfDataArePhaseFlipped").any())
        self.flip = (not self.same) and prep.phase_flip and not flipped
        self.ctf = None
        if self.flip:
            self.ctf = ps.ctf_params()
            if self.ctf is None:
                raise CryolatentError(f"the model was trained on phase-flipped images, but "
                                      f"{ps.source} has no CTF parameters to flip {ps.source}")
        self.invert = (not self.same) and prep.invert != (mine is not None and mine.invert)
        self.normalize = (not self.same) and prep.normalize
        self.calibration: float | None = None
        if prep.apix is not None and not self.same:
            eff = float(np.median(self.apix_model))
            if abs(eff / prep.apix - 1.0) > 0.01:
                log.warning("WARNING: %s: pixel size %.4g Å × box %d / %d = %.4g Å differs "
                            "from the training images' %.4g Å; the model may see the wrong "
                            "scale",
                            ps.source, _median_apix(ps), self.box_in, self.box, eff, prep.apix)

    @property
    def steps(self) -> Preprocessing:
        """The description applied to INPUT (the run's, less what INPUT already had)."""
        return replace(self.prep, phase_flip=self.flip, invert=self.invert,
                       normalize=self.normalize)

    def describe(self) -> str:
        if self.same:
            return "as stored (the training images)"
        s = ", ".join(self.steps.steps(self.box_in)) or "as stored"
        if self.calibration is not None:
            s += f" (matches the training images: r = {self.calibration:.3f})"
        return s

    def __call__(self, images: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if self.same:
            return x
        idx = np.asarray(idx)
        x = self.steps.apply(x, apix=self.ps.apix_per_particle[idx], ctf=self.ctf, idx=idx)
        return x.float().contiguous()

    def calibrate(self, n: int = 8) -> None:
        """Runs that recorded no preprocessing (``training`` given): compare INPUT particles
        with their preprocessed copies in the training set; a correlation near -1 turns on
        the inversion (unless the training set's optics describe it), anything below 0.9 is
        warned about. A recorded description needs no calibration (nothing happens)."""
        tps = self.training
        if self.same or tps is None or "rlnImageOriginalName" not in tps.table.columns \
                or "rlnImageName" not in self.ps.table.columns:
            return
        # "000012@Particles/x.mrcs" and "12@/abs/Particles/x.mrcs" are the same image; a
        # repeated name pairs its k-th row with its k-th row in the other set
        inp = pd.Index(nth_keys(particle_keys(self.ps.table["rlnImageName"])))
        orig = nth_keys(particle_keys(tps.table["rlnImageOriginalName"].to_numpy()[: 50 * n]))
        pos = inp.get_indexer(orig)
        rows = np.flatnonzero(pos >= 0)[:n]
        if len(rows) == 0:
            return
        mine = self(self.ps.images(pos[rows]), pos[rows]).double().numpy()
        theirs = tps.images(rows).astype(np.float64)
        r = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(mine, theirs)])
        r = float(np.median(r))
        if r < -0.9 and self.prep.source != "preprocess":
            self.invert = True
            r = -r
            log.info("INPUT has the opposite contrast of the training images: inverting")
        self.calibration = r
        if r < 0.9:
            log.warning("INPUT particles, cropped and normalised, differ from their training "
                        "copies (correlation %.2f): the training set was preprocessed in a "
                        "way embed does not reproduce", r)


# ============================================================================ the batch loop

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
        for idx, x in prefetch(batches()):
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
    psi, x, y = POSE_COLUMNS
    cols: dict[str, np.ndarray] = {
        psi: np.asarray(psi_deg, np.float64),
        x: np.asarray(origin_angst[:, 0], np.float64),
        y: np.asarray(origin_angst[:, 1], np.float64),
    }
    if labels is not None:
        cols["rlnClassNumber"] = np.asarray(labels, np.int64) + 1
    for j in range(z.shape[1]):
        cols[f"cryolatentZ{j + 1}"] = np.array(z[:, j], np.float32)
    return cols


def _add_columns(df, cols: dict[str, np.ndarray]):
    """Set columns in place: existing ones keep their position, new ones are appended."""
    new = {k: v for k, v in cols.items() if k not in df.columns}
    for k, v in cols.items():
        if k in df.columns:
            df[k] = v
    if new:
        df = pd.concat([df, pd.DataFrame(new, index=df.index)], axis=1)
    return df


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
    prep, training = run_preprocessing(cfg, model, rundir, particles=ps if same else None)
    adapter = InputAdapter(ps, prep, same_as_training=same, training=training)
    adapter.calibrate()            # only for runs that recorded no preprocessing
    adapter.training = None        # free the training set's tables before the long loop
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
            origin, offs = centre_class_frames(psi, origin, labels)
            log.info("centred the frames: offsets (Å) %s",
                     "; ".join(f"{x:+.2f}, {y:+.2f}" for x, y in offs[:20]))
        cols = relion_columns(psi, origin, res.z, labels)
        for j, ax in enumerate("XY"):   # stale pixel origins (relion_project-style 3.1 files)
            if f"rlnOrigin{ax}" in ps.table.columns:
                cols[f"rlnOrigin{ax}"] = origin[:, j] / ps.apix_per_particle
        del res.z  # close the memmap before the rename
        _warn_kept_columns(ps.table, clusters is not None)
        # ps.table names the stacks from the current directory (relative below it, else
        # absolute), as RELION run from here resolves them (io.particles.cwd_stack_name)
        table = _add_columns(ps.table, cols)

        write_star(outs.star, table, ps.optics)       # bounded memory (row chunks)
        if outs.cs is not None:
            if ps.cs_array is None:
                raise CryolatentError(f"{input}: the original .cs fields are not available")
            write_cs(outs.cs, cs_with_alignments(ps.cs_array, psi, origin,
                                                 ps.apix_per_particle, labels,
                                                 res.confidence))
    log.info("wrote %s, %s%s", outs.star, outs.z, f", {outs.cs}" if outs.cs else "")
    if trust:  # half-set resolution per class, shift edge, latent use (docs/trust.md)
        embed_report_safe(outs.star, ps, table, labels, model, res.psi, res.shift,
                          np.load(outs.z, mmap_mode="r"), rundir, seed, bs, dev,
                          adapter=adapter)
    return outs.star


def _is_training_set(ps, cfg, rundir=None) -> bool:
    return bool(getattr(cfg, "input", "")) and _same_file(ps.source,
                                                          training_set_path(cfg, rundir))


def _warn_kept_columns(df, clustering: bool) -> None:
    kept = [c for c in ("rlnAngleRot", "rlnAngleTilt") if c in df.columns]
    if kept:
        log.warning("INPUT has %s from an earlier refinement; kept as they are (only "
                    "rlnAnglePsi and the origins are replaced)", ", ".join(kept))
    if not clustering and "rlnClassNumber" in df.columns:
        log.warning("INPUT has rlnClassNumber; kept as it is (give --clusters K to replace it)")


def _load_run(rundir: Path, device: torch.device, checkpoint: str = "best"):
    """(model on ``device`` in eval mode, TrainConfig) of a run folder."""
    if checkpoint not in ("best", "last"):
        raise CryolatentError(f"--checkpoint {checkpoint!r}: choose best or last")
    run = RunDir(rundir)
    if not run.has_checkpoint():
        raise CryolatentError(f"{rundir}: no checkpoints/best.pt or last.pt (not a finished "
                              "cryolatent train run?)")
    model, cfg = run.load(device, which=checkpoint)
    model.eval()
    return model, cfg
