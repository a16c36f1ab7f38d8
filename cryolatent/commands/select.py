"""``cryolatent select OUT.star --classes 1,3 -o SUBSET.star [--invert]``,
``cryolatent select OUT.star --auto -o SUBSET.star [--max-resolution Å]`` or
``cryolatent select OUT.star --selection FILE -o SUBSET.star [--invert]`` (thin layer over
:func:`cryolatent.analysis.cluster.select_classes` / :func:`~.select_auto` /
:func:`cryolatent.report.selection.select_selection`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("select")
@click.argument("input", type=click.Path(path_type=Path))
@click.option("--classes", default=None,
              help="Class numbers to keep, 1-based as rlnClassNumber: 1,3 or 2-5 "
                   "[default: none; give --classes, --auto or --selection].")
@click.option("--auto", is_flag=True,
              help="Instead of --classes: keep the classes that pass the checks of INPUT's "
                   "trust report (INPUT_summary.json beside it, written by embed and refine): "
                   "at least 2 particles, resolved signal, better than noise aligned the same "
                   "way, resolution no worse than --max-resolution. Logs each dropped class "
                   "with its reasons and writes them to SUBSET_select.json [default: off].")
@click.option("--selection", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Instead of --classes: keep the particles a selection file names (saved "
                   "by the Save selection button of a `cryolatent report` page; particles "
                   "named by rlnImageName, so any STAR holding them works) [default: none].")
@click.option("--max-resolution", "max_resolution", type=float, default=None, metavar="Å",
              help="--auto: drop classes whose half-set resolution is worse (larger) than "
                   "this [default: max(box × apix / 8, 4 × apix) of the class averages: the "
                   "half-set FRC must hold out to Fourier ring 8 (half Nyquist in boxes under "
                   "32 px); blobs (ice, aggregates, aligned noise) fade by ring ~5, particle "
                   "classes go far beyond; docs/trust.md].")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="SUBSET.star (SUBSET.cs for a .cs input).")
@click.option("--invert", is_flag=True,
              help="Drop the particles of these classes (or of the selection) instead "
                   "[default: keep them].")
@click.option("--datadir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder where INPUT's relative stack paths are looked up first [default: "
                   "beside INPUT, then the current directory].")
@click.option("--force", is_flag=True, default=False,
              help="Overwrite an existing SUBSET file (and SUBSET_select.json) [default: "
                   "refuse].")
def command(input, classes, auto, selection, max_resolution, out, invert, datadir, force):
    """Keep (or with --invert drop) the particles of chosen classes of a STAR or .cs file,
    or with --auto those of the classes that pass the trust checks, or with --selection
    those of a selection file saved in a `cryolatent report` page.

    Every column and the optics table are kept, so the subset goes straight back to RELION or
    cryoSPARC (re-extraction, refinement). In a .cs file the classes are alignments2D/class + 1.
    A STAR's image names resolve from the current directory (relative below it, else
    absolute), as RELION run from here resolves them.
    """
    from ..analysis.cluster import (parse_classes, select_auto, select_classes,
                                    selection_report_path)
    from ..errors import CryolatentError
    from ..utils import check_outfiles, output_files, setup_logging

    setup_logging()
    if (classes is not None) + auto + (selection is not None) != 1:
        raise CryolatentError("give one of --classes or --auto or --selection FILE")
    if selection is not None:
        from ..report.selection import select_selection

        if max_resolution is not None:
            raise CryolatentError("--max-resolution applies to --auto only")
        if out.resolve() != input.resolve():   # (-o INPUT: select_selection says so)
            check_outfiles([out], force)
        select_selection(input, selection, out, invert=invert, datadir=datadir)
        return
    if not auto:
        if max_resolution is not None:
            raise CryolatentError("--max-resolution applies to --auto only")
        if out.resolve() != input.resolve():   # (-o INPUT: select_classes says so)
            check_outfiles([out], force)
        select_classes(input, parse_classes(classes), out, invert=invert, datadir=datadir)
        return
    if invert:
        raise CryolatentError("--invert applies to --classes only")
    paths = [out, selection_report_path(out)] if out.resolve() != input.resolve() else []
    with output_files(paths, force):   # both refused unless --force; removed if it fails
        select_auto(input, out, max_resolution_A=max_resolution, datadir=datadir)
