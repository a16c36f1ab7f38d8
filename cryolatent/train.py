"""Training loop shared by every model (``cryolatent train``; callable from a notebook).

    from cryolatent.config import TrainConfig
    from cryolatent.train import train, load_run
    rundir = train(TrainConfig(input="particles.star", outdir="run1", epochs=50))
    model, cfg = load_run("run1", device="cuda")

Run folder: ``config.json`` (every option, seed, command line), ``log.csv`` (one row per
epoch), ``run.log``, ``checkpoints/last.pt`` (newest complete epoch) and ``best.pt`` (lowest
validation loss). Checkpoints hold only plain types and tensors, so they load with
``torch.load(weights_only=True)``; they contain the model, optimiser and scheduler states,
the RNG states, the epoch, the early-stopping state, the configuration and the log.csv rows
up to that epoch (``--resume`` rebuilds log.csv from them, so every epoch appears exactly
once whatever moment a SIGKILL landed in).

Speed: data resident on the GPU when they fit (:mod:`cryolatent.data`), bf16 autocast on
CUDA with float32 master weights, TF32 matrix products, optional ``torch.compile``, fused
Adam. The step never waits for the GPU: losses are summed on the device and read once per
epoch (and every ``LOG_EVERY`` steps for the progress bar and the non-finite check); a step
whose gradients are not finite (a NaN/Inf loss) is skipped on the device by
``torch.amp.GradScaler`` at a constant scale of 1 (exact: no loss scaling; with the fused
optimiser no host synchronisation), and the run stops with an error after ``MAX_BAD_STEPS``
non-finite losses in a row.

Several GPUs / nodes: the same command under ``torchrun`` (docs/distributed.md). The
environment is read by :func:`cryolatent.distributed.setup`; ``--batch-size`` is the global
batch, split over the ranks (:mod:`cryolatent.data`); each rank's mean loss is weighted by
``W * b_rank / g`` so that DDP's gradient average is the mean over the global batch (one
step equals the single-process step on the same global batch); the non-finite flag is
max-reduced per step (one 4-byte all_reduce, queued on the stream) so every rank skips the
same updates; loss sums are all-reduced once per epoch; BatchNorm running statistics are
broadcast from rank 0 before validation and checkpoints; only rank 0 writes files (all
writes go through ``_Writer``), after every rank has checked its options and particle set
and all ranks agree (:meth:`cryolatent.distributed.DistContext.agree`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from .config import DataFacts, TrainConfig, complete_v0_1, resolve
from .data import Batches, ParticleData, split_indices
from .distributed import DistContext, fingerprint, rank_seed, setup
from .errors import CryolatentError
from .models import build_model
from .preprocess import Preprocessing, describe_particles
from .run import load_checkpoint as _load_checkpoint
from .run import load_run  # noqa: F401 (re-exported: cryolatent.train.load_run)
from .utils import (atomic_path, defer_sigint, progress, seed_everything,
                    setup_logging)

log = logging.getLogger("cryolatent")

LOG_EVERY = 50          # steps between host reads of the running losses
MAX_BAD_STEPS = 10      # consecutive non-finite steps before the run stops
CKPT_FORMAT = 1
#: options a resumed run may change; every other option comes from the checkpoint
RESUMABLE = ("epochs", "device", "num_workers", "compile", "command", "early_stop", "amp",
             "input", "outdir", "datadir", "threads", "converge_tol", "converge_window")


# ----------------------------------------------------------------------------- step
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16), so
    that bf16 autocast pays on it (on the project's Xeon VM: 3-6x faster matrix products,
    1.6x a whole TARGET-VAE step)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        f = getattr(cpu, probe, None)
        try:
            if f is not None and f():
                return True
        except Exception:  # noqa: BLE001 - a private probe that may change: no fast path
            pass
    return False


#: environment variable that forces the training precision over every option and default
#: (``bf16`` or ``float32``): for measuring the spread over precisions and for running the
#: test suite in both (``CRYOLATENT_PRECISION=bf16 pytest``)
PRECISION_ENV = "CRYOLATENT_PRECISION"


def forced_precision() -> str | None:
    """``"bf16"``, ``"float32"`` or None: what :data:`PRECISION_ENV` forces (a one-line
    error for any other value)."""
    import os

    v = os.environ.get(PRECISION_ENV, "").strip().lower()
    if not v:
        return None
    if v in ("bf16", "bfloat16"):
        return "bf16"
    if v in ("float32", "fp32", "off"):
        return "float32"
    from .errors import CryolatentError

    raise CryolatentError(f"{PRECISION_ENV}={v!r}: use bf16 or float32")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), for the
    run log: results are reported per CPU kind."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def amp_dtype(cfg_amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for "auto" on CUDA and on CPUs with hardware bf16 matrix products
    (:func:`cpu_has_fast_bf16`); "bf16" forces it; "off" disables. Master weights, the
    likelihood and the KL stay float32 (the models cast before summing).
    :data:`PRECISION_ENV` overrides all three."""
    forced = forced_precision()
    if forced is not None:
        return torch.bfloat16 if forced == "bf16" else None
    if cfg_amp == "off":
        return None
    if cfg_amp == "bf16" or device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


