"""Trust signals (cryolatent/analysis/trust.py): FRC and its 0.143 resolution against brute
force, half-set resolution of clean vs noisy classes, the mean-image baseline against numpy,
and end to end: a run on pure noise warns after train, embed and classes; a run that learns
does not say it did not learn."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cryolatent.analysis import trust
from cryolatent.config import TrainConfig
from cryolatent.io import load_particles, write_mrcs, write_star
from cryolatent.train import train


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- FRC
def frc_brute(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FRC by explicit loops over the FFT coefficients (ring = round(|k|))."""
    n = a.shape[0]
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    num = np.zeros(n // 2 + 1)
    pa = np.zeros(n // 2 + 1)
    pb = np.zeros(n // 2 + 1)
    for i in range(n):
        for j in range(n):
            ky = i if i <= n // 2 else i - n
            kx = j if j <= n // 2 else j - n
            r = int(round(math.sqrt(kx * kx + ky * ky)))
            if r > n // 2:
                continue
            num[r] += (fa[i, j] * np.conj(fb[i, j])).real
            pa[r] += abs(fa[i, j]) ** 2
            pb[r] += abs(fb[i, j]) ** 2
    return num / np.sqrt(pa * pb)


def test_frc_identical_is_one_and_independent_noise_is_near_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 64))
    np.testing.assert_allclose(trust.frc(a, a)[1:], 1.0, atol=1e-12)
    np.testing.assert_allclose(trust.frc(a, 3.0 * a + 0.0)[1:], 1.0, atol=1e-12)
    b = rng.normal(size=(64, 64))
    c = trust.frc(a, b)[1:]
    # ring k holds ~2 pi k coefficients: |FRC| ~ 1/sqrt(2 pi k)
    assert abs(c.mean()) < 0.05
    assert np.abs(c[8:]).max() < 0.4


def test_frc_and_resolution_match_brute_force():
    rng = np.random.default_rng(1)
    n, apix = 32, 2.5
    # a smooth signal plus noise: FRC falls from ~1 to ~0 across the rings
    yy, xx = np.mgrid[:n, :n] - n // 2
    sig = np.exp(-(xx ** 2 + (yy / 2) ** 2) / 18.0) + 0.5 * np.exp(-((xx - 5) ** 2 + yy ** 2) / 4)
    a = 10 * sig + rng.normal(0, 0.3, (n, n))
    b = 10 * sig + rng.normal(0, 0.3, (n, n))
    got = trust.frc(a, b)
    ref = frc_brute(a, b)
    np.testing.assert_allclose(got, ref, atol=1e-10)
    res = trust.frc_resolution(got, n, apix)
    # brute force: first ring below 0.143 from ring 1, linear interpolation
    k = next(k for k in range(1, n // 2 + 1) if ref[k] < 0.143)
    assert k >= 2
    kc = (k - 1) + (ref[k - 1] - 0.143) / (ref[k - 1] - ref[k])
    assert res["resolution_A"] == pytest.approx(n * apix / kc, rel=1e-9)
    assert not res["limited_by_nyquist"]
    # the edge cases
    assert trust.frc_resolution(np.ones(17), 32, 1.0) == {
        "resolution_A": 2.0, "ring": 16.0, "limited_by_nyquist": True}
    assert trust.frc_resolution(np.r_[1.0, 0.1, np.ones(15)], 32, 1.0)["resolution_A"] is None


# ----------------------------------------------------------------------------- halves
def _blob(n, cx, cy, sx, sy):
    r = np.arange(n) - n // 2
    y, x = np.meshgrid(r, r, indexing="ij")
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _write_set(tmp_path, name, images, psi, shift_px, labels, apix=2.0):
    n, D = len(images), images.shape[-1]
    write_mrcs(tmp_path / f"{name}.mrcs", images.astype(np.float32), apix)
    table = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{name}.mrcs" for i in range(n)],
        "rlnAnglePsi": psi, "rlnOriginXAngst": shift_px[:, 0] * apix,
        "rlnOriginYAngst": shift_px[:, 1] * apix, "rlnClassNumber": labels,
        "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [D],
                           "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_star(tmp_path / f"{name}.star", table, optics)
    return tmp_path / f"{name}.star", table


def test_half_set_resolution_clean_class_beats_noisy_class_and_poses_agree(tmp_path):
    """Two classes of the same object with the true poses: class 1 at high SNR, class 2 at
    low SNR. Class 1's half-set resolution is finer; both halves agree to ~0 rotation/shift;
    aligning with random poses instead gives no resolved signal."""
    from cryolatent.pose import transform_to_particle

    rng = np.random.default_rng(0)
    D, n = 32, 80
    canon = _blob(D, 0, 0, 5, 2.5) + 0.7 * _blob(D, 5, -4, 2, 2)
    labels = np.repeat([1, 2], n // 2)
    psi = rng.uniform(0, 360, n)
    shift = rng.uniform(-2, 2, (n, 2))
    parts = transform_to_particle(torch.as_tensor(canon).expand(n, D, D), torch.as_tensor(psi),
                                  torch.as_tensor(shift)).numpy()
    noise_sd = np.where(labels == 1, 0.2, 2.0)[:, None, None]
    parts = parts + rng.normal(size=parts.shape) * noise_sd
    star, table = _write_set(tmp_path, "p", parts, psi, shift, labels)
    ps = load_particles(star)
    halves, counts = trust.half_set_averages(ps, table, labels, 2, ctf=False)
    assert halves.shape == (2, 2, D, D) and counts.tolist() == [[20, 20], [20, 20]]
    rep = trust.class_report(halves, counts, 2.0)
    c1, c2 = rep["classes"]
    print(c1["resolution_A"], c2["resolution_A"], c1["pose_residual_psi_deg"],
          c1["pose_residual_shift_A"])
    assert c1["size"] == 40 and c2["size"] == 40
    assert c1["resolution_A"] is not None
    assert c2["resolution_A"] is None or c1["resolution_A"] < c2["resolution_A"]
    # smooth blobs (sd >= 2 px) carry little power past ring ~7 of 32 (9 Å at 2 Å/px)
    assert c1["resolution_A"] < 12.0
    for c in (c1,):
        assert abs(c["pose_residual_psi_deg"]) <= 4.0
        assert np.hypot(*c["pose_residual_shift_A"]) <= 2.0 * 1.5
    # the same particles aligned with wrong (random) poses: no resolved signal in class 1's
    # halves beyond what a blurred disc gives; its resolution is far worse
    bad = table.copy()
    bad["rlnAnglePsi"] = rng.uniform(0, 360, n)
    bad["rlnOriginXAngst"] = rng.uniform(-12, 12, n)
    bad["rlnOriginYAngst"] = rng.uniform(-12, 12, n)
    hb, cb = trust.half_set_averages(ps, bad, labels, 2, ctf=False)
    rb = trust.class_report(hb, cb, 2.0)["classes"][0]
    assert rb["resolution_A"] is None or rb["resolution_A"] > 1.5 * c1["resolution_A"]


def test_identical_classes_are_indistinguishable_distinct_ones_are_not():
    rng = np.random.default_rng(3)
    D = 32
    a = _blob(D, 0, 0, 6, 2) + 0.8 * _blob(D, 5, 4, 2, 2)
    b = _blob(D, -3, 0, 2, 6) + 0.8 * _blob(D, 5, -5, 3, 2)

    def halves(imgs, sd):
        return np.stack([[im + rng.normal(0, sd, im.shape) for _ in range(2)] for im in imgs])

    counts = np.full((2, 2), 50)
    same = trust.class_report(halves([a, a], 0.05), counts, 1.0)
    assert same["indistinguishable_pairs"] and same["indistinguishable_pairs"][0]["classes"] == [1, 2]
    assert any("indistinguishable" in w for w in same["warnings"])
    diff = trust.class_report(halves([a, b], 0.05), counts, 1.0)
    assert diff["indistinguishable_pairs"] == []
    # same object turned by 90 degrees: the rotation search still finds them alike
    same_rot = trust.class_report(halves([a, np.rot90(a).copy()], 0.05), counts, 1.0)
    assert same_rot["indistinguishable_pairs"]


def test_pose_residual_between_halves_finds_a_rotation_and_shift():
    """Half B of a class turned by 30 degrees and moved by 2 px: the residual pose that
    aligns the halves reports them (0 for consistent halves)."""
    from cryolatent.pose import fourier_shift, rotate_images

    D = 32
    a = _blob(D, 0, 0, 6, 2) + 0.8 * _blob(D, 5, 4, 2, 2)
    ta = torch.as_tensor(a)[None]
    b = fourier_shift(rotate_images(ta, 30.0), torch.tensor([[2.0, -1.0]]))[0].numpy()
    rep = trust.class_report(np.stack([[a, a], [a, b]]), np.full((2, 2), 10), 1.5)
    c1, c2 = rep["classes"]
    assert c1["pose_residual_psi_deg"] == 0.0 and c1["pose_residual_shift_A"] == [0.0, 0.0]
    assert abs(abs(c2["pose_residual_psi_deg"]) - 30.0) <= 2.0
    assert np.hypot(*c2["pose_residual_shift_A"]) == pytest.approx(np.hypot(2, 1) * 1.5,
                                                                   abs=1.5)


def test_shift_edge_tells_a_pile_up_from_a_tail():
    """A grid of +-4 px: shifts N(0, 1.2 px) leave the border sparse (no pile-up, even though
    some particles reach it); shifts spread uniformly over the grid, or clipped from
    N(0, 6 px), pile up on it."""
    class Grid(torch.nn.Module):
        trange = 4
        recentre = False
        name = "target-vae"

    rng = np.random.default_rng(0)
    n = 4000
    z = np.zeros((n, 2))
    psi = np.zeros(n)
    tail = trust.shift_edge(Grid(), psi, np.rint(rng.normal(0, 1.2, (n, 2))).clip(-4, 4), z)
    assert tail["search_limit_px"] == 4 and 0 < tail["at_edge_share"] < 0.05 * 2
    assert tail["edge_density_ratio"] < trust.EDGE_RATIO
    uni = trust.shift_edge(Grid(), psi, rng.integers(-4, 5, (n, 2)).astype(float), z)
    assert uni["at_edge_share"] == pytest.approx(1 - (7 / 9) ** 2, abs=0.03)
    assert uni["edge_density_ratio"] == pytest.approx(1.0, abs=0.2)
    wide = trust.shift_edge(Grid(), psi, np.rint(rng.normal(0, 6, (n, 2))).clip(-4, 4), z)
    assert wide["edge_density_ratio"] > 1.5
    assert uni["sampled"] == trust.EDGE_SAMPLE


# ----------------------------------------------------------------------------- baseline
def test_baseline_nll_matches_numpy_brute_force():
    from cryolatent.models import build_model

    rng = np.random.default_rng(0)
    D = 12
    x = rng.normal(1.0, 2.0, (5, D, D))
    m = rng.normal(0.5, 1.0, (D, D))
    s = rng.uniform(0.5, 2.0, (D, D))
    xt, mt, st = (torch.as_tensor(v) for v in (x, m, s))

    def tiny(**kw):
        return build_model(TrainConfig(enc_channels=4, kernel=5, translation_range=1,
                                       gen_width=8, gen_layers=1, fourier_features=4, **kw), D)

    def run(**kw):
        model = tiny(**kw)
        b, f = trust._baseline_parts(model, xt, mt, st)
        return b.numpy(), f.numpy()

    # Gaussian, sigma 1: sum over pixels of (x - m)^2 / 2 + log(2 pi) / 2
    ref = np.array([sum(0.5 * (x[i, r, c] - m[r, c]) ** 2 + 0.5 * math.log(2 * math.pi)
                        for r in range(D) for c in range(D)) for i in range(5)])
    b, f = run(likelihood="gaussian")
    np.testing.assert_allclose(b, ref, rtol=1e-12)
    np.testing.assert_allclose(f, D * D * 0.5 * math.log(2 * math.pi))
    # masked: only the disc of radius D/2
    yy, xx = np.mgrid[:D, :D] - D // 2
    disc = (xx ** 2 + yy ** 2) <= (D / 2) ** 2
    ref_m = (0.5 * (x - m) ** 2 + 0.5 * math.log(2 * math.pi))[:, disc].sum(-1)
    np.testing.assert_allclose(run(likelihood="gaussian", mask=True)[0], ref_m, rtol=1e-12)
    # learned sigma: the per-pixel sd of the training images
    ref_s = (0.5 * ((x - m) / s) ** 2 + np.log(s) + 0.5 * math.log(2 * math.pi)).sum((1, 2))
    np.testing.assert_allclose(run(likelihood="gaussian", learn_sigma=True)[0], ref_s,
                               rtol=1e-12)
    # Bernoulli on [0, 1] data
    xb = rng.uniform(0, 1, (5, D, D))
    mb = rng.uniform(0.05, 0.95, (D, D))
    model = tiny(likelihood="bernoulli")
    b, f = trust._baseline_parts(model, torch.as_tensor(xb), torch.as_tensor(mb), st)
    np.testing.assert_allclose(b, -(xb * np.log(mb) + (1 - xb) * np.log(1 - mb)).sum((1, 2)),
                               rtol=1e-10)
    np.testing.assert_allclose(f, -(xb * np.log(xb) + (1 - xb) * np.log(1 - xb)).sum((1, 2)),
                               rtol=1e-8)

    # IRL-INR's recon is the mean squared error over pixels
    class Plain:
        pass

    b, f = trust._baseline_parts(Plain(), xt, mt, st)
    np.testing.assert_allclose(b.numpy(), ((x - m) ** 2).mean((1, 2)), rtol=1e-12)
    assert (f.numpy() == 0).all()


def test_learn_threshold():
    assert trust.learn_threshold(2, 16 * 16) == pytest.approx(10 / 256)
    assert trust.learn_threshold(8, 64 * 64) == 0.01


# ----------------------------------------------------------------------------- end to end
def _tiny_cfg(star, outdir, **kw):
    base = dict(input=str(star), outdir=str(outdir), epochs=2, batch_size=25, lr=2e-3,
                enc_channels=8, kernel=7, translation_range=3, rotations=4, gen_width=32,
                gen_layers=1, fourier_features=16, z_dim=2, translation_prior=1.5,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings_log():
    h = _Capture()
    logger = logging.getLogger("cryolatent")
    logger.addHandler(h)
    yield h.lines
    logger.removeHandler(h)


def test_run_on_pure_noise_warns_after_train_embed_and_classes(tmp_path, warnings_log):
    """The headline: a couple of epochs of a tiny model on pure noise images. Training,
    embed and classes each say WARNING: the model did not learn; embed/classes also find no
    resolved signal in the class averages."""
    from cryolatent.analysis.class_averages import make_class_averages
    from cryolatent.inference import embed

    rng = np.random.default_rng(0)
    n, D = 200, 16
    noise = rng.normal(size=(n, D, D)).astype(np.float32)
    star, _ = _write_set(tmp_path, "noise", noise, np.zeros(n), np.zeros((n, 2)),
                         np.ones(n, np.int64))
    rundir = train(_tiny_cfg(star, tmp_path / "run"))
    s = json.loads((rundir / "summary.json").read_text())
    assert s["improvement"] < s["improvement_threshold"]
    assert any(w.startswith("the model did not learn") for w in s["warnings"])
    assert any(line.startswith("WARNING: the model did not learn: validation loss is")
               for line in warnings_log)
    assert "WARNING" in (rundir / "run.log").read_text()

    warnings_log.clear()
    out = embed(rundir, star, tmp_path / "emb" / "out.star", clusters=2, device="cpu",
                datadir=tmp_path)
    es = json.loads((tmp_path / "emb" / "out_summary.json").read_text())
    assert es["kind"] == "embed" and len(es["classes"]) == 2
    assert sum(c["size"] for c in es["classes"]) == n
    assert es["shifts"]["search_limit_px"] == 3 and 0 <= es["shifts"]["at_edge_share"] <= 1
    assert es["shifts"]["edge_density_ratio"] >= 0
    assert any("the model did not learn" in line for line in warnings_log)
    assert any("better than pure noise aligned the same way" in w
               for w in es["warnings"])
    assert es["aligned_noise"]["particles"] > 0

    warnings_log.clear()
    res = make_class_averages(rundir, out, tmp_path / "classes", datadir=tmp_path,
                              device="cpu")
    cs = json.loads((tmp_path / "classes" / "summary.json").read_text())
    assert cs["shifts"] == es["shifts"]                # carried over from the embed report
    assert [c["size"] for c in cs["classes"]] == res["counts"].tolist()
    assert any("the model did not learn" in line for line in warnings_log)
    assert any("Einstein from noise" in w for w in cs["warnings"])
    assert not any(c.get("beats_aligned_noise") for c in cs["classes"])
    assert all(v.endswith("(≈ noise)") or v == "no signal"
               for v in trust.gallery_notes(cs).values())
    assert (tmp_path / "classes" / "gallery.png").exists()
    assert tmp_path / "classes" / "summary.json" in res["files"]


def test_run_that_learns_does_not_say_it_did_not_learn(tmp_path, warnings_log):
    """Tiny simulated objects (an L shape, random angle and small shift, in [0, 1]): after
    30 short epochs the model explains most of the variance around the mean image; no
    "did not learn" / "collapsed" warning, and the aligned average has resolved signal well
    above that of noise aligned by the same model. (This tiny run is honestly reported as
    not converged, and its locations spread over its 7 x 7 grid: those signals may fire.)"""
    import sys
    from pathlib import Path

    from cryolatent.inference import embed

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import bars

    imgs = bars(400)
    n = len(imgs)
    star, _ = _write_set(tmp_path, "bars", imgs, np.zeros(n), np.zeros((n, 2)),
                         np.ones(n, np.int64))
    rundir = train(_tiny_cfg(star, tmp_path / "run", epochs=30, lr=5e-3))
    s = json.loads((rundir / "summary.json").read_text())
    # the run's trajectory differs by CPU kind and precision (0.45 on an AMD EPYC, 0.5-0.6 on
    # Intel Xeons): a quarter of the variance is 5x the "did not learn" threshold here
    assert s["improvement"] > max(0.25, 5 * trust.learn_threshold(2, imgs[0].size))
    assert s["latent"]["used_dims"] >= 1
    embed(rundir, star, tmp_path / "out.star", device="cpu", datadir=tmp_path)
    es = json.loads((tmp_path / "out_summary.json").read_text())
    assert es["classes"][0]["resolution_A"] is not None
    assert es["classes"][0]["beats_aligned_noise"] is True
    bad = [w for w in warnings_log if "did not learn" in w or "collapsed" in w
           or "no class average has resolved signal" in w]
    assert bad == []


def test_too_few_validation_images_warned(tmp_path, warnings_log):
    """Issue 23: 269 particles leave 27 validation images, too few to judge convergence;
    summary.json and a WARNING: line say so. 100 validation images (~1,000 particles) do
    not."""
    assert trust.validation_size_warning(99) is not None
    assert trust.validation_size_warning(100) is None
    assert trust.validation_size_warning(0) is None            # no validation set: a note
    rng = np.random.default_rng(3)
    n, D = 150, 16
    star, _ = _write_set(tmp_path, "small", rng.normal(size=(n, D, D)).astype(np.float32),
                         np.zeros(n), np.zeros((n, 2)), np.ones(n, np.int64))
    rundir = train(_tiny_cfg(star, tmp_path / "run", epochs=1))
    s = json.loads((rundir / "summary.json").read_text())
    assert s["validation_images"] == 15
    want = ("too few particles to judge the training: only 15 validation images of 150 "
            "particles (fewer than 100)")
    assert any(w.startswith(want) for w in s["warnings"]), s["warnings"]
    assert any(line.startswith("WARNING: " + want) for line in warnings_log), warnings_log
