"""Training loop shared by every model (``cryolatent train``; callable from a notebook).

    from cryolatent.config import TrainConfig
    from cryolatent.train import train, load_run
    rundir = train(TrainConfig(input="particles.star", outdir="run1", epochs=50))
    model, cfg = load_run("run1", device="cuda")

Run folder: ``config.json`` (every option, seed, command line), ``log.csv`` (one row per
epoch), ``run.log``, ``checkpoints/last.pt`` (newest complete epoch) and ``best.pt`` (lowest
validation loss). Checkpoints hold only plain types and tensors, so they load with
``torch.load(weights_only=True)``; they contain the model, optimiser and scheduler states,
the RNG states, the epoch, the early-stopping state and the configuration.

Speed: data resident on the GPU when they fit (:mod:`cryolatent.data`), bf16 autocast on
CUDA with float32 master weights, TF32 matrix products, optional ``torch.compile``, fused
Adam. The step never waits for the GPU: losses are summed on the device and read once per
epoch (and every ``LOG_EVERY`` steps for the progress bar and the non-finite check); a
non-finite loss makes the fused Adam kernel skip the update on the device (``found_inf``),
and the run stops with an error after ``MAX_BAD_STEPS`` such steps in a row.

DDP later: only rank 0 would write files (all writes go through ``_Writer``), the epoch
order is sharded in :meth:`cryolatent.data.Batches.epoch_order`, and the model would be
wrapped before ``StepRunner``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path

import torch

from .config import TrainConfig
from .data import Batches, ParticleData, resolve_device, split_indices
from .errors import CryolatentError
from .models import build_model
from .utils import atomic_path, progress, seed_everything, setup_logging

log = logging.getLogger("cryolatent")

LOG_EVERY = 50          # steps between host reads of the running losses
MAX_BAD_STEPS = 10      # consecutive non-finite steps before the run stops
CKPT_FORMAT = 1
#: options a resumed run may change; every other option comes from the checkpoint
RESUMABLE = ("epochs", "device", "num_workers", "compile", "command", "early_stop", "amp",
             "input", "outdir", "datadir")


# ----------------------------------------------------------------------------- step
def amp_dtype(cfg_amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for "auto"; "bf16" forces it (also on CPU); "off" disables."""
    if cfg_amp == "off":
        return None
    if cfg_amp == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


class StepRunner:
    """One optimisation / evaluation step without host synchronisation.

    ``train_step(x, ctf)`` returns detached device scalars {"loss", parts...}. Non-finite
    losses are skipped on the device; ``bad_run`` counts them in a row, ``max_bad_run`` the
    longest such run since the last :meth:`read_bad` call.
    """

    def __init__(self, model, optimizer, device: torch.device, amp: torch.dtype | None = None,
                 compile: bool = False):
        self.model, self.opt, self.device, self.amp = model, optimizer, device, amp
        self.loss_fn = torch.compile(model.loss) if compile else model.loss
        self.bad_run = torch.zeros((), device=device)
        self.max_bad_run = torch.zeros((), device=device)
        self.n_bad = torch.zeros((), device=device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16,
                              enabled=self.amp is not None)

    def train_step(self, x: torch.Tensor, ctf: torch.Tensor | None = None):
        self.model.train()
        with self._autocast():
            loss, parts = self.loss_fn(x, ctf)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        bad = (~torch.isfinite(loss.detach())).float()
        # fused Adam reads found_inf on the device and leaves params and state untouched
        self.opt.found_inf = bad
        self.opt.step()
        self.bad_run = (self.bad_run + 1) * bad
        self.max_bad_run = torch.maximum(self.max_bad_run, self.bad_run)
        self.n_bad = self.n_bad + bad
        return {"loss": loss.detach(), **parts}

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, ctf: torch.Tensor | None = None):
        self.model.eval()
        with self._autocast():
            loss, parts = self.loss_fn(x, ctf)
        return {"loss": loss.detach(), **parts}

    def read_bad(self) -> int:
        """Longest run of non-finite steps since the last call (one host sync)."""
        v = int(self.max_bad_run.item())
        self.max_bad_run = torch.maximum(self.bad_run, torch.zeros_like(self.bad_run))
        return v


def make_optimizer(model, cfg: TrainConfig):
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=True)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    return opt, sched