class StepRunner:
    """One optimisation / evaluation step without host synchronisation.

    ``train_step(x, ctf_params)`` calls the model (its ``forward`` is the objective,
    :meth:`cryolatent.models.LatentModel.forward`; under DDP the model is what DDP wraps) and
    returns detached device scalars {"loss", parts...}. Non-finite losses are skipped on the
    device; ``bad_run`` counts them in a row, ``max_bad_run`` the longest such run since the
    last :meth:`read_bad` call.
    """

    def __init__(self, model, optimizer, device: torch.device, amp: torch.dtype | None = None,
                 compile: bool = False, dist: DistContext | None = None):
        self.model, self.opt, self.device, self.amp = model, optimizer, device, amp
        self.dist = dist if dist is not None and dist.enabled else None
        self.module = model if self.dist is None else self.dist.wrap(model)
        self.loss_fn = torch.compile(self.module) if compile else self.module
        # validation under DDP runs on the bare model (no collective)
        self.eval_fn = self.loss_fn if self.dist is None else model
        # skips the optimiser step, on the device, when a gradient is not finite; the scale
        # stays 1 (loss and gradients multiplied by exactly 1), so it changes no value
        self.scaler = torch.amp.GradScaler(device.type, init_scale=1.0,
                                           growth_interval=2 ** 30)
        self.bad_run = torch.zeros((), device=device)
        self.max_bad_run = torch.zeros((), device=device)
        self.n_bad = torch.zeros((), device=device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16,
                              enabled=self.amp is not None)

    def train_step(self, x: torch.Tensor, ctf: torch.Tensor | None = None,
                   weight: float = 1.0):
        """``ctf``: the batch's CTF parameters (B, 6) (or a (B, D, D) CTF image, see
        :meth:`cryolatent.models.LatentModel.forward`). ``weight`` multiplies the loss for
        the gradient only (DDP: ``W * b_rank / g``); the returned values are the unweighted
        batch means."""
        self.module.train()
        with self._autocast():
            loss, parts = self.loss_fn(x, ctf)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        # a non-finite gradient (any rank's NaN poisons DDP's average: all ranks skip) leaves
        # the parameters and the optimiser state untouched
        self.scaler.step(self.opt)
        self.scaler.update(1.0)
        bad = (~torch.isfinite(loss.detach())).float()
        if self.dist is not None:  # the count of non-finite losses is global
            self.dist.all_reduce_max(bad)
        self.bad_run = (self.bad_run + 1) * bad
        self.max_bad_run = torch.maximum(self.max_bad_run, self.bad_run)
        self.n_bad = self.n_bad + bad
        return {"loss": loss.detach(), **parts}

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, ctf: torch.Tensor | None = None):
        self.model.eval()
        with self._autocast():
            loss, parts = self.eval_fn(x, ctf)
        return {"loss": loss.detach(), **parts}

    def read_bad(self) -> int:
        """Longest run of non-finite steps since the last call (one host sync)."""
        v = int(self.max_bad_run.item())
        self.max_bad_run = torch.maximum(self.bad_run, torch.zeros_like(self.bad_run))
        return v


