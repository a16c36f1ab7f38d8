"""``cryolatent refine IN.star -o OUT.star``: embed's classes and poses refined by 2D alignment
(thin layer over :func:`cryolatent.analysis.refine2d.refine_star`)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import apply_threads, force_option, threads_option


@click.command("refine")
@click.argument("star", metavar="IN.star", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="OUT.star (also writes OUT_classes.mrcs and OUT_refine.json).")
@click.option("--iterations", type=click.IntRange(min=1), default=10, show_default=True,
              help="Most expectation-maximisation rounds; stops earlier once fewer than "
                   "0.2% of the particles change class.")
@click.option("--resolution", "resolution_A", type=click.FloatRange(min=0, min_open=True),
              default=12.0, show_default=True,
              help="Å: the particles are Fourier-cropped so that this is the Nyquist "
                   "resolution of the search (never below 32 px or above the particle box).")
@click.option("--psi-step", type=click.FloatRange(min=0.5, max=90), default=5.0,
              show_default=True, help="Degrees between the in-plane angles searched.")
@click.option("--offset-range", "offset_range_A", type=click.FloatRange(min=0), default=None,
              help="Å: radius of the shift search [default: 0.15 × the box, as train's].")
@click.option("--mask-diameter", "mask_diameter_A", type=click.FloatRange(min=0, min_open=True),
              default=None, help="Å: soft circular mask of the class averages "
                                 "[default: 0.9 × the box].")
@click.option("--ctf/--no-ctf", "use_ctf", default=True, show_default=True,
              help="Model each particle's CTF when the particles have CTF parameters.")
@click.option("--centre/--no-centre", default=True, show_default=True,
              help="Centre each class's frame afterwards (as embed does).")
@click.option("--datadir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder where IN.star's relative stack paths are looked up first "
                   "[default: beside IN.star, then the current directory].")
@click.option("--moves/--no-moves", default=True, show_default=True,
              help="After EM converges, try split-and-merge moves and a two-frame check per "
                   "class, each kept only when it raises the likelihood: escapes a poor start "
                   "(two views in one class, one view in two classes or two frames).")
@force_option
@threads_option
def command(star, out, iterations, resolution_A, psi_step, offset_range_A, mask_diameter_A,
            use_ctf, centre, datadir, moves, force, threads):
    """Refine the classes and poses of IN.star (a `cryolatent embed --clusters K` output) by
    2D alignment: every particle is compared with every class average at every in-plane angle
    and shift (CTF and a noise spectrum modelled), assigned by its class posterior, and the
    averages are rebuilt, until the classes stop changing. The model's clusters and poses are
    the starting point; a class that empties out is re-seeded by splitting the largest one,
    and once EM has converged, split-and-merge moves are tried (kept when the likelihood
    rises). Classes that hold one view are named (over-clustering is fine: ask for more
    classes than you expect).

    OUT.star keeps every column and row of IN.star, with rlnClassNumber, rlnAnglePsi,
    rlnOriginXAngst/YAngst replaced and rlnMaxValueProbDistribution set (the latent columns
    stay as embed wrote them). OUT_classes.mrcs holds the class averages (slice k = class k),
    OUT_refine.json the settings and each round's figures; the log goes to refine.log beside
    OUT.star.
    """
    import contextlib

    from ..analysis.refine2d import refine_star
    from ..errors import InputError
    from ..utils import command_line, output_files, output_folder, setup_logging

    if out.resolve() == star.resolve():
        raise InputError(f"{out}: OUT.star would overwrite IN.star; choose another name")
    folder = out.parent if str(out.parent) else Path(".")
    made = output_folder(folder, force=True) if not folder.exists() \
        else contextlib.nullcontext()
    stem = out.with_suffix("")
    files = output_files([out, Path(f"{stem}_classes.mrcs"), Path(f"{stem}_refine.json")],
                         force, logs=[folder / "refine.log"])
    with made, files:
        logger = setup_logging(folder, "refine.log")
        logger.info("command: %s", command_line())
        apply_threads(threads)
        res = refine_star(star, out, datadir=datadir, iterations=iterations,
                          resolution_A=resolution_A, psi_step=psi_step,
                          offset_range_A=offset_range_A, mask_diameter_A=mask_diameter_A,
                          use_ctf=use_ctf, centre=centre, moves=moves)
    click.echo(f"{res['n']} particles, {len(res['class_counts'])} classes "
               f"{res['class_counts']}, {res['iterations_run']} rounds, "
               f"{100 * res['changed_from_input']:.1f}% changed class -> {out}")

