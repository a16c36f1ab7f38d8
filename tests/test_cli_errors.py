"""Bad input through the real CLI, for every command that reads particles (issue 10).

Each command x bad input: a non-zero exit, exactly one ``error:`` line on stderr naming the
file / particle / column and what is wrong (the last line), no traceback, and no output file
left behind (nor a temporary one). STAR files with CRLF line ends or a UTF-8 BOM must be
read exactly like the plain file. The commands run in-process through
:func:`cryolatent.cli.main` (the same code path as the console script) on 16 images of 16 px
and a tiny TARGET-VAE trained once per module.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryolatent.cli import main
from cryolatent.io import load_particles, read_star, write_cs, write_mrcs, write_star

N, D, APIX = 16, 16, 2.0
TINY = ["--model", "target-vae", "--enc-channels", "4", "--gen-width", "16", "--gen-layers",
        "1", "--kernel", "5", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
        "--z-dim", "2"]


# ------------------------------------------------------------------------------ data
def _tables(n=N, stack="stack.mrcs"):
    rng = np.random.default_rng(1)
    parts = pd.DataFrame({
        "rlnImageName": pd.Series([f"{i + 1:06d}@{stack}" for i in range(n)], dtype=str),
        "rlnDefocusU": 15000.0 + 10 * np.arange(n), "rlnDefocusV": 14500.0 + 10 * np.arange(n),
        "rlnDefocusAngle": 10.0, "rlnOpticsGroup": np.ones(n, np.int64),
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.normal(0, 2, n),
        "rlnOriginYAngst": rng.normal(0, 2, n), "cryolatentZ1": rng.normal(size=n),
        "cryolatentZ2": rng.normal(size=n),
        "rlnClassNumber": (np.arange(n) % 2 + 1).astype(np.int64)})
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": pd.Series(["opticsGroup1"], dtype=str),
        "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
        "rlnImagePixelSize": [APIX], "rlnImageSize": [D], "rlnImageDimensionality": [2]})
    return parts, optics


def _images(n=N, box=D, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box] - box // 2
    blob = np.exp(-(xx ** 2 + (yy / 2) ** 2) / 8.0)
    return (blob + 0.3 * rng.standard_normal((n, box, box))).astype(np.float32)


def make_set(folder: Path, case: str = "good", col: str = "rlnDefocusU") -> Path:
    """A particle set in ``folder`` broken in one way; returns the file to give the command."""
    folder.mkdir(parents=True, exist_ok=True)
    imgs = _images()
    parts, optics = _tables()
    star = folder / "in.star"
    apix_hdr = APIX
    if case == "nan_particle":
        imgs[4] = np.nan
    if case == "inf_particle":
        imgs[8, 3, 5] = np.inf
    if case == "zero_apix":
        apix_hdr = 0.0
        optics["rlnImagePixelSize"] = 0.0
    write_mrcs(folder / "stack.mrcs", imgs, apix_hdr)
    if case == "missing_stack":
        parts.loc[4:, "rlnImageName"] = [f"{i + 1:06d}@gone.mrcs" for i in range(4, N)]
    if case == "short_stack":
        raw = (folder / "stack.mrcs").read_bytes()
        (folder / "stack.mrcs").write_bytes(raw[:-10])
    if case == "empty_loop":
        parts = parts.iloc[:0]
    if case == "two_boxes":
        write_mrcs(folder / "big.mrcs", _images(1, 20), APIX)
        parts.loc[5, "rlnImageName"] = "000001@big.mrcs"
    if case == "duplicate":
        parts.loc[3, "rlnImageName"] = parts.loc[1, "rlnImageName"]
    if case == "wrong_type":
        parts = parts.astype({col: object})
        parts.loc[2, col] = "abc"
    if case == "cs_no_path":
        arr = np.zeros(N, dtype=[("uid", "<u8"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                                 ("blob/psize_A", "<f4"), ("alignments2D/class", "<u4")])
        arr["uid"] = np.arange(N) + 1000
        arr["blob/idx"] = np.arange(N)
        arr["blob/shape"] = D
        arr["blob/psize_A"] = APIX
        write_cs(folder / "in.cs", arr)
        return folder / "in.cs"
    write_star(star, parts, optics)
    if case == "crlf":
        star.write_bytes(star.read_bytes().replace(b"\n", b"\r\n"))
    if case == "bom":
        star.write_bytes(b"\xef\xbb\xbf" + star.read_bytes())
    return star


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A good set (``good/in.star``) and a tiny trained run (``run``)."""
    root = tmp_path_factory.mktemp("cli_errors")
    good = make_set(root / "good")
    rc = main(["train", str(good), "-o", str(root / "run"), *TINY])
    assert rc == 0 and (root / "run" / "checkpoints" / "last.pt").exists()
    return root