def make_optimizer(model, cfg: TrainConfig):
    """AdamW (decoupled weight decay; identical to Adam when the decay is 0, TARGET-VAE's
    default) and the plateau scheduler. Adam's coupled L2 decay (the IRL-INR paper's 5e-4)
    outweighs the gradient on the hypernetwork's input layer and collapses z
    (docs/irl-inr-rotation.md §6: cluster accuracy 0.29 with it, 0.70 with AdamW).

    ``cfg.lr`` and ``cfg.weight_decay``; a configuration that leaves them None (a model built
    by hand with :func:`cryolatent.models.build_model`) is completed as build_model completes
    it (:func:`cryolatent.config.resolve` for the model's box)."""
    if cfg.lr is None or cfg.weight_decay is None:
        cfg = resolve(cfg, model.box)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=True)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    return opt, sched


def set_fast_math(device: torch.device) -> None:
    """TF32 for float32 matrix products / convolutions, cuDNN autotuning; on the CPU,
    subnormal floats flushed to zero (process-wide): a float32 TARGET-VAE step on set A's
    32-px particles went from 0.45 s to 1.54 s once its activations and gradients turned
    subnormal (a Xeon without hardware bf16, epoch 4 on; bf16 autocast hides it), and a
    flushed value below 1.2e-38 changes no loss. :func:`train` turns the flush off again when
    it returns (the flag is the processor's, for the whole process: numpy and everything else
    of a notebook would see it)."""
    torch.set_float32_matmul_precision("high")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


# ----------------------------------------------------------------------------- files
class _Writer:
    """Everything the run writes (rank 0 only under DDP)."""

    def __init__(self, rundir: Path):
        self.rundir = rundir
        self.ckdir = rundir / "checkpoints"
        self.rows: list[dict] = []

    def checkpoint(self, state: dict, best: bool) -> None:
        self.ckdir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.ckdir / "last.pt") as tmp:
            torch.save(state, tmp)
        if best:
            with atomic_path(self.ckdir / "best.pt") as tmp:
                torch.save(state, tmp)

    def log_row(self, row: dict) -> None:
        """Add one epoch's row and rewrite log.csv (atomically)."""
        self.rows.append(row)
        self.write_log()

    def write_log(self) -> None:
        """log.csv from ``rows`` (atomic rename: a kill leaves the old or the new file)."""
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in keys})
        with atomic_path(self.rundir / "log.csv") as tmp:
            tmp.write_text(buf.getvalue())

    def resume_rows(self, ck: dict) -> None:
        """On --resume: the rows of the epochs the checkpoint holds, each exactly once.

        The checkpoint carries the rows up to its epoch (``log_rows``), so log.csv is
        rebuilt from it whatever moment a kill landed in: a row written after the
        checkpoint is dropped (that epoch is trained again), a row lost after the checkpoint
        was renamed comes back. Older checkpoints without rows: log.csv cut to the rows of
        epochs <= the checkpoint's epoch."""
        upto = int(ck["epoch"])
        rows = ck.get("log_rows")
        if rows is not None:
            self.rows = [dict(r) for r in rows if int(r["epoch"]) <= upto]
        else:
            p = self.rundir / "log.csv"
            self.rows = []
            if p.exists():
                with p.open() as f:
                    self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= upto]
        self.write_log()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _rng_state(device: torch.device | None = None) -> dict:
    """CPU RNG and CUDA RNG states; with ``device`` (a DDP rank) only that GPU's."""
    st = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        st["cuda_device"] = torch.cuda.get_rng_state(device)
    elif device is None and torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(st["cpu"].cpu())
    if "cuda_device" in st and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda_device"].cpu(), device)
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])
        except (RuntimeError, IndexError):  # different GPU count: keep the fresh seed
            log.warning("CUDA RNG state of the checkpoint not restored (different GPUs)")


def merge_resume(stored: dict, options: dict) -> TrainConfig:
    """A resumed run's configuration: the ``stored`` one (a run's config.json or checkpoint
    table, older names mapped) with those of ``options`` (field -> value) that a resumed run
    may change (:data:`RESUMABLE`); every other option given with another value is kept as
    stored, with a warning."""
    new = TrainConfig.from_dict(stored)
    old = new.to_dict()
    for k, v in options.items():
        if k in RESUMABLE:
            setattr(new, k, v)
        elif k not in ("extra", "preprocessing", "version") and old.get(k, v) != v:
            log.warning("--resume: keeping %s=%r from the checkpoint (ignoring %r)",
                        k, old.get(k), v)
    return new


