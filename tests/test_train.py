"""Training loop: the loss falls, checkpoints round-trip, resume equals an uninterrupted run,
non-finite steps are skipped, the CLI refuses a used folder, streamed data equal resident."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryolatent.config import TrainConfig
from cryolatent.data import Batches, ParticleData, split_indices
from cryolatent.errors import CryolatentError
from cryolatent.train import StepRunner, load_run, make_optimizer, train

D = 16


def bars(n=200, seed=0) -> np.ndarray:
    """n images of an L-shaped object in [0, 1], random angle, small random shift."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:D, :D] - D // 2
    out = np.zeros((n, D, D), np.float32)
    for i in range(n):
        a = rng.uniform(0, 2 * np.pi)
        cx, cy = rng.normal(0, 1.0, 2)
        c, s = np.cos(a), np.sin(a)
        X = c * (xx - cx) + s * (yy - cy)
        Y = -s * (xx - cx) + c * (yy - cy)
        out[i] = (((np.abs(X) < 5) & (np.abs(Y) < 1.5))
                  | ((np.abs(X - 4) < 1.5) & (np.abs(Y - 2) < 3))).astype(np.float32)
    return out


def small_cfg(outdir, **kw) -> TrainConfig:
    base = dict(outdir=str(outdir), epochs=3, batch_size=25, lr=2e-3, enc_channels=8,
                kernel=7, translation_range=3, rotations=4, gen_width=32, gen_layers=1,
                fourier_features=16, z_dim=2, translation_prior=1.5, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def images():
    return bars()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscription is slower than one thread
    yield
    torch.set_num_threads(n)


def rows(rundir):
    with open(rundir / "log.csv") as f:
        return list(csv.DictReader(f))


def test_loss_falls_and_run_folder(tmp_path, images):
    rundir = train(small_cfg(tmp_path / "run", epochs=4, command="cryolatent train x"),
                   data=images)
    r = rows(rundir)
    assert [int(x["epoch"]) for x in r] == [1, 2, 3, 4]
    assert all(int(x["images"]) == 175 for x in r)  # 180 train particles, drop_last at 25
    for k in ("train_loss", "train_recon", "train_kl", "val_loss", "lr", "images_per_s",
              "seconds"):
        assert k in r[0]
    assert float(r[-1]["train_loss"]) < 0.8 * float(r[0]["train_loss"])
    assert float(r[-1]["val_loss"]) < float(r[0]["val_loss"])
    cfg = json.loads((rundir / "config.json").read_text())
    assert cfg["seed"] == 0 and cfg["command"] == "cryolatent train x"
    assert cfg["likelihood"] == "bernoulli"  # auto-resolved from [0, 1] data
    # complete: the version that resolved it, and every option the model reads
    import cryolatent
    from cryolatent.config import missing

    assert cfg["version"] == cryolatent.__version__ and cfg["kernel"] == 7
    assert missing(TrainConfig.from_dict(cfg)) == []
    assert (rundir / "run.log").exists()
    assert (rundir / "checkpoints" / "last.pt").exists()
    assert (rundir / "checkpoints" / "best.pt").exists()

    # weights_only load and the checkpoint's contents
    ck = torch.load(rundir / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 4 and ck["config"]["z_dim"] == 2 and ck["box"] == D
    assert {"model", "optimizer", "scheduler", "rng"} <= set(ck)

    # load_run gives the trained model
    model, cfg2 = load_run(rundir, "cpu", which="last")
    assert cfg2.likelihood == "bernoulli"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ck["model"][k], rtol=0, atol=0)
    inf = model.infer(torch.from_numpy(images[:8]))
    assert inf.z_mean.shape == (8, 2)

    # a used run folder is refused without resume
    with pytest.raises(CryolatentError, match="not empty"):
        train(small_cfg(tmp_path / "run"), data=images)


def test_resume_equals_uninterrupted(tmp_path, images):
    a = train(small_cfg(tmp_path / "a", epochs=3), data=images)
    b = train(small_cfg(tmp_path / "b", epochs=2), data=images)
    b = train(small_cfg(tmp_path / "b", epochs=3), data=images, resume=True)
    ca = torch.load(a / "checkpoints" / "last.pt", weights_only=True)
    cb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)
    assert ca["epoch"] == cb["epoch"] == 3
    for k in ca["model"]:
        torch.testing.assert_close(cb["model"][k], ca["model"][k], rtol=0, atol=0)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            torch.testing.assert_close(sb[i][k], sa[i][k], rtol=0, atol=0)
    assert torch.equal(ca["rng"]["cpu"], cb["rng"]["cpu"])
    ra, rb = rows(a), rows(b)
    assert [x["train_loss"] for x in ra] == [x["train_loss"] for x in rb]


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_steps_are_skipped(fused):
    """NaN steps leave the parameters and the optimiser state untouched, with the fused
    AdamW and with the plain one (the skip is GradScaler's, not a fused-kernel detail)."""
    torch.manual_seed(0)
    cfg = small_cfg("unused", likelihood="bernoulli")
    from cryolatent.models import build_model

    model = build_model(cfg, D)
    opt, _ = make_optimizer(model, cfg)
    if not fused:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    runner = StepRunner(model, opt, torch.device("cpu"))
    x = torch.from_numpy(bars(25))
    runner.train_step(x)                     # optimiser state exists
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {i: {k: v.clone() for k, v in s.items()}
             for i, s in opt.state_dict()["state"].items()}
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    for _ in range(3):
        out = runner.train_step(bad)
        assert not torch.isfinite(out["loss"])
    for k, v in model.state_dict().items():  # untouched by the NaN steps
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(v, state[i][k], rtol=0, atol=0)
    assert runner.read_bad() == 3
    runner.train_step(x)
    assert int(runner.bad_run) == 0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_streamed_batches_equal_resident(images):
    data = ParticleData.from_source(images)
    tr, va = split_indices(len(data), 0.1, seed=3)
    assert len(va) == 20 and len(np.intersect1d(tr, va)) == 0
    kw = dict(batch_size=30, device=torch.device("cpu"), seed=3, num_workers=0)
    res = Batches(data, tr, va, resident=True, **kw)
    st = Batches(data, tr, va, resident=False, **kw)
    for (xa, _), (xb, _) in zip(res.train(5), st.train(5)):
        # streamed batches read sorted indices: same set of images per batch
        ka = sorted(map(bytes, xa.numpy().reshape(len(xa), -1)))
        kb = sorted(map(bytes, xb.numpy().reshape(len(xb), -1)))
        assert ka == kb
    assert sum(len(x) for x, _ in res.val()) == 20
    assert not np.array_equal(res.epoch_order(0), res.epoch_order(1))
    np.testing.assert_array_equal(res.epoch_order(4), st.epoch_order(4))


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_bad_particle_error_is_the_original_line(tmp_path, workers):
    """A NaN particle met by a DataLoader worker: the InputError that reaches the trainer is
    io's own one line (no "Caught InputError in DataLoader worker", no traceback)."""
    from cryolatent.errors import InputError
    from cryolatent.io import write_mrcs

    x = bars(40)
    x[13, 2, 3] = np.nan
    write_mrcs(tmp_path / "p.mrcs", x, 1.0)
    data = ParticleData.from_source(str(tmp_path / "p.mrcs"))
    st = Batches(data, np.arange(40), np.arange(0), 40, torch.device("cpu"), seed=0,
                 num_workers=workers, resident=False)
    with pytest.raises(InputError) as e:
        list(st.train(0))
    msg = str(e.value)
    assert "#14" in msg and "NaN or Inf" in msg and msg.startswith(str(tmp_path / "p.mrcs"))
    assert "Traceback" not in msg and "worker" not in msg and len(msg) < 200, msg


