"""Working the way RELION users work (issue 17): -j/--threads, --force and the clean-up of a
failed command, duplicate image names, seconds per epoch and ETA, embed.log.

The commands run in-process through :func:`cryolatent.cli.main` on 16 images of 16 px and a
tiny TARGET-VAE (the data helpers are those of tests/test_cli_errors.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cryolatent import utils
from cryolatent.cli import main
from cryolatent.io import read_star
from test_cli_errors import TINY, make_set

NONEMPTY = r"folder exists and is not empty; use --force to overwrite its files"


@pytest.fixture(autouse=True)
def _keep_threads():
    """The commands set the process's threads: restore them after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A good set (``good/in.star``) and a tiny trained run (``run``)."""
    root = tmp_path_factory.mktemp("workflow")
    good = make_set(root / "good")
    n = torch.get_num_threads()
    rc = main(["train", str(good), "-o", str(root / "run"), "-j", "1", *TINY,
               "--epochs", "2"])
    torch.set_num_threads(n)
    assert rc == 0
    return root


def _one_error(rc, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc not in (0, None), err
    assert "Traceback" not in err and lines and lines[-1].startswith("error:"), err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, err
    return lines[-1]


# ------------------------------------------------------------------------------ threads
def test_available_cores_honours_cgroup_v2_quota(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("150000 100000\n")                  # 1.5 cores
    assert utils.available_cores(cpu_max=f, affinity={0, 1, 2, 3}) == 1
    f.write_text("300000 100000\n")
    assert utils.available_cores(cpu_max=f, affinity={0, 1, 2, 3}) == 3
    assert utils.available_cores(cpu_max=f, affinity={5, 7}) == 2   # affinity is smaller
    f.write_text("max 100000\n")                     # no limit
    assert utils.available_cores(cpu_max=f, affinity=set(range(6))) == 6
    f.write_text("50000 100000\n")                   # half a core: still 1
    assert utils.available_cores(cpu_max=f, affinity={0, 1}) == 1


def test_available_cores_honours_cgroup_v1_quota_and_real_affinity(tmp_path):
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    none = tmp_path / "absent.max"
    assert utils.available_cores(cpu_max=none, cfs_dir=v1, affinity=set(range(8))) == 2
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")     # no limit
    assert utils.available_cores(cpu_max=none, cfs_dir=v1, affinity=set(range(8))) == 8
    # the real process: never more than its affinity, at least 1
    n = utils.available_cores()
    assert 1 <= n <= len(__import__("os").sched_getaffinity(0))


def test_set_threads_reaches_torch():
    assert utils.set_threads(1) == 1 and torch.get_num_threads() == 1
    assert utils.current_threads() == 1
    assert utils.set_threads(2) == 2 and torch.get_num_threads() == 2
    assert utils.set_threads(None) == utils.available_cores() == torch.get_num_threads()


@pytest.mark.parametrize("j", ["1", "2"])
def test_threads_option_reaches_torch_and_the_log(tmp_path, j):
    inp = make_set(tmp_path / "in")
    torch.set_num_threads(3 - int(j))
    assert main(["preprocess", str(inp), "-o", str(tmp_path / "p"), "-j", j]) == 0
    assert torch.get_num_threads() == int(j)
    assert f"threads: {j}" in (tmp_path / "p" / "preprocess.log").read_text()


def test_threads_default_is_the_available_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "available_cores", lambda *a, **k: 1)
    inp = make_set(tmp_path / "in")
    torch.set_num_threads(2)
    assert main(["preprocess", str(inp), "-o", str(tmp_path / "p")]) == 0
    assert torch.get_num_threads() == 1
    assert "threads: 1" in (tmp_path / "p" / "preprocess.log").read_text()


def test_train_embed_classes_take_threads(run, tmp_path):
    log = (run / "run" / "run.log").read_text()
    assert "threads: 1" in log
    out = tmp_path / "e" / "e.star"
    assert main(["embed", str(run / "run"), str(run / "good" / "in.star"), "-o", str(out),
                 "--device", "cpu", "-j", "1", "--clusters", "2"]) == 0
    assert torch.get_num_threads() == 1
    elog = (tmp_path / "e" / "embed.log").read_text()          # embed writes a log
    assert "threads: 1" in elog and "command:" in elog
    torch.set_num_threads(2)
    assert main(["classes", str(run / "run"), str(out), "-o", str(tmp_path / "c"), "-j", "1",
                 "--device", "cpu", "--traversal-steps", "2",
                 "--datadir", str(run / "good")]) == 0
    assert torch.get_num_threads() == 1
    assert "threads: 1" in (tmp_path / "c" / "classes.log").read_text()


# ------------------------------------------------------------------------------ progress
def test_run_log_has_seconds_per_epoch_and_eta(run):
    lines = [ln for ln in (run / "run" / "run.log").read_text().splitlines()
             if re.search(r"epoch \d+/2:", ln)]
    assert len(lines) == 2, lines
    assert re.search(r"[\d.]+ s/epoch, ETA <= \d", lines[0]), lines[0]   # a cap
    assert re.search(r"s/epoch, ETA 0 s", lines[1]), lines[1]


# ------------------------------------------------------------------------------ --force
def _argv(cmd: str, out: Path, root: Path, inp: Path) -> list[str]:
    emb = root / "emb.star"
    return {
        "preprocess": ["preprocess", str(inp), "-o", str(out)],
        "train": ["train", str(inp), "-o", str(out), "-j", "1", *TINY],
        "classes": ["classes", str(root / "run"), str(emb), "-o", str(out), "--device", "cpu",
                    "--traversal-steps", "2", "-j", "1", "--datadir", str(root / "good")],
        "plot": ["plot", str(emb), "-o", str(out), "--no-umap"],
        "simulate": ["simulate", "cryoem", "-o", str(out), "--n", "4", "--box", "16",
                     "--apix", "3", "--device", "cpu"],
        "demo": ["demo", "--quick", "-o", str(out)],
    }[cmd]


@pytest.fixture(scope="module")
def embedded(run):
    emb = run / "emb.star"
    if not emb.exists():
        assert main(["embed", str(run / "run"), str(run / "good" / "in.star"), "-o", str(emb),
                     "--device", "cpu", "-j", "1", "--clusters", "2"]) == 0
    return run


@pytest.mark.parametrize("cmd", ["preprocess", "train", "classes", "plot", "simulate", "demo"])
def test_non_empty_folder_refused_with_one_message(embedded, tmp_path, capsys, cmd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    capsys.readouterr()
    rc = main(_argv(cmd, out, embedded, embedded / "good" / "in.star"))
    line = _one_error(rc, capsys.readouterr().err)
    assert re.search(re.escape(str(out)) + ": " + NONEMPTY, line), line
    if cmd == "train":
        assert "--resume" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("cmd", ["preprocess", "classes", "plot", "simulate"])
def test_force_proceeds(embedded, tmp_path, cmd, request):
    if cmd == "simulate":
        request.getfixturevalue("shared_data")   # cryoem's default structures (skips without)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    argv = _argv(cmd, out, embedded, embedded / "good" / "in.star")
    assert main([*argv, "--force"]) == 0
    assert (out / "keep.txt").read_text() == "user data"
    assert len(list(out.iterdir())) > 1
    assert main([*argv, "--force"]) == 0          # and again over its own output


def _embed_argv(root: Path, inp, out) -> list[str]:
    return ["embed", str(root / "run"), str(inp), "-o", str(out), "--device", "cpu", "-j",
            "1", "--clusters", "2"]


@pytest.mark.parametrize("cmd", ["embed", "select"])
def test_existing_output_file_refused_unless_force(embedded, tmp_path, capsys, cmd):
    """embed -o OUT.star (and OUT.z.npy, OUT_summary.json) and select -o SUBSET.star refuse
    an existing file with one line naming it, write nothing (no embed.log either), and
    overwrite it with --force."""
    out = tmp_path / "o.star"
    argv = (_embed_argv(embedded, embedded / "good" / "in.star", out) if cmd == "embed" else
            ["select", str(embedded / "emb.star"), "--classes", "1,2", "-o", str(out)])
    files = [out] + ([tmp_path / "o.z.npy", tmp_path / "o_summary.json"]
                     if cmd == "embed" else [])
    for f in files:
        f.write_text("mine")
        capsys.readouterr()
        line = _one_error(main(argv), capsys.readouterr().err)
        assert line == f"error: {f}: file exists; use --force to overwrite it or choose " \
                       "another -o"
        assert f.read_text() == "mine"
        assert sorted(p.name for p in tmp_path.iterdir()) == [f.name]
        f.unlink()
    out.write_text("mine")
    assert main([*argv, "--force"]) == 0
    assert len(read_star(out)["particles"]) == 16
    if cmd == "embed":
        assert (tmp_path / "embed.log").exists()
        assert np.load(tmp_path / "o.z.npy").shape == (16, 2)


def test_failed_embed_leaves_no_output_and_no_log(embedded, tmp_path, capsys):
    """A failed embed in an existing folder removes what it wrote, embed.log included; an
    embed.log of earlier runs is left as it was."""
    inp = make_set(tmp_path / "in", "nan_particle")         # found while embedding
    out = tmp_path / "out"
    out.mkdir()
    _one_error(main(_embed_argv(embedded, inp, out / "e.star")), capsys.readouterr().err)
    assert list(out.iterdir()) == []
    (out / "embed.log").write_text("an earlier run\n")
    _one_error(main(_embed_argv(embedded, inp, out / "e.star")), capsys.readouterr().err)
    assert [p.name for p in out.iterdir()] == ["embed.log"]
    assert (out / "embed.log").read_text() == "an earlier run\n"


def test_pixel_size_mismatch_is_a_warning(embedded, tmp_path, capsys):
    """Particles at another pixel size than the training images: embed goes on and says so
    on a line starting WARNING: like every trust warning."""
    from cryolatent.io import write_star

    inp = make_set(tmp_path / "in")
    blocks = read_star(inp)
    blocks["optics"]["rlnImagePixelSize"] *= 2
    write_star(inp, blocks["particles"], blocks["optics"])
    capsys.readouterr()
    assert main(_embed_argv(embedded, inp, tmp_path / "e.star")) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "differs from the training "
             "images'" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"WARNING: {inp}: pixel size "), lines


def test_output_files_helper(tmp_path):
    a, log = tmp_path / "a.star", tmp_path / "x.log"
    log.write_text("old\n")
    with pytest.raises(RuntimeError):
        with utils.output_files([a], logs=[log, tmp_path / "new.log"]):
            a.write_text("partial")
            (tmp_path / "new.log").write_text("y")
            with open(log, "a") as f:
                f.write("appended\n")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.log"]
    assert log.read_text() == "old\n"
    a.write_text("mine")
    with pytest.raises(Exception, match="a.star: file exists; use --force"):
        utils.check_outfiles([None, a])
    utils.check_outfiles([a], force=True)
    with pytest.raises(Exception, match="is a folder"):
        utils.check_outfiles([tmp_path], force=True)


def test_train_force_starts_over(embedded, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv("train", out, embedded, embedded / "good" / "in.star")
    assert main(argv) == 0
    assert main([*argv, "--force", "--epochs", "2"]) == 0
    assert len((out / "log.csv").read_text().splitlines()) == 3     # header + 2 new epochs
    # --force removes a run's own files only: anything else in the folder is refused
    (out / "keep.txt").write_text("user data")
    capsys.readouterr()
    _one_error(main([*argv, "--force"]), capsys.readouterr().err)
    assert (out / "keep.txt").read_text() == "user data"
    assert (out / "checkpoints" / "last.pt").exists()    # nothing was deleted


def test_failed_preprocess_leaves_no_folder(tmp_path, capsys):
    inp = make_set(tmp_path / "in", "short_stack")          # a truncated (corrupt) stack
    out = tmp_path / "deep" / "out"
    rc = main(["preprocess", str(inp), "-o", str(out)])
    _one_error(rc, capsys.readouterr().err)
    assert not (tmp_path / "deep").exists()
    # NaN pixels are found while writing: the half-made folder goes too
    inp = make_set(tmp_path / "in2", "nan_particle")
    rc = main(["preprocess", str(inp), "-o", str(out)])
    _one_error(rc, capsys.readouterr().err)
    assert not out.exists()


def test_failed_preprocess_in_existing_folder_removes_only_its_files(tmp_path, capsys):
    inp = make_set(tmp_path / "in", "nan_particle")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["preprocess", str(inp), "-o", str(out), "--force"])
    _one_error(rc, capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_failed_train_before_a_checkpoint_leaves_no_folder(tmp_path, capsys):
    inp = make_set(tmp_path / "in", "nan_particle")
    out = tmp_path / "run"
    rc = main(["train", str(inp), "-o", str(out), "-j", "1", *TINY])
    _one_error(rc, capsys.readouterr().err)
    assert not out.exists()


def test_output_folder_helper(tmp_path):
    made = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with utils.output_folder(made):
            made.mkdir(parents=True)
            (made / "f.txt").write_text("x")
            raise RuntimeError
    assert not (tmp_path / "a").exists()       # the parent it made goes too
    with utils.output_folder(made):
        made.mkdir(parents=True)
        (made / "f.txt").write_text("x")
    assert (made / "f.txt").exists()
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C too; keep() can spare a resumable run
        with utils.output_folder(tmp_path / "k", keep=lambda p: (p / "f").exists()):
            (tmp_path / "k").mkdir()
            (tmp_path / "k" / "f").write_text("x")
            raise KeyboardInterrupt
    assert (tmp_path / "k" / "f").exists()


# ------------------------------------------------------------------------------ duplicates
def test_duplicate_names_preprocess_embed_select_keep_every_row(run, tmp_path, capsys,
                                                               monkeypatch):
    """A STAR in which rows 2 and 4 (and 3 and 9) name the same image goes through
    preprocess -> embed -> select with every row kept and the warning printed."""
    inp = make_set(tmp_path / "in", "duplicate")             # row 4 repeats row 2
    monkeypatch.chdir(inp.parent)      # the names as written resolve from here: kept
    blocks = read_star(inp)
    parts = blocks["particles"]
    parts.loc[8, "rlnImageName"] = parts.loc[2, "rlnImageName"]
    from cryolatent.io import write_star

    write_star(inp, parts, blocks["optics"])
    n = len(parts)
    capsys.readouterr()
    warn = "in.star: 2 duplicate image names, first 000002@stack.mrcs (rows 2 and 4); all rows kept"

    assert main(["preprocess", str(inp), "-o", str(tmp_path / "prep"), "-j", "1"]) == 0
    assert warn in capsys.readouterr().err
    prep = read_star(tmp_path / "prep" / "particles.star")["particles"]
    assert len(prep) == n
    assert list(prep["rlnImageOriginalName"]) == list(parts["rlnImageName"])

    # embed the original (duplicated) set with a run trained on other particles
    emb = tmp_path / "emb.star"
    assert main(["embed", str(run / "run"), str(inp), "-o", str(emb), "--device", "cpu",
                 "-j", "1", "--clusters", "2"]) == 0
    assert warn in capsys.readouterr().err
    e = read_star(emb)["particles"]
    assert len(e) == n and list(e["rlnImageName"]) == list(parts["rlnImageName"])
    # rows 2 and 4 are the same image: the same pose and latent, row by row
    np.testing.assert_allclose(e.loc[1, ["cryolatentZ1", "rlnAnglePsi"]].to_numpy(float),
                               e.loc[3, ["cryolatentZ1", "rlnAnglePsi"]].to_numpy(float),
                               atol=1e-4)

    # embed the preprocessed copy too (its original names repeat)
    emb2 = tmp_path / "emb2.star"
    assert main(["embed", str(run / "run"), str(tmp_path / "prep" / "particles.star"),
                 "-o", str(emb2), "--device", "cpu", "-j", "1"]) == 0
    assert len(read_star(emb2)["particles"]) == n

    # select keeps every row of the chosen classes, repeated names included
    sel = tmp_path / "sel.star"
    assert main(["select", str(emb), "--classes", "1,2", "-o", str(sel)]) == 0
    s = read_star(sel)["particles"]
    assert len(s) == n and list(s["rlnImageName"]) == list(parts["rlnImageName"])
    sel1 = tmp_path / "sel1.star"
    assert main(["select", str(emb), "--classes", "1", "-o", str(sel1)]) == 0
    k = int((e["rlnClassNumber"] == 1).sum())
    assert len(read_star(sel1)["particles"]) == k

    # evaluate against itself: repeated names are matched by position
    capsys.readouterr()
    assert main(["evaluate", str(emb), "--truth", str(emb)]) == 0
    import json

    res = json.loads(capsys.readouterr().out)
    assert res["n"] == n and res["cluster_accuracy"] == 1.0

    # classes on the embedded set: every particle counted once
    capsys.readouterr()
    assert main(["classes", str(run / "run"), str(emb), "-o", str(tmp_path / "cls"),
                 "--device", "cpu", "-j", "1", "--traversal-steps", "2",
                 "--datadir", str(tmp_path / "in")]) == 0
    assert f", {n} particles ->" in capsys.readouterr().out


def test_match_particles_pairs_repeated_names_by_position():
    import pandas as pd

    from cryolatent.metrics import match_particles

    pred = pd.DataFrame({"rlnImageName": ["1@a", "2@a", "1@a", "3@a"]})
    truth = pd.DataFrame({"rlnImageName": ["3@a", "1@a", "2@a", "1@a"]})
    pi, ti = match_particles(pred, truth)
    assert ti.tolist() == [1, 2, 3, 0]
    # more repeats than the truth has (a duplicated set against unique ground truth)
    truth1 = pd.DataFrame({"rlnImageName": ["3@a", "1@a", "2@a"]})
    assert match_particles(pred, truth1)[1].tolist() == [1, 2, 1, 0]


def test_match_table_pairs_repeated_names_by_position():
    import pandas as pd

    from cryolatent.analysis.class_averages import match_table

    table = pd.DataFrame({"rlnImageName": ["1@a", "2@a", "1@a"]})
    assert match_table(["2@a", "1@a", "1@a"], table).tolist() == [1, 0, 2]


# ------------------------------------------------------------------------------ help texts
def _commands():
    from cryolatent.cli import COMMANDS, LazyGroup

    g = LazyGroup()
    return {n: g.get_command(None, n) for n in COMMANDS if g.get_command(None, n) is not None}


def test_every_option_help_states_its_default():
    import click

    missing = []
    for name, cmd in _commands().items():
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.required or p.hidden or p.name == "help":
                continue
            h = (p.help or "").lower()
            if not (p.show_default or "default" in h or re.search(r"\[[^\]]+\]\.?$", h)):
                missing.append(f"{name} {p.opts[0]}")
    assert missing == [], missing


def test_angstrom_units_at_the_interface():
    cmds = _commands()
    apix = next(p for p in cmds["preprocess"].params if p.name == "apix")
    assert "Å" in apix.help and " in A " not in apix.help
    names = {p.name for p in cmds["train"].params}
    assert {"translation_prior_angst", "translation_range_angst"} <= names
    prior = next(p for p in cmds["train"].params if p.name == "translation_prior")
    assert "px of the training images" in prior.help
    model = next(p for p in cmds["train"].params if p.name == "model")
    assert "[target-vae]" in model.help


def test_translation_options_in_angstrom(tmp_path):
    inp = make_set(tmp_path / "in")                         # 2 Å/px
    out = tmp_path / "run"
    assert main(["train", str(inp), "-o", str(out), "-j", "1", *TINY,
                 "--translation-prior-angst", "3", "--translation-range-angst", "5"]) == 0
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["translation_prior"] == pytest.approx(1.5)
    assert cfg["translation_range"] == 3                    # ceil(5 / 2)
    assert cfg["translation_prior_angst"] == 3.0              # the option as given


# ------------------------------------------------------------------------------ paths
def test_relion_path_relative_below_cwd_absolute_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "proj" / "prep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "proj")
    assert utils.relion_path("prep/particles.mrcs") == "prep/particles.mrcs"
    assert utils.relion_path(tmp_path / "proj" / "prep" / "p.mrcs") == "prep/p.mrcs"
    assert utils.relion_path(tmp_path / "other" / "p.mrcs") == str(
        tmp_path.resolve() / "other" / "p.mrcs")
    assert utils.relion_path("../x/p.mrcs") == str(tmp_path.resolve() / "x" / "p.mrcs")


def test_stack_resolution_order(tmp_path, monkeypatch):
    """--datadir, beside the STAR, the current directory, then the run's folders."""
    from cryolatent.io import load_particles
    from cryolatent.io.particles import stack_search_dirs

    inp = make_set(tmp_path / "data")                   # in.star + stack.mrcs
    star = tmp_path / "meta" / "in.star"
    star.parent.mkdir()
    star.write_text(inp.read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="stack stack.mrcs not found"):
        load_particles(star)
    assert load_particles(star, datadir=tmp_path / "data").stack_paths[0] == \
        tmp_path / "data" / "stack.mrcs"
    with stack_search_dirs([tmp_path / "data"]):
        assert len(load_particles(star)) == 16
    # names relative to the project directory (the current one)
    star.write_text(inp.read_text().replace("@stack.mrcs", "@data/stack.mrcs"))
    assert len(load_particles(star)) == 16


def test_written_names_resolve_from_the_current_directory(embedded, tmp_path, monkeypatch,
                                                        capsys):
    """SPEC: image names that cryolatent writes are relative to the current directory when
    the stack lies below it, absolute otherwise. Input names relative to their STAR's folder
    (Extract/job005/, run from the project directory) come out naming the stack from the
    project directory; names that already resolve from it are kept as written."""
    import os
    import shutil

    from cryolatent.io import load_particles

    proj = tmp_path / "proj"
    scratch = tmp_path / "scratch"                    # the job folder behind a symlink
    make_set(scratch / "job005")                      # in.star naming "stack.mrcs"
    (proj / "Extract").mkdir(parents=True)
    os.symlink(scratch / "job005", proj / "Extract" / "job005")
    monkeypatch.chdir(proj)
    want = [f"{i + 1:06d}@Extract/job005/stack.mrcs" for i in range(16)]

    ps = load_particles("Extract/job005/in.star")
    assert list(ps.table["rlnImageName"]) == want
    assert ps.names[0] == "000001@stack.mrcs"               # identity: as written
    assert main(_embed_argv(embedded, "Extract/job005/in.star", "emb.star")) == 0
    assert list(read_star("emb.star")["particles"]["rlnImageName"]) == want
    # select reads no stack but names them the same way (found by the readers' rule)
    assert main(["select", "Extract/job005/in.star", "--classes", "1,2", "-o", "s.star"]) == 0
    assert list(read_star("s.star")["particles"]["rlnImageName"]) == want
    shutil.copy("Extract/job005/in.star", "meta.star")      # a STAR away from its stack
    assert main(["select", "meta.star", "--classes", "1,2", "-o", "s2.star", "--datadir",
                 "Extract/job005"]) == 0
    assert list(read_star("s2.star")["particles"]["rlnImageName"]) == want
    # names that resolve from here already are kept as they are
    assert main(["select", "s.star", "--classes", "1", "-o", "s3.star"]) == 0
    assert list(read_star("s3.star")["particles"]["rlnImageName"]) == want[::2]
    # a stack outside the current directory: absolute, as written when it was absolute
    outside = tmp_path / "outside"
    make_set(outside)
    ab = [f"{i + 1:06d}@{outside.resolve()}/stack.mrcs" for i in range(16)]
    assert main(["select", str(outside / "in.star"), "--classes", "1,2", "-o",
                 "o.star"]) == 0
    assert list(read_star("o.star")["particles"]["rlnImageName"]) == ab
    assert list(load_particles("o.star").table["rlnImageName"]) == ab
    # a stack select cannot find keeps its name, with a warning
    (tmp_path / "lost").mkdir()
    shutil.copy(outside / "in.star", tmp_path / "lost" / "in.star")
    capsys.readouterr()
    assert main(["select", str(tmp_path / "lost" / "in.star"), "--classes", "1", "-o",
                 "l.star"]) == 0
    assert "stack stack.mrcs not found" in capsys.readouterr().err
    assert read_star("l.star")["particles"]["rlnImageName"][0] == "000001@stack.mrcs"


@pytest.mark.parametrize("layout", ["project_relative", "star_relative"])
def test_readme_workflow_from_a_project_folder(shared_data, relion, tmp_path, monkeypatch,
                                               capsys, layout):
    """The README's "real workflow", line by line, on the real Topaz particles (269) laid out
    in a RELION project, run from the project directory (not the STAR's folder) with no
    --datadir and tiny models: preprocess, train, embed, refine, plot, classes, select, then
    RELION's relion_stack_create --apply_transformation on the selection. Two layouts of the
    input: Select/job012/particles.star naming its stack from the project directory (as
    RELION writes them), and Extract/job005/particles.star naming it relative to the STAR's
    own folder (issue 23: embed found the stack but copied the name, and every later step
    lost it). Every STAR cryolatent writes names the stack from the project directory, and
    RELION reads each from there. Then the commands given a run folder find the stacks from
    another folder too."""
    import json
    import shutil

    src = shared_data / "particles" / "topaz_picked"
    proj = tmp_path / "project"
    job = proj / ("Select/job012" if layout == "project_relative" else "Extract/job005")
    jobrel = job.relative_to(proj).as_posix()
    job.mkdir(parents=True)
    shutil.copy(src / "epu29_particles_b96.mrcs", job / "epu29_particles_b96.mrcs")
    text = (src / "epu29_particles_b96.star").read_text()
    assert "@epu29_particles_b96.mrcs" in text                 # relative to the STAR
    if layout == "project_relative":    # relative to the project directory, as RELION writes
        text = text.replace("@epu29_particles_b96.mrcs", f"@{jobrel}/epu29_particles_b96.mrcs")
    (job / "particles.star").write_text(text)
    star = f"{jobrel}/particles.star"
    stack = f"{jobrel}/epu29_particles_b96.mrcs"              # as RELION resolves it from proj
    monkeypatch.chdir(proj)

    def ok(*argv):
        rc = main([*map(str, argv)])
        assert rc == 0, argv

    def stack_create(star, out, *extra):
        relion("relion_stack_create", "--i", star, "--o", out, *extra, cwd=proj)
        assert Path(proj / f"{out}.mrcs").stat().st_size > 0

    def names(f):
        return list(read_star(proj / f)["particles"]["rlnImageName"])

    want = [f"{i + 1:06d}@{stack}" for i in range(269)]
    ok("preprocess", star, "-o", "prep", "--box", "32", "-j", "1")
    prep = read_star(proj / "prep" / "particles.star")["particles"]
    assert prep["rlnImageName"].iloc[0] == "000001@prep/particles.mrcs"
    assert list(prep["rlnImageOriginalName"]) == want
    stack_create("prep/particles.star", "prep_stack")
    capsys.readouterr()
    ok("train", "prep/particles.star", "-o", "run1", "-j", "1", *TINY)
    # 269 particles leave 27 validation images: too few to judge the run, and it says so
    small = "too few particles to judge the training: only 27 validation images of 269"
    assert any(w.startswith(small) for w in
               json.loads((proj / "run1" / "summary.json").read_text())["warnings"])
    assert any(ln.startswith("WARNING: " + small) for ln in capsys.readouterr().err.splitlines())
    ok("embed", "run1", star, "-o", "embedded.star", "--clusters", "2", "--device", "cpu",
       "-j", "1")
    assert names("embedded.star") == want
    stack_create("embedded.star", "embedded_aligned", "--apply_transformation")
    ok("refine", "embedded.star", "-o", "refined.star", "-j", "1", "--iterations", "2")
    assert names("refined.star") == want
    stack_create("refined.star", "refined_aligned", "--apply_transformation")
    ok("plot", "refined.star", "-o", "plots", "--rundir", "run1", "--no-umap")
    ok("classes", "run1", "refined.star", "-o", "classes", "--device", "cpu", "-j", "1",
       "--traversal-steps", "2")
    assert (proj / "classes" / "gallery.png").exists()
    ok("select", "refined.star", "--classes", "1", "-o", "good.star")
    cls = read_star(proj / "refined.star")["particles"]["rlnClassNumber"].to_numpy()
    assert names("good.star") == [n for n, c in zip(want, cls) if c == 1]
    stack_create("good.star", "aligned", "--apply_transformation")
    n_sel = len(read_star(proj / "good.star")["particles"])
    import mrcfile

    with mrcfile.open(proj / "aligned.mrcs", permissive=True) as m:
        assert m.data.shape[0] == n_sel
    if layout != "project_relative":
        return

    # from another folder: beside the STAR, then beside the run's recorded training input
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    shutil.copy(proj / "embedded.star", other / "e.star")      # names relative to project
    ok("classes", proj / "run1", "e.star", "-o", "c2", "--device", "cpu", "-j", "1",
       "--traversal-steps", "2")
    ok("embed", proj / "run1", "e.star", "-o", "e2.star", "--device", "cpu", "-j", "1")
    # the stack lies outside this folder: embed names it absolutely
    assert read_star(other / "e2.star")["particles"]["rlnImageName"][0] == \
        f"000001@{job.resolve()}/epu29_particles_b96.mrcs"
    # a STAR cryolatent writes outside the current directory names its stack absolutely
    ok("preprocess", "e.star", "-o", tmp_path / "outside", "--box", "32", "-j", "1",
       "--datadir", proj)
    monkeypatch.chdir(proj)
    name = read_star(tmp_path / "outside" / "particles.star")["particles"]["rlnImageName"][0]
    assert name == f"000001@{(tmp_path / 'outside').resolve() / 'particles.mrcs'}"
    stack_create(str(tmp_path / "outside" / "particles.star"), "outside_stack")
    stack_create(str(other / "e2.star"), "e2_stack")


def test_demo_force_replaces_an_earlier_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "run" / "junk.pt").write_text("old")         # an earlier demo's outputs
    (out / "summary.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "-o", str(out), "--force"]) == 0
    assert not (out / "run" / "junk.pt").exists()
    assert (out / "run" / "checkpoints" / "last.pt").exists()
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------ help, examples
def test_train_help_lists_common_options_first_then_expert_ones():
    """train has ~60 options: --help shows the dozen a user sets first ("Options") and the
    rest under "Expert options"; every option is listed once and keeps working."""
    import click
    from click.testing import CliRunner

    from cryolatent.cli import cli
    from cryolatent.commands.train import COMMON, command

    text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
    head, sep, expert = text.partition("\nExpert options")
    assert sep and "\nOptions:\n" in head, text
    ctx = click.Context(command, info_name="train")
    options = [p for p in command.get_params(ctx) if isinstance(p, click.Option)]
    assert len(options) > 50
    for p in options:
        first_col = p.get_help_record(ctx)[0]
        mine, other = (head, expert) if p.name in COMMON or "--help" in p.opts else \
            (expert, head)
        assert f"\n  {first_col}" in mine and f"\n  {first_col}" not in other, first_col
    assert len([p for p in options if p.name in COMMON]) <= 15
    for p in options:      # each is parsed as before (old aliases included)
        for opt in p.opts:
            if opt.startswith("--") and opt != "--help" and not p.is_flag:
                value = "1" if p.type.name not in ("choice",) else p.type.choices[0]
                command.make_context("train", ["in.star", "-o", "r", opt, str(value)])


def test_example_workflow_is_the_readme_chain():
    """examples/relion_workflow.sh: every cryolatent line parses with the current options, no
    model-size option is passed to train, and refine sits between embed and the steps that
    use its output."""
    import shlex

    from cryolatent.cli import cli

    text = (Path(__file__).resolve().parents[1] / "examples" / "relion_workflow.sh").read_text()
    lines = [ln.split("#")[0].strip() for ln in text.replace("\\\n", " ").splitlines()]
    steps = [shlex.split(ln.replace('"$IN"', "Extract/job007/particles.star"))
             for ln in lines if ln.startswith("cryolatent ")]
    names = [s[1] for s in steps]
    assert names == ["preprocess", "train", "embed", "refine", "plot", "classes", "select"]
    for argv in steps:
        cmd = cli.get_command(None, argv[1])
        cmd.make_context(argv[1], argv[2:])            # options and arguments all valid
    size = {"--enc-channels", "--kernel", "--gen-width", "--gen-layers", "--enc-width",
            "--hyper-width", "--inr-width", "--fourier-features", "--enc-layers",
            "--hyper-layers", "--inr-layers", "--gen-fourier-features"}
    assert not size & set(steps[1]), steps[1]
    refined = steps[3][steps[3].index("-o") + 1]
    assert steps[3][2] == steps[2][steps[2].index("-o") + 1]       # refine reads embed's
    for argv in steps[4:]:
        assert refined in argv, argv                                # the rest read refine's
    assert "relion_stack_create --i cryolatent/good.star" in text


def test_demo_default_output_folder_is_git_ignored():
    import subprocess

    from cryolatent.commands.demo import command

    repo = Path(__file__).resolve().parents[1]
    default = next(p.default for p in command.params if p.name == "outdir")
    try:
        res = subprocess.run(["git", "check-ignore", "-q", f"{default}/run/config.json"],
                             cwd=repo, capture_output=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no git")
    if res.returncode == 128:
        pytest.skip("not a git checkout")
    assert res.returncode == 0, f"{default}/ is not in .gitignore"
