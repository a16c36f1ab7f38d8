"""Robustness (issue 10): interrupted runs, full disks, NaN losses, untrusted files.

* SIGKILL during training leaves checkpoints/last.pt a complete epoch (loads with
  ``weights_only=True``); ``--resume`` finishes and log.csv has every epoch exactly once.
* SIGINT stops with exit status 130, one line, no traceback, the last checkpoint intact.
* A full disk (a real tmpfs when it can be mounted; a write that raises ENOSPC otherwise)
  leaves the previous output intact, no temporary file, and one error line naming the file.
* A loss that is NaN every step stops the run with a clear line and a finite checkpoint.
* A checkpoint whose unpickling would run a shell command is refused by every command that
  loads checkpoints, and the command never runs (the same file *does* run it when loaded
  with ``weights_only=False``, so the payload is real).
* Stacks named inside a STAR are never opened for writing (audit hook), stay byte-identical,
  and nothing new appears beside them.
* ``ParticleSet.release`` drops a stack's mapped pages from the process (resident set).

Subprocesses use the console script ``cryolatent`` with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cryolatent.cli import main
from cryolatent.io import load_particles, write_mrcs, write_star

CLI = [sys.executable, "-m", "cryolatent"]
TINY = ["--model", "target-vae", "--enc-channels", "4", "--gen-width", "16", "--gen-layers",
        "1", "--kernel", "5", "--batch-size", "8", "--device", "cpu", "--z-dim", "2",
        "--early-stop", "0"]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def make_set(folder: Path, n: int = 16, box: int = 16, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box] - box // 2
    blob = np.exp(-(xx ** 2 + (yy / 2) ** 2) / 8.0)
    imgs = (blob + 0.3 * rng.standard_normal((n, box, box))).astype(np.float32)
    write_mrcs(folder / "stack.mrcs", imgs, 2.0)
    parts = pd.DataFrame({
        "rlnImageName": pd.Series([f"{i + 1:06d}@stack.mrcs" for i in range(n)], dtype=str),
        "rlnOpticsGroup": np.ones(n, np.int64),
        "rlnClassNumber": (np.arange(n) % 2 + 1).astype(np.int64)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    write_star(folder / "in.star", parts, optics)
    return folder / "in.star"


def one_error_line(rc, err: str, pattern: str | None = None) -> str:
    import re

    lines = [ln for ln in err.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error:")]
    assert rc not in (0, None), err
    assert len(errs) == 1 and lines[-1] == errs[0], err
    assert "Traceback" not in err and "internal error" not in err, err
    if pattern:
        assert re.search(pattern, errs[0]), errs[0]
    return errs[0]


def load_ckpt(path: Path) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values()
               if torch.is_tensor(v) and v.is_floating_point())
    return ck


def log_epochs(run: Path) -> list[int]:
    with (run / "log.csv").open() as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _wait_for(path: Path, proc, timeout=60.0, epoch: int | None = None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        if path.exists():
            if epoch is None:
                return
            try:
                if load_ckpt(path)["epoch"] >= epoch:
                    return
            except Exception:  # noqa: BLE001 - being replaced right now
                pass
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


# ----------------------------------------------------------------------------- SIGKILL
def test_sigkill_keeps_last_complete_checkpoint_and_resume_logs_each_epoch_once(tmp_path):
    inp = make_set(tmp_path / "in", n=64)
    run = tmp_path / "run"
    E = 6
    proc = subprocess.Popen([*CLI, "train", str(inp), "-o", str(run), *TINY, "--epochs",
                             str(E)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        last = run / "checkpoints" / "last.pt"
        _wait_for(last, proc, epoch=1)
        time.sleep(0.15)  # somewhere in the next epoch (or in its checkpoint write)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ck = load_ckpt(last)  # a complete epoch, loadable without unpickling code
    k = int(ck["epoch"])
    assert 1 <= k <= E
    assert set(log_epochs(run)) <= set(range(1, E + 1))
    rc = main(["train", str(inp), "-o", str(run), "--resume", "--device", "cpu"])
    assert rc == 0
    assert log_epochs(run) == list(range(1, E + 1))
    assert int(load_ckpt(last)["epoch"]) == E


def test_kill_between_checkpoint_and_log_row_keeps_every_epoch(tmp_path):
    """The state SIGKILL leaves when it lands after last.pt was renamed but before the
    log.csv row was written: resume must still log every epoch exactly once."""
    inp = make_set(tmp_path / "in")
    run = tmp_path / "run"
    assert main(["train", str(inp), "-o", str(run), *TINY, "--epochs", "3"]) == 0
    rows = (run / "log.csv").read_text().splitlines()
    (run / "log.csv").write_text("\n".join(rows[:-1]) + "\n")  # epoch 3's row never written
    assert main(["train", str(inp), "-o", str(run), "--resume", "--epochs", "4",
                 "--device", "cpu"]) == 0
    assert log_epochs(run) == [1, 2, 3, 4]


def test_kill_after_log_row_before_checkpoint_logs_the_redone_epoch_once(tmp_path):
    """The opposite moment: log.csv already has the row of an epoch whose checkpoint never
    landed; resume trains that epoch again and its row must appear once (the resumed
    run's), and a damaged checkpoint is refused in one short line."""
    import shutil

    inp = make_set(tmp_path / "in")
    run = tmp_path / "run"
    assert main(["train", str(inp), "-o", str(run), *TINY, "--epochs", "2"]) == 0
    shutil.copy(run / "checkpoints" / "last.pt", tmp_path / "epoch2.pt")
    assert main(["train", str(inp), "-o", str(run), "--resume", "--epochs", "3",
                 "--device", "cpu"]) == 0
    shutil.copy(tmp_path / "epoch2.pt", run / "checkpoints" / "last.pt")  # epoch 3 not saved
    assert log_epochs(run) == [1, 2, 3]
    assert main(["train", str(inp), "-o", str(run), "--resume", "--epochs", "4",
                 "--device", "cpu"]) == 0
    assert log_epochs(run) == [1, 2, 3, 4]
    assert [int(r["epoch"]) for r in load_ckpt(run / "checkpoints" / "last.pt")["log_rows"]] \
        == [1, 2, 3, 4]

    from cryolatent.errors import CryolatentError
    from cryolatent.train import _load_checkpoint

    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:2000])                 # truncated
    with pytest.raises(CryolatentError, match=r"last\.pt: cannot read the checkpoint") as e:
        _load_checkpoint(last)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CryolatentError, match=r"last\.pt: cannot read the checkpoint") as e:
        _load_checkpoint(last)
    assert "weights_only" not in str(e.value)