def test_cli_refuses_nonempty_and_resolves_model_defaults(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cryolatent.commands import train as cmd

    seen = {}

    def fake_train(cfg, resume=False):
        seen["cfg"], seen["resume"] = cfg, resume
        return tmp_path

    import cryolatent.launch

    monkeypatch.setattr(cryolatent.launch, "train", fake_train)
    r = CliRunner().invoke(cmd.command, ["in.star", "-o", str(tmp_path / "r"), "--model",
                                         "irl-inr", "--rotations", "16", "--no-ctf"])
    assert r.exit_code == 0, r.output
    c = seen["cfg"]
    # options not given stay "auto" in the CLI; the library resolves them from the data
    assert (c.lr, c.batch_size, c.weight_decay, c.ctf) == (None, None, None, False)
    c.resolve_defaults(box=32, has_ctf=False, device_type="cuda")
    assert (c.lr, c.batch_size, c.weight_decay) == (1e-4, 128, 5e-4)   # the paper's (GPU)
    assert c.rotations == 16 and c.model == "irl-inr" and c.ctf is False
    r = CliRunner().invoke(cmd.command, ["in.star", "-o", str(tmp_path / "r"), "--lr", "1e-3"])
    c = seen["cfg"]
    c.resolve_defaults(box=32, has_ctf=False)
    assert (c.lr, c.batch_size, c.weight_decay, c.model) == (1e-3, 100, 0.0, "target-vae")


def test_cli_nonempty_rundir_error(tmp_path, capsys):
    from cryolatent.cli import main

    (tmp_path / "junk.txt").write_text("x")
    rc = main(["train", str(tmp_path / "missing.mrcs"), "-o", str(tmp_path)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--resume" in err and len(err.strip().splitlines()) == 1


def test_rotated_filter_bank_backward_is_exact_and_reproducible():
    """The bank's custom backward equals autograd's scatter-add of the plain gather (float64
    gradcheck + reference), and repeated backward passes on 2 threads are bit-identical
    (autograd's CPU index_put_(accumulate=True) adds with atomics: they were not)."""
    from cryolatent.models.blocks import GroupConvP, _RotateBank

    torch.set_num_threads(2)
    g = GroupConvP(6, 5, 8).double()
    tabs = (g._idx, g._w.double(), g._tidx, g._tw.double())
    w = g.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda W: _RotateBank.apply(W, *tabs), (w,))
    ref = (w[:, g._idx] * g._w.double()).sum(-1)            # plain gather, autograd backward
    gb = torch.randn_like(ref)
    (gref,) = torch.autograd.grad(ref, w, gb)
    (gnew,) = torch.autograd.grad(_RotateBank.apply(w, *tabs), w, gb)
    torch.testing.assert_close(gnew, gref, rtol=0, atol=1e-12)

    g = GroupConvP(128, 15, 8)
    gb = torch.randn(8 * 128, 1, 15, 15)
    grads = []
    for _ in range(10):
        g.weight.grad = None
        g.filter_bank().backward(gb)
        grads.append(g.weight.grad.clone())
    assert all(torch.equal(grads[0], x) for x in grads[1:])


def test_same_seed_same_run_on_two_threads(tmp_path, images):
    """Two trainings with the same seed and data on 2 CPU threads: bit-identical log.csv
    (all but the timing columns) and weights. 128 encoder channels: enough work for the old
    multithreaded scatter-add in the filter bank's backward to reorder its sums."""
    torch.set_num_threads(2)
    runs = [train(small_cfg(tmp_path / f"run{i}", epochs=2, enc_channels=128, num_workers=0),
                  data=images[:100]) for i in range(2)]
    timing = {"images_per_s", "seconds"}
    r0, r1 = ([{k: v for k, v in r.items() if k not in timing} for r in rows(d)] for d in runs)
    assert r0 == r1 and len(r0) == 2
    m0, m1 = (torch.load(d / "checkpoints" / "last.pt", weights_only=False)["model"]
              for d in runs)
    assert m0.keys() == m1.keys()
    assert all(torch.equal(m0[k], m1[k]) for k in m0)


def test_weight_decay_is_decoupled():
    """A parameter the loss does not touch shrinks by exactly (1 - lr * wd) per step (AdamW);
    Adam's coupled L2 would move it by ~lr (the normalised decay term) instead."""
    import torch

    from cryolatent.config import TrainConfig
    from cryolatent.train import make_optimizer

    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt, _ = make_optimizer(lin, cfg)
    loss = lin.bias.sum()            # the weight gets a zero gradient
    loss.backward()
    lin.weight.grad = torch.zeros_like(lin.weight)
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), torch.full((2, 3), 2.0 * (1 - 1e-2 * 0.1)))


