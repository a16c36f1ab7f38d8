"""``cryolatent train`` as one library call: a run started, or continued, from the options
given.

    from cryolatent.launch import train_from_options
    train_from_options("prep/particles.star", "run1", {"epochs": 50, "z_dim": 4})
    train_from_options("prep/particles.star", "run1", resume=True)   # after an interruption

Options are :class:`cryolatent.config.TrainConfig` fields, only those given; the others are
chosen from the data and the machine when the training starts
(:func:`cryolatent.config.resolve`). Each step is a function of its own: :func:`clear_run_folder`
(``--force``), :func:`threads_per_process` (the default of ``-j``), the configuration (a new
run's, :meth:`~cryolatent.config.TrainConfig.from_options`, or the stored one with what a
resumed run may change, :func:`cryolatent.train.resume_config`), then
:func:`cryolatent.train.train`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import CryolatentError
from .train import resume_config, train
from .utils import (available_cores, check_outdir, command_line, output_folder,
                    remove_entries, set_threads)

__all__ = ["RUN_FILES", "clear_run_folder", "threads_per_process", "is_main_process",
           "train_from_options"]

#: what a run folder holds (removed by ``--force`` before a new run starts there)
RUN_FILES = ("config.json", "log.csv", "run.log", "checkpoints", "summary.json")
#: options in Å: converted with the particle set's pixel size when a run starts
ANGSTROM_OPTIONS = ("translation_prior_angst", "translation_range_angst", "particle_diameter")


def is_main_process() -> bool:
    """Whether this process writes files: the only one, or rank 0 under ``torchrun``."""
    return os.environ.get("RANK", "0") in ("", "0")


def threads_per_process() -> int:
    """CPU threads for each training process: the cores this one may use
    (:func:`cryolatent.utils.available_cores`) shared by the processes of its node
    (``torchrun``'s LOCAL_WORLD_SIZE)."""
    return max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def clear_run_folder(outdir, input=None) -> None:
    """Remove a run's own files (:data:`RUN_FILES`) from ``outdir``, so that a new run can
    start there (``train --force``). A folder that holds anything else is refused, and
    nothing is removed when ``input``, the new run's particle set, does not exist (a run
    that cannot start deletes none)."""
    out = Path(outdir)
    if not out.is_dir():
        return
    other = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    if other:
        raise CryolatentError(
            f"{outdir}: --force starts a new run in a folder that holds a run "
            f"({', '.join(RUN_FILES)}) and nothing else, but it also holds "
            f"{other[0]}; choose another -o")
    if input is not None and not Path(input).exists():
        raise CryolatentError(f"{input}: no such file")
    remove_entries(out, RUN_FILES)


def train_from_options(input, outdir, options: dict[str, Any] | None = None, *,
                       resume: bool = False, force: bool = False, datadir=None,
                       command: str | None = None) -> Path:
    """Train on ``input`` into the run folder ``outdir``, as ``cryolatent train`` does;
    returns the run folder.

    options: TrainConfig fields given (the others are chosen when the run starts); with
    ``resume`` the run's stored options, of which the given ones may change
    :data:`cryolatent.train.RESUMABLE` (e.g. ``epochs``). force: start a new run in a used
    run folder (:func:`clear_run_folder`). datadir: where relative stack paths are looked up
    (a resumed run keeps its own unless given). The process's threads are set first
    (``options["threads"]``, else :func:`threads_per_process`). A new run that fails before
    its first checkpoint removes the folder it created. Under ``torchrun`` every process
    calls this; only rank 0 checks and clears the folder.
    """
    options = dict(options or {})
    if resume and force:
        raise CryolatentError("--resume and --force exclude each other")
    given_angst = [k for k in ANGSTROM_OPTIONS if options.get(k) is not None]
    if resume and given_angst:
        raise CryolatentError(f"--{given_angst[0].replace('_', '-')}: options in Å cannot "
                              "change a run under --resume")
    main = is_main_process()
    if main and not resume:
        check_outdir(outdir, force, extra=", --resume to continue it")
        if force:
            clear_run_folder(outdir, input)
    set_threads(options.get("threads") or threads_per_process())
    # the threads are this invocation's (not a resumed run's): None when not given
    options.update(threads=options.get("threads"), input=str(input), outdir=str(outdir),
                   command=command if command is not None else command_line())
    if datadir is not None or not resume:
        options["datadir"] = datadir
    if resume:
        cfg = resume_config(outdir, options)
    else:
        cfg = TrainConfig.from_options(options)
        cfg.extra["cwd"] = os.getcwd()  # where relative paths were resolved
    # a new run that fails before its first checkpoint removes the folder it created
    cleanup = output_folder(outdir, force=True,
                            keep=lambda p: (p / "checkpoints" / "last.pt").exists()) \
        if main and not resume else contextlib.nullcontext()
    with cleanup:
        return train(cfg, resume=resume)