def resume_config(rundir, options: dict | None = None) -> TrainConfig:
    """The configuration to continue the run in ``rundir`` with (:func:`merge_resume` of its
    config.json, else of its last checkpoint's, and ``options``: only those given)."""
    stored = Path(rundir) / "config.json"
    table = (json.loads(stored.read_text()) if stored.exists()
             else _load_checkpoint(Path(rundir) / "checkpoints" / "last.pt")["config"])
    return merge_resume(table, dict(options or {}))


# ----------------------------------------------------------------------------- train
def train(cfg: TrainConfig, resume: bool = False, data=None,
          dist: DistContext | None = None) -> Path:
    """Train ``cfg.model`` on ``cfg.input`` (or on ``data``: a ParticleSet, an array
    (n, box, box) or a :class:`cryolatent.data.ParticleData`) into ``cfg.outdir``.

    ``resume=True`` continues from ``outdir/checkpoints/last.pt`` with the stored options
    (except those in ``RESUMABLE``, e.g. ``epochs``). Under ``torchrun`` (WORLD_SIZE > 1)
    every process calls this with the same arguments; ``dist`` defaults to
    :func:`cryolatent.distributed.setup` of the environment. Returns the run folder.
    """
    own = dist is None
    if own:
        dist = setup(cfg.device)
    try:
        return _train(cfg, resume, data, dist)
    finally:
        torch.set_flush_denormal(False)   # set_fast_math's flush ends with the training
        if own:
            dist.close()


def _prepare(cfg: TrainConfig, resume: bool, data, dist: DistContext):
    """Everything every rank checks before anyone writes: (cfg, checkpoint, source)."""
    cfg = TrainConfig.from_dict(cfg.to_dict()).validate()
    if not cfg.outdir:
        raise CryolatentError("no run folder given (-o RUNDIR)")
    rundir = Path(cfg.outdir)
    ck = None
    if resume:
        ck = _load_checkpoint(rundir / "checkpoints" / "last.pt")
        cfg = complete_v0_1(merge_resume(ck["config"], cfg.to_dict()), int(ck["box"]))
        cfg.validate()
    elif rundir.exists() and (not rundir.is_dir() or any(rundir.iterdir())):
        raise CryolatentError(f"{rundir}: run folder exists and is not empty; use --resume to "
                              "continue it or choose another -o")
    source = ParticleData.from_source(data if data is not None else cfg.input, cfg.datadir)
    # what was chosen from the data and the machine, one note each for the run log
    cfg, notes = resolve(cfg, source.box, data_facts(source, cfg), dist.device.type)
    _record_preprocessing(cfg, source, resumed=ck is not None)
    if dist.world_size > 1:
        n_train = len(split_indices(source.n, cfg.val_fraction, cfg.seed)[0])
        if cfg.batch_size < dist.world_size:
            raise CryolatentError(
                f"--batch-size {cfg.batch_size} is smaller than the {dist.world_size} "
                "processes (--batch-size is the global batch, split over the processes)")
        if n_train < dist.world_size:
            raise CryolatentError(f"{n_train} training particles for {dist.world_size} "
                                  "processes: use fewer processes")
    return cfg, ck, source, notes


def data_facts(source: ParticleData, cfg: TrainConfig) -> DataFacts:
    """What :func:`cryolatent.config.resolve` needs of the training images: CTF parameters,
    the pixel size (the median over optics groups, for the options in Å) and, when the
    likelihood is left to it, the range of a sample's pixel values."""
    ps = source.particle_set
    apix = (float(np.median(np.asarray(ps.apix_per_particle, dtype=float))) if ps is not None
            else source.apix)
    return DataFacts(has_ctf=source.has_ctf, apix=apix,
                     value_range=(source.value_range(seed=cfg.seed)
                                  if cfg.likelihood == "auto" else None))


def _record_preprocessing(cfg: TrainConfig, source: ParticleData, resumed: bool) -> None:
    """``cfg.preprocessing``: what the training images are relative to the original particles
    (the description ``preprocess`` wrote into the set's optics table, else the images as
    stored; :func:`cryolatent.preprocess.describe_particles`), so that ``embed`` never needs
    the training set. A resumed run keeps its record (a warning when the input now differs)."""
    ps = source.particle_set
    desc = describe_particles(ps if ps is not None else source)
    if resumed and cfg.preprocessing:
        try:
            old = Preprocessing.from_dict(cfg.preprocessing)
        except ValueError:
            old = None
        if old is not None:
            if old.steps(old.original_box) != desc.steps(desc.original_box) \
                    or old.box != desc.box:
                log.warning("--resume: the input's preprocessing (%s) differs from the run's "
                            "(%s); keeping the run's record",
                            ", ".join(desc.steps()) or "none", ", ".join(old.steps()) or "none")
            return
    cfg.preprocessing = desc.to_dict()