def test_precision_forced_by_the_environment(tmp_path, images, monkeypatch):
    """CRYOLATENT_PRECISION overrides --amp and the CPU's default, and run.log says so."""
    from cryolatent.train import PRECISION_ENV, amp_dtype, forced_precision

    cpu = torch.device("cpu")
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert forced_precision() == "bf16" and amp_dtype("off", cpu) is torch.bfloat16
    monkeypatch.setenv(PRECISION_ENV, "float32")
    assert forced_precision() == "float32" and amp_dtype("bf16", cpu) is None
    monkeypatch.setenv(PRECISION_ENV, "fp8")
    with pytest.raises(CryolatentError, match=PRECISION_ENV):
        amp_dtype("auto", cpu)
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    rundir = train(small_cfg(tmp_path / "run", epochs=1, amp="off"), data=images)
    log = (rundir / "run.log").read_text()
    assert f"precision: bf16 autocast (float32 weights, loss and KL) (forced by {PRECISION_ENV})" \
        in log
    assert "hardware bf16:" in log and "CPU:" in log
    monkeypatch.delenv(PRECISION_ENV)
    assert forced_precision() is None and amp_dtype("off", cpu) is None


def test_particle_diameter_sets_the_likelihood_disc(tmp_path, monkeypatch):
    """train --particle-diameter Å: the likelihood's disc in px of the training images (the
    mask on), recorded in config.json; a diameter beyond the box is a one-line error."""
    from click.testing import CliRunner

    from cryolatent.cli import cli, main
    from cryolatent.io import write_mrcs, write_star
    from cryolatent.models import build_model
    import pandas as pd

    n, apix = 60, 2.5
    write_mrcs(tmp_path / "p.mrcs", bars(n).astype(np.float32), apix)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(n)],
                       "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroupName": ["g"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [D],
                           "rlnImageDimensionality": [2]})
    write_star(tmp_path / "p.star", df, optics)
    import cryolatent.launch
    from cryolatent.config import resolve
    from cryolatent.train import data_facts
    from cryolatent.data import ParticleData

    seen = {}
    monkeypatch.setattr(cryolatent.launch, "train",
                        lambda cfg, resume=False: seen.setdefault("cfg", cfg) and tmp_path)
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "p.star"), "-o", str(tmp_path / "r"),
                                 "--particle-diameter", "30", "--mask-diameter", "3"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]       # Å replaces px; converted with the set's pixel size at the start
    assert cfg.particle_diameter == 30 and cfg.mask_diameter is None
    cfg, _ = resolve(cfg, D, data_facts(ParticleData.from_source(tmp_path / "p.star"), cfg))
    assert cfg.mask_diameter == pytest.approx(12.0) and cfg.mask is True
    model = build_model(cfg, D, resolve=False)
    c = torch.arange(D) - D // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    assert torch.equal(model.mask2d > 0, r2 <= 6.0 ** 2)         # radius 6 px, not 8
    assert model.scored_px.numel() == int((r2 <= 36).sum())
    monkeypatch.undo()
    assert main(["train", str(tmp_path / "p.star"), "-o", str(tmp_path / "r2"),
                 "--particle-diameter", "100"]) == 1           # 40 px > the 16-px box
    assert not (tmp_path / "r2").exists()


