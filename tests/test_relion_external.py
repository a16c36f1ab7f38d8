"""``cryolatent relion-external``: the chain as a RELION 4/5 External job, offline (issue 17).

RELION calls the executable from the project directory with ``--o External/jobNNN/
--in_parts ... --j N`` and the job's own ``--label value`` parameters; the job writes into
its folder, declares its outputs in RELION_OUTPUT_NODES.star and leaves
RELION_JOB_EXIT_SUCCESS or RELION_JOB_EXIT_FAILURE.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cryolatent.cli import main
from cryolatent.io import read_star
from test_cli_errors import make_set

TRAIN_ARGS = ("--enc-channels 4 --gen-width 16 --gen-layers 1 --kernel 5 --batch-size 8 "
              "--z-dim 2")


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A RELION project: Select/job012/particles.star naming its stack from the project
    directory, which is the current directory."""
    proj = tmp_path / "project"
    src = make_set(proj / "Select" / "job012")          # in.star + stack.mrcs, 16 px
    star = src.parent / "particles.star"
    star.write_text(src.read_text().replace("@stack.mrcs", "@Select/job012/stack.mrcs"))
    src.unlink()
    monkeypatch.chdir(proj)
    return proj


def _job(*extra, box="12", epochs="1", train_args="--train-args"):
    return ["relion-external", "--in_parts", "Select/job012/particles.star", "--o",
            "External/job005/", "--j", "1", "--box", box, "--epochs", epochs, "--clusters",
            "2", "--device", "cpu", "--refine-iterations", "2", train_args, TRAIN_ARGS, *extra]


def test_external_job_outputs_nodes_and_success(project, capsys):
    rc = main(_job("--pipeline_control", "External/job005/", "--someday", "x"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    job = project / "External" / "job005"
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (job / "RELION_JOB_EXIT_FAILURE").exists()
    nodes = read_star(job / "RELION_OUTPUT_NODES.star")["output_nodes"]
    assert list(nodes["rlnPipeLineNodeName"]) == ["External/job005/particles.star"]
    assert list(nodes["rlnPipeLineNodeTypeLabel"]) == ["ParticleGroupMetadata.star.relion"]
    # the declared node exists relative to the project directory, with poses and classes
    parts = read_star(Path(nodes["rlnPipeLineNodeName"][0]))["particles"]
    assert len(parts) == 16
    for col in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber",
                "cryolatentZ1"):
        assert col in parts.columns
    # the original particles keep their names (relative to the project directory)
    assert parts["rlnImageName"][0] == "000001@Select/job012/stack.mrcs"
    # embed, then refine (the library's refine_star): particles.star is refine's output
    emb = read_star(job / "embedded.star")["particles"]
    assert "rlnMaxValueProbDistribution" in parts.columns
    assert "rlnMaxValueProbDistribution" not in emb.columns
    assert list(parts["rlnImageName"]) == list(emb["rlnImageName"])
    assert (job / "particles_refine.json").exists() and (job / "refine.log").exists()
    # 16 particles: training's trust report says the run cannot be judged; the job
    # succeeds, and the warnings end run.out and run.err and go into the job's note
    head = "WARNING: relion-external: the job finished, but "
    small = "WARNING: [train] too few particles to judge the training: only 2 validation"
    for stream in (cap.out, cap.err):
        tail = stream.strip().splitlines()
        k = max(i for i, ln in enumerate(tail) if ln.startswith(head))
        assert all(ln.startswith("WARNING: [") for ln in tail[k + 1:]), tail[k:]
        assert any(ln.startswith(small) for ln in tail[k + 1:]), tail[k:]
    note = (job / "note.txt").read_text()
    assert head in note and small in note
    # 16 px > --box 12: the training set was preprocessed inside the job folder, its names
    # relative to the project directory too
    prep = read_star(job / "prep" / "particles.star")["particles"]
    assert prep["rlnImageName"][0] == "000001@External/job005/prep/particles.mrcs"
    assert (job / "run" / "checkpoints" / "last.pt").exists()
    assert (job / "classes" / "aligned_averages.mrcs").exists()
    assert "threads: 1" in (job / "run" / "run.log").read_text()
    # running the job again continues the training (RELION's "Continue"); the old
    # spelling of the parameters (job setups made before --train-args) still works
    assert main(_job(epochs="2", train_args="--train_args")) == 0
    assert len((job / "run" / "log.csv").read_text().splitlines()) == 3
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()


def test_external_job_failure_marker(project, capsys):
    star = project / "Select" / "job012" / "particles.star"
    star.write_text(star.read_text().replace("@Select/job012/stack.mrcs", "@gone.mrcs"))
    rc = main(_job())
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:")
    job = project / "External" / "job005"
    assert (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (job / "RELION_OUTPUT_NODES.star").exists()


def test_external_job_output_read_by_relion(project, relion):
    """RELION, run from the project directory, applies the job's poses to the particles."""
    assert main(_job(box="16")) == 0                        # no preprocessing needed
    assert not (project / "External" / "job005" / "prep").exists()
    relion("relion_stack_create", "--i", "External/job005/particles.star", "--o",
           "aligned", "--apply_transformation", cwd=project)
    assert (project / "aligned.mrcs").stat().st_size > 0


def test_external_job_options_spelt_as_train_s(project, capsys):
    """--z-dim and --train-args as train spells them; --z_dim / --train_args are hidden
    aliases; giving both spellings different values is a usage error."""
    from click.testing import CliRunner

    from cryolatent.cli import cli

    text = CliRunner().invoke(cli, ["relion-external", "--help"]).output
    options = text.split("Options:")[1]
    for opt in ("--z-dim", "--train-args", "--refine-iterations"):
        assert opt in options
    assert "--z_dim" not in options and "--train_args" not in options
    capsys.readouterr()
    rc = main(_job("--z-dim", "2", "--z_dim", "3"))
    assert rc == 2 and "--z-dim and --z_dim" in capsys.readouterr().err
    assert not (project / "External" / "job005" / "run").exists()
