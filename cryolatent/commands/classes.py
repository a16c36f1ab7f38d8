"""``cryolatent classes``: aligned (CTF-corrected) and denoised class averages, traversals."""

from __future__ import annotations

import click

from .common import apply_threads, force_option, run_search_dirs, threads_option


@click.command("classes")
@click.argument("rundir", type=click.Path(file_okay=False))
@click.argument("star", metavar="OUT.star", type=click.Path(dir_okay=False))
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for the averages, counts and gallery (created).")
@click.option("--particles", type=click.Path(dir_okay=False), default=None,
              help="Particle set to average (.star/.cs/.mrcs), e.g. the unbinned one for "
                   "full-resolution averages; matched to OUT.star by (original) image name "
                   "[default: the images OUT.star names].")
@click.option("--datadir", type=click.Path(file_okay=False), default=None,
              help="Folder holding the stacks named with relative paths, looked in first "
                   "[default: beside OUT.star, then the current directory, then beside the "
                   "run's recorded training input].")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Particles read and aligned at a time.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N.")
@click.option("--ctf/--no-ctf", "use_ctf", default=True, show_default=True,
              help="Wiener CTF correction of the aligned averages when the particles have "
                   "CTF parameters.")
@click.option("--wiener-snr", type=click.FloatRange(min=0, min_open=True), default=0.1,
              show_default=True,
              help="Per-particle spectral SNR of the Wiener filter: the regulariser added to "
                   "sum(CTF^2) is 1/SNR.")
@click.option("--traversal-axes", type=click.IntRange(min=1), default=2, show_default=True,
              help="Principal axes of z to traverse.")
@click.option("--traversal-steps", type=click.IntRange(min=2), default=7, show_default=True,
              help="Images along each axis.")
@click.option("--pdf", is_flag=True, default=False,
              help="Write PDF galleries beside the PNGs [default: PNG only].")
@threads_option
@force_option
def command(rundir, star, outdir, particles, datadir, batch_size, device, use_ctf, wiener_snr,
            traversal_axes, traversal_steps, pdf, threads, force):
    """Class averages of OUT.star (a `cryolatent embed --clusters K` output) with the
    model of RUNDIR.

    Writes OUTDIR/aligned_averages.mrcs (every particle aligned with its psi and shift and
    averaged, Wiener CTF-corrected when the particles carry CTF parameters, pixel size of the
    particles), denoised_averages.mrcs (the generator at each class's latent centre),
    traversals.mrcs (along the principal axes of z), class_counts.csv, gallery.png and
    traversals.png. Class k is image k of each stack.
    """
    from pathlib import Path

    from .. import utils
    from ..analysis.class_averages import make_class_averages
    from ..errors import InputError

    if not Path(rundir).is_dir():
        raise InputError(f"{rundir}: no such run folder")
    from ..io.particles import stack_search_dirs

    # removed again if the command fails; stacks are also looked for beside the run's
    # recorded training input
    with utils.output_folder(outdir, force), stack_search_dirs(run_search_dirs(rundir)):
        logger = utils.setup_logging(outdir, "classes.log")
        logger.info("command: %s", utils.command_line())
        apply_threads(threads)
        res = make_class_averages(rundir, star, outdir, particles=particles, datadir=datadir,
                                  batch_size=batch_size, device=device, wiener_snr=wiener_snr,
                                  ctf="auto" if use_ctf else False, n_axes=traversal_axes,
                                  steps=traversal_steps,
                                  fmt=("png", "pdf") if pdf else ("png",))
    counts = res["counts"]
    click.echo(f"{int((counts > 0).sum())} classes, {int(counts.sum())} particles -> {outdir}")
    for f in res["files"]:
        click.echo(str(f))