# ------------------------------------------------------------------------------ commands
# command -> (argv for INPUT and an output location OUT, the outputs a success writes)
def _argv(cmd: str, inp: Path, out: Path, base: Path) -> list[str]:
    return {
        "preprocess": ["preprocess", str(inp), "-o", str(out)],
        "train": ["train", str(inp), "-o", str(out), *TINY],
        "embed": ["embed", str(base / "run"), str(inp), "-o", str(out / "e.star"),
                  "--device", "cpu"],
        "classes": ["classes", str(base / "run"), str(inp), "-o", str(out), "--device", "cpu",
                    "--traversal-steps", "2"],
        "select": ["select", str(inp), "--classes", "1", "-o", str(out / "sel.star")],
        "evaluate": ["evaluate", str(inp), "--truth", str(base / "good" / "in.star")],
        "plot": ["plot", str(inp), "-o", str(out), "--no-umap"],
    }[cmd]


IMAGE_CMDS = ["preprocess", "train", "embed", "classes"]
ALL_CMDS = IMAGE_CMDS + ["select", "evaluate", "plot"]
#: the column each command really uses, for the "column of the wrong type" case
WRONG_COL = {"preprocess": "rlnDefocusU", "train": "rlnDefocusU", "embed": "rlnDefocusU",
             "classes": "rlnAnglePsi", "select": "rlnClassNumber", "evaluate": "rlnAnglePsi",
             "plot": "cryolatentZ1"}

# case -> (commands, regex the error line must match; {col} is the command's column)
CASES = {
    "missing_stack": (IMAGE_CMDS, r"in\.star: stack gone\.mrcs not found.*000005@gone\.mrcs"),
    "short_stack": (IMAGE_CMDS, r"in\.star: particle 000016@stack\.mrcs.*shorter than its "
                                r"header"),
    "empty_loop": (ALL_CMDS, r"in\.star.*(no particles|no particle table|empty|0 particles)"),
    "two_boxes": (IMAGE_CMDS, r"in\.star: two box sizes.*000001@big\.mrcs"),
    "nan_particle": (IMAGE_CMDS, r"in\.star: particle 000005@stack\.mrcs.*NaN or Inf"),
    "inf_particle": (IMAGE_CMDS, r"in\.star: particle 000009@stack\.mrcs.*NaN or Inf"),
    "zero_apix": (IMAGE_CMDS, r"in\.star: unknown or zero pixel size"),
    "cs_no_path": (["preprocess", "train", "embed"], r"in\.cs: no blob/path"),
    "wrong_type": (ALL_CMDS, r"in\.star: .*{col}.*('abc'|number|numeric)"),
}
_PARAMS = [(c, k) for k, (cmds, _) in CASES.items() for c in cmds]

# known failures (command, case) -> reason, marked xfail(strict=True); none at present
XFAIL: dict[tuple[str, str], str] = {}


def _outputs(out: Path) -> list[str]:
    """Files under OUT that a user could take for a result: anything but logs."""
    if not out.exists():
        return []
    if out.is_file():
        return [out.name]
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and p.suffix != ".log")


def _temps(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob(".*.tmp"))


