"""Data-parallel training (CPU, gloo): sharding of the global batches, a real ``torchrun``
launch of the CLI, DDP step == single-process step on the same global batch, each particle
seen exactly once per epoch, resume under DDP, and ranks that disagree.

Processes: ``torchrun --nproc_per_node 2 --no-python cryolatent train`` (subprocess) and
``torch.multiprocessing.spawn`` for the in-library checks; one thread per process.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryolatent.data import Batches, ParticleData, shard_bounds, split_indices

D = 16
TINY = dict(enc_channels=8, kernel=7, translation_range=3, rotations=4, gen_width=32,
            gen_layers=1, fourier_features=16, z_dim=2, translation_prior=1.5, device="cpu",
            num_workers=0, lr=2e-3, amp="off")  # float32: the DDP arithmetic is compared exactly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def indexed_bars(n: int, seed: int = 0) -> np.ndarray:
    """Images in [0, 1] (an L-shaped bar) whose pixel (0, 0) encodes the index: (i+1)/1000."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:D, :D] - D // 2
    out = np.zeros((n, D, D), np.float32)
    for i in range(n):
        a = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(a), np.sin(a)
        X, Y = c * xx + s * yy, -s * xx + c * yy
        out[i] = (((np.abs(X) < 5) & (np.abs(Y) < 1.5))
                  | ((np.abs(X - 4) < 1.5) & (np.abs(Y - 2) < 3)))
        out[i, 0, 0] = (i + 1) / 1000.0
    return out


def index_of(x: torch.Tensor) -> list[int]:
    return [int(v) - 1 for v in torch.round(x[:, 0, 0].double() * 1000).tolist()]


def deterministic_noise():
    """TARGET-VAE's Gumbel / reparameterisation noise made constant (u = 0.5, eps = 0), so
    a 2-process step and a 1-process step can be compared exactly."""
    torch.rand_like = lambda t, **k: torch.full_like(t, 0.5)
    torch.randn_like = lambda t, **k: torch.zeros_like(t)


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n,b,w", [(103, 10, 2), (103, 10, 3), (96, 12, 4), (7, 20, 3)])
def test_shards_cover_each_particle_once(n, b, w):
    data = ParticleData.from_source(np.zeros((n, 4, 4), np.float32))
    tr, va = split_indices(n, 0.1, seed=1)
    kw = dict(batch_size=b, device=torch.device("cpu"), seed=1, num_workers=0, resident=True)
    one = Batches(data, tr, va, **kw)
    ranks = [Batches(data, tr, va, rank=r, world_size=w, **kw) for r in range(w)]
    for epoch in (0, 3):
        single = one.train_indices(epoch)
        per = [r.train_indices(epoch) for r in ranks]
        assert all(len(p) == len(single) for p in per)          # same step count everywhere
        for k, g in enumerate(single):                           # global batch k, split
            got = np.concatenate([p[k] for p in per])
            np.testing.assert_array_equal(got, g)                # == the 1-process batch
            sizes = [len(p[k]) for p in per]
            assert max(sizes) - min(sizes) <= 1
        seen = np.concatenate([np.concatenate(p) for p in per])
        assert len(np.unique(seen)) == len(seen)                 # nobody twice
        if len(tr) % b == 0 or len(tr) < b:
            assert set(seen) == set(tr)                          # everybody once
        else:
            assert len(seen) == (len(tr) // b) * b               # the 1-process drop_last rule
        assert ranks[0].global_sizes(epoch) == [len(g) for g in single]
    vals = np.concatenate([np.concatenate(r.val_indices()) for r in ranks])
    np.testing.assert_array_equal(np.sort(vals), va)
    np.testing.assert_array_equal(shard_bounds(7, 3), [0, 3, 5, 7])


# ----------------------------------------------------------------------------- torchrun CLI
def test_torchrun_cli_one_epoch(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    exe = Path(sys.executable).parent / "cryolatent"
    if not torchrun.exists() or not exe.exists():
        pytest.skip("torchrun / cryolatent entry points not installed")
    from cryolatent.io import write_mrcs

    write_mrcs(tmp_path / "p.mrcs", indexed_bars(90), 1.0)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--no-python", str(exe), "train",
           str(tmp_path / "p.mrcs"), "-o", str(tmp_path / "run"), "--epochs", "1",
           "--batch-size", "20", "--val-fraction", "0.2"]
    for k, v in TINY.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [str(tmp_path / "run")]   # rank 0 only
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "log.csv",
                                                     "run.log", "summary.json"]  # rank 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert int(rows[0]["images"]) == 60          # 72 training particles, 3 global batches of 20
    assert np.isfinite(float(rows[0]["val_loss"]))
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["world_size"] == 2 and len(ck["rng_ranks"]) == 2
    assert "2 processes (gloo)" in (run / "run.log").read_text()


