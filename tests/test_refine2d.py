"""cryolatent.analysis.refine2d: the 2D-alignment refinement of embed's classes and poses.

Each piece is checked against an independent computation (brute-force likelihood over shifts,
band-limited functions, exact 90° rotations), then the whole EM on small synthetic sets with
known classes and poses, and the command on real files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cryolatent.analysis.refine2d import (
    frame_bits, same_view_groups,
    _shift_window, fourier_pad, refine_classes, rfft_weights, rotated_references,
    score_maps, search_box, shell_index, split_in_two)
from cryolatent.cli import cli, main
from cryolatent.ctf import CTFParams, compute_ctf
from cryolatent.io import read_star, write_mrcs, write_star
from cryolatent.masks import circular_mask
from cryolatent.metrics import cluster_accuracy
from cryolatent.pose import fourier_shift, transform_to_particle
from cryolatent.preprocess import fourier_crop


def _band_limited(n: int, scale: float, D: int) -> torch.Tensor:
    """(1, n, n) float64 sum of cosines with frequencies < D/2 (cycles per D units), sampled
    every ``scale`` units about n//2."""
    c = (torch.arange(n, dtype=torch.float64) - n // 2) * scale
    y, x = torch.meshgrid(c, c, indexing="ij")
    return (torch.cos(2 * math.pi * (3 * x + 5 * y) / D + 0.3)
            + 0.5 * torch.sin(2 * math.pi * (-7 * x + 2 * y) / D))[None]


def test_fourier_pad_is_band_limited_interpolation_and_crop_inverts_it():
    D = 16
    a = _band_limited(D, 1.0, D)
    up = fourier_pad(a, 2 * D)
    assert torch.allclose(up, _band_limited(2 * D, 0.5, D), atol=1e-12)
    x = torch.randn(3, D, D, dtype=torch.float64)
    assert torch.allclose(fourier_crop(fourier_pad(x, 3 * D + 2), D), x, atol=1e-12)


def test_rotated_references_exact_at_90_and_close_to_analytic_at_30():
    D = 32
    c = torch.arange(D, dtype=torch.float64) - D // 2
    y, x = torch.meshgrid(c, c, indexing="ij")

    def blob(px, py):  # smooth, nearly band-limited
        return torch.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * 2.5 ** 2))

    a = (blob(5, -3) + 0.5 * blob(-4, 6))[None]
    angles = torch.tensor([0.0, 90.0, 30.0])
    r = rotated_references(a, angles)[0]                       # (3, D, D)
    assert torch.allclose(r[0], a[0], atol=1e-6)
    # particle(x) = A(R(psi) x): the content at p moves to R(-psi) p
    assert torch.allclose(r[1], transform_to_particle(a, 90.0, torch.zeros(2))[0], atol=1e-4)

    def moved(px, py, deg):
        t = math.radians(deg)
        return blob(math.cos(t) * px + math.sin(t) * py, -math.sin(t) * px + math.cos(t) * py)

    want = moved(5, -3, 30) + 0.5 * moved(-4, 6, 30)
    assert float((r[2] - want).abs().max()) < 0.02


