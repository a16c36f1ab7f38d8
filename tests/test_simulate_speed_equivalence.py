"""The fast cryo-EM simulator against the exact one (``cryolatent/simulate/render.py``).

* each renderer against the analytic projection of Gaussian atoms
  (:func:`cryolatent.simulate.cryoem.render_projections`): the exact matrix-product renderer
  to float rounding; the fixed-view renderer (canonical on a 4x finer grid, then bilinear
  rotation + shift) and the gridded renderer (random views, morph) to correlation >= 0.999 in
  the worst case (isolated point atoms of sd 1 px) and >= 0.9999 on protein-like models;
* the batched, pruned CTF product against the plain centred one, to rounding;
* whole simulated sets (fixed views, random views, junk) against analytic rendering + CTF;
* determinism: the same seed gives the same bytes whatever the chunk size and the number of
  threads.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryolatent.ctf import CTFParams, compute_ctf
from cryolatent.simulate import simulate_cryoem
from cryolatent.simulate.cryoem import (apply_ctf, euler_matrix, load_structure,
                                        render_projections)
from cryolatent.simulate.render import (FineBlur, ViewCache, ctf_filter, ctf_half,
                                        render_exact, render_splat)
from cryolatent.simulate.synthetic import hinge_pair


def _corr(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def _poses(k, seed=0, shift_sd=3.0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 360, k), np.degrees(np.arccos(rng.uniform(-1, 1, k))),
            rng.uniform(0, 360, k), rng.normal(0, shift_sd, (k, 2)))


def _cases(tmp_path, write_pdb):
    """(name, coords, weights, box, apix, blur, min corr): the worst case (5 point atoms,
    sd 1 px) and a protein-like model (hinge_pair, 1 px sd, 64 px)."""
    st = load_structure(write_pdb(tmp_path / "obj.pdb"))
    hinge = hinge_pair(atoms=1500)[0]
    return [("5 atoms, sd 1 px", st.coords, st.weights, 48, 1.0, 1.0, 0.999),
            ("5 atoms, sd 2 px", st.coords, st.weights, 40, 1.0, 2.0, 0.9999),
            ("hinge, 64 px", hinge.coords, hinge.weights, 64, 2.1, 2.1, 0.9999)]


def test_render_exact_is_the_analytic_projection(tmp_path, write_pdb, monkeypatch):
    import cryolatent.simulate.render as render

    st = load_structure(write_pdb(tmp_path / "obj.pdb"))
    rot, tilt, psi, t = _poses(5)
    ref = render_projections(st.coords, st.weights, rot, tilt, psi, t, 40, 1.0, 1.5).numpy()
    A = euler_matrix(rot, tilt, psi)
    for block in (8192, 2):                      # the atoms summed in one block or in three
        monkeypatch.setattr(render, "ATOM_BLOCK", block)
        for i in range(5):
            got = render_exact(st.coords, st.weights, A[i], t[i], 40, 1.0, 1.5).numpy()
            assert np.abs(got - ref[i]).max() < 1e-5 * np.abs(ref[i]).max()


def test_fixed_view_renderer_matches_the_analytic_projection(tmp_path, write_pdb):
    """Canonical at 4x, then bilinear R(psi)(x + t): the pose convention is RELION's (the
    same image as rendering every atom at (rot, tilt, psi, t)), the error small."""
    for name, coords, w, box, apix, blur, floor in _cases(tmp_path, write_pdb):
        rot, tilt, psi, t = _poses(6, seed=1)
        radius = float(np.sqrt((coords ** 2).sum(1)).max()) / apix
        cache = ViewCache(box, apix, blur, radius)
        ref = render_projections(coords, w, rot, tilt, psi, t, box, apix, blur).numpy()
        for i in range(6):
            can = cache.canonical(i, coords, w, euler_matrix(rot[i], tilt[i], 0.0)[0])
            got = cache.particles(can, psi[i:i + 1], t[i:i + 1])[0].numpy()
            c = _corr(got, ref[i])
            assert c >= floor, (name, i, c)
            assert np.linalg.norm(got - ref[i]) < 0.02 * np.linalg.norm(ref[i]), name
            # the integral (sum of Z) is kept
            assert got.sum() == pytest.approx(ref[i].sum(), rel=2e-3)
        # a sign error in psi would be far off
        bad = cache.particles(can, -psi[5:6], t[5:6])[0].numpy()
        assert _corr(bad, ref[5]) < 0.9


def test_gridded_renderer_matches_the_analytic_projection(tmp_path, write_pdb):
    for name, coords, w, box, apix, blur, floor in _cases(tmp_path, write_pdb):
        rot, tilt, psi, t = _poses(6, seed=2)
        fine = FineBlur(box, blur / apix)
        ref = render_projections(coords, w, rot, tilt, psi, t, box, apix, blur).numpy()
        A = euler_matrix(rot, tilt, psi)
        for i in range(6):
            got = render_splat(coords, w, A[i], t[i], fine, apix).numpy()
            c = _corr(got, ref[i])
            assert c >= floor, (name, i, c)
            assert np.linalg.norm(got - ref[i]) < 0.02 * np.linalg.norm(ref[i]), name


def test_real_structure_at_box_128(shared_data):
    """Adenylate kinase (2,952 atoms) at 128 px, 1 Å/px (sd 1 px): both fast renderers
    against the analytic projection, correlation >= 0.9999."""
    st = load_structure(shared_data / "structures" / "adk_open_4AKE_MDA.pdb")
    box, apix, blur = 128, 1.0, 1.0
    rot, tilt, psi, t = _poses(3, seed=3)
    ref = render_projections(st.coords, st.weights, rot, tilt, psi, t, box, apix, blur).numpy()
    cache = ViewCache(box, apix, blur, st.radius / apix)
    fine = FineBlur(box, blur / apix)
    A = euler_matrix(rot, tilt, psi)
    for i in range(3):
        can = cache.canonical(i, st.coords, st.weights, euler_matrix(rot[i], tilt[i], 0)[0])
        fixed = cache.particles(can, psi[i:i + 1], t[i:i + 1])[0].numpy()
        grid = render_splat(st.coords, st.weights, A[i], t[i], fine, apix).numpy()
        assert _corr(fixed, ref[i]) >= 0.9999 and _corr(grid, ref[i]) >= 0.9999


def test_ctf_product_equals_the_centred_full_transform(tmp_path, write_pdb):
    """ctf_filter (corner placement, rfft, zero rows skipped, transposed half spectrum) ==
    apply_ctf (image centred on the 2x canvas, full complex FFT, compute_ctf), and ctf_half is
    compute_ctf's half spectrum. (The two differ at the Nyquist frequency only, where the full
    transform's astigmatic CTF is not symmetric; the test images, projections with 2-px
    Gaussians, hold nothing there, as simulated particles do not.)"""
    rng = np.random.default_rng(0)
    n, D, apix = 5, 36, 1.3
    p = CTFParams(defocus_u=rng.uniform(9000, 20000, n), defocus_v=rng.uniform(8000, 9000, n),
                  astigmatism=rng.uniform(0, 180, n), voltage=300.0, cs=2.7,
                  amplitude_contrast=0.1, phase_shift=0.0)
    full = compute_ctf(p, 2 * D, apix).numpy()                         # (n, P, P) [ky, kx]
    half = ctf_half(p, 2 * D, apix).numpy()                            # (n, H, P) [kx, ky]
    # (column D, the Nyquist frequency, is -1/2 in compute_ctf and +1/2 in the half grid)
    np.testing.assert_allclose(half[:, :D], full[:, :, :D].transpose(0, 2, 1), atol=2e-4)
    st = load_structure(write_pdb(tmp_path / "obj.pdb"))
    rot, tilt, psi, t = _poses(n, seed=5)
    img = render_projections(st.coords, st.weights, rot, tilt, psi, t, D, 1.0, 2.0)
    ref = apply_ctf(img, p, apix).numpy()
    got = ctf_filter(img, ctf_half(p, 2 * D, apix)).numpy()
    assert np.abs(got - ref).max() < 2e-4 * np.abs(ref).max()
    # one image alone gives the same bytes as in a batch
    one = ctf_filter(img[2:3], ctf_half(p.subset([2]), 2 * D, apix)).numpy()
    np.testing.assert_array_equal(one[0], got[2])


@pytest.mark.parametrize("views", [3, None])
def test_simulated_particles_are_the_analytic_projections_through_the_ctf(tmp_path, write_pdb,
                                                                        views):
    """A whole set, fixed views (interpolated) and random views (gridded): every particle
    against the analytic projection at its truth pose through its CTF, up to the set's one
    scale: correlation >= 0.999 each."""
    from cryolatent.io import read_star
    import mrcfile

    pdb = write_pdb(tmp_path / "obj.pdb")
    out = tmp_path / "sim"
    simulate_cryoem(out, [pdb], n=24, box=40, apix=1.0, snr=None, seed=7, views=views,
                    shift_sd=2.0, blur=1.5)
    tab = read_star(out / "particles.star")["particles"]
    imgs = np.asarray(mrcfile.read(out / "particles.mrcs"), np.float64)
    st = load_structure(pdb)
    proj = render_projections(st.coords, st.weights, tab.rlnAngleRot, tab.rlnAngleTilt,
                              tab.rlnAnglePsi, np.c_[tab.rlnOriginXAngst, tab.rlnOriginYAngst],
                              40, 1.0, 1.5)
    ref = apply_ctf(proj, CTFParams.from_relion(tab, read_star(out / "particles.star")
                                                ["optics"]), 1.0).double().numpy()
    k = (imgs * ref).sum() / (ref * ref).sum()
    for i in range(len(tab)):
        assert _corr(imgs[i], ref[i]) >= 0.999, i
    assert np.linalg.norm(imgs - k * ref) < 0.01 * np.linalg.norm(imgs)


def _set(tmp_path, name, **kw):
    import mrcfile

    from cryolatent.io import read_star

    out = tmp_path / name
    simulate_cryoem(out, **kw)
    tab = read_star(out / "particles.star")["particles"].drop(columns="rlnImageName")
    return tab, np.asarray(mrcfile.read(out / "particles.mrcs"))


@pytest.mark.parametrize("views", [2, None])
def test_same_bytes_for_any_chunk_size_and_thread_count(tmp_path, write_pdb, views):
    """Fixed and random views, with junk (pairs and aggregates render extra particles), CTF
    and noise: chunks of 256, 7 and 1 and 1 or 2 threads write the same images and truth;
    another seed does not."""
    pdb = write_pdb(tmp_path / "obj.pdb")
    pdb2 = write_pdb(tmp_path / "obj2.pdb", [("S", (5, 5, 0)), ("S", (-5, -5, 0)),
                                              ("C", (0, 9, 1))])
    kw = dict(structures=[pdb, pdb2], n=40, box=32, apix=1.0, snr=2.0, seed=3, views=views,
              blur=1.2, junk=0.4)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ta, a = _set(tmp_path, "a", **kw)
        tb, b = _set(tmp_path, "b", chunk=7, **kw)
        tc, c = _set(tmp_path, "c", chunk=1, **kw)
        torch.set_num_threads(2)
        td, d = _set(tmp_path, "d", chunk=5, **kw)
        te, e = _set(tmp_path, "e", **{**kw, "seed": 4})
    finally:
        torch.set_num_threads(old)
    for t, x in ((tb, b), (tc, c), (td, d)):
        np.testing.assert_array_equal(x, a)
        assert t.equals(ta)
    assert not np.array_equal(e, a)


def test_first_particles_of_a_larger_set_are_the_same(tmp_path, write_pdb):
    """The first m particles of a set of n >= m are those of the set of m when m >= 256 (the
    scale comes from the first 256 rows, whatever n and the chunk size)."""
    pdb = write_pdb(tmp_path / "obj.pdb")
    kw = dict(structures=[pdb], box=24, apix=1.0, snr=1.0, seed=9, views=3, blur=1.2)
    _, small = _set(tmp_path, "small", n=260, **kw)
    _, large = _set(tmp_path, "large", n=300, chunk=100, **kw)
    np.testing.assert_array_equal(large[:260], small)