# ----------------------------------------------------------------------------- spawn
def _setup_child(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from cryolatent.distributed import setup

    return setup("cpu")


def _child_train(rank: int, world: int, port: int, out: str):
    deterministic_noise()
    from cryolatent.config import TrainConfig
    from cryolatent.models import build_model
    from cryolatent.train import StepRunner, make_optimizer, train
    import cryolatent.train as T

    ctx = _setup_child(rank, world, port)
    out = Path(out)
    try:
        # (1) one optimizer step, uneven global batch 7 -> 4 + 3, vs the 1-process step
        cfg = TrainConfig(likelihood="bernoulli", **TINY)
        torch.manual_seed(rank)        # different init per rank: DDP must broadcast rank 0's
        model = build_model(cfg, D)
        opt, _ = make_optimizer(model, cfg)
        runner = StepRunner(model, opt, torch.device("cpu"), dist=ctx)
        x = torch.from_numpy(indexed_bars(7))
        b = shard_bounds(7, world)
        xl = x[b[rank]:b[rank + 1]]
        runner.train_step(xl, weight=world * len(xl) / 7)
        if rank == 0:
            torch.save({"params": {k: v.clone() for k, v in model.state_dict().items()},
                        "grads": {n: p.grad.clone() for n, p in model.named_parameters()}},
                       out / "step.pt")

        # (2) full epochs through train(): each particle exactly once per epoch
        seen: list[int] = []
        orig = T.StepRunner.train_step

        def rec(self, xb, c=None, weight=1.0):
            seen.extend(index_of(xb))
            return orig(self, xb, c, weight)

        T.StepRunner.train_step = rec
        data = indexed_bars(60)
        kw = dict(TINY, outdir=str(out / "run"), batch_size=10, val_fraction=0.0)
        train(TrainConfig(epochs=1, **kw), data=data, dist=ctx)
        torch.save(seen, out / f"seen_{rank}.pt")
        # (3) --resume under DDP continues from last.pt with per-rank RNG states
        train(TrainConfig(epochs=2, **kw), data=data, dist=ctx, resume=True)
    finally:
        ctx.close()


def _spawn(fn, *args, world=2):
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, free_port()) + args, nprocs=world, join=True)


