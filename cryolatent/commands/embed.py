"""``cryolatent embed RUNDIR INPUT -o OUT.star [--clusters K]`` (thin layer over
:func:`cryolatent.inference.embed`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..analysis.cluster import METHODS
from .common import apply_threads, run_search_dirs, threads_option


@click.command("embed")
@click.argument("rundir", type=click.Path(path_type=Path))
@click.argument("input", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="OUT.star (also writes OUT.z.npy, and OUT.cs when INPUT is .cs).")
@click.option("--clusters", type=click.IntRange(min=1), default=None,
              help="Cluster the latent means into K classes (rlnClassNumber 1..K) "
                   "[default: no clustering].")
@click.option("--cluster-method", type=click.Choice(METHODS), default="kmeans",
              show_default=True, help="k-means, agglomerative (Ward) or Gaussian mixture.")
@click.option("--datadir", type=click.Path(path_type=Path), default=None,
              help="Folder where INPUT's relative stack paths are looked up first [default: "
                   "beside INPUT, then the current directory, then beside the run's recorded "
                   "training input].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Particles per forward pass [default: the run's training batch size].")
@click.option("--device", default="auto", show_default=True,
              help="auto (GPU when there is one), cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the clustering.")
@click.option("--checkpoint", type=click.Choice(("best", "last")), default="best",
              show_default=True, help="The run's checkpoint: lowest validation loss, or newest.")
@click.option("--centre/--no-centre", default=True, show_default=True,
              help="Centre each class's frame so that its particles' shifts are smallest "
                   "(one frame for all without --clusters).")
@click.option("--force", is_flag=True, default=False,
              help="Overwrite existing OUT.star, OUT.z.npy, OUT_summary.json (and OUT.cs) "
                   "[default: refuse].")
@threads_option
def command(rundir, input, out, clusters, cluster_method, datadir, batch_size, device, seed,
            checkpoint, centre, force, threads):
    """Infer the in-plane angle, shift, latent vector (and class) of every particle of INPUT
    (.star, .cs or .mrcs) with the trained model of RUNDIR.

    Relative stack paths are looked up in --datadir, beside INPUT, in the current directory,
    then beside the run's recorded training input.

    INPUT may be the training set or the original particles it was made from (larger box):
    these get the run's recorded preprocessing on the fly (Fourier crop, phase flip,
    inversion, normalisation, as at training; the training set itself is not read), and the
    origins are written in Å, right for INPUT's pixel size. OUT.star keeps every input column and row, in
    order, and adds rlnAnglePsi, rlnOriginXAngst, rlnOriginYAngst, cryolatentZ1..D (and
    rlnClassNumber with --clusters).

    The log goes to the terminal and to embed.log beside OUT.star (appended to). Existing
    output files are refused unless --force; a failed embed removes what it wrote (embed.log
    included).
    """
    import contextlib

    from ..analysis.trust import summary_path_for
    from ..inference import embed, output_paths
    from ..io.particles import stack_search_dirs
    from ..utils import command_line, output_files, output_folder, setup_logging

    outs = output_paths(out, input, "cs" if input.suffix.lower() == ".cs" else "star")
    folder = out.parent if str(out.parent) else Path(".")
    # a folder made for OUT.star is removed again if embed fails
    made = output_folder(folder, force=True) if not folder.exists() \
        else contextlib.nullcontext()
    files = output_files([outs.star, outs.z, outs.cs, summary_path_for(outs.star)], force,
                         logs=[folder / "embed.log"])
    # stacks are also looked for beside the run's recorded training input
    with made, files, stack_search_dirs(run_search_dirs(rundir)):
        logger = setup_logging(folder, "embed.log")
        logger.info("command: %s", command_line())
        apply_threads(threads)
        embed(rundir, input, out, clusters=clusters, cluster_method=cluster_method,
              batch_size=batch_size, device=device, datadir=datadir, seed=seed,
              checkpoint=checkpoint, centre=centre)
