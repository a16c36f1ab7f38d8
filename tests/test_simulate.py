"""Simulators: MNIST(U)/(N) statistics and truth, cryo-EM projection geometry, SNR, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from cryolatent import pose
from cryolatent.io import read_star
from cryolatent.simulate import simulate_cryoem, simulate_mnist
from cryolatent.simulate.cryoem import (apply_ctf, euler_matrix, fibonacci_views,
                                        load_structure, render_projections)
from cryolatent.simulate.mnist import pad_digits


def _read(out):
    import mrcfile

    blocks = read_star(out / "particles.star")
    imgs = mrcfile.read(out / "particles.mrcs")
    return blocks["particles"], blocks["optics"], np.asarray(imgs, dtype=np.float64)


# --------------------------------------------------------------------------- MNIST

@pytest.fixture(scope="module")
def mnist_file(shared_data):
    return shared_data / "mnist" / "mnist.npz"


def test_mnist_u_truth_recovers_the_padded_digit(tmp_path, mnist_file):
    n = 200
    simulate_mnist(tmp_path, "u", n=n, seed=5, mnist=mnist_file, split="test")
    tab, optics, imgs = _read(tmp_path)
    with np.load(mnist_file) as z:
        digits, labels = z["x_test"][:n], z["y_test"][:n]
    assert imgs.shape == (n, 50, 50) and imgs.min() >= 0.0 and imgs.max() <= 1.0
    # names relative to the current directory, or absolute where the set lies outside it
    stack = tmp_path.resolve() / "particles.mrcs"
    assert list(tab.rlnImageName[:2]) == [f"000001@{stack}", f"000002@{stack}"]
    assert np.array_equal(tab.rlnClassNumber.to_numpy(), labels + 1)
    assert float(optics.rlnImagePixelSize[0]) == 1.0 and int(optics.rlnImageSize[0]) == 50
    canon = pad_digits(digits, 50).astype(np.float64)
    # the digit field's centre (14, 14) sits on the rotation centre (25, 25)
    assert np.allclose(canon[:, 11:39, 11:39] * 255, digits.astype(np.float64), atol=1e-4)
    psi = tab.rlnAnglePsi.to_numpy()
    t = np.c_[tab.rlnOriginXAngst, tab.rlnOriginYAngst] / 1.0
    x = torch.from_numpy(imgs)
    # only digits that stayed inside the box can be recovered whole
    inside = np.abs(t).max(1) < 8
    good = pose.align_particles(x, psi, t).numpy()
    wrong = pose.align_particles(x, -psi, t).numpy()          # a sign error in psi
    swap = pose.align_particles(x, psi, -t).numpy()           # a sign error in t

    def corr(a, b):
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        a = a - a.mean(1, keepdims=True)
        b = b - b.mean(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))

    cg = corr(good, canon)[inside]
    assert np.median(cg) > 0.9 and cg.min() > 0.75
    assert np.median(corr(wrong, canon)[inside]) < 0.6
    assert np.median(corr(swap, canon)[inside]) < 0.6


def test_mnist_pose_statistics(tmp_path, mnist_file):
    n = 3000
    simulate_mnist(tmp_path / "u", "u", n=n, seed=11, mnist=mnist_file)
    simulate_mnist(tmp_path / "n", "n", n=n, seed=12, mnist=mnist_file)
    tu, _, iu = _read(tmp_path / "u")
    tn, _, _ = _read(tmp_path / "n")
    psi_u = pose.wrap_deg(tu.rlnAnglePsi.to_numpy())
    assert stats.kstest(psi_u / 360.0, "uniform").pvalue > 1e-3
    psi_n = tn.rlnAnglePsi.to_numpy()                      # (-180, 180]
    assert abs(psi_n.mean()) < 3 * 45 / math.sqrt(n)
    assert abs(psi_n.std() - 45.0) < 2.5                    # N(0, (π/4)²) rad
    for tab in (tu, tn):
        for col in ("rlnOriginXAngst", "rlnOriginYAngst"):
            v = tab[col].to_numpy()
            assert abs(v.std() - 5.0) < 0.3 and abs(v.mean()) < 0.35
    assert iu.min() >= 0.0 and iu.max() <= 1.0
    assert 0.5 < iu.max()
    # same seed, same data
    simulate_mnist(tmp_path / "u2", "u", n=50, seed=11, mnist=mnist_file)
    t2, _, i2 = _read(tmp_path / "u2")
    assert np.array_equal(t2.rlnAnglePsi.to_numpy(), tu.rlnAnglePsi.to_numpy()[:50])
    assert np.array_equal(i2, iu[:50])


def test_mnist_centered_and_errors(tmp_path, mnist_file):
    from cryolatent.errors import CryolatentError

    simulate_mnist(tmp_path, "n", n=20, centered=True, mnist=mnist_file)
    tab, _, _ = _read(tmp_path)
    assert (tab.rlnOriginXAngst == 0).all() and (tab.rlnOriginYAngst == 0).all()
    with pytest.raises(CryolatentError, match="only 10000"):
        simulate_mnist(tmp_path / "x", "u", n=10001, mnist=mnist_file, split="test")
    with pytest.raises(CryolatentError, match="not found"):
        simulate_mnist(tmp_path / "x", "u", n=5, mnist=tmp_path / "nope.npz")


# --------------------------------------------------------------------------- cryo-EM

def test_euler_matrix_is_relion_zyz():
    """A = Rz(psi) Ry(tilt) Rz(rot) with RELION's passive matrices, built independently."""
    def rz(a):
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(b):
        c, s = math.cos(math.radians(b)), math.sin(math.radians(b))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    angles = [(0, 0, 0), (30, 0, 0), (10, 50, -20), (-120, 170, 300), (90, 90, 90)]
    A = euler_matrix(*np.array(angles).T)
    for (r, t, p), a in zip(angles, A):
        assert np.allclose(a, rz(p) @ ry(t) @ rz(r))
        assert np.allclose(a @ a.T, np.eye(3)) and np.isclose(np.linalg.det(a), 1.0)
        # projection direction = third row
        tr, tt = math.radians(r), math.radians(t)
        assert np.allclose(a[2], [math.sin(tt) * math.cos(tr), math.sin(tt) * math.sin(tr),
                                  math.cos(tt)])
    # psi alone is the in-plane R(psi)^T on (x, y)
    a = euler_matrix(0, 0, 30.0)[0]
    assert np.allclose(a[:2, :2], pose.rotation_matrix(30.0).numpy().T)


