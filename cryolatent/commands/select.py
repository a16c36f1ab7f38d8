"""``cryolatent select OUT.star --classes 1,3 -o SUBSET.star [--invert]`` (thin layer over
:func:`cryolatent.analysis.cluster.select_classes`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("select")
@click.argument("input", type=click.Path(path_type=Path))
@click.option("--classes", required=True,
              help="Class numbers to keep, 1-based as rlnClassNumber: 1,3 or 2-5.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="SUBSET.star (SUBSET.cs for a .cs input).")
@click.option("--invert", is_flag=True,
              help="Drop the particles of these classes instead [default: keep them].")
@click.option("--datadir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder where INPUT's relative stack paths are looked up first [default: "
                   "beside INPUT, then the current directory].")
@click.option("--force", is_flag=True, default=False,
              help="Overwrite an existing SUBSET file [default: refuse].")
def command(input, classes, out, invert, datadir, force):
    """Keep (or with --invert drop) the particles of chosen classes of a STAR or .cs file.

    Every column and the optics table are kept, so the subset goes straight back to RELION or
    cryoSPARC (re-extraction, refinement). In a .cs file the classes are alignments2D/class + 1.
    A STAR's image names resolve from the current directory (relative below it, else
    absolute), as RELION run from here resolves them.
    """
    from ..analysis.cluster import parse_classes, select_classes
    from ..utils import check_outfiles, setup_logging

    setup_logging()
    if out.resolve() != input.resolve():   # (-o INPUT: select_classes says so)
        check_outfiles([out], force)
    select_classes(input, parse_classes(classes), out, invert=invert, datadir=datadir)