# ----------------------------------------------------------------------------- SIGINT
def test_sigint_stops_cleanly_with_checkpoint(tmp_path):
    inp = make_set(tmp_path / "in", n=64)
    run = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "train", str(inp), "-o", str(run), *TINY, "--epochs",
                             "200"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        last = run / "checkpoints" / "last.pt"
        _wait_for(last, proc, epoch=1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted"), err
    ck = load_ckpt(last)
    assert 1 <= int(ck["epoch"]) < 200
    assert log_epochs(run)[-1] >= int(ck["epoch"]) - 1
    assert not list(run.rglob(".*.tmp"))


# --------------------------------------------------------------------------- full disk
@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 320 KiB tmpfs (needs root and mount); skips where it cannot be mounted."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and p.suffix != ".log"}


def test_full_disk_real_tmpfs_keeps_previous_output(tmp_path, tiny_tmpfs, capsys):
    small = make_set(tmp_path / "small", n=8)
    big = make_set(tmp_path / "big", n=400, seed=1)       # 400 x 16 x 16 x 4 B = 400 KiB
    out = tiny_tmpfs / "pre"
    assert main(["preprocess", str(small), "-o", str(out)]) == 0
    before = _digest(out)
    capsys.readouterr()
    rc = main(["preprocess", str(big), "-o", str(out), "--force"])
    line = one_error_line(rc, capsys.readouterr().err, r"particles\.mrcs.*No space left")
    assert str(out) in line
    assert _digest(out) == before                   # the previous result, untouched
    assert len(load_particles(out / "particles.star")) == 8
    assert not list(out.glob(".*.tmp"))


def test_full_disk_during_checkpoint_keeps_previous(tmp_path, capsys, monkeypatch):
    inp = make_set(tmp_path / "in")
    run = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 1 wrote last.pt and best.pt; then the disk is full
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    capsys.readouterr()
    rc = main(["train", str(inp), "-o", str(run), *TINY, "--epochs", "3"])
    one_error_line(rc, capsys.readouterr().err, r"checkpoints/(last|best)\.pt: No space left")
    monkeypatch.setattr(torch, "save", real_save)
    ck = load_ckpt(run / "checkpoints" / "last.pt")
    assert int(ck["epoch"]) == 1
    assert not list(run.rglob(".*.tmp"))
    assert main(["train", str(inp), "-o", str(run), "--resume", "--device", "cpu"]) == 0
    assert log_epochs(run) == [1, 2, 3]


def test_full_disk_simulated_for_star_and_stack(tmp_path, capsys, monkeypatch):
    """Everywhere a file is written: ENOSPC in the middle of the stack or of the STAR."""
    import cryolatent.io.mrc as mrc
    import cryolatent.io.star as star

    inp = make_set(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["preprocess", str(inp), "-o", str(out)]) == 0
    before = _digest(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for target, name in ((mrc.MRCStackWriter, "write"), (star, "_write_loop")):
        with monkeypatch.context() as m:
            m.setattr(target, name, full)
            capsys.readouterr()
            rc = main(["preprocess", str(inp), "-o", str(out), "--box", "12", "--force"])
            one_error_line(rc, capsys.readouterr().err, r"particles\.(mrcs|star).*No space")
        assert _digest(out) == before
        assert not list(out.glob(".*.tmp"))


# --------------------------------------------------------------------------- NaN loss
def test_nan_loss_stops_with_clear_message_and_finite_checkpoint(tmp_path, capsys,
                                                                 monkeypatch):
    from cryolatent.models.target_vae import TargetVAE

    real = TargetVAE.loss

    def nan_loss(self, images, ctf=None):
        loss, parts = real(self, images, ctf)
        return loss * float("nan"), parts

    monkeypatch.setattr(TargetVAE, "loss", nan_loss)
    inp = make_set(tmp_path / "in", n=32)
    run = tmp_path / "run"
    capsys.readouterr()
    rc = main(["train", str(inp), "-o", str(run), *TINY, "--epochs", "20"])
    one_error_line(rc, capsys.readouterr().err, r"NaN/Inf.*last\.pt")
    ck = load_ckpt(run / "checkpoints" / "last.pt")  # finite: the bad steps were skipped
    assert int(ck["epoch"]) < 20


# ----------------------------------------------------------------- malicious checkpoint
class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust_run")
    inp = make_set(root / "in")
    assert main(["train", str(inp), "-o", str(root / "run"), *TINY, "--epochs", "1"]) == 0
    return root


def test_malicious_checkpoint_refused_and_never_run(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    inp = trained / "in" / "in.star"
    marker = tmp_path / "PWNED"
    good = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    good["model"] = {"payload": _Evil(f"touch {marker}")}
    for name in ("last.pt", "best.pt"):
        torch.save(good, run / "checkpoints" / name)
    # embed a STAR with poses/classes for `classes`
    assert main(["embed", str(trained / "run"), str(inp), "-o", str(tmp_path / "e.star"),
                 "--device", "cpu", "--clusters", "2"]) == 0
    cmds = {
        "embed": ["embed", str(run), str(inp), "-o", str(tmp_path / "x.star"), "--device",
                  "cpu"],
        "train --resume": ["train", str(inp), "-o", str(run), "--resume", "--epochs", "2",
                           "--device", "cpu"],
        "classes": ["classes", str(run), str(tmp_path / "e.star"), "-o", str(tmp_path / "cls"),
                    "--datadir", str(trained / "in"), "--device", "cpu"],
    }
    for what, argv in cmds.items():
        capsys.readouterr()
        rc = main(argv)
        one_error_line(rc, capsys.readouterr().err, r"(last|best)\.pt")
        assert not marker.exists(), f"{what} ran the payload"
    assert not (tmp_path / "x.star").exists()
    # the payload is real: an unsafe load runs it
    torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------- inputs are never written
def test_stacks_named_in_a_star_are_never_written(trained, tmp_path, capsys):
    import shutil

    src = tmp_path / "in"
    shutil.copytree(trained / "in", src)
    inp = src / "in.star"
    files = sorted(src.iterdir())
    digest = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
              for p in files}
    for p in files:
        p.chmod(0o444)
    src.chmod(0o555)
    opened: list[str] = []
    watch = str(src.resolve())

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0]) if not isinstance(args[0], os.PathLike) else \
                os.fspath(args[0])
            mode, flags = (args[1] if len(args) > 1 else "r"), (args[2] if len(args) > 2
                                                                 else 0)
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                bool(isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and os.path.abspath(path).startswith(watch):
                opened.append(f"{path} {mode} {flags}")

    _HOOK["fn"] = hook
    out = tmp_path / "out"
    try:
        argvs = [
            ["preprocess", str(inp), "-o", str(out / "pre"), "--box", "12"],
            ["embed", str(trained / "run"), str(inp), "-o", str(out / "e.star"), "--device",
             "cpu", "--clusters", "2"],
            ["select", str(out / "e.star"), "--classes", "1", "-o", str(out / "s.star")],
            ["classes", str(trained / "run"), str(out / "e.star"), "-o", str(out / "cls"),
             "--datadir", str(src), "--device", "cpu", "--traversal-steps", "2"],
            ["train", str(inp), "-o", str(out / "run"), *TINY, "--epochs", "1"],
        ]
        for argv in argvs:
            capsys.readouterr()
            rc = main(argv)
            assert rc == 0, (argv[0], capsys.readouterr().err)
    finally:
        _HOOK["fn"] = None
        src.chmod(0o755)
        for p in files:
            p.chmod(0o644)
    assert opened == []
    assert sorted(src.iterdir()) == files                      # nothing new beside them
    assert {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in files} == digest


_HOOK: dict = {"fn": None}


def _audit(event, args):  # installed once; audit hooks cannot be removed
    fn = _HOOK["fn"]
    if fn is not None:
        fn(event, args)


sys.addaudithook(_audit)


# ------------------------------------------------------------------ ParticleSet.release
def _mapping_rss_kb(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    target = str(path.resolve())
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:
                inside = line.rstrip().endswith(target)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_release_drops_mapped_pages_and_keeps_data(tmp_path):
    from cryolatent.io.mrc import clear_cache

    rng = np.random.default_rng(3)
    imgs = rng.standard_normal((64, 128, 128)).astype(np.float32)   # 4 MiB
    stack = tmp_path / "big.mrcs"
    write_mrcs(stack, imgs, 1.0)
    clear_cache()
    ps = load_particles(stack)
    np.testing.assert_array_equal(ps.images(np.arange(64)), imgs)
    before = _mapping_rss_kb(stack)
    assert before >= 3000, before
    ps.release(np.arange(64))
    after = _mapping_rss_kb(stack)
    assert after < before / 4, (before, after)
    np.testing.assert_array_equal(ps.images([5, 63, 0]), imgs[[5, 63, 0]])  # still readable
    ps.release(np.arange(10, 20))   # partial ranges and repeated calls are fine
    ps.release([])


def test_malicious_checkpoint_message_is_short_and_safe(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    ck["model"] = {"payload": _Evil("true")}
    torch.save(ck, run / "checkpoints" / "last.pt")
    (run / "checkpoints" / "best.pt").unlink()
    rc = main(["embed", str(run), str(trained / "in" / "in.star"), "-o",
               str(tmp_path / "x.star"), "--device", "cpu"])
    line = one_error_line(rc, capsys.readouterr().err, r"last\.pt")
    assert "weights_only" not in line and len(line) < 300, line
    assert "refused" in line or "unsafe" in line or "not allowed" in line


# ------------------------------------------------------------------ metadata-only reads
def test_read_particle_table_checks(tmp_path):
    from cryolatent.errors import InputError
    from cryolatent.io import read_particle_table

    inp = make_set(tmp_path / "in")
    t, o = read_particle_table(inp)
    assert len(t) == 16 and o is not None
    (tmp_path / "in" / "stack.mrcs").unlink()            # never opens the stacks
    assert len(read_particle_table(inp)[0]) == 16
    txt = inp.read_text()
    bad = tmp_path / "bad.star"
    bad.write_text(txt.replace("000003@stack.mrcs 1 1", "000003@stack.mrcs 1 x"))
    with pytest.raises(InputError, match=r"bad.star: column rlnClassNumber .*000003@stack.mrcs "
                                         r"\(row 3\) has 'x'"):
        read_particle_table(bad)
    bad.write_text(txt.replace("000003@stack.mrcs", "000002@stack.mrcs"))
    assert len(read_particle_table(bad)[0]) == 16   # duplicates: warned, every row kept
    assert len(read_particle_table(bad, unique=False)[0]) == 16   # symmetry expansion
    head = txt[:txt.index("000001@")]
    bad.write_text(head)
    with pytest.raises(InputError, match=r"bad.star: data_particles has no particles"):
        read_particle_table(bad)
    assert len(read_particle_table(bad, allow_empty=True)[0]) == 0
    with pytest.raises(InputError, match="nope.star: no such file"):
        read_particle_table(tmp_path / "nope.star")


# ------------------------------------------------------- property tests the io suite lacked
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 1024 + 5 * 8 * 8 * 4), n=st.integers(1, 5),
       ext=st.sampled_from([0, 64]))
def test_property_truncated_stack_anywhere(tmp_path, cut, n, ext):
    """A valid stack (with or without an extended header) cut at any byte, header included:
    load_particles gives the complete images exactly, or an InputError naming the file; a
    STAR that uses an incomplete image names that particle."""
    from cryolatent.errors import InputError
    from cryolatent.io.mrc import clear_cache

    rng = np.random.default_rng(cut)
    imgs = rng.standard_normal((n, 8, 8)).astype(np.float32)
    full = tmp_path / "full.mrcs"
    write_mrcs(full, imgs, 1.5)
    raw = bytearray(full.read_bytes())
    if ext:
        raw[92:96] = np.int32(ext).tobytes()                 # nsymbt
        raw = raw[:1024] + bytes(ext) + raw[1024:]
    p = tmp_path / "cut.mrcs"
    p.write_bytes(bytes(raw[:min(cut + ext, len(raw))]) if cut < 1024 + n * 256
                  else bytes(raw))
    clear_cache()
    size = p.stat().st_size
    complete = max(0, (size - 1024 - ext) // 256) if size >= 1024 else -1
    try:
        ps = load_particles(p)
    except InputError as e:
        assert "cut.mrcs" in str(e) and "\n" not in str(e)
        assert complete < n
    else:
        assert complete == n and len(ps) == n
        np.testing.assert_array_equal(ps.images(np.arange(n)), imgs)
    if 0 <= complete < n and size >= 1024:
        parts = pd.DataFrame({"rlnImageName": pd.Series([f"{i + 1:06d}@cut.mrcs"
                                                         for i in range(n)], dtype=str),
                              "rlnOpticsGroup": np.ones(n, np.int64)})
        write_star(tmp_path / "c.star", parts, pd.DataFrame({"rlnOpticsGroup": [1],
                                                            "rlnImagePixelSize": [1.5]}))
        with pytest.raises(InputError, match=rf"{complete + 1:06d}@cut.mrcs.*shorter"):
            load_particles(tmp_path / "c.star")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vals=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                               st.integers(-2**40, 2**40)), min_size=1, max_size=6),
       crlf=st.booleans(), bom=st.booleans(), blank=st.booleans())
