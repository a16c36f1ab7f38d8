"""Junk in the simulator (``simulate cryoem --junk``) and in ``evaluate`` (junk kept, good
particles lost, class metrics on the real particles only). Tiny sets (≤ 80 picks, 32–64 px,
a five-atom object)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cryolatent import metrics
from cryolatent.io import read_star, write_star
from cryolatent.simulate import simulate_cryoem
from cryolatent.simulate.cryoem import load_structure, mask_disc
from cryolatent.simulate.junk import (JUNK_KINDS, JUNK_VARIANCE, carbon_edge,
                                      cluster_members, empty_image, ice_blob, junk_rows)


def _read(out):
    import mrcfile

    tab = read_star(out / "particles.star")["particles"]
    return tab, np.asarray(mrcfile.read(out / "particles.mrcs"), dtype=np.float64)


# --------------------------------------------------------------------------- generators
def test_junk_rows_exact_fraction_and_uniform_kinds():
    codes = junk_rows(np.random.default_rng(0), 2000, 0.3)
    assert codes.shape == (2000,) and (codes > 0).sum() == 600
    counts = np.bincount(codes[codes > 0], minlength=6)[1:]
    assert counts.sum() == 600 and (counts > 0).all()
    # uniform among the five: a loose chi-square (df 4, p ~ 1e-4 at 23.5)
    exp = 600 / 5
    assert ((counts - exp) ** 2 / exp).sum() < 23.5
    assert not junk_rows(np.random.default_rng(0), 50, 0.0).any()
    assert (junk_rows(np.random.default_rng(0), 7, 1.0) > 0).all()
    from cryolatent.errors import CryolatentError

    with pytest.raises(CryolatentError, match="--junk"):
        junk_rows(np.random.default_rng(0), 10, 1.5)


@pytest.mark.parametrize("seed", range(4))
def test_carbon_edge_is_a_step_along_its_angle(seed):
    size, r = 48, 12.0
    img, p = carbon_edge(np.random.default_rng(seed), size, r)
    a, off, w = math.radians(p["angle_deg"]), p["offset_px"], p["width_px"]
    assert abs(off) <= 0.8 * r and 1.0 <= w <= max(1.0, r / 4)
    c = np.arange(size) - size // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    s = x * math.cos(a) + y * math.sin(a) - off          # distance along the stated normal
    assert (img[s >= w / 2] == 1).all() and (img[s <= -w / 2] == 0).all()
    ramp = np.abs(s) < w / 2
    np.testing.assert_allclose(img[ramp], s[ramp] / w + 0.5, atol=1e-12)
    # independently: the mean gradient points along the stated angle (finite differences)
    gy, gx = np.gradient(img)
    got = math.degrees(math.atan2(gy.sum(), gx.sum())) % 360
    assert min(abs(got - p["angle_deg"]), 360 - abs(got - p["angle_deg"])) < 1.0
    img0, _ = carbon_edge(np.random.default_rng(seed), size, r)
    np.testing.assert_array_equal(img, img0)             # a pure function of the generator


def test_ice_blob_is_large_smooth_and_positive():
    size, r = 64, 10.0
    for seed in range(4):
        img, p = ice_blob(np.random.default_rng(seed), size, r)
        assert img.min() >= 0 and img.max() == pytest.approx(1.0)
        assert 1 <= len(p["sd_px"]) <= 3 and (p["sd_px"] >= 0.5 * r).all()
        # large: more pixels above half maximum than a Gaussian of sd r/2 has (pi (1.177 r/2)^2)
        assert (img >= 0.5).sum() >= math.pi * (1.177 * r / 2) ** 2 * 0.9
        # smooth: no power above 0.15 cycles/px (> 4.7 spectral sd of the narrowest blob)
        f = np.fft.fftfreq(size)
        fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
        pw = np.abs(np.fft.fft2(img - img.mean())) ** 2
        assert pw[fr > 0.15].sum() < 1e-6 * pw.sum()


def test_empty_and_cluster_members():
    img, p = empty_image(16)
    assert img.shape == (16, 16) and not img.any() and p == {}
    r = 10.0
    for seed in range(6):
        m = cluster_members(np.random.default_rng(seed), "pair", 3, r)
        assert len(m["psi"]) == 1 and set(m["structure"]) <= {0, 1, 2}
        d = np.hypot(*m["offset_px"][0])
        assert 0.5 * r <= d <= 1.5 * r                   # they overlap (< 2 radii)
        a = cluster_members(np.random.default_rng(seed), "aggregate", 2, r,
                            views=(np.array([10.0, 20.0]), np.array([30.0, 40.0])))
        assert 2 <= len(a["psi"]) <= 5                     # 3-6 particles with the row's own
        assert (np.hypot(*a["offset_px"].T) <= 1.2 * r).all()
        assert set(a["rot"]) <= {10.0, 20.0} and set(a["tilt"]) <= {30.0, 40.0}


# --------------------------------------------------------------------------- the simulator
def test_simulated_junk_rows_truth_and_signal(tmp_path, write_pdb):
    """25 % of 80 picks are junk: class 0, their kind named; the particles are the very images
    of the set without junk; empty picks hold nothing before the noise; ice and carbon have
    the drawn variance in the particle disc; the noise is the particles' noise."""
    pdb = write_pdb(tmp_path / "obj.pdb")
    kw = dict(n=80, box=32, apix=1.0, seed=5, blur=1.5, shift_sd=1.0)
    simulate_cryoem(tmp_path / "plain", [pdb], snr=math.inf, **kw)
    simulate_cryoem(tmp_path / "clean", [pdb], snr=math.inf, junk=0.25, **kw)
    simulate_cryoem(tmp_path / "noisy", [pdb], snr=0.5, junk=0.25, **kw)
    plain_t, plain = _read(tmp_path / "plain")
    tab, clean = _read(tmp_path / "clean")
    tab_n, noisy = _read(tmp_path / "noisy")
    assert len(tab) == 80 and clean.shape == (80, 32, 32)
    junk = tab["rlnClassNumber"].to_numpy() == 0
    assert junk.sum() == 20
    kind = tab["cryolatentJunkKind"].to_numpy()
    assert (kind[~junk] == "none").all() and set(kind[junk]) <= set(JUNK_KINDS)
    assert len(set(kind[junk])) >= 3
    pd.testing.assert_frame_equal(tab.drop(columns="rlnImageName"),
                                  tab_n.drop(columns="rlnImageName"))
    # the particles: rows, truth and pixels of the set without junk
    np.testing.assert_array_equal(clean[~junk], plain[~junk])
    np.testing.assert_array_equal(tab["rlnClassNumber"][~junk], plain_t["rlnClassNumber"][~junk])
    assert not np.array_equal(clean[junk], plain[junk])
    # empty: nothing at all before the noise
    e = kind == "empty"
    if e.any():
        assert not clean[e].any()
    # ice / carbon: pixel variance in the particle disc as drawn (after CTF, set's scale)
    disc = mask_disc(32, min(load_structure(pdb).radius / 1.0, 16))
    for k, (lo, hi) in JUNK_VARIANCE.items():
        v = clean[kind == k][:, disc].var(axis=1)
        assert ((v > lo * 0.999) & (v < hi * 1.001)).all(), (k, v)
    # the noise: the same white noise of variance 1/snr on every pick, junk or not
    noise = noisy - clean
    assert abs(noise[junk].var() - 2.0) < 0.15 and abs(noise[~junk].var() - 2.0) < 0.1