def _train(cfg: TrainConfig, resume: bool, data, dist: DistContext) -> Path:
    main = dist.is_main
    if not main:  # other ranks: warnings and errors only, on stderr
        setup_logging(None).setLevel(logging.WARNING)
    err, fp, notes = None, None, []
    try:
        cfg, ck, source, notes = _prepare(cfg, resume, data, dist)
        if dist.enabled:
            fp = fingerprint(cfg.to_dict(), source)
    except CryolatentError as e:
        err = str(e)
    dist.agree(err, fp)   # every rank raises the same line if any failed or they disagree

    rundir = Path(cfg.outdir)
    device = dist.device
    if main:
        rundir.mkdir(parents=True, exist_ok=True)
        setup_logging(rundir)
    if notes:
        log.info("chosen from the data and the device: %s", "; ".join(notes))
    if main:
        cfg.save(rundir / "config.json")
    set_fast_math(device)
    if cfg.threads:
        from .utils import set_threads

        set_threads(cfg.threads)
    log.info("threads: %d; CPU: %s (hardware bf16: %s); torch %s", torch.get_num_threads(),
             cpu_name(), "yes" if cpu_has_fast_bf16() else "no", torch.__version__)
    log.info("%s run in %s: %d particles of %d px, device %s%s", cfg.model, rundir, source.n,
             source.box, device, f", {dist.world_size} processes ({dist.backend}), global "
             f"batch {cfg.batch_size}" if dist.enabled else "")

    seed_everything(cfg.seed)
    model = build_model(cfg, source.box, resolve=False).to(device)
    opt, sched = make_optimizer(model, cfg)
    state = {"epoch": 0, "best": math.inf, "bad_epochs": 0, "history": []}
    writer = _Writer(rundir)
    train_idx, val_idx = split_indices(source.n, cfg.val_fraction, cfg.seed)
    if main and ck is None:
        from .analysis.trust import validation_size_warning

        small = validation_size_warning(len(val_idx), source.n)
        if small:
            log.warning("WARNING: %s", small)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = {"epoch": int(ck["epoch"]), "best": float(ck["best"]),
                 "bad_epochs": int(ck["bad_epochs"]),
                 "history": [float(v) for v in ck.get("history", [])]}
        if main:
            writer.resume_rows(ck)
        log.info("resumed from epoch %d", state["epoch"])
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.3g M parameters", model.name, n_params / 1e6)

    batches = Batches(source, train_idx, val_idx, cfg.batch_size, device, cfg.seed,
                      with_ctf=cfg.ctf, num_workers=cfg.num_workers, rank=dist.rank,
                      world_size=dist.world_size, local_world_size=dist.local_world_size)
    amp = amp_dtype(cfg.amp, device)
    log.info("precision: %s%s", "bf16 autocast (float32 weights, loss and KL)" if amp
             else "float32", f" (forced by {PRECISION_ENV})" if forced_precision() else "")
    runner = StepRunner(model, opt, device, amp, cfg.compile,
                        dist=dist)  # DDP: parameters broadcast from rank 0 here
    # RNG of the sampling (Gumbel noise, random views): per rank under DDP
    if ck is not None:
        _restore_rng(ck, dist, cfg.seed)
    elif dist.enabled:
        torch.manual_seed(rank_seed(cfg.seed, dist.rank))

    def ckpt_state(epoch: int, rng_ranks: list | None = None) -> dict:
        st = {"format": CKPT_FORMAT, "model_name": model.name, "box": source.box,
              "model": model.state_dict(), "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict(),
              "rng": rng_ranks[0] if rng_ranks else _rng_state(), "epoch": epoch,
              "best": state["best"], "bad_epochs": state["bad_epochs"],
              "history": list(state["history"]),
              "config": cfg.to_dict(), "val_idx": torch.from_numpy(val_idx),
              "log_rows": [dict(r) for r in writer.rows]}
        if dist.enabled and rng_ranks:
            st["rng_ranks"] = rng_ranks
            st["world_size"] = dist.world_size
        return st

    W = dist.world_size
    epoch_times: list[float] = []   # this session's epochs, for s/epoch and the ETA
    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        n_seen, steps = 0, 0
        gsizes = batches.global_sizes(epoch)
        bar = progress(total=len(gsizes), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", leave=False, **({} if main else {"disable": True}))
        for (x, c), g in zip(batches.train(epoch), gsizes):
            b = x.shape[0]
            if cfg.kl_warmup > 0 and hasattr(model, "kl_z_weight"):
                model.kl_z_weight = min(1.0, (epoch + steps / len(gsizes)) / cfg.kl_warmup)
            out = runner.train_step(x, c, weight=(W * b / g) if W > 1 else 1.0)
            for k, v in out.items():
                sums[k] = sums[k] + v * b if k in sums else v * b
            n_seen += b
            steps += 1
            bar.update(1)
            if steps % LOG_EVERY == 0:
                if runner.read_bad() >= MAX_BAD_STEPS:
                    bar.close()
                    _abort(writer, ckpt_state, state, epoch, main)
                if not bar.disable:
                    bar.set_postfix(loss=f"{(sums['loss'] / n_seen).item():.4g}")
        bar.close()
        if runner.read_bad() >= MAX_BAD_STEPS:
            _abort(writer, ckpt_state, state, epoch, main)
        keys = list(sums)
        train_means, n_seen = _means(sums, n_seen, keys, dist)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train = time.perf_counter() - t0
        n_bad = int(runner.n_bad.item())   # the flag is global: the same on every rank
        runner.n_bad.zero_()

        dist.broadcast_buffers(model)      # rank 0's running statistics (BatchNorm)
        vsums: dict[str, torch.Tensor] = {}
        n_val = 0
        # the same sampling noise (Gumbel, reparameterisation) every epoch: epoch-to-epoch
        # changes of the validation loss are then the model's, not the noise's (the
        # convergence test and the plateau scheduler read them)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(rank_seed(cfg.seed + 104729, dist.rank))
            for x, c in batches.val():
                out = runner.eval_step(x, c)
                for k, v in out.items():
                    vsums[k] = vsums[k] + v * x.shape[0] if k in vsums else v * x.shape[0]
                n_val += x.shape[0]
        val_means, _ = _means(vsums, n_val, keys, dist)

        monitored = val_means.get("loss", train_means.get("loss", math.nan))
        if not math.isfinite(monitored):
            monitored = math.inf
        sched.step(monitored)
        improved = monitored < state["best"]
        if improved:
            state["best"], state["bad_epochs"] = monitored, 0
        else:
            state["bad_epochs"] += 1
        state["history"].append(monitored)
        rng_ranks = dist.gather_objects(_rng_state(device)) if dist.enabled else None
        row = {"epoch": epoch + 1, "images": n_seen}
        row.update({f"train_{k}": v for k, v in train_means.items()})
        row.update({f"val_{k}": v for k, v in val_means.items()})
        row.update({"lr": opt.param_groups[0]["lr"],
                    "images_per_s": n_seen / max(t_train, 1e-9),
                    "seconds": time.perf_counter() - t0, "skipped_steps": n_bad})
        if main:
            # the row travels in the checkpoint; log.csv follows it (resume_rows rebuilds
            # log.csv from the checkpoint, so a kill between the two loses nothing)
            writer.rows.append(row)
            with defer_sigint():          # Ctrl-C waits until both are on disk
                writer.checkpoint(ckpt_state(epoch + 1, rng_ranks), best=improved)
                writer.write_log()
        epoch_times.append(time.perf_counter() - t0)
        mean_t = sum(epoch_times) / len(epoch_times)
        # remaining epochs x mean epoch time: a cap, early stopping may end the run sooner
        eta = _fmt_duration(mean_t * (cfg.epochs - epoch - 1))
        log.info("epoch %d/%d: train %.6g, val %s, lr %.3g, %.0f images/s, %.3g s/epoch, "
                 "ETA %s%s", epoch + 1,
                 cfg.epochs, train_means.get("loss", math.nan),
                 f"{val_means['loss']:.6g}" if "loss" in val_means else "-",
                 row["lr"], row["images_per_s"], epoch_times[-1],
                 eta if epoch + 1 >= cfg.epochs else f"<= {eta}",
                 f", {n_bad} non-finite steps skipped" if n_bad else "")
        if cfg.early_stop and state["bad_epochs"] >= cfg.early_stop:
            log.info("early stop: no improvement for %d epochs", state["bad_epochs"])
            break
        if cfg.converge_tol > 0 and converged(state["history"], cfg.converge_window,
                                              cfg.converge_tol):
            log.info("converged: over the last %d epochs the validation loss fell by less "
                     "than %g of its fall since epoch 1", cfg.converge_window,
                     cfg.converge_tol)
            break
    if main:  # trust signals: RUNDIR/summary.json (docs/trust.md); rank 0's validation share
        from .analysis.trust import training_report_safe

        training_report_safe(model, source, train_idx, batches.val, writer.rows, rundir,
                             cfg.z_dim, cfg.seed)
    dist.barrier()  # no rank leaves (and tears the group down) before rank 0 has written
    return rundir


def _fmt_duration(seconds: float) -> str:
    """12 s, 5m07s, 2h03m (for the ETA of the per-epoch lines)."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def converged(history: list[float], window: int, tol: float, min_epochs: int = 5) -> bool:
    """Whether the monitored (validation) loss has converged.

    history: the loss after each epoch (epoch 1 first). True when at least ``min_epochs``
    epochs ran and the best loss of the last ``window`` epochs is lower than the best before
    them by less than ``tol`` x (history[0] - best so far): the recent fall is a small share
    of the whole fall. A loss that never fell below epoch 1's counts as converged too (the
    run's summary then warns that it did not learn)."""
    if len(history) < max(min_epochs, window + 1):
        return False
    h = [v if math.isfinite(v) else math.inf for v in history]
    best, before = min(h), min(h[:-window])
    total = h[0] - best
    if not math.isfinite(total) or total <= 0:
        return True
    return (before - best) < tol * total


def _restore_rng(ck: dict, dist: DistContext, seed: int) -> None:
    """The RNG state saved for this rank (an uninterrupted run's stream); a rank that has
    none (other world size) is reseeded from (seed, epoch, rank)."""
    if not dist.enabled:
        _set_rng_state(ck["rng"])
        return
    per = ck.get("rng_ranks")
    if per is not None and len(per) == dist.world_size:
        _set_rng_state(per[dist.rank], dist.device)
        return
    if dist.is_main:
        log.warning("--resume with %d processes (checkpoint: %s): sampling RNG reseeded",
                    dist.world_size, ck.get("world_size", 1))
    torch.manual_seed(rank_seed(seed + 7 * int(ck["epoch"]), dist.rank))


def _means(sums: dict[str, torch.Tensor], n: int, keys: list[str], dist: DistContext
           ) -> tuple[dict[str, float], int]:
    """Means over every rank of the per-image sums (one all_reduce, one host sync).
    ``keys``: the order every rank uses (a rank may have no batch: zeros)."""
    if not keys:
        return {}, n
    if not dist.enabled:
        if not sums or n == 0:
            return {}, n
        vals = (torch.stack([sums[k].float() for k in keys]) / n).tolist()
        return dict(zip(keys, vals)), n
    dev = dist.device
    zero = torch.zeros((), device=dev)
    t = torch.stack([sums[k].float() if k in sums else zero for k in keys]
                    + [torch.tensor(float(n), device=dev)]).double()
    vals = dist.all_reduce_sum(t).tolist()
    total = int(round(vals[-1]))
    if total == 0:
        return {}, 0
    return {k: v / total for k, v in zip(keys, vals[:-1])}, total


def _abort(writer: _Writer, ckpt_state, state: dict, epoch: int, main: bool = True):
    """Too many non-finite steps in a row: keep a usable checkpoint and stop (every rank
    sees the same global flag, so all stop here; rank 0 writes)."""
    last = writer.ckdir / "last.pt"
    if main and not last.exists():  # parameters are finite (bad steps were skipped): save them
        writer.checkpoint(ckpt_state(epoch), best=False)
    raise CryolatentError(
        f"training stopped in epoch {epoch + 1}: the loss was NaN/Inf for {MAX_BAD_STEPS} "
        f"steps in a row (try a lower --lr, --amp off, or check the particles for bad "
        f"values); the last good state is in {last}")


__all__ = ["train", "load_run", "resume_config", "merge_resume", "data_facts", "StepRunner",
           "make_optimizer", "amp_dtype", "set_fast_math"]