def test_property_star_line_ends_bom_nan(tmp_path, vals, crlf, bom, blank):
    """Round trip with NaN/Inf, then the same bytes with CRLF, a BOM and blank lines between
    the header parts: the table read back is the same."""
    from cryolatent.io import read_star

    df = pd.DataFrame({"rlnImageName": pd.Series([f"{i + 1:06d}@s.mrcs"
                                                  for i in range(len(vals))], dtype=str),
                       "rlnAnglePsi": np.array(vals, dtype=np.float64)})
    p = tmp_path / "t.star"
    write_star(p, df, pd.DataFrame({"rlnOpticsGroup": [1]}))
    ref = read_star(p)["particles"]
    np.testing.assert_array_equal(ref["rlnAnglePsi"].to_numpy(np.float64),
                                  df["rlnAnglePsi"].to_numpy())
    b = p.read_bytes()
    if blank:
        b = b.replace(b"loop_\n", b"loop_\n\n").replace(b"data_particles\n",
                                                        b"data_particles\n\n\n")
    if crlf:
        b = b.replace(b"\n", b"\r\n")
    if bom:
        b = b"\xef\xbb\xbf" + b
    p.write_bytes(b)
    back = read_star(p)["particles"]
    pd.testing.assert_frame_equal(back, ref)


