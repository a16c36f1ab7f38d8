"""``cryolatent relion-external``: the whole chain as a RELION 4/5 "External" job.

RELION runs the External job's executable from the project directory as

    EXECUTABLE --in_parts Select/job012/particles.star --o External/job034/ --j 4 \\
        [--PARAM VALUE ...]

(the input nodes it was given, the job folder, the threads, then the job's own parameters).
This command preprocesses the particles when they are larger than ``--box``, trains, embeds
the ORIGINAL particles (psi, shifts in Å, latents, classes) and draws class averages, all
inside the job folder, then declares ``JOBDIR/particles.star`` in
``JOBDIR/RELION_OUTPUT_NODES.star`` (type ``ParticleGroupMetadata.star.relion``, so the
pipeline offers it to Select, Extract, Refine3D, ...) and writes ``RELION_JOB_EXIT_SUCCESS``
(or ``RELION_JOB_EXIT_FAILURE`` with the error in ``JOBDIR/run.err`` as RELION shows it).
The GUI fields are in docs/relion-external.md.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

#: what RELION_OUTPUT_NODES.star declares: (file in the job folder, RELION 4/5 node type)
OUTPUT_NODES = (("particles.star", "ParticleGroupMetadata.star.relion"),)
SUCCESS, FAILURE, ABORTED = ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE",
                             "RELION_JOB_EXIT_ABORTED")


def write_output_nodes(jobdir: Path, nodes) -> Path:
    """``JOBDIR/RELION_OUTPUT_NODES.star`` (RELION 4/5: name + type label), names relative
    to the project directory (the current one) as RELION's pipeline records them."""
    import pandas as pd

    from ..io import write_star_blocks

    rows = [(f"{jobdir.as_posix().rstrip('/')}/{name}", kind) for name, kind in nodes]
    df = pd.DataFrame({"rlnPipeLineNodeName": pd.Series([r[0] for r in rows], dtype=str),
                       "rlnPipeLineNodeTypeLabel": pd.Series([r[1] for r in rows], dtype=str)})
    path = jobdir / "RELION_OUTPUT_NODES.star"
    write_star_blocks(path, {"output_nodes": df})
    return path


@click.command("relion-external", context_settings={"ignore_unknown_options": True})
@click.option("--o", "jobdir", required=True, type=click.Path(file_okay=False),
              help="The job folder RELION gives (External/jobNNN/), relative to the project "
                   "directory, the current one.")
@click.option("--in_parts", "in_parts", required=True, type=click.Path(dir_okay=False),
              help="Input particles (a RELION particle STAR), from the GUI's 'Input "
                   "particles' field.")
@click.option("--j", "threads", type=click.IntRange(min=1), default=None,
              help="Threads, from the GUI's 'Number of threads' [default: the cores this "
                   "process may use].")
@click.option("--box", type=click.IntRange(min=8), default=64, show_default=True,
              help="Training box in px: larger particles are Fourier-cropped to it first "
                   "(preprocess); embed and classes use the originals.")
@click.option("--model", type=click.Choice(["target-vae", "irl-inr"]), default="target-vae",
              show_default=True, help="Model to train.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Maximum training epochs [default: train's].")
@click.option("--z_dim", "z_dim", type=click.IntRange(min=1), default=None,
              help="Latent dimension [default: train's].")
@click.option("--clusters", type=click.IntRange(min=1), default=10, show_default=True,
              help="Classes (rlnClassNumber 1..K) the latents are clustered into.")
@click.option("--device", default="auto", show_default=True,
              help="auto (GPU when there is one), cpu, cuda or cuda:N.")
@click.option("--train_args", "train_args", default="", show_default=False,
              help="More `cryolatent train` options, as one string (e.g. \"--rotations 16 "
                   "--gen-layers 6\") [default: none].")
@click.option("--in_mics", "in_mics", default=None, hidden=True)
@click.option("--in_movies", "in_movies", default=None, hidden=True)
@click.option("--in_coords", "in_coords", default=None, hidden=True)
@click.option("--in_3dref", "in_3dref", default=None, hidden=True)
@click.option("--in_mask", "in_mask", default=None, hidden=True)
@click.option("--pipeline_control", "pipeline_control", default=None, hidden=True)
@click.argument("unknown", nargs=-1, type=click.UNPROCESSED)
def command(jobdir, in_parts, threads, box, model, epochs, z_dim, clusters, device, train_args,
            in_mics, in_movies, in_coords, in_3dref, in_mask, pipeline_control, unknown):
    """Run preprocess (when the particles are larger than --box), train, embed and classes
    as a RELION 4/5 External job, from the project directory.

    Writes into JOBDIR: prep/ (the training set), run/ (the training run), particles.star
    (every input column and row, with rlnAnglePsi, rlnOriginXAngst/YAngst, rlnClassNumber and
    cryolatentZ*), classes/ (class averages), RELION_OUTPUT_NODES.star, and
    RELION_JOB_EXIT_SUCCESS or RELION_JOB_EXIT_FAILURE. Running it again continues: the
    training resumes from its last checkpoint, and the other steps are redone.
    """
    from ..errors import CryolatentError

    import logging

    job = Path(jobdir.rstrip("/") or ".")
    job.mkdir(parents=True, exist_ok=True)
    if unknown:   # a parameter this version does not know: say so, do not fail the job
        logging.getLogger("cryolatent").warning("relion-external: ignoring %s",
                                                " ".join(unknown))
    for name in (SUCCESS, FAILURE, ABORTED):
        (job / name).unlink(missing_ok=True)
    try:
        _run_chain(job, in_parts, threads, box, model, epochs, z_dim, clusters, device,
                   train_args)
        write_output_nodes(job, OUTPUT_NODES)
    except BaseException as e:
        (job / (ABORTED if isinstance(e, KeyboardInterrupt) else FAILURE)).touch()
        if isinstance(e, _StepFailed):
            raise CryolatentError(str(e)) from None
        raise
    (job / SUCCESS).touch()
    click.echo(f"{job}/particles.star")


class _StepFailed(Exception):
    pass


def _run_chain(job: Path, in_parts, threads, box, model, epochs, z_dim, clusters, device,
               train_args) -> None:
    from ..cli import main
    from ..io import load_particles

    j = ["-j", str(threads)] if threads else []

    def step(what: str, argv: list[str]) -> None:
        click.echo(f"relion-external: cryolatent {shlex.join(argv)}", err=True)
        rc = main(argv)
        if rc != 0:
            raise _StepFailed(f"relion-external: step '{what}' failed (exit status {rc}); its "
                              "error is above")

    ps = load_particles(in_parts)
    train_input = in_parts
    if int(ps.box) > box:
        step("preprocess", ["preprocess", in_parts, "-o", str(job / "prep"), "--box", str(box),
                            "--force", *j])
        train_input = str(job / "prep" / "particles.star")
    del ps
    run = job / "run"
    if (run / "checkpoints" / "last.pt").exists():
        targs = ["train", train_input, "-o", str(run), "--resume", *j]
    else:
        targs = ["train", train_input, "-o", str(run), "--model", model, "--device", device,
                 "--force", *j]
        if z_dim is not None:
            targs += ["--z-dim", str(z_dim)]
        targs += shlex.split(train_args or "")
    if epochs is not None:
        targs += ["--epochs", str(epochs)]
    step("train", targs)
    step("embed", ["embed", str(run), in_parts, "-o", str(job / "particles.star"),
                   "--clusters", str(clusters), "--device", device, *j])
    step("classes", ["classes", str(run), str(job / "particles.star"), "-o",
                     str(job / "classes"), "--device", device, "--force", *j])