def set_fast_math(device: torch.device) -> None:
    """TF32 for float32 matrix products / convolutions, cuDNN autotuning."""
    torch.set_float32_matmul_precision("high")
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
        self.rows.append(row)
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

    def load_rows(self, upto_epoch: int) -> None:
        p = self.rundir / "log.csv"
        if p.exists():
            with p.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= upto_epoch]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _load_checkpoint(path: Path, device="cpu") -> dict:
    if not path.exists():
        raise CryolatentError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file: one line
        raise CryolatentError(f"{path}: cannot read the checkpoint ({e})")


def _rng_state() -> dict:
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["cpu"].cpu())
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])
        except (RuntimeError, IndexError):  # different GPU count: keep the fresh seed
            log.warning("CUDA RNG state of the checkpoint not restored (different GPUs)")


def _merge_resume(cfg: TrainConfig, stored: dict) -> TrainConfig:
    new = TrainConfig.from_dict(stored)
    for name in RESUMABLE:
        setattr(new, name, getattr(cfg, name))
    for k, v in cfg.to_dict().items():
        if k not in RESUMABLE and k != "extra" and stored.get(k, v) != v:
            log.warning("--resume: keeping %s=%r from the checkpoint (ignoring %r)",
                        k, stored.get(k), v)
    return new