def test_single_atom_lands_where_the_convention_says():
    """Top view (rot = tilt = 0): an atom at (x, y, z) Å is imaged at R(psi)^T (x, y)/apix - t."""
    apix, D = 1.5, 40
    xyz = np.array([[9.0, -4.5, 3.0]])
    psis = np.array([0.0, 40.0, 90.0, -150.0])
    t = np.array([[0.0, 0.0], [1.5, -2.0], [-3.25, 0.5], [2.0, 2.0]])
    img = render_projections(xyz, np.array([6.0]), np.zeros(4), np.zeros(4), psis, t, D,
                             apix, blur=2.0 * apix).double().numpy()
    r = np.arange(D) - D // 2
    y, x = np.meshgrid(r, r, indexing="ij")
    for i in range(4):
        want = pose.rotation_matrix(psis[i]).numpy().T @ (xyz[0, :2] / apix) - t[i]
        got = np.array([(img[i] * x).sum(), (img[i] * y).sum()]) / img[i].sum()
        assert np.allclose(got, want, atol=1e-3), (got, want)
        assert np.isclose(img[i].sum(), 6.0, rtol=1e-3)  # weight = integral (Z)


def test_projection_matches_analytic_inplane_rotation(tmp_path, write_pdb):
    """Rendering at (rot, tilt, psi, t) == transform_to_particle of the canonical projection
    at (rot, tilt, 0, 0): the truth psi/t are RELION's for what was drawn."""
    st = load_structure(write_pdb(tmp_path / "obj.pdb"))
    D, apix, blur = 48, 1.0, 2.5
    rot = np.array([20.0, 200.0, -45.0])
    tilt = np.array([70.0, 10.0, 120.0])
    psi = np.array([33.0, -100.0, 250.0])
    t = np.array([[2.0, -1.5], [-3.0, 2.5], [0.5, 4.0]])
    part = render_projections(st.coords, st.weights, rot, tilt, psi, t, D, apix, blur).double()
    can = render_projections(st.coords, st.weights, rot, tilt, np.zeros(3), np.zeros((3, 2)),
                             D, apix, blur).double()
    ref = pose.transform_to_particle(can, psi, t)
    assert ((part - ref).abs().max() / can.abs().max()) < 0.05  # bilinear vs analytic
    back = pose.align_particles(part, psi, t)
    assert ((back - can).abs().max() / can.abs().max()) < 0.06
    # the mirror-image reading would not match
    bad = pose.transform_to_particle(can, -psi, t)
    assert ((part - bad).abs().max() / can.abs().max()) > 0.3
    # the structure is centred on its centre of mass
    raw = np.array([[0, 0, 0], [8, 2, 0], [-4, 6, 3], [2, -9, -2], [-7, -5, 4]], float)
    m = np.array([12.011, 32.06, 15.999, 14.007, 30.974])
    assert np.allclose(st.coords, raw - (raw * m[:, None]).sum(0) / m.sum(), atol=1e-3)
    assert np.array_equal(st.weights, [6, 16, 8, 7, 15])


