"""``cryolatent report [RUNDIR] [CLASSES_DIR] OUT.star -o report.html`` (thin layer over
:func:`cryolatent.report.build.make_report`)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import apply_threads, threads_option


@click.command("report")
@click.argument("inputs", nargs=-1, required=True, metavar="RUN_OR_STAR...",
                type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The HTML file to write (one self-contained file: opens offline in any "
                   "browser).")
@click.option("--no-umap", is_flag=True, default=False,
              help="PCA map only (UMAP takes minutes on 10^5+ particles) [default: UMAP and "
                   "PCA].")
@click.option("--umap-sample", type=click.IntRange(min=10), default=50_000, show_default=True,
              help="Particles UMAP is fitted on; the others are placed with UMAP.transform.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of UMAP.")
@click.option("--color-by", "color_by", default=None, metavar="COL1,COL2",
              help="Offer only these STAR columns (and the class) to colour the map by "
                   "[default: every numeric column that varies, and the mean defocus].")
@click.option("--device", default="auto", show_default=True,
              help="Where the generator runs (with a run folder): auto, cpu, cuda or cuda:N.")
@click.option("--title", default=None, help="Page title [default: the STAR's name].")
@click.option("--force", is_flag=True, default=False,
              help="Overwrite an existing output file [default: refuse].")
@threads_option
def command(inputs, out, no_umap, umap_sample, seed, color_by, device, title, force, threads):
    """Write one HTML page to look at an embedding and pick particles in it.

    RUN_OR_STAR...: the particle STAR with latents (embed's OUT.star, or refine's output);
    optionally the training run folder (the generator's image at each class's latent centre
    and its traversals along the principal axes of z) and a `cryolatent classes` output
    folder (aligned and denoised class averages).

    The page: the latent map (UMAP and PCA of z) as a WebGL scatter, coloured by class, psi,
    defocus or any numeric STAR column; the class gallery with each class's images, size,
    half-set resolution and the trust report's warnings (OUT_summary.json beside the STAR);
    the traversals. Select particles with a box or lasso in the map or by clicking classes,
    and Save selection writes STEM_selection.json; then

        cryolatent select OUT.star --selection STEM_selection.json -o subset.star

    keeps exactly those particles. The page needs no server and no network: its JavaScript
    (BokehJS, 1.5 MB) and data are inside, as base64 typed arrays (per particle ~11 bytes
    for the first map, 5 for the other, 8 for its name, 1.3 per colouring: ~50 MB at 10^6
    particles).
    """
    from ..errors import CryolatentError
    from ..report.build import classify_inputs, make_report
    from ..utils import check_outfiles, output_files, setup_logging

    setup_logging()
    if out.suffix.lower() not in (".html", ".htm"):
        raise CryolatentError(f"-o {out}: the report is an HTML file; end its name in .html")
    check_outfiles([out], force)
    classify_inputs(inputs)   # one-line errors before anything starts
    apply_threads(threads)
    cols = [c.strip() for c in color_by.split(",") if c.strip()] if color_by else None
    with output_files([out], force):
        make_report(inputs, out, umap=not no_umap, umap_sample=umap_sample, seed=seed,
                    device=device, color_by=cols, title=title)
    click.echo(str(out))
