"""``cryolatent relion-external``: the whole chain as a RELION 4/5 "External" job.

RELION runs the External job's executable from the project directory as

    EXECUTABLE --in_parts Select/job012/particles.star --o External/job034/ --j 4 \\
        [--PARAM VALUE ...]

(the input nodes it was given, the job folder, the threads, then the job's own parameters).
This command preprocesses the particles when they are larger than ``--box``, trains, embeds
the ORIGINAL particles (psi, shifts in Å, latents, classes), refines the classes and poses by
2D alignment (:func:`cryolatent.analysis.refine2d.refine_star`) and draws class averages, all
inside the job folder and through the library's functions (as ``cryolatent demo`` does), then declares ``JOBDIR/particles.star`` in
``JOBDIR/RELION_OUTPUT_NODES.star`` (type ``ParticleGroupMetadata.star.relion``, so the
pipeline offers it to Select, Extract, Refine3D, ...) and writes ``RELION_JOB_EXIT_SUCCESS``
(or ``RELION_JOB_EXIT_FAILURE`` with the error in ``JOBDIR/run.err`` as RELION shows it).
The trust warnings of the steps (the model did not learn, ...) end the job's output on
stdout and stderr (RELION's run.out / run.err) and are added to ``JOBDIR/note.txt``; the job
still succeeds (:func:`report_trust_warnings`). The GUI fields are in docs/relion-external.md.
"""

from __future__ import annotations

import contextlib
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
@click.option("--z-dim", "z_dim", type=click.IntRange(min=1), default=None,
              help="Latent dimension [default: train's].")
@click.option("--z_dim", "z_dim_old", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--clusters", type=click.IntRange(min=1), default=10, show_default=True,
              help="Classes (rlnClassNumber 1..K) the latents are clustered into.")
@click.option("--refine-iterations", "refine_iterations", type=click.IntRange(min=0),
              default=10, show_default=True,
              help="Most rounds of `cryolatent refine` (2D alignment of the particles to "
                   "their class averages) after embed; 0 skips the step.")
@click.option("--device", default="auto", show_default=True,
              help="auto (GPU when there is one), cpu, cuda or cuda:N.")
@click.option("--train-args", "train_args", default=None,
              help="More `cryolatent train` options, as one string (e.g. \"--rotations 16 "
                   "--epochs 50\") [default: none].")
@click.option("--train_args", "train_args_old", default=None, hidden=True)
@click.option("--in_mics", "in_mics", default=None, hidden=True)
@click.option("--in_movies", "in_movies", default=None, hidden=True)
@click.option("--in_coords", "in_coords", default=None, hidden=True)
@click.option("--in_3dref", "in_3dref", default=None, hidden=True)
@click.option("--in_mask", "in_mask", default=None, hidden=True)
@click.option("--pipeline_control", "pipeline_control", default=None, hidden=True)
@click.argument("unknown", nargs=-1, type=click.UNPROCESSED)
def command(jobdir, in_parts, threads, box, model, epochs, z_dim, z_dim_old, clusters,
            refine_iterations, device, train_args, train_args_old, in_mics, in_movies,
            in_coords, in_3dref, in_mask, pipeline_control, unknown):
    """Run preprocess (when the particles are larger than --box), train, embed, refine and
    classes as a RELION 4/5 External job, from the project directory.

    Writes into JOBDIR: prep/ (the training set), run/ (the training run), embedded.star
    (embed's output), particles.star (every input column and row, with rlnAnglePsi,
    rlnOriginXAngst/YAngst, rlnClassNumber after refine, and cryolatentZ*), classes/ (class
    averages), RELION_OUTPUT_NODES.star, and RELION_JOB_EXIT_SUCCESS or
    RELION_JOB_EXIT_FAILURE. Trust warnings (e.g. the model did not learn) end run.out and
    run.err and go into note.txt; the job still succeeds. Running it again continues: the
    training resumes from its last checkpoint, and the other steps are redone.

    Parameters are spelt as train's options (--z-dim, --train-args); the older --z_dim and
    --train_args still work.
    """
    import logging

    z_dim = _one_of("z-dim", z_dim, z_dim_old)
    train_args = _one_of("train-args", train_args, train_args_old) or ""
    job = Path(jobdir.rstrip("/") or ".")
    job.mkdir(parents=True, exist_ok=True)
    if unknown:   # a parameter this version does not know: say so, do not fail the job
        logging.getLogger("cryolatent").warning("relion-external: ignoring %s",
                                                " ".join(unknown))
    for name in (SUCCESS, FAILURE, ABORTED):
        (job / name).unlink(missing_ok=True)
    try:
        _run_chain(job, in_parts, threads, box, model, epochs, z_dim, clusters,
                   refine_iterations, device, train_args)
        write_output_nodes(job, OUTPUT_NODES)
        click.echo(f"{job}/particles.star")
        report_trust_warnings(job)          # the last lines of run.out and run.err
    except BaseException as e:
        (job / (ABORTED if isinstance(e, KeyboardInterrupt) else FAILURE)).touch()
        raise
    (job / SUCCESS).touch()


def _one_of(name: str, new, old):
    """The value of --NAME or of its old spelling --NAME_WITH_UNDERSCORES (not both)."""
    if new is not None and old is not None and new != old:
        raise click.UsageError(f"--{name} and --{name.replace('-', '_')} (its old spelling) "
                               "are both given, with different values")
    return new if new is not None else old