# ----------------------------------------------------------------------------- train
def train(cfg: TrainConfig, resume: bool = False, data=None) -> Path:
    """Train ``cfg.model`` on ``cfg.input`` (or on ``data``: a ParticleSet, an array
    (n, box, box) or a :class:`cryolatent.data.ParticleData`) into ``cfg.outdir``.

    ``resume=True`` continues from ``outdir/checkpoints/last.pt`` with the stored options
    (except those in ``RESUMABLE``, e.g. ``epochs``). Returns the run folder.
    """
    cfg = TrainConfig.from_dict(cfg.to_dict()).validate()
    if not cfg.outdir:
        raise CryolatentError("no run folder given (-o RUNDIR)")
    rundir = Path(cfg.outdir)
    ck = None
    if resume:
        ck = _load_checkpoint(rundir / "checkpoints" / "last.pt")
        cfg = _merge_resume(cfg, ck["config"]).validate()
    elif rundir.exists() and (not rundir.is_dir() or any(rundir.iterdir())):
        raise CryolatentError(f"{rundir}: run folder exists and is not empty; use --resume to "
                              "continue it or choose another -o")
    rundir.mkdir(parents=True, exist_ok=True)
    setup_logging(rundir)
    device = resolve_device(cfg.device)
    set_fast_math(device)

    source = ParticleData.from_source(data if data is not None else cfg.input, cfg.datadir)
    if cfg.ctf and not source.has_ctf:
        raise CryolatentError(f"--ctf: {cfg.input or 'the particle set'} has no CTF parameters")
    if cfg.likelihood == "auto":
        lo, hi = source.value_range(seed=cfg.seed)
        cfg.likelihood = "bernoulli" if (lo >= 0.0 and hi <= 1.0 and not cfg.ctf) else "gaussian"
        log.info("likelihood: %s (pixel values in [%.3g, %.3g])", cfg.likelihood, lo, hi)
    if cfg.ctf and cfg.likelihood == "bernoulli":
        raise CryolatentError("--ctf needs --likelihood gaussian")
    cfg.save(rundir / "config.json")
    log.info("%s run in %s: %d particles of %d px, device %s", cfg.model, rundir, source.n,
             source.box, device)

    seed_everything(cfg.seed)
    model = build_model(cfg, source.box).to(device)
    opt, sched = make_optimizer(model, cfg)
    state = {"epoch": 0, "best": math.inf, "bad_epochs": 0}
    writer = _Writer(rundir)
    train_idx, val_idx = split_indices(source.n, cfg.val_fraction, cfg.seed)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        state = {"epoch": int(ck["epoch"]), "best": float(ck["best"]),
                 "bad_epochs": int(ck["bad_epochs"])}
        writer.load_rows(state["epoch"])
        log.info("resumed from epoch %d", state["epoch"])
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.3g M parameters", model.name, n_params / 1e6)

    batches = Batches(source, train_idx, val_idx, cfg.batch_size, device, cfg.seed,
                      with_ctf=cfg.ctf, num_workers=cfg.num_workers)
    runner = StepRunner(model, opt, device, amp_dtype(cfg.amp, device), cfg.compile)

    def ckpt_state(epoch: int) -> dict:
        return {"format": CKPT_FORMAT, "model_name": model.name, "box": source.box,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(), "epoch": epoch,
                "best": state["best"], "bad_epochs": state["bad_epochs"],
                "config": cfg.to_dict(), "val_idx": torch.from_numpy(val_idx)}

    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        n_seen, steps = 0, 0
        bar = progress(total=batches.n_train_batches(), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", leave=False)
        for x, c in batches.train(epoch):
            out = runner.train_step(x, c)
            b = x.shape[0]
            for k, v in out.items():
                sums[k] = sums[k] + v * b if k in sums else v * b
            n_seen += b
            steps += 1
            bar.update(1)
            if steps % LOG_EVERY == 0:
                if runner.read_bad() >= MAX_BAD_STEPS:
                    bar.close()
                    _abort(writer, ckpt_state, state, epoch)
                if not bar.disable:
                    bar.set_postfix(loss=f"{(sums['loss'] / n_seen).item():.4g}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_train = time.perf_counter() - t0
        if runner.read_bad() >= MAX_BAD_STEPS:
            _abort(writer, ckpt_state, state, epoch)
        n_bad = int(runner.n_bad.item())
        runner.n_bad.zero_()
        train_means = _means(sums, n_seen)

        vsums: dict[str, torch.Tensor] = {}
        n_val = 0
        for x, c in batches.val():
            out = runner.eval_step(x, c)
            for k, v in out.items():
                vsums[k] = vsums[k] + v * x.shape[0] if k in vsums else v * x.shape[0]
            n_val += x.shape[0]
        val_means = _means(vsums, n_val)

        monitored = val_means.get("loss", train_means.get("loss", math.nan))
        if not math.isfinite(monitored):
            monitored = math.inf
        sched.step(monitored)
        improved = monitored < state["best"]
        if improved:
            state["best"], state["bad_epochs"] = monitored, 0
        else:
            state["bad_epochs"] += 1
        writer.checkpoint(ckpt_state(epoch + 1), best=improved)
        row = {"epoch": epoch + 1, "images": n_seen}
        row.update({f"train_{k}": v for k, v in train_means.items()})
        row.update({f"val_{k}": v for k, v in val_means.items()})
        row.update({"lr": opt.param_groups[0]["lr"],
                    "images_per_s": n_seen / max(t_train, 1e-9),
                    "seconds": time.perf_counter() - t0, "skipped_steps": n_bad})
        writer.log_row(row)
        log.info("epoch %d/%d: train %.6g, val %s, lr %.3g, %.0f images/s%s", epoch + 1,
                 cfg.epochs, train_means.get("loss", math.nan),
                 f"{val_means['loss']:.6g}" if "loss" in val_means else "-",
                 row["lr"], row["images_per_s"],
                 f", {n_bad} non-finite steps skipped" if n_bad else "")
        if cfg.early_stop and state["bad_epochs"] >= cfg.early_stop:
            log.info("early stop: no improvement for %d epochs", state["bad_epochs"])
            break
    return rundir


def _means(sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
    if not sums or n == 0:
        return {}
    keys = list(sums)
    vals = (torch.stack([sums[k].float() for k in keys]) / n).tolist()  # one host sync
    return dict(zip(keys, vals))


def _abort(writer: _Writer, ckpt_state, state: dict, epoch: int):
    """Too many non-finite steps in a row: keep a usable checkpoint and stop."""
    last = writer.ckdir / "last.pt"
    if not last.exists():  # parameters are finite (bad steps were skipped): save them
        writer.checkpoint(ckpt_state(epoch), best=False)
    raise CryolatentError(
        f"training stopped in epoch {epoch + 1}: the loss was NaN/Inf for {MAX_BAD_STEPS} "
        f"steps in a row (try a lower --lr, --amp off, or check the particles for bad "
        f"values); the last good state is in {last}")


# ----------------------------------------------------------------------------- loading
def load_run(rundir, device="auto", which: str = "best"):
    """Model (eval mode, on ``device``) and TrainConfig of a run.

    which: "best" (lowest validation loss; falls back to "last") or "last".
    """
    rundir = Path(rundir)
    ckdir = rundir / "checkpoints"
    path = ckdir / f"{which}.pt"
    if which == "best" and not path.exists():
        path = ckdir / "last.pt"
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    ck = _load_checkpoint(path, device="cpu")
    cfg = TrainConfig.from_dict(ck["config"])
    model = build_model(cfg, int(ck["box"]))
    model.load_state_dict(ck["model"])
    return model.to(dev).eval(), cfg


__all__ = ["train", "load_run", "StepRunner", "make_optimizer", "amp_dtype", "set_fast_math"]