def test_pair_and_aggregate_hold_two_and_three_to_six_particles(tmp_path, write_pdb):
    """Without CTF and noise, a pick's pixel sum is its density: a pair holds exactly two
    particles' worth, an aggregate 3-6 (the members lie inside the 64-px box)."""
    pdb = write_pdb(tmp_path / "obj.pdb")
    simulate_cryoem(tmp_path / "s", [pdb], n=60, box=64, apix=1.0, snr=None, seed=1,
                    blur=1.0, ctf=False, centered=True, junk=0.8)
    tab, img = _read(tmp_path / "s")
    kind = tab["cryolatentJunkKind"].to_numpy()
    sums = img.sum(axis=(1, 2))
    one = sums[kind == "none"]
    # (the 4-sd truncation of each atom's Gaussian moves a sum by < 1e-3)
    assert len(one) == 12 and np.ptp(one) < 2e-3 * one.mean()
    ratio = sums / one.mean()
    assert (kind == "pair").any() and (kind == "aggregate").any()
    np.testing.assert_allclose(ratio[kind == "pair"], 2.0, atol=5e-3)
    agg = ratio[kind == "aggregate"]
    np.testing.assert_allclose(agg, np.round(agg), atol=1e-2)
    assert set(np.round(agg).astype(int)) <= {3, 4, 5, 6}


