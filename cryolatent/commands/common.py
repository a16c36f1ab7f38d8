"""Options shared by several commands: ``-j/--threads`` and ``--force`` (one definition each,
so the help text and the behaviour are the same everywhere)."""

from __future__ import annotations

import click

THREADS_HELP = ("CPU threads (torch, BLAS, OpenMP) [default: the cores this process may use: "
                "its CPU affinity and cgroup quota].")
FORCE_HELP = ("Write into an existing non-empty output folder, overwriting the files of the "
              "same names [default: refuse].")


def threads_option(f):
    """``-j/--threads N`` (None when not given: the cores this process may use)."""
    return click.option("-j", "--threads", "threads", type=click.IntRange(min=1), default=None,
                        help=THREADS_HELP)(f)


def force_option(f):
    """``--force``: accept a non-empty output folder."""
    return click.option("--force", is_flag=True, default=False, help=FORCE_HELP)(f)


def apply_threads(threads: int | None) -> int:
    """Set the process's threads (:func:`cryolatent.utils.set_threads`) and log
    ``threads: N``; returns N."""
    import logging

    from ..utils import set_threads

    n = set_threads(threads)
    logging.getLogger("cryolatent").info("threads: %d", n)
    return n


def run_search_dirs(rundir) -> list:
    """Folders where a command given a run folder also looks for relative stack paths (after
    --datadir, beside the STAR and the current directory): beside the run's recorded training
    input, its --datadir, and the folder the training ran from (a RELION project directory).
    Relative records are taken from that folder, else from the run folder's parent."""
    from pathlib import Path

    from ..errors import CryolatentError
    from ..run import RunDir   # here, not at the top: it imports torch (`--help` stays fast)

    try:
        cfg = RunDir(rundir).config()
    except (CryolatentError, TypeError, AttributeError):   # no run, or not a config
        return []
    cwd0 = cfg.extra.get("cwd")
    bases = [Path(b) for b in (cwd0, Path(rundir).parent) if b]
    out: list[Path] = []

    def add(p: Path) -> None:
        if p.is_dir() and p not in out:
            out.append(p)

    for rec, parent in ((cfg.input, True), (cfg.datadir, False)):
        if not rec:
            continue
        p = Path(rec)
        for cand in ([p] if p.is_absolute() else [b / p for b in bases]):
            add(cand.parent if parent else cand)
    for b in bases[:1]:
        add(b)
    return out