@pytest.fixture
def noise_off(monkeypatch):
    monkeypatch.setattr(torch, "rand_like", lambda t, **k: torch.full_like(t, 0.5))
    monkeypatch.setattr(torch, "randn_like", lambda t, **k: torch.zeros_like(t))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ddp_step_equals_single_process_and_each_particle_once(tmp_path, noise_off,
                                                               one_thread):
    from cryolatent.config import TrainConfig
    from cryolatent.models import build_model
    from cryolatent.train import StepRunner, make_optimizer, train

    _spawn(_child_train, str(tmp_path))

    # one step: 2 ranks with 4 + 3 images == 1 process with the global batch of 7
    cfg = TrainConfig(likelihood="bernoulli", **TINY)
    torch.manual_seed(0)                              # rank 0's initialisation
    model = build_model(cfg, D)
    opt, _ = make_optimizer(model, cfg)
    StepRunner(model, opt, torch.device("cpu")).train_step(torch.from_numpy(indexed_bars(7)))
    ddp = torch.load(tmp_path / "step.pt", weights_only=True)
    n_skip = n_all = 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(ddp["grads"][n], p.grad, rtol=1e-4, atol=1e-6)
        # Adam's first step is lr * g / (|g| + eps): where g is rounding noise (a direction
        # the loss does not depend on, e.g. the bias of the softmax logits) it is arbitrary
        keep = p.grad.abs() > 1e-4 * p.grad.abs().max()
        n_skip, n_all = n_skip + int((~keep).sum()), n_all + keep.numel()
        torch.testing.assert_close(ddp["params"][n][keep], p.detach()[keep], rtol=1e-5,
                                   atol=1e-6)
    assert n_skip < 0.05 * n_all

    # epoch 1: every training particle exactly once across the two ranks, none twice
    s0 = torch.load(tmp_path / "seen_0.pt")
    s1 = torch.load(tmp_path / "seen_1.pt")
    assert len(s0) == len(s1) == 30 and not set(s0) & set(s1)
    assert sorted(s0 + s1) == list(range(60))

    # the 2-epoch DDP run (1 epoch + resume) == the 1-process run with the same global batch
    run = tmp_path / "run"
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["images"] == "60" for r in rows)
    single = train(TrainConfig(epochs=2, outdir=str(tmp_path / "single"), batch_size=10,
                               val_fraction=0.0, **{k: v for k, v in TINY.items()}),
                   data=indexed_bars(60))
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(single / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    # compare what the models compute (the logit-bias gauge direction drifts by Adam noise)
    from cryolatent.train import load_run

    ma, _ = load_run(run, "cpu", which="last")
    mb, _ = load_run(single, "cpu", which="last")
    x = torch.from_numpy(indexed_bars(16, seed=5))
    ia, ib = ma.infer(x), mb.infer(x)
    torch.testing.assert_close(ia.z_mean, ib.z_mean, rtol=1e-3, atol=1e-4)
    # the same translation cell (exact), and the recentred shift (which moves continuously
    # with the generator's weights) within rounding
    torch.testing.assert_close(ma.infer_internal(x, recentre=False)["u_px"],
                               mb.infer_internal(x, recentre=False)["u_px"])
    torch.testing.assert_close(ia.shift_px, ib.shift_px, rtol=0, atol=5e-3)
    torch.testing.assert_close(ma.loss(x)[0], mb.loss(x)[0], rtol=1e-4, atol=1e-4)
    with open(single / "log.csv") as f:
        srows = list(csv.DictReader(f))
    for r, s in zip(rows, srows):
        assert float(r["train_loss"]) == pytest.approx(float(s["train_loss"]), rel=1e-4)


def _child_disagree(rank: int, world: int, port: int, out: str):
    from cryolatent.config import TrainConfig
    from cryolatent.errors import CryolatentError
    from cryolatent.train import train

    ctx = _setup_child(rank, world, port)
    msgs = []
    try:
        data = indexed_bars(40)
        cases = [  # (config change on rank 1, data change on rank 1)
            ({"lr": 1e-3}, None),
            ({}, "fewer"),
            ({}, "scaled"),
            ({"batch_size": 1}, None),  # an error on rank 1 only
        ]
        for i, (change, dchange) in enumerate(cases):
            kw = dict(TINY, outdir=str(Path(out) / f"r{i}"), epochs=1, batch_size=10,
                      likelihood="bernoulli")
            d = data.copy()
            if rank == 1:
                kw.update(change)
                if dchange == "fewer":
                    d = d[:38]
                elif dchange == "scaled":
                    d = d * 0.9
            try:
                train(TrainConfig(**kw), data=d, dist=ctx)
                msgs.append("no error")
            except CryolatentError as e:
                msgs.append(str(e))
        torch.save(msgs, Path(out) / f"msgs_{rank}.pt")
    finally:
        ctx.close()


def test_ranks_that_disagree_fail_with_one_line(tmp_path, one_thread):
    _spawn(_child_disagree, str(tmp_path))
    m0 = torch.load(tmp_path / "msgs_0.pt")
    m1 = torch.load(tmp_path / "msgs_1.pt")
    for m in m0 + m1:
        assert "\n" not in m
    assert m0[0] == m1[0] and "ranks disagree" in m0[0] and "config.lr" in m0[0]
    assert "0.001" in m0[0] and "0.002" in m0[0]
    assert m0[1] == m1[1] and "particles=38" in m0[1] and "has 40" in m0[1]
    assert m0[2] == m1[2] and "images_sha256" in m0[2]
    assert "--batch-size 1" in m1[3]                       # the failing rank: its own error
    assert m0[3].startswith("rank 1 (") and "--batch-size 1" in m0[3]
    for i in range(4):                                      # nothing written by anybody
        assert not (tmp_path / f"r{i}").exists()


def test_streamed_fast_read_equals_images(tmp_path):
    """The loader's one-copy memmap gather (workers, shared memory) == the stored images."""
    from cryolatent.io import write_mrcs

    x = indexed_bars(50)
    write_mrcs(tmp_path / "p.mrcs", x, 1.0)
    data = ParticleData.from_source(str(tmp_path / "p.mrcs"))
    idx = np.array([1, 4, 5, 17, 49])
    out = np.empty((5, D, D), np.float32)
    np.testing.assert_array_equal(data.read_into(idx, out), x[idx])
    tr, va = split_indices(50, 0.2, seed=2)
    st = Batches(data, tr, va, 8, torch.device("cpu"), seed=2, num_workers=1, resident=False,
                 rank=1, world_size=2)
    got = np.concatenate([b.numpy() for b, _ in st.train(0)])
    want = np.concatenate([x[np.sort(i)] for i in st.train_indices(0)])
    np.testing.assert_array_equal(got, want)