def test_training_leaves_subnormal_floats_as_they_were(tmp_path, images):
    """train flushes subnormals while it runs (speed on CPUs without hardware bf16) and
    turns that off when it returns: the process's other numerics keep IEEE subnormals."""
    tiny = np.float32(1e-39)                  # subnormal in float32
    assert float(np.float32(tiny) * np.float32(1.0)) != 0.0
    train(small_cfg(tmp_path / "run", epochs=1), data=images)
    assert float(np.float32(tiny) * np.float32(1.0)) != 0.0
    assert torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() != 0.0


def test_train_from_options_is_the_command_as_a_library_call(tmp_path, images, caplog):
    """cryolatent.launch: a new run from the options given, --resume with only the given
    options changing (the others warned about and kept), --force clearing only a run's own
    files; the threads per process."""
    import logging

    from cryolatent.io import write_mrcs
    from cryolatent.launch import (RUN_FILES, clear_run_folder, threads_per_process,
                                   train_from_options)
    from cryolatent.train import resume_config

    write_mrcs(tmp_path / "p.mrcs", images[:60], 1.0)
    opts = {k: v for k, v in vars(small_cfg(tmp_path)).items()
            if k in ("batch_size", "lr", "enc_channels", "kernel", "translation_range",
                     "rotations", "gen_width", "gen_layers", "gen_fourier_features", "z_dim",
                     "translation_prior", "device")}
    out = tmp_path / "run"
    train_from_options(tmp_path / "p.mrcs", out, dict(opts, epochs=1, threads=1), command="x")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["epochs"], cfg["threads"], cfg["command"], cfg["extra"]["cwd"]) == \
        (1, 1, "x", str(Path.cwd()))
    logger = logging.getLogger("cryolatent")
    logger.addHandler(caplog.handler)
    try:
        again = resume_config(out, {"epochs": 2, "z_dim": 5})
    finally:
        logger.removeHandler(caplog.handler)
    assert (again.epochs, again.z_dim) == (2, 2) and "keeping z_dim=2" in caplog.text
    train_from_options(tmp_path / "p.mrcs", out, {"epochs": 2}, resume=True)
    assert len(rows(out)) == 2
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CryolatentError, match="also holds notes.txt"):
        clear_run_folder(out, tmp_path / "p.mrcs")
    (out / "notes.txt").unlink()
    with pytest.raises(CryolatentError, match="no such file"):
        clear_run_folder(out, tmp_path / "gone.mrcs")      # nothing deleted for a bad input
    clear_run_folder(out, tmp_path / "p.mrcs")
    assert not any((out / name).exists() for name in RUN_FILES)
    assert threads_per_process() >= 1