#: the trust summaries of the job's steps (docs/trust.md): (step, file in the job folder).
#: embed's own judges its clusters, which refine replaces: it counts only without refine;
#: refine's JSON, where it has "warnings"; classes judges the job's final classes (and
#: repeats train's and embed's other warnings)
SUMMARIES = (("train", "run/summary.json"), ("embed", "particles_summary.json"),
             ("refine", "particles_refine.json"), ("classes", "classes/summary.json"))


def trust_warnings(job: Path) -> list[tuple[str, str]]:
    """``(step, warning)`` of every trust summary the job's steps wrote, each warning once
    (embed and classes repeat the training run's as "training run: ...")."""
    import json

    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for step, name in SUMMARIES:
        f = job / name
        try:
            warnings = json.loads(f.read_text()).get("warnings") or []
        except (OSError, ValueError, AttributeError):
            continue
        for w in map(str, warnings):
            key = w.removeprefix("training run: ")
            if key not in seen:
                seen.add(key)
                out.append((step, w))
    return out


def report_trust_warnings(job: Path) -> list[tuple[str, str]]:
    """Make the steps' trust warnings impossible to miss in RELION: the last lines of the
    job's stdout and stderr (RELION's run.out and run.err panes) and a block appended to
    ``JOBDIR/note.txt`` (the job's note). The job still succeeds: its files are complete and
    valid, a failed job's outputs would not enter the pipeline to be inspected, and some
    warnings ask for more training (Continue), not a new job. Returns the warnings."""
    import datetime

    found = trust_warnings(job)
    if not found:
        return found
    lines = [f"WARNING: relion-external: the job finished, but {len(found)} trust check"
             f"{'s' if len(found) > 1 else ''} failed: do not use its particles, classes or "
             "poses before reading these (what each means: cryolatent's docs/trust.md; "
             f"the figures: {job}/run/summary.json, {job}/classes/summary.json)"]
    lines += [f"WARNING: [{step}] {w}" for step, w in found]
    for err in (False, True):
        for line in lines:
            click.echo(line, err=err)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    with open(job / "note.txt", "a", encoding="utf-8") as f:
        f.write(f" ++++ cryolatent trust warnings ({stamp}):\n")
        f.writelines(f"{line}\n" for line in lines)
        f.write(" ++++\n")
    return found


def _run_chain(job: Path, in_parts, threads, box, model, epochs, z_dim, clusters,
               refine_iterations, device, train_args) -> None:
    """preprocess (when needed), train, embed, refine and classes through the library, as
    :func:`cryolatent.demo.run_demo` runs them; each step logs into its own folder."""
    from ..analysis.class_averages import make_class_averages
    from ..inference import embed
    from ..io import load_particles
    from ..io.particles import stack_search_dirs
    from ..launch import train_from_options
    from ..preprocess import preprocess
    from ..utils import setup_logging
    from .common import apply_threads, run_search_dirs
    from .train import parse_options

    ps = load_particles(in_parts)
    train_input = in_parts
    if int(ps.box) > box:
        prep = job / "prep"
        with _step(f"preprocess {in_parts} -> {prep}/ ({box} px)"):
            setup_logging(prep, "preprocess.log")
            apply_threads(threads)
            preprocess(in_parts, prep, box=box)
        train_input = str(prep / "particles.star")
    del ps
    run = job / "run"
    resume = (run / "checkpoints" / "last.pt").exists()    # RELION's "Continue"
    options = {"threads": threads}
    if not resume:
        options.update(model=model, device=device)
        if z_dim is not None:
            options["z_dim"] = z_dim
        options.update(parse_options(shlex.split(train_args or "")))
    if epochs is not None:
        options["epochs"] = epochs
    with _step(f"train {train_input} -> {run}/" + (" (continued)" if resume else "")):
        train_from_options(train_input, run, options, resume=resume, force=not resume)
    particles = job / "particles.star"
    embedded = job / "embedded.star" if refine_iterations else particles
    with _step(f"embed {in_parts} -> {embedded} ({clusters} classes)"), \
            stack_search_dirs(run_search_dirs(run)):
        setup_logging(job, "embed.log")
        apply_threads(threads)
        embed(run, in_parts, embedded, clusters=clusters, device=device)
    if refine_iterations:
        _refine(embedded, particles, refine_iterations, threads)
    with _step(f"classes {particles} -> {job / 'classes'}/"), \
            stack_search_dirs(run_search_dirs(run)):
        setup_logging(job / "classes", "classes.log")
        apply_threads(threads)
        make_class_averages(run, particles, job / "classes", device=device)


@contextlib.contextmanager
def _step(what: str):
    """One step of the chain: announced on stderr (RELION's run.err); its one-line error
    names the step."""
    from ..errors import CryolatentError

    click.echo(f"relion-external: {what}", err=True)
    try:
        yield
    except CryolatentError as e:
        raise CryolatentError(f"relion-external: step '{what.split()[0]}' failed: {e}") \
            from None


def _refine(embedded: Path, out: Path, iterations: int, threads) -> None:
    """The chain's ``refine`` step: the library's refine_star, logged to JOBDIR/refine.log."""
    import logging

    from ..analysis.refine2d import refine_star
    from ..utils import setup_logging
    from .common import apply_threads

    click.echo(f"relion-external: refine {embedded} -> {out} (at most {iterations} rounds)",
               err=True)
    setup_logging(out.parent, "refine.log")
    logging.getLogger("cryolatent").info("relion-external: refine_star(%s, %s, iterations=%d)",
                                         embedded, out, iterations)
    apply_threads(threads)
    refine_star(embedded, out, iterations=iterations)