def test_images_out_and_fast_path_equal_general_path(tmp_path):
    """images(idx, out=...) fills the given buffer; single float32 stack (fast gather) and
    a big-endian int16 stack (general path) give the same values; NaN named either way."""
    from cryolatent.errors import InputError
    from cryolatent.io.mrc import clear_cache

    inp = make_set(tmp_path / "in", n=12)
    ps = load_particles(inp)
    idx = np.array([7, 2, 2, 11, 0])
    ref = ps.images(idx, check=False)
    buf = np.full((5, 16, 16), -1.0, np.float32)
    got = ps.images(idx, out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, ref)
    raw = np.fromfile(tmp_path / "in" / "stack.mrcs", dtype="<f4", offset=1024)
    np.testing.assert_array_equal(ref, raw.reshape(12, 16, 16)[idx])
    with pytest.raises(ValueError):
        ps.images(idx, out=np.zeros((4, 16, 16), np.float32))
    a = raw.reshape(12, 16, 16).copy()
    a[2, 0, 0] = np.nan
    write_mrcs(tmp_path / "in" / "stack.mrcs", a, 2.0)
    clear_cache()
    with pytest.raises(InputError, match=r"000003@stack.mrcs \(#3\) has NaN"):
        load_particles(inp).images(idx, out=buf)
