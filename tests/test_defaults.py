"""Training defaults chosen from the data and the device, convergence stopping, precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryolatent.config import CPU_SIZES, IRL_CPU, IRL_PAPER_SIZES, PAPER_SIZES, TrainConfig
from cryolatent.models import build_model
from cryolatent.train import amp_dtype, converged


def test_cryoem_defaults_on_cpu():
    cfg = TrainConfig(likelihood="gaussian")
    notes = cfg.resolve_defaults(box=64, has_ctf=True, device_type="cpu")
    assert cfg.ctf is True and cfg.mask is True
    assert cfg.translation_range == 10 and cfg.translation_prior == 5.0
    assert (cfg.batch_size, cfg.lr, cfg.gumbel_tau, cfg.kl_warmup, cfg.z_dim) == \
        (32, 1e-3, 0.5, 5.0, 8)
    assert {k: getattr(cfg, k) for k in CPU_SIZES} == CPU_SIZES
    assert any("translation search" in n for n in notes)
    m = build_model(cfg, 64)
    assert m.trange == 10 and m.use_ctf and m.use_mask and m.gumbel_tau == 0.5
    assert m.gconv.channels == CPU_SIZES["enc_channels"]
    assert m.coord_in.out_features == CPU_SIZES["gen_width"]
    # the translation grid is (2T+1)^2 cells per rotation
    assert m.log_p_tr.numel() == 21 * 21 * cfg.rotations


def test_papers_sizes_on_gpu_and_for_sets_without_ctf():
    cfg = TrainConfig(likelihood="bernoulli")
    cfg.resolve_defaults(box=50, has_ctf=False, device_type="cuda")
    assert {k: getattr(cfg, k) for k in PAPER_SIZES} == PAPER_SIZES
    assert cfg.ctf is False and cfg.mask is False
    assert cfg.translation_range == 20 and cfg.translation_prior == 5.0
    assert (cfg.batch_size, cfg.lr, cfg.gumbel_tau, cfg.kl_warmup, cfg.z_dim) == \
        (100, 2e-4, 1.0, 0.0, 2)
    m = build_model(cfg, 50)
    assert m.trange == 20                         # min(box//2, ceil(4 * 5)): MNIST(U)'s grid


def test_explicit_options_are_kept():
    cfg = TrainConfig(likelihood="gaussian", ctf=False, enc_channels=16, translation_range=2,
                      translation_prior=0.7, mask=False, fourier_features=8)
    cfg.resolve_defaults(box=64, has_ctf=True, device_type="cpu")
    assert (cfg.ctf, cfg.enc_channels, cfg.translation_range, cfg.translation_prior,
            cfg.mask, cfg.gen_fourier_features) == (False, 16, 2, 0.7, False, 8)
    assert cfg.gen_width == CPU_SIZES["gen_width"]


def test_irl_inr_papers_settings_on_gpu():
    cfg = TrainConfig(model="irl-inr")
    cfg.resolve_defaults(box=32, has_ctf=True, device_type="cuda")
    assert {k: getattr(cfg, k) for k in IRL_PAPER_SIZES} == IRL_PAPER_SIZES
    assert cfg.inr_fourier_features == 256 and cfg.gen_fourier_features is None
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay) == (128, 1e-4, 5e-4)


def test_irl_inr_cpu_settings_and_explicit_options_kept():
    """On the CPU the paper's networks train at ~13 images/s (32 px): IRL_CPU's sizes, lr and
    batch instead (benchmarks/README.md, issue 15.4); options given are kept."""
    cfg = TrainConfig(model="irl-inr")
    notes = cfg.resolve_defaults(box=32, has_ctf=True, device_type="cpu")
    assert {k: getattr(cfg, k) for k in IRL_CPU} == IRL_CPU
    assert cfg.weight_decay == 5e-4 and cfg.gen_fourier_features is None
    assert any("IRL-INR CPU settings" in n for n in notes)
    m = build_model(cfg, 32)
    assert m.encoder.out_dim == 8 * IRL_CPU["enc_width"]
    assert m.hyper.shapes[0] == (2 * IRL_CPU["inr_fourier_features"], IRL_CPU["inr_width"])
    cfg = TrainConfig(model="irl-inr", enc_width=16, lr=3e-4, inr_fourier_features=64)
    cfg.resolve_defaults(box=32, has_ctf=False, device_type="cpu")
    assert (cfg.enc_width, cfg.lr, cfg.inr_fourier_features, cfg.inr_width) == \
        (16, 3e-4, 64, IRL_CPU["inr_width"])


def test_unresolved_irl_inr_config_builds_the_papers_sizes():
    from cryolatent.models.irl_inr import IRLINR
    m = build_model(TrainConfig(model="irl-inr"), 32)
    assert m.encoder.out_dim == 8 * IRL_PAPER_SIZES["enc_width"]
    with pytest.raises(ValueError, match="enc_width"):      # the model itself takes values
        IRLINR(32, TrainConfig(model="irl-inr"))
    assert m.hyper.shapes[0] == (2 * 256, 256) and len(m.hyper.shapes) == 4


def test_unresolved_config_builds_the_papers_model():
    m = build_model(TrainConfig(), 50)
    assert m.gconv.channels == 128 and m.coord_in.out_features == 512
    assert m.ff.freqs.shape[1] == 256 and not m.use_mask and not m.use_ctf


def test_converged_rule():
    # still falling fast: not converged
    assert not converged([10, 8, 6, 4, 2, 1], window=3, tol=0.01)
    # fell 9, then less than 1 % of that over the last 3 epochs
    assert converged([10, 2, 1.05, 1.03, 1.02, 1.01], window=3, tol=0.01)
    # the same fall but a 5 % step inside the window: not yet
    assert not converged([10, 2, 1.5, 1.45, 1.2, 1.2], window=3, tol=0.01)
    # noise that rises counts as no fall
    assert converged([10, 1.0, 1.1, 1.2, 1.05, 1.3], window=3, tol=0.01)
    # too few epochs
    assert not converged([10, 1, 1, 1], window=3, tol=0.01)
    # never below epoch 1 (did not learn): stop, the summary warns
    assert converged([5, 5.1, 5.2, 5.0, 5.3], window=3, tol=0.01)
    assert converged([1, math.inf, 2, 3, 4], window=3, tol=0.01)


def test_converged_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h = list(np.cumsum(-np.abs(rng.normal(size=rng.integers(5, 12)))) + 100)
        w, tol = int(rng.integers(1, 4)), float(rng.uniform(0.001, 0.2))
        total = h[0] - min(h)
        recent = min(h[:-w]) - min(h)
        want = len(h) >= max(5, w + 1) and (total <= 0 or recent < tol * total)
        assert converged(h, w, tol) == want


def test_amp_dtype():
    cpu = torch.device("cpu")
    assert amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    from cryolatent.train import cpu_has_fast_bf16

    assert amp_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_fast_bf16() else None)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_step_agrees_with_float32(seed):
    """One TARGET-VAE loss under CPU bf16 autocast equals the float32 loss to bf16 accuracy
    (same Gumbel / reparameterisation noise)."""
    cfg = TrainConfig(likelihood="gaussian", z_dim=2, enc_channels=8, gen_width=32,
                      fourier_features=8, translation_range=2, ctf=True, mask=True)
    torch.manual_seed(seed)
    m = build_model(cfg, 16)
    x = torch.randn(6, 16, 16)
    ctf = torch.rand(6, 16, 16) * 2 - 1
    torch.manual_seed(10)
    l32, _ = m.loss(x, ctf)
    torch.manual_seed(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l16, _ = m.loss(x, ctf)
    assert l16.dtype == torch.float32
    assert abs(l16.item() - l32.item()) < 2e-2 * abs(l32.item())


def test_training_stops_when_converged(tmp_path):
    """A run whose validation loss has converged stops before --epochs; the stop is logged
    and the history survives in the checkpoint (resume continues the same test)."""
    import csv

    from test_train import bars, small_cfg
    from cryolatent.train import train

    torch.set_num_threads(1)
    cfg = small_cfg(tmp_path / "run", epochs=30, converge_tol=0.5, converge_window=2,
                    amp="off", early_stop=0)
    rundir = train(cfg, data=bars(100))
    with open(rundir / "log.csv") as f:
        n = len(list(csv.DictReader(f)))
    assert 5 <= n < 30
    assert "converged" in (rundir / "run.log").read_text()
    ck = torch.load(rundir / "checkpoints" / "last.pt", weights_only=True)
    assert len(ck["history"]) == n


def test_kl_warmup_weights_only_the_latent_term_in_training():
    cfg = TrainConfig(likelihood="gaussian", z_dim=3, enc_channels=8, gen_width=16,
                      fourier_features=8, translation_range=2)
    torch.manual_seed(0)
    m = build_model(cfg, 16)
    x = torch.randn(5, 16, 16)

    def run(weight, train):
        m.kl_z_weight = weight
        m.train(train)
        torch.manual_seed(3)
        return m.loss(x)

    full, parts = run(1.0, True)
    half, parts_h = run(0.5, True)
    assert torch.allclose(full, parts["recon"] + parts["kl"], rtol=1e-5)
    assert torch.allclose(half, parts_h["recon"] + parts_h["kl_tr"] + parts_h["kl_theta"]
                          + 0.5 * parts_h["kl_z"], rtol=1e-5)
    assert parts_h["kl_z"] > 0 and half < full
    ev, parts_e = run(0.0, False)             # evaluation: always the ELBO
    assert torch.allclose(ev, parts_e["recon"] + parts_e["kl"], rtol=1e-5)


def test_free_bits_floor_each_latent_dimension():
    """With free bits lambda the training loss counts max(lambda, batch-mean KL_d) per latent
    dimension; the brute-force sum over cells and dimensions agrees."""
    cfg = TrainConfig(likelihood="gaussian", z_dim=3, enc_channels=8, gen_width=16,
                      fourier_features=8, translation_range=2, kl_free_bits=0.7)
    torch.manual_seed(0)
    m = build_model(cfg, 16).train()
    x = torch.randn(4, 16, 16)
    torch.manual_seed(5)
    loss, parts = m.loss(x)
    with torch.no_grad():
        post = m.encode(x)
    q = post["log_q"].exp().double()
    mu, ls = post["z_mu"].double(), post["z_logstd"].double()
    kl_d = np.zeros(3)
    for b in range(4):
        for n in range(q.shape[1]):
            for d in range(3):
                kl_d[d] += float(q[b, n] * (-ls[b, n, d] + 0.5 * (torch.exp(2 * ls[b, n, d])
                                                                  + mu[b, n, d] ** 2) - 0.5))
    kl_d /= 4
    want = (parts["recon"] + parts["kl_tr"] + parts["kl_theta"]).item() + \
        np.maximum(kl_d, 0.7).sum()
    assert abs(loss.item() - want) < 1e-3 * abs(want)
    m.eval()
    torch.manual_seed(5)
    ev, pe = m.loss(x)
    assert torch.allclose(ev, pe["recon"] + pe["kl"], rtol=1e-5)


@pytest.mark.parametrize("opt", [["--converge-window", "0"], ["--kl-warmup", "-1"],
                                 ["--gumbel-tau", "0"], ["--kl-free-bits", "-0.1"],
                                 ["--converge-tol", "-1"], ["--pixel-fraction", "0"],
                                 ["--pixel-fraction", "1.5"]])
def test_bad_new_options_are_one_line_errors(tmp_path, opt):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cryolatent.cli", "train", str(tmp_path / "x.mrcs"),
                        "-o", str(tmp_path / "run"), *opt], capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and opt[0] in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_pixel_fraction_defaults():
    """0.25 for boxes >= 48 px without CTF; 1 with CTF and for small boxes; a fraction below
    1 with the CTF is a one-line error."""
    from cryolatent.config import PIXEL_FRACTION
    from cryolatent.errors import CryolatentError

    cfg = TrainConfig(likelihood="bernoulli")
    notes = cfg.resolve_defaults(box=50, has_ctf=False, device_type="cpu")
    assert cfg.pixel_fraction == PIXEL_FRACTION < 1 and any("random 0.25" in n for n in notes)
    assert build_model(cfg, 50).pixel_fraction == PIXEL_FRACTION
    cfg = TrainConfig(model="irl-inr")
    cfg.resolve_defaults(box=50, has_ctf=False, device_type="cpu")
    assert cfg.pixel_fraction == PIXEL_FRACTION and build_model(cfg, 50).pixel_fraction < 1
    for box, ctf in ((64, True), (32, False)):
        cfg = TrainConfig(likelihood="gaussian")
        cfg.resolve_defaults(box=box, has_ctf=ctf, device_type="cpu")
        assert cfg.pixel_fraction == 1.0
    cfg = TrainConfig(likelihood="gaussian", pixel_fraction=0.5)
    with pytest.raises(CryolatentError, match="pixel-fraction"):
        cfg.resolve_defaults(box=64, has_ctf=True, device_type="cpu")


def test_pixel_fraction_with_ctf_is_a_one_line_error_with_no_output(tmp_path, capsys):
    """`train --pixel-fraction 0.5` on a set with CTF parameters: the CTF mixes every pixel,
    so the command stops with one line naming the option, exit 1, and no run folder."""
    from cryolatent.cli import main
    from cryolatent.simulate.cryoem import simulate_cryoem
    from cryolatent.simulate.synthetic import hinge_pair

    sim = simulate_cryoem(tmp_path / "sim", hinge_pair(atoms=60), n=8, box=16, snr=3.0, seed=0,
                          views=1)
    star = sim if str(sim).endswith(".star") else tmp_path / "sim" / "particles.star"
    rc = main(["train", str(star), "-o", str(tmp_path / "run"), "--pixel-fraction", "0.5",
               "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "--pixel-fraction" in err and "CTF" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", ["target-vae", "irl-inr"])
@pytest.mark.parametrize("data", [None, dict(has_ctf=True), dict(value_range=(0.0, 1.0)),
                                  dict(value_range=(-2.0, 3.0))])
@pytest.mark.parametrize("device", [None, "cpu", "cuda"])
def test_resolve_leaves_nothing_open_and_twice_is_once(model, data, device):
    """resolve() turns options + data + machine into a complete configuration (nothing the
    model or the loop reads is None or "auto"), records the version, and resolving again
    changes nothing."""
    import cryolatent
    from cryolatent.config import DataFacts, missing, resolve

    facts = None if data is None else DataFacts(**data)
    cfg = TrainConfig(model=model)
    assert "z_dim" in missing(cfg) and "likelihood" in missing(cfg)
    done, notes = resolve(cfg, 50, facts, device)
    assert missing(done) == [] and done.version == cryolatent.__version__
    assert cfg.z_dim is None                      # the options given are not changed
    assert resolve(done, 50, facts, device)[0] == done
    if model == "target-vae":
        assert done.kernel == 31 and done.mask_diameter == 50.0


def test_resolve_without_data_is_the_papers_model_and_with_data_train_s():
    """Nothing known of the images: no CTF, Gaussian, every pixel scored (what a model built
    from options alone gets); a set of 50-px images in [0, 1] without CTF: Bernoulli and a
    quarter of the pixels per step, as train chooses."""
    from cryolatent.config import DataFacts, resolve

    plain = resolve(TrainConfig(), 50)[0]
    assert (plain.likelihood, plain.ctf, plain.pixel_fraction, plain.enc_channels) == \
        ("gaussian", False, 1.0, PAPER_SIZES["enc_channels"])
    data = resolve(TrainConfig(), 50, DataFacts(value_range=(0.0, 1.0)), "cpu")[0]
    assert (data.likelihood, data.ctf, data.pixel_fraction, data.enc_channels) == \
        ("bernoulli", False, 0.25, CPU_SIZES["enc_channels"])
    cryo = resolve(TrainConfig(), 64, DataFacts(has_ctf=True, value_range=(-3.0, 4.0)))[0]
    assert (cryo.likelihood, cryo.ctf, cryo.mask, cryo.translation_range) == \
        ("gaussian", True, True, 10)


def test_options_in_angstrom_are_resolved_with_the_pixel_size():
    from cryolatent.config import DataFacts, resolve
    from cryolatent.errors import CryolatentError

    cfg = TrainConfig.from_options(dict(translation_prior=9.0, translation_prior_angst=3.0,
                                        translation_range_angst=5.0, particle_diameter=30.0))
    done, notes = resolve(cfg, 16, DataFacts(apix=2.5))
    assert (done.translation_prior, done.translation_range, done.mask_diameter, done.mask) == \
        (pytest.approx(1.2), 2, pytest.approx(12.0), True)
    assert any("30 Å = 12 px" in n for n in notes)
    assert done.particle_diameter == 30.0          # kept as the record
    with pytest.raises(CryolatentError, match="pixel size is not known"):
        resolve(cfg, 16)


def test_a_config_of_0_1_is_completed_as_its_model_did():
    """No version recorded: the options the model of 0.1.0 filled itself (the kernel, the
    translation grid without CTF, the disc) are filled by that version's frozen rules."""
    from cryolatent.config import complete_v0_1

    old = TrainConfig(likelihood="bernoulli", z_dim=2, ctf=False, mask=False, enc_channels=4,
                      gen_width=16, gen_fourier_features=8, translation_prior=5.0,
                      gumbel_tau=1.0, kl_warmup=0.0, kl_free_bits=0.0, pixel_fraction=1.0,
                      kernel=8)
    c = complete_v0_1(old, 16)
    assert (c.kernel, c.translation_range, c.mask_diameter, c.version) == (9, 8, 16.0, "0.1.0")
    assert complete_v0_1(c, 24) is c               # a versioned configuration stays
