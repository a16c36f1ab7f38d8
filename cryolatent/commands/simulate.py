"""``cryolatent simulate {mnist-u,mnist-n,cryoem} -o OUTDIR``: particles with ground truth."""

from __future__ import annotations

import math
from pathlib import Path

import click

from .common import apply_threads, force_option, threads_option


@click.command("simulate")
@click.argument("kind", type=click.Choice(["mnist-u", "mnist-n", "cryoem"]))
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path),
              help="Output folder: particles.star + particles.mrcs.")
@click.option("--n", "n", type=int, default=None,
              help="Number of particles. MNIST: the first N digits of the split (default all: "
                   "60,000 train / 10,000 test); cryoem: default 1000.")
@click.option("--box", type=int, default=None,
              help="Box size in px (default 50 for MNIST, 128 for cryoem).")
@click.option("--apix", type=float, default=None,
              help="Pixel size in Å (MNIST default 1.0; cryoem default: the largest "
                   "structure's diameter spans 70% of the box).")
@click.option("--snr", type=float, default=None,
              help="Signal-to-noise ratio (signal variance / noise variance; see "
                   "docs/conventions.md). MNIST default: no noise; cryoem default 0.1; "
                   "'inf' = no noise.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--structure", "structures", multiple=True, type=click.Path(path_type=Path),
              help="cryoem: PDB or mmCIF model, one class each (repeatable; default the GluA3 "
                   "NTD pair 3O21 / 3P3W from ../shared/data/structures).")
@click.option("--mnist", "mnist", type=click.Path(path_type=Path), default=None,
              help="MNIST .npz (x_train, y_train, x_test, y_test); default "
                   "../shared/data/mnist/mnist.npz beside the repository when present.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train",
              show_default=True, help="MNIST split.")
@click.option("--views", type=int, default=None,
              help="cryoem: K fixed projection directions (Fibonacci sphere) instead of "
                   "uniform random ones; the view is written as cryolatentViewNumber "
                   "[default: random views].")
@click.option("--shift-sd", type=float, default=None,
              help="Shift standard deviation per axis in px of the simulated images "
                   "[default: MNIST 5, cryoem 3].")
@click.option("--defocus-min", type=float, default=10000.0, show_default=True,
              help="cryoem: smallest mean defocus, Å.")
@click.option("--defocus-max", type=float, default=25000.0, show_default=True,
              help="cryoem: largest mean defocus, Å.")
@click.option("--astigmatism", type=float, default=500.0, show_default=True,
              help="cryoem: largest defocus difference U - V, Å.")
@click.option("--no-ctf", is_flag=True,
              help="cryoem: no CTF (and no CTF columns) [default: with CTF].")
@click.option("--centered", is_flag=True,
              help="All shifts 0 (centred particles) [default: off].")
@click.option("--junk", type=float, default=0.0, show_default=True, metavar="FRACTION",
              help="cryoem: this fraction of the N picks are junk (truth rlnClassNumber 0, "
                   "cryolatentJunkKind ice / carbon / empty / pair / aggregate, drawn "
                   "uniformly), with the particles' CTF and noise; docs/conventions.md.")
@click.option("--morph", nargs=2, type=click.Path(path_type=Path), default=None,
              metavar="A B",
              help="cryoem: two models of one protein (PDB/mmCIF; atoms matched by chain, "
                   "residue number and atom name, B superposed on A): class 1, each particle "
                   "at its own conformation lambda ~ U(0, 1) between them, written as "
                   "cryolatentMorph (-1 for --structure classes, numbered 2, 3, ...) [default: no morph].")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu or cuda (rendering and interpolation).")
@threads_option
@force_option
def command(kind, outdir, n, box, apix, snr, seed, structures, mnist, split, views, shift_sd,
            defocus_min, defocus_max, astigmatism, no_ctf, centered, junk, morph, device,
            threads, force):
    """Make synthetic particles with known pose and class.

    \b
    mnist-u  MNIST digits padded to 50x50, rotated U(0, 360°), shifted N(0, 5²) px
    mnist-n  the same with rotations N(0, 45²) degrees (= N(0, π²/16) rad)
    cryoem   projections of atomic models (Gaussian atoms), CTF, Gaussian noise;
             --junk F: a fraction F of the picks are junk (class 0);
             --morph A B: a continuous motion between two models (cryolatentMorph)

    Writes OUTDIR/particles.mrcs and OUTDIR/particles.star with the truth in RELION's
    convention: rlnAnglePsi, rlnOriginXAngst/YAngst (aligning with them recovers the
    upright object), rlnClassNumber (digit + 1, or structure number).
    """
    from ..errors import CryolatentError
    from ..utils import output_folder, setup_logging

    setup_logging()
    apply_threads(threads)
    with output_folder(outdir, force):   # removed again if the command fails
        if snr is not None and math.isinf(snr):
            snr = None if kind != "cryoem" else math.inf
        if kind.startswith("mnist"):
            if structures or views or no_ctf or junk or morph:
                raise CryolatentError("--structure, --views, --no-ctf, --junk and --morph "
                                      "apply to cryoem only")
            from ..simulate import simulate_mnist

            simulate_mnist(outdir, variant=kind[-1], n=n, box=box or 50,
                           apix=1.0 if apix is None else apix, snr=snr, seed=seed, mnist=mnist,
                           split=split, shift_sd=5.0 if shift_sd is None else shift_sd,
                           centered=centered, device=device)
        else:
            if mnist is not None:
                raise CryolatentError("--mnist applies to mnist-u / mnist-n only")
            from ..simulate import simulate_cryoem

            simulate_cryoem(outdir, structures=list(structures) or None,
                            n=1000 if n is None else n, box=box or 128, apix=apix,
                            snr=0.1 if snr is None else snr, seed=seed, views=views,
                            shift_sd=3.0 if shift_sd is None else shift_sd,
                            defocus_min=defocus_min, defocus_max=defocus_max,
                            astigmatism=astigmatism, ctf=not no_ctf, centered=centered,
                            device=device, junk=junk, morph=morph or None)