def test_cryoem_end_to_end_truth_classes_views(tmp_path, write_pdb):
    a = write_pdb(tmp_path / "a.pdb")
    b = write_pdb(tmp_path / "b.pdb", [("S", (5, 5, 0)), ("S", (-5, -5, 0)),
                                       ("C", (0, 9, 1))])
    out = tmp_path / "sim"
    simulate_cryoem(out, [a, b], n=40, box=40, apix=1.0, snr=None, seed=2, views=3,
                    ctf=False, shift_sd=2.0, blur=2.0)
    tab, optics, imgs = _read(out)
    assert set(tab.rlnClassNumber) == {1, 2}
    assert set(tab.cryolatentViewNumber) <= {1, 2, 3}
    vrot, vtilt = fibonacci_views(3)
    v = tab.cryolatentViewNumber.to_numpy() - 1
    assert np.allclose(pose.wrap_deg(tab.rlnAngleRot.to_numpy()), vrot[v], atol=1e-6)
    assert np.allclose(tab.rlnAngleTilt.to_numpy(), vtilt[v])
    assert "rlnDefocusU" not in tab.columns
    structs = [load_structure(a), load_structure(b)]
    t = np.c_[tab.rlnOriginXAngst, tab.rlnOriginYAngst]
    aligned = pose.align_particles(torch.from_numpy(imgs), tab.rlnAnglePsi.to_numpy(), t)
    for i in range(len(tab)):
        s = structs[tab.rlnClassNumber[i] - 1]
        can = render_projections(s.coords, s.weights, tab.rlnAngleRot[i:i + 1],
                                 tab.rlnAngleTilt[i:i + 1], [0.0], np.zeros((1, 2)), 40, 1.0,
                                 2.0)[0].double()
        k = (aligned[i] * can).sum() / (can * can).sum()  # the set's global scale
        assert (aligned[i] - k * can).abs().max() / (k * can).abs().max() < 0.05


def test_cryoem_ctf_and_snr(tmp_path, write_pdb):
    from cryolatent.ctf import CTFParams

    pdb = write_pdb(tmp_path / "obj.pdb")
    kw = dict(n=30, box=32, apix=1.2, seed=4, shift_sd=1.0, defocus_min=8000.0,
              defocus_max=12000.0, astigmatism=300.0, blur=2.0)
    simulate_cryoem(tmp_path / "clean", [pdb], snr=math.inf, **kw)
    simulate_cryoem(tmp_path / "noisy", [pdb], snr=0.25, **kw)
    tab, optics, clean = _read(tmp_path / "clean")
    _, _, noisy = _read(tmp_path / "noisy")
    for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        assert col in tab.columns
    dU, dV = tab.rlnDefocusU.to_numpy(), tab.rlnDefocusV.to_numpy()
    assert (dU >= dV).all() and (dU - dV <= 300.0 + 1e-9).all()
    assert ((dU + dV) / 2 >= 8000).all() and ((dU + dV) / 2 <= 12000).all()
    assert float(optics.rlnVoltage[0]) == 300.0 and float(optics.rlnSphericalAberration[0]) == 2.7
    # clean images = CTF(projection) up to one global scale
    st = load_structure(pdb)
    proj = render_projections(st.coords, st.weights, tab.rlnAngleRot, tab.rlnAngleTilt,
                              tab.rlnAnglePsi, np.c_[tab.rlnOriginXAngst, tab.rlnOriginYAngst]
                              / 1.2, 32, 1.2, 2.0)
    ctf = CTFParams.from_relion(tab, optics)
    ref = apply_ctf(proj, ctf, 1.2).double().numpy()
    k = (clean * ref).sum() / (ref * ref).sum()
    # random views are rendered by gridding the atoms (simulate/render.py), within ~1e-3 of
    # the analytic projection here; the exact equivalences (the CTF product to rounding, each
    # renderer against the analytic one) are in tests/test_simulate_speed_equivalence.py
    assert np.abs(clean - k * ref).max() < 5e-3 * np.abs(clean).max()
    # noise: white Gaussian with variance 1/snr; clean signal variance in the mask ~ 1
    noise = noisy - clean
    assert abs(noise.var() - 4.0) < 0.2 and abs(noise.mean()) < 0.05
    r = np.arange(32) - 16
    mask = (r[:, None] ** 2 + r[None, :] ** 2) <= (st.radius / 1.2) ** 2
    assert abs(clean[:, mask].var(axis=1).mean() - 1.0) < 1e-3


def test_cli_simulate_and_errors(tmp_path, mnist_file, write_pdb):
    from cryolatent.cli import main

    pdb = write_pdb(tmp_path / "obj.pdb")
    rc = main(["simulate", "cryoem", "-o", str(tmp_path / "c"), "--n", "5", "--box", "32",
               "--structure", str(pdb), "--views", "2", "--snr", "1", "--seed", "1",
               "--device", "cpu"])
    assert rc == 0
    tab, optics, imgs = _read(tmp_path / "c")
    assert imgs.shape == (5, 32, 32) and len(tab) == 5
    assert "cryolatentViewNumber" in tab.columns and "rlnDefocusU" in tab.columns
    rc = main(["simulate", "mnist-n", "-o", str(tmp_path / "m"), "--n", "7",
               "--mnist", str(mnist_file), "--split", "test", "--device", "cpu"])
    assert rc == 0 and len(_read(tmp_path / "m")[0]) == 7

    runner = CliRunner()
    from cryolatent.cli import cli

    r = runner.invoke(cli, ["simulate", "cryoem", "-o", str(tmp_path / "b"), "--n", "2",
                            "--structure", str(tmp_path / "missing.cif")])
    assert r.exit_code != 0 and "missing.cif" in str(r.exception)
    assert not (tmp_path / "b" / "particles.star").exists()
