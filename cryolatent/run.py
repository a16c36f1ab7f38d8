"""A ``cryolatent train`` run folder: its configuration, checkpoints and the preprocessing of
its training images, for the commands that use a trained model (``embed``, ``classes``).

    RUNDIR/config.json            every option (:class:`cryolatent.config.TrainConfig`), with
                                  ``preprocessing``: what the training images are
    RUNDIR/checkpoints/last.pt    newest complete epoch; ``best.pt``: lowest validation loss

    run = RunDir("run1")
    model, cfg = run.load(device="cuda")          # = load_run("run1", device="cuda")
    prep = run.preprocessing()                     # cryolatent.preprocess.Preprocessing

Checkpoints are read with ``torch.load(weights_only=True)`` only (:func:`load_checkpoint`).
``cryolatent.train`` writes runs; this module reads them and does not import it.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch

from .config import TrainConfig, complete_v0_1
from .errors import CryolatentError
from .io import load_particles
from .models import build_model
from .preprocess import Preprocessing, describe_particles
from .utils import resolve_device

__all__ = ["RunDir", "load_run", "load_checkpoint", "training_set_path", "run_preprocessing"]

log = logging.getLogger("cryolatent")


def load_checkpoint(path, device="cpu") -> dict:
    """A checkpoint's dict, loaded with ``weights_only=True`` (tensors and plain values only).

    Every reader of cryolatent checkpoints goes through here. A file holding other Python
    objects (which unpickling could run as code) is refused with one line; torch's own
    message, which advises ``weights_only=False``, is never passed on.
    """
    path = Path(path)
    if not path.exists():
        raise CryolatentError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        inner = str(e.__context__ or "")
        if zipfile.is_zipfile(path) or "global" in inner.lower():
            raise CryolatentError(
                f"{path}: refused: the checkpoint holds Python objects other than tensors "
                "and plain values (it could run code); not loaded") from None
        raise CryolatentError(f"{path}: cannot read the checkpoint (not a PyTorch checkpoint, "
                              "or a damaged file)") from None
    except Exception as e:  # noqa: BLE001 - truncated / corrupt file: one short line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = first.split(". ")[0][:160]
        raise CryolatentError(f"{path}: cannot read the checkpoint (damaged or incomplete "
                              f"file: {first})") from None


def training_set_path(cfg: TrainConfig, rundir=None) -> str:
    """The run's training set path: as recorded, else relative to the folder the training ran
    from, the run folder's parent or the run folder (a relative path recorded by a run started
    in a RELION-style project folder)."""
    p = Path(cfg.input)
    if not p.exists() and not p.is_absolute() and rundir is not None:
        cwd0 = (getattr(cfg, "extra", None) or {}).get("cwd")   # where the training ran
        for base in ([Path(cwd0)] if cwd0 else []) + [Path(rundir).parent, Path(rundir)]:
            if (base / p).exists():
                return str(base / p)
    return str(cfg.input)


def run_preprocessing(cfg: TrainConfig, model=None, rundir=None, particles=None):
    """``(Preprocessing, training ParticleSet or None)`` of a run's training images.

    The description ``train`` recorded (``cfg.preprocessing``), without opening the training
    set (None). A run that recorded none (an older cryolatent) gets it judged from its
    training set (``particles`` when that is the training set already opened), with a
    warning: the description ``preprocess`` wrote into the set's optics table, else
    :func:`cryolatent.preprocess.describe_particles`'s judgement ("inferred"); the set is
    returned for calibration. When it cannot be opened either: the model's box and no steps,
    with a warning.
    """
    rec = getattr(cfg, "preprocessing", None)
    if rec:
        try:
            return Preprocessing.from_dict(rec), None
        except ValueError as e:
            log.warning("the run's recorded preprocessing is unreadable (%s); judging it "
                        "from the training set", e)
    where = f"{rundir}: " if rundir is not None else ""
    try:
        tps = particles if particles is not None else load_particles(
            training_set_path(cfg, rundir), datadir=cfg.datadir)
        desc = describe_particles(tps, source="inferred")
    except (CryolatentError, OSError) as e:
        box = getattr(model, "box", None)
        if box is None:
            raise CryolatentError(f"cannot open the run's training set {cfg.input!r} ({e}) "
                                  "and the run does not record its image size")
        log.warning("%sthe run records no preprocessing and its training set %s cannot be "
                    "opened (%s); using the model's box %s and no normalisation, flip or "
                    "inversion", where, cfg.input, e, box)
        return Preprocessing(box=int(box), source="inferred"), None
    log.warning("%sthe run records no preprocessing of its training images (made by an older "
                "cryolatent); judged from its training set %s: %s", where, cfg.input,
                ", ".join(desc.steps()) or "no steps")
    return desc, tps


class RunDir:
    """A ``cryolatent train`` run folder (see the module docstring)."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_path(self, which: str = "best") -> Path:
        """``checkpoints/{which}.pt``; "best" falls back to "last" when there is no best."""
        if which not in ("best", "last"):
            raise CryolatentError(f"checkpoint {which!r}: choose best or last")
        path = self.checkpoint_dir / f"{which}.pt"
        if which == "best" and not path.exists():
            path = self.checkpoint_dir / "last.pt"
        return path

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path("best").exists()

    def config(self) -> TrainConfig:
        """The run's options (``config.json``)."""
        return TrainConfig.load(self.config_path)

    def checkpoint(self, which: str = "best", device="cpu") -> dict:
        return load_checkpoint(self.checkpoint_path(which), device=device)

    def load(self, device="auto", which: str = "best"):
        """Model (eval mode, on ``device``) and TrainConfig of the checkpoint ``which``: the
        configuration the run recorded, complete (a run of cryolatent 0.1.0, which recorded
        some options as None, completed as its model did then: :func:`complete_v0_1`); nothing
        is chosen again."""
        ck = self.checkpoint(which, device="cpu")
        box = int(ck["box"])
        cfg = complete_v0_1(TrainConfig.from_dict(ck["config"]), box)
        model = build_model(cfg, box, resolve=False)
        model.load_state_dict(ck["model"])
        return model.to(resolve_device(device)).eval(), cfg

    def training_set(self, cfg: TrainConfig | None = None) -> str:
        return training_set_path(cfg or self.config(), self.path)

    def preprocessing(self, cfg: TrainConfig | None = None, model=None) -> Preprocessing:
        """What the training images are (:func:`run_preprocessing`)."""
        return run_preprocessing(cfg or self.config(), model, self.path)[0]


def load_run(rundir, device="auto", which: str = "best"):
    """Model (eval mode, on ``device``) and TrainConfig of a run.

    which: "best" (lowest validation loss; falls back to "last") or "last".
    """
    return RunDir(rundir).load(device, which)