def test_score_maps_equal_the_brute_force_log_likelihood_at_every_shift():
    g = torch.Generator().manual_seed(0)
    D, n, J = 12, 2, 3
    x = torch.randn(n, D, D, generator=g, dtype=torch.float64)
    refs = torch.randn(J, D, D, generator=g, dtype=torch.float64)
    ctf = torch.rand(n, D, D // 2 + 1, generator=g, dtype=torch.float64) * 2 - 1
    sig2 = (torch.rand(D, D // 2 + 1, generator=g, dtype=torch.float64) + 0.5)
    # the noise spectrum and CTF of a real image are Hermitian: symmetrise the half planes
    full = lambda h: torch.fft.fft2(torch.fft.irfft2(h.to(torch.complex128), s=(D, D))).real  # noqa: E731
    ctf = full(ctf)[..., : D // 2 + 1]
    sig2 = full(sig2[None])[0, :, : D // 2 + 1].abs() + 0.5
    maps = score_maps(torch.fft.rfft2(x), ctf, torch.fft.rfft2(refs), 1 / sig2,
                      rfft_weights(D))
    xf_full = torch.fft.fft2(x)
    ctf_full = full(ctf)
    s2_full = full(sig2[None])[0]
    for i in range(n):
        for j in range(J):
            for sx, sy in [(0, 0), (1, 0), (0, -2), (3, 2), (-5, 4)]:
                t = fourier_shift(refs[j][None], torch.tensor([float(sx), float(sy)]))[0]
                res = xf_full[i] - ctf_full[i] * torch.fft.fft2(t)
                ll = -0.5 * (res.abs() ** 2 / s2_full).sum() + \
                    0.5 * (xf_full[i].abs() ** 2 / s2_full).sum()
                assert float(maps[i, j, sy % D, sx % D]) == pytest.approx(float(ll), rel=1e-9,
                                                                         abs=1e-8)


def test_shell_index_and_weights_cover_the_full_plane():
    D = 10
    w = rfft_weights(D)
    assert float((w[None, :] * torch.ones(D, D // 2 + 1)).sum()) == D * D
    s = shell_index(D)
    assert int(s[0, 0]) == 0 and int(s[0, 3]) == 3 and int(s[4, 3]) == 5
    flat, sv = _shift_window(D, 1.5)
    assert sv.shape == (9, 2)


def test_search_box():
    assert search_box(64, 3.0, 12.0) == 32
    assert search_box(256, 1.06, 12.0) == 46
    assert search_box(40, 6.0, 12.0) == 40          # never above the box
    assert search_box(200, 1.0, 40.0) == 32          # never below 32 px


def _shapes(D: int) -> torch.Tensor:
    """(3, D, D) float32 asymmetric test objects (no in-plane symmetry)."""
    c = torch.arange(D, dtype=torch.float64) - D // 2
    y, x = torch.meshgrid(c, c, indexing="ij")

    def b(px, py, s):
        return torch.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * s * s))

    return torch.stack([b(-4, 0, 2.5) + b(3, 0, 1.8) + b(3, 6, 1.8),
                        b(0, -5, 2) + b(0, 4, 2) + b(6, 4, 1.8),
                        b(0, 0, 3) + b(-5, -5, 2)]).float()


def _particles(n: int, D: int, snr_sd: float, ctf=None, seed: int = 0):
    """n particles of the 3 shapes at random ψ and shifts (±2 px), noise sd ``snr_sd``."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    psi = rng.uniform(0, 360, n)
    t = rng.uniform(-2, 2, (n, 2))
    obj = _shapes(D)[cls]
    p = transform_to_particle(obj, torch.as_tensor(psi), torch.as_tensor(t), method="fourier")
    if ctf is not None:
        p = torch.fft.irfft2(torch.fft.rfft2(p) * ctf, s=(D, D))
    p = p + snr_sd * torch.as_tensor(rng.standard_normal((n, D, D)), dtype=torch.float32)
    return p.float(), cls, psi, t


def _psi_consistent(pred, true, cls, tol):
    """Per class, the fraction of particles whose ψ error is within tol of the class's
    circular-median offset (an unsupervised frame is arbitrary up to one rotation)."""
    ok = []
    for k in np.unique(cls):
        d = np.deg2rad(pred[cls == k] - true[cls == k])
        off = np.angle(np.exp(1j * d).mean())
        err = np.rad2deg(np.abs(np.angle(np.exp(1j * (d - off)))))
        ok.append(err <= tol)
    return float(np.concatenate(ok).mean())


def _rough_start(cls, right: float, seed: int) -> np.ndarray:
    """Classes as a model might give them: each right with probability ``right``, else
    random (no poses)."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(cls)) < right, cls, rng.integers(0, 3, len(cls)))


def _rough_psi(psi, seed: int) -> np.ndarray:
    """Angles as rough as a model's: right within ±20° for 60 %, anything for the rest."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(psi)) < 0.6, psi + rng.normal(0, 20, len(psi)),
                    rng.uniform(0, 360, len(psi)))


def test_refine_from_rough_classes_recovers_classes_and_poses():
    D = 24
    x, cls, psi, t = _particles(240, D, 0.5)
    start = _rough_start(cls, 0.4, 1)
    assert cluster_accuracy(start, cls) < 0.7
    psi0 = _rough_psi(psi, 2)
    assert _psi_consistent(psi0, psi, cls, 10.0) < 0.5
    res = refine_classes(x, None, start, iterations=10, psi_step=10.0, max_shift=3,
                         psi_deg=psi0, show_progress=False)
    assert cluster_accuracy(res.labels, cls) >= 0.93
    assert _psi_consistent(res.psi_deg, psi, cls, 10.0) >= 0.8
    assert res.averages.shape == (3, D, D)
    assert res.posterior.shape == (len(x), 3)
    assert np.allclose(res.posterior.sum(1), 1)
    assert len(res.history) >= 2
    # the loss it climbs: the mean log-likelihood does not fall after the first rounds
    ll = [h["loglik"] for h in res.history]
    assert ll[-1] >= ll[1] - 1e-6


def test_refine_with_ctf_models_each_particles_ctf():
    D, n, apix = 24, 240, 4.0
    rng = np.random.default_rng(3)
    params = CTFParams(defocus_u=rng.uniform(8000, 20000, n), defocus_v=rng.uniform(8000, 20000, n),
                       astigmatism=rng.uniform(0, 180, n), voltage=300.0, cs=2.7,
                       amplitude_contrast=0.1, phase_shift=0.0)
    c = compute_ctf(params, D, apix)[..., : D // 2 + 1]
    x, cls, psi, t = _particles(n, D, 0.3, ctf=c, seed=4)
    from cryolatent.analysis.refine2d import ctf_function

    start, psi0 = _rough_start(cls, 0.4, 2), _rough_psi(psi, 3)
    res = refine_classes(x, ctf_function(params, D, apix), start, iterations=10,
                         psi_step=10.0, max_shift=3, psi_deg=psi0, show_progress=False,
                         moves=False)          # the EM's CTF model under test, not the moves
    assert cluster_accuracy(res.labels, cls) >= 0.93
    assert _psi_consistent(res.psi_deg, psi, cls, 10.0) >= 0.8
    # without the CTF model the same data is classified worse or equal
    flat = refine_classes(x, None, start, iterations=10, psi_step=10.0, max_shift=3,
                          psi_deg=psi0, show_progress=False, moves=False)
    assert cluster_accuracy(res.labels, cls) >= cluster_accuracy(flat.labels, cls)


def test_an_emptied_class_is_reseeded_from_the_largest():
    D = 24
    x, cls, psi, t = _particles(240, D, 0.4, seed=5)
    # start: classes 0 and 1 merged into label 0, class 2 -> label 1, label 2 empty but one
    start = np.where(cls == 2, 1, 0)
    start[np.flatnonzero(cls == 2)[0]] = 2
    res = refine_classes(x, None, start, iterations=10, psi_step=10.0, max_shift=3,
                         psi_deg=_rough_psi(psi, 6), show_progress=False, moves=False)
    assert any(h["reseeded"] for h in res.history)
    assert cluster_accuracy(res.labels, cls) >= 0.95


def test_merge_split_move_escapes_a_start_that_em_keeps():
    """Two kinds merged in one class and the third held by two classes in two frames (one
    turned 180°): with the same EM rounds, EM alone keeps most of both mistakes; the merge +
    split move (kept only when the likelihood rises) undoes them."""
    D = 24
    x, cls, psi, t = _particles(300, D, 0.7, seed=11)
    rng = np.random.default_rng(0)
    half = rng.integers(0, 2, len(cls))
    start = np.where(cls == 2, 1 + half, 0)            # 0+1 merged, 2 in two frames
    psi0 = psi + rng.normal(0, 5, len(psi)) + 180.0 * ((cls == 2) & (half == 1))
    kw = dict(iterations=2, psi_step=10.0, max_shift=3, psi_deg=psi0, show_progress=False,
              coarse_start=())
    plain = refine_classes(x, None, start, moves=False, **kw)
    assert cluster_accuracy(plain.labels, cls) < 0.7
    res = refine_classes(x, None, start, **kw)
    assert [m["move"] for m in res.moves][:1] == ["merge+split"]
    assert all(m["loglik_gain"] > 0 for m in res.moves)
    assert cluster_accuracy(res.labels, cls) >= 0.9
    # the kept move raised the likelihood of the whole set, not only of the particles it moved
    assert res.history[-1]["loglik"] > plain.history[-1]["loglik"]


def test_frame_bits_finds_the_particles_turned_by_180_degrees():
    """A nearly 2-fold symmetric object (two equal lobes and a faint third) with half of its
    particles given the angle 180° off: their antisymmetric parts have opposite signs."""
    D, n = 24, 300
    c = torch.arange(D, dtype=torch.float64) - D // 2
    y, xg = torch.meshgrid(c, c, indexing="ij")

    def b(px, py, s):
        return torch.exp(-((xg - px) ** 2 + (y - py) ** 2) / (2 * s * s))

    obj = (b(-4, 0, 2) + b(4, 0, 2) + 0.6 * b(4, 5, 1.5)).float()
    rng = np.random.default_rng(0)
    psi, t = rng.uniform(0, 360, n), rng.uniform(-2, 2, (n, 2))
    x = transform_to_particle(obj.expand(n, D, D), torch.as_tensor(psi), torch.as_tensor(t),
                              method="fourier")
    x = (x + 0.7 * torch.as_tensor(rng.standard_normal((n, D, D)))).float()
    flip = rng.random(n) < 0.4
    bits = frame_bits(x, psi + 180.0 * flip, t, torch.ones(n, D, D // 2 + 1),
                      circular_mask(D, 0.45 * D, edge=3.0))
    assert bits.mean() <= 0.5                          # the smaller frame is the one turned
    assert np.mean(bits == flip) >= 0.9


def test_over_clustering_gives_pure_classes_and_names_those_of_one_view(tmp_path,
                                                                         monkeypatch):
    """Three kinds refined as six classes from random classes: the classes are (nearly) pure,
    and refine's report groups the classes that hold one kind (each group one kind, every
    kind with two or more classes named). The toy's particles are classified ~95 % right
    with three classes; six halve each average's particles."""
    monkeypatch.chdir(tmp_path)
    cls, psi = _star_set(tmp_path, n=300)
    blocks = read_star(tmp_path / "in.star")
    p = blocks["particles"].copy()
    p["rlnClassNumber"] = np.random.default_rng(4).integers(1, 7, len(p))
    write_star(tmp_path / "six.star", p, blocks["optics"])
    r = CliRunner().invoke(cli, ["refine", "six.star", "-o", "r6/refined.star",
                                 "--psi-step", "10", "--iterations", "15", "-j", "1"])
    assert r.exit_code == 0, r.output
    out = read_star(tmp_path / "r6" / "refined.star")["particles"]
    lab = out["rlnClassNumber"].to_numpy(int)
    pure = [np.bincount(cls[lab == k]).max() / (lab == k).sum() for k in np.unique(lab)]
    assert min(pure) >= 0.8
    assert (np.bincount(lab) >= 10).sum() >= 5          # the classes are used, not emptied
    info = json.loads((tmp_path / "r6" / "refined_refine.json").read_text())
    groups = info["same_view_groups"]
    kind = {k: np.bincount(cls[lab == k]).argmax() for k in np.unique(lab)}
    for g in groups:
        assert len({kind[k] for k in g}) == 1          # a group is one kind
    for c in range(3):
        mine = [k for k in kind if kind[k] == c]
        if len(mine) > 1:
            assert any(set(mine) <= set(g) for g in groups)
    # the classes joined by their groups are the three kinds
    joined = lab.copy()
    for g in groups:
        joined[np.isin(lab, g)] = g[0]
    assert cluster_accuracy(joined, cls) >= 0.9


def test_same_view_groups_joins_pairs():
    assert same_view_groups([(1, 4), (4, 6), (2, 5)]) == [[1, 4, 6], [2, 5]]
    assert same_view_groups([]) == []


def test_split_in_two_separates_two_kinds():
    D = 24
    obj = _shapes(D)[:2]
    rng = np.random.default_rng(0)
    k = rng.integers(0, 2, 200)
    imgs = obj[k] + 0.5 * torch.as_tensor(rng.standard_normal((200, D, D)), dtype=torch.float32)
    small = split_in_two(imgs, np.zeros(200), np.zeros((200, 2)),
                         torch.ones(200, D, D // 2 + 1), torch.ones(D, D))
    assert cluster_accuracy(small.astype(int), k) >= 0.97


# ------------------------------------------------------------------------------ command
def _star_set(tmp_path, n=180, D=24, apix=5.0):
    x, cls, psi, t = _particles(n, D, 0.5, seed=7)
    write_mrcs(tmp_path / "p.mrcs", x.numpy(), apix)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(n)],
                       "rlnOpticsGroup": 1,
                       "rlnMicrographName": [f"mic{i % 4}.mrc" for i in range(n)],
                       "rlnClassNumber": _rough_start(cls, 0.4, 0) + 1,
                       "rlnAnglePsi": _rough_psi(psi, 8), "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0})
    optics = pd.DataFrame({"rlnOpticsGroupName": ["g1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [D],
                           "rlnImageDimensionality": [2]})
    write_star(tmp_path / "in.star", df, optics)
    return cls, psi


def test_refine_command_writes_a_relion_star_keeping_every_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)        # image names are written relative to the cwd
    cls, psi = _star_set(tmp_path)
    before = (tmp_path / "in.star").read_bytes()
    out = tmp_path / "out" / "refined.star"
    r = CliRunner().invoke(cli, ["refine", str(tmp_path / "in.star"), "-o", str(out),
                                 "--psi-step", "10", "--iterations", "8", "-j", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "in.star").read_bytes() == before
    p = read_star(out)["particles"]
    src = read_star(tmp_path / "in.star")["particles"]
    assert list(p["rlnImageName"]) == list(src["rlnImageName"])
    assert list(p["rlnMicrographName"]) == list(src["rlnMicrographName"])
    for col in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnMaxValueProbDistribution"):
        assert col in p
    assert cluster_accuracy(p["rlnClassNumber"].to_numpy(int), cls) >= 0.93
    assert _psi_consistent(p["rlnAnglePsi"].to_numpy(float), psi, cls, 10.0) >= 0.8
    info = json.loads((tmp_path / "out" / "refined_refine.json").read_text())
    assert info["search_box"] == 24 and sum(info["class_counts"]) == 180
    from cryolatent.io.mrc import read_header

    h = read_header(tmp_path / "out" / "refined_classes.mrcs")
    assert (h.nx, h.nz) == (24, 3)
    assert (tmp_path / "out" / "refine.log").exists()


def test_pure_noise_through_refine_and_classes_still_warns(tmp_path, monkeypatch, caplog):
    """Pure noise with random starting classes: refine's search makes averages out of noise
    ('Einstein from noise'); its own trust report (OUT_summary.json, against noise aligned by
    the same search) says no class beats aligned noise, and `classes` on OUT.star repeats it.
    Real particles through the same command beat that null."""
    import logging

    monkeypatch.chdir(tmp_path)
    D, n, apix = 24, 240, 5.0
    rng = np.random.default_rng(3)
    write_mrcs(tmp_path / "noise.mrcs", rng.standard_normal((n, D, D)).astype(np.float32), apix)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@noise.mrcs" for i in range(n)],
                       "rlnOpticsGroup": 1, "rlnClassNumber": rng.integers(1, 4, n),
                       "rlnAnglePsi": rng.uniform(0, 360, n), "rlnOriginXAngst": 0.0,
                       "rlnOriginYAngst": 0.0})
    optics = pd.DataFrame({"rlnOpticsGroupName": ["g1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [D],
                           "rlnImageDimensionality": [2]})
    write_star(tmp_path / "noise.star", df, optics)
    caplog.set_level(logging.WARNING, logger="cryolatent")
    r = CliRunner().invoke(cli, ["refine", "noise.star", "-o", "nref/refined.star",
                                 "--psi-step", "10", "--iterations", "4", "-j", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "nref" / "refined_summary.json").read_text())
    assert rep["kind"] == "refine" and rep["aligned_noise"]["particles"] > 0
    assert all(c.get("beats_aligned_noise") is False for c in rep["classes"]
               if c.get("resolution_A") is not None)
    assert any("better than pure noise" in w for w in rep["warnings"])
    info = json.loads((tmp_path / "nref" / "refined_refine.json").read_text())
    assert info["warnings"] == rep["warnings"]
    from cryolatent.analysis.class_averages import make_class_averages

    make_class_averages(None, tmp_path / "nref" / "refined.star", tmp_path / "ncls")
    cl = json.loads((tmp_path / "ncls" / "summary.json").read_text())
    assert any("better than pure noise" in w for w in cl["warnings"])
    noise_snr = max(c["log_snr_above_aligned_noise"] for c in rep["classes"]
                    if c.get("resolution_A") is not None)
    # the same command on particles: their classes stand clearly above refine's null
    _star_set(tmp_path)
    r = CliRunner().invoke(cli, ["refine", "in.star", "-o", "pref/refined.star",
                                 "--psi-step", "10", "--iterations", "6", "-j", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "pref" / "refined_summary.json").read_text())
    real_snr = min(c["log_snr_above_aligned_noise"] for c in rep["classes"]
                   if c.get("resolution_A") is not None)
    assert real_snr > noise_snr + 0.5


def test_refine_command_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    _star_set(tmp_path)
    blocks = read_star(tmp_path / "in.star")
    p = blocks["particles"].drop(columns=["rlnClassNumber"])
    write_star(tmp_path / "noclass.star", p, blocks["optics"])
    out = tmp_path / "o2" / "r.star"
    assert main(["refine", str(tmp_path / "noclass.star"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "noclass.star" in lines[0] and "rlnClassNumber" in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o2").exists()
    assert main(["refine", str(tmp_path / "in.star"), "-o", str(tmp_path / "in.star")]) == 1
    assert "overwrite" in capsys.readouterr().err
