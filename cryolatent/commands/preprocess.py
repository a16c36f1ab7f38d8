"""``cryolatent preprocess``: Fourier-crop, normalise, invert or phase-flip a particle set."""

from __future__ import annotations

import click

from .common import apply_threads, force_option, threads_option


@click.command("preprocess")
@click.argument("input", type=click.Path(dir_okay=False))
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False),
              help="Output folder: particles.star + particles.mrcs (+ preprocess.log).")
@click.option("--datadir", type=click.Path(file_okay=False), default=None,
              help="Folder holding the stacks named by a STAR/.cs with relative paths "
                   "[default: beside INPUT, then the current directory].")
@click.option("--box", type=click.IntRange(min=2), default=None,
              help="New box size in px (Fourier crop; even recommended) [default: keep the "
                   "input's].")
@click.option("--normalize/--no-normalize", "do_normalize", default=True, show_default=True,
              help="Background (outside a circle of diameter 0.75 x box) to mean 0, sd 1.")
@click.option("--invert/--no-invert", "do_invert", default=False, show_default=True,
              help="Invert the contrast.")
@click.option("--phase-flip", "do_phase_flip", is_flag=True, default=False,
              help="Multiply each particle's Fourier transform by the sign of its CTF "
                   "[default: off].")
@click.option("--apix", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Pixel size of the input in Å [default: the file's: rlnImagePixelSize, "
                   "else the stack header].")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Particles per chunk [default: about 64 MB of input].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Chunks processed at once [default: 2, or 1 with a single thread]; the "
                   "threads are shared among them.")
@threads_option
@force_option
def command(input, outdir, datadir, box, do_normalize, do_invert, do_phase_flip, apix,
            chunk_size, workers, threads, force):
    """Read INPUT (.star, .cs or .mrcs), Fourier-crop to --box, optionally phase-flip, invert
    and normalise, and write OUTDIR/particles.star + OUTDIR/particles.mrcs (RELION 3.1).

    Every input column is kept; rlnImageName points to the new stack and the old name moves to
    rlnImageOriginalName. The pixel size in the optics table becomes apix x old box / new box.
    """
    from pathlib import Path

    from .. import utils
    from ..errors import InputError
    from ..preprocess import preprocess

    if not Path(input).exists():
        raise InputError(f"{input}: no such file")
    # a failed run removes the folder it created (or the files it added to an existing one)
    with utils.output_folder(outdir, force):
        logger = utils.setup_logging(outdir, "preprocess.log")
        logger.info("command: %s", utils.command_line())
        apply_threads(threads)
        # a failure is printed once by the CLI (cryolatent.cli)
        res = preprocess(input, outdir, box=box, normalize=do_normalize, invert=do_invert,
                         phase_flip=do_phase_flip, datadir=datadir, apix=apix,
                         chunk=chunk_size, workers=workers)
    click.echo(f"{res.n} particles, box {res.box}, {res.apix:.4g} Å/px -> {res.star}")