def check_one_error_line(rc: int, err: str, pattern: str) -> str:
    """Non-zero exit; the last stderr line is the only ``error:`` line and matches."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc not in (0, None), err
    assert lines, "nothing on stderr"
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err and "internal error" not in err, err
    assert re.search(pattern, errors[0]), f"{errors[0]!r} !~ {pattern!r}"
    return errors[0]


def _param(cmd, case):
    marks = []
    if (cmd, case) in XFAIL:
        marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[(cmd, case)]))
    return pytest.param(cmd, case, marks=marks, id=f"{cmd}-{case}")


@pytest.mark.parametrize("cmd,case", [_param(c, k) for c, k in _PARAMS])
def test_bad_input_one_line_no_output(base, tmp_path, capsys, cmd, case):
    inp = make_set(tmp_path / "in", case, col=WRONG_COL[cmd])
    before = {p: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(_argv(cmd, inp, out, base))
    cap = capsys.readouterr()
    check_one_error_line(rc, cap.err, CASES[case][1].format(col=WRONG_COL[cmd]))
    if cmd == "evaluate":
        assert cap.out.strip() == ""
    left = _outputs(out)
    if cmd == "train":  # a failed run leaves no checkpoint or log to be taken for a result
        left = [p for p in left if p != "config.json"]
    assert left == [], f"{cmd} left {left}"
    assert _temps(tmp_path) == []
    # the input files are untouched
    assert {p: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before


# --------------------------------------------------------------------- CRLF / BOM are read
@pytest.mark.parametrize("case", ["crlf", "bom"])
def test_crlf_and_bom_star_read_like_plain(tmp_path, case):
    plain = load_particles(make_set(tmp_path / "lf"))
    other = load_particles(make_set(tmp_path / case, case))
    # the names as written are equal; the tables name each folder's stack from the cwd
    assert list(plain.names) == list(other.names)
    pd.testing.assert_frame_equal(plain.table.drop(columns="rlnImageName"),
                                  other.table.drop(columns="rlnImageName"))
    pd.testing.assert_frame_equal(plain.optics, other.optics)
    np.testing.assert_array_equal(plain.images(np.arange(N)), other.images(np.arange(N)))


@pytest.mark.parametrize("cmd", ALL_CMDS)
def test_crlf_bom_star_through_every_command(base, tmp_path, capsys, cmd):
    """The same command on a CRLF and on a BOM copy of a good STAR succeeds and writes what
    it writes for the plain file."""
    results = {}
    for case in ("good", "crlf", "bom"):
        inp = make_set(tmp_path / case / "in", case)
        out = tmp_path / case / "out"
        capsys.readouterr()
        rc = main(_argv(cmd, inp, out, base))
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        if cmd == "evaluate":
            results[case] = json.loads(cap.out)
        elif cmd == "preprocess":
            results[case] = load_particles(out / "particles.star").images(np.arange(N))
        elif cmd in ("embed", "select"):
            f = out / ("e.star" if cmd == "embed" else "sel.star")
            # the stack named from the current directory: absolute, in each case's folder
            results[case] = [x.replace(str(inp.parent.resolve()), "IN") for x in
                             read_star(f)["particles"]["rlnImageName"]]
        else:
            results[case] = _outputs(out)
    for case in ("crlf", "bom"):
        if cmd == "preprocess":
            np.testing.assert_array_equal(results[case], results["good"])
        else:
            assert results[case] == results["good"], case


# ---------------------------------------------------------------- the error is printed once
@pytest.mark.parametrize("cmd", IMAGE_CMDS)
def test_error_printed_once_and_logged(base, tmp_path, capsys, cmd):
    inp = make_set(tmp_path / "in", "nan_particle")
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(_argv(cmd, inp, out, base))
    err = capsys.readouterr().err
    line = check_one_error_line(rc, err, r"000005@stack\.mrcs")
    msg = line[len("error: "):]
    assert err.count(msg) == 1, err
    for log in out.glob("*.log"):  # a command with a log file records the error there too
        assert msg in log.read_text()


def test_debug_shows_traceback(tmp_path):
    inp = make_set(tmp_path / "in", "nan_particle")
    from cryolatent.errors import InputError

    with pytest.raises(InputError, match="000005@stack.mrcs"):
        main(["--debug", "preprocess", str(inp), "-o", str(tmp_path / "out")])


def test_unexpected_exception_is_one_line(tmp_path, capsys, monkeypatch):
    """A bug (not a user error) still gives one line, with the hint to use --debug."""
    import cryolatent.preprocess as pre

    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pre, "preprocess", boom)
    rc = main(["preprocess", str(make_set(tmp_path / "in")), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    check_one_error_line(rc, err.replace("internal error", "internal-error"),
                         r"internal-error: ZeroDivisionError.*--debug")


def test_missing_input_file_every_command(base, tmp_path, capsys):
    for cmd in ALL_CMDS:
        capsys.readouterr()
        rc = main(_argv(cmd, tmp_path / "nope.star", tmp_path / "out", base))
        err = capsys.readouterr().err
        check_one_error_line(rc, err, r"nope\.star.*(no such file|not found|does not exist)")
    assert _outputs(tmp_path / "out") == []


def test_classes_bad_checkpoint_leaves_no_output(base, tmp_path, capsys):
    """The model is loaded before anything is written: a damaged checkpoint leaves no
    aligned_averages.mrcs behind that could be taken for a result."""
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    for p in (run / "checkpoints").glob("*.pt"):
        p.write_bytes(p.read_bytes()[:1000])
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["classes", str(run), str(base / "good" / "in.star"), "-o", str(out),
               "--device", "cpu", "--traversal-steps", "2"])
    check_one_error_line(rc, capsys.readouterr().err, r"\.pt: cannot read the checkpoint")
    assert _outputs(out) == [] and _temps(tmp_path) == []


def test_help_does_not_import_torch():
    """`cryolatent --help` and every command's --help stay fast: torch is imported by the
    commands' bodies only (cli.py and commands/ import lazily)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cryolatent.cli import cli, COMMANDS\n"
        "for args in [['--help']] + [[c, '--help'] for c in COMMANDS]:\n"
        "    r = CliRunner().invoke(cli, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "    assert 'torch' not in sys.modules, args\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ctrl_c_in_refine_does_not_offer_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C in refine: exit 130 and one line, no --resume (refine has none), no output."""
    import cryolatent.analysis.refine2d as refine2d
    from cryolatent.cli import main as cli_main

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(refine2d, "refine_star", interrupt)
    (tmp_path / "in.star").write_text("data_\n")
    assert cli_main(["refine", str(tmp_path / "in.star"), "-o", str(tmp_path / "o.star")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted (Ctrl-C)") and "--resume" not in err[-1]
    assert not (tmp_path / "o.star").exists()
