"""``cryolatent plot``: latent-space maps (UMAP / PCA), pose histograms, training curves."""

from __future__ import annotations

import click

from .common import force_option


@click.command("plot")
@click.argument("star", metavar="OUT.star", type=click.Path(dir_okay=False))
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for the pictures (created).")
@click.option("--rundir", type=click.Path(file_okay=False), default=None,
              help="Training run folder: also plot its log.csv (training curves) "
                   "[default: none].")
@click.option("--pdf", is_flag=True, default=False,
              help="Write PDF files beside the PNGs [default: PNG only].")
@force_option
@click.option("--umap-sample", type=click.IntRange(min=10), default=50_000, show_default=True,
              help="Particles UMAP is fitted on; the others are placed with UMAP.transform.")
@click.option("--no-umap", is_flag=True, default=False,
              help="PCA only (UMAP takes minutes on 10^5+ particles) [default: UMAP and "
                   "PCA].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of UMAP and of the subsampling.")
def command(star, outdir, rundir, pdf, force, umap_sample, no_umap, seed):
    """Plot the latents of OUT.star (a `cryolatent embed` output) as UMAP and PCA maps,
    coloured by class and by in-plane angle, with histograms of psi and of the shifts.

    Writes OUTDIR/latent_umap.png, latent_pca.png (latent_*_density.png above 10^5
    particles), pose_histograms.png and, with --rundir, training_curves.png.
    """
    from pathlib import Path

    from .. import utils
    from ..analysis.plots import plot_all

    utils.setup_logging(None)
    fmt = ("png", "pdf") if pdf else ("png",)
    methods = ("pca",) if no_umap else ("umap", "pca")
    with utils.output_folder(outdir, force):   # removed again if the command fails
        files = plot_all(Path(star), Path(outdir), rundir=rundir, methods=methods,
                         umap_sample=umap_sample, fmt=fmt, seed=seed)
    for f in files:
        click.echo(str(f))
