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
def command(input, classes, out, invert):
    """Keep (or with --invert drop) the particles of chosen classes of a STAR or .cs file.

    Every column and the optics table are kept, so the subset goes straight back to RELION or
    cryoSPARC (re-extraction, refinement). In a .cs file the classes are alignments2D/class + 1.
    """
    from ..analysis.cluster import parse_classes, select_classes
    from ..utils import setup_logging

    setup_logging()
    select_classes(input, parse_classes(classes), out, invert=invert)
