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