def test_junk_zero_is_bit_identical_and_cli(tmp_path, write_pdb):
    """--junk 0 (and no --junk) write the same stack bytes and truth as before; --junk F via
    the CLI writes the class-0 rows and their kinds; --junk outside [0, 1] is one line."""
    from cryolatent.cli import main

    pdb = write_pdb(tmp_path / "obj.pdb")
    base = ["simulate", "cryoem", "--n", "30", "--box", "32", "--apix", "1", "--snr", "2",
            "--structure", str(pdb), "--seed", "3", "--device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "a")]) == 0
    assert main([*base, "-o", str(tmp_path / "b"), "--junk", "0"]) == 0
    assert (tmp_path / "a" / "particles.mrcs").read_bytes() == \
        (tmp_path / "b" / "particles.mrcs").read_bytes()
    ta, tb = (read_star(tmp_path / d / "particles.star")["particles"] for d in "ab")
    assert "cryolatentJunkKind" not in tb.columns
    pd.testing.assert_frame_equal(ta.drop(columns="rlnImageName"),
                                  tb.drop(columns="rlnImageName"))
    assert main([*base, "-o", str(tmp_path / "c"), "--junk", "0.2"]) == 0
    tc = read_star(tmp_path / "c" / "particles.star")["particles"]
    assert (tc["rlnClassNumber"] == 0).sum() == 6
    assert ((tc["cryolatentJunkKind"] != "none") == (tc["rlnClassNumber"] == 0)).all()
    assert main([*base, "-o", str(tmp_path / "d"), "--junk", "1.5"]) == 1
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- evaluate
def _truth_with_junk(n_good=10, n_junk=10, seed=0):
    rng = np.random.default_rng(seed)
    n = n_good + n_junk
    cls = np.r_[np.arange(n_good) % 2 + 1, np.zeros(n_junk, np.int64)]
    kinds = np.r_[["none"] * n_good, [JUNK_KINDS[i % 5] for i in range(n_junk)]]
    return pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@sim/particles.mrcs" for i in range(n)],
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(0, 3, n), "rlnOriginYAngst": rng.normal(0, 3, n),
        "rlnClassNumber": cls, "cryolatentJunkKind": kinds})


def test_evaluate_reports_junk_kept_and_good_lost():
    truth = _truth_with_junk()
    # the prediction: every good particle (perfect poses, classes 1 <-> 2 swapped) + junk 0-2
    keep = np.r_[np.arange(10), 10, 11, 12]
    pred = truth.iloc[keep].copy()
    pred["rlnAnglePsi"] = pred["rlnAnglePsi"] + 30.0
    pred["rlnClassNumber"] = np.r_[3 - truth["rlnClassNumber"][:10], [1, 1, 2]]
    pred = pred.sample(frac=1.0, random_state=1).drop(columns="cryolatentJunkKind")
    r = metrics.evaluate_tables(pred, truth)
    assert r["junk_in_truth"] == 10 and r["junk_kept"] == 3
    assert r["junk_kept_fraction"] == pytest.approx(0.3)
    assert r["good_in_truth"] == 10 and r["good_lost"] == 0 and r["good_lost_fraction"] == 0
    assert r["junk_kept_by_kind"] == {"aggregate": 0.0, "carbon": 0.5, "empty": 0.5,
                                      "ice": 0.5, "pair": 0.0}
    # the class and pose metrics see the 10 real particles only (junk's classes ignored)
    assert r["n"] == 10 and r["n_pred"] == 13
    assert r["cluster_accuracy"] == 1.0 and r["ari"] == pytest.approx(1.0)
    assert r["rotation_agreement_per_class"] == pytest.approx(1.0)
    # two good particles lost, no junk kept
    r = metrics.evaluate_tables(truth.iloc[2:10], truth)
    assert r["junk_kept"] == 0 and r["junk_kept_fraction"] == 0.0
    assert r["good_lost"] == 2 and r["good_lost_fraction"] == pytest.approx(0.2)
    assert r["n"] == 8
    # a truth without junk: the keys of before, nothing more
    clean = truth.iloc[:10]
    r = metrics.evaluate_tables(clean.iloc[:6], clean)
    assert "junk_kept" not in r and "n_pred" not in r and r["n"] == 6


def test_evaluate_files_on_a_selected_subset(tmp_path, capsys):
    """The CLI on STAR files: a subset (fewer rows than the truth) of good + junk picks."""
    from cryolatent.cli import main

    truth = _truth_with_junk(n_good=8, n_junk=4)
    write_star(tmp_path / "truth.star", truth, None)
    write_star(tmp_path / "sel.star", truth.iloc[[0, 1, 2, 3, 4, 5, 9]], None)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "sel.star"), "--truth",
                 str(tmp_path / "truth.star")]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["junk_kept"] == 1 and r["junk_kept_fraction"] == pytest.approx(0.25)
    assert r["good_lost"] == 2 and r["good_lost_fraction"] == pytest.approx(0.25)
    assert r["n"] == 6 and r["n_pred"] == 7 and r["cluster_accuracy"] == 1.0
