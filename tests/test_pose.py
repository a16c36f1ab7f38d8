"""RELION's in-plane pose convention (cryolatent.pose), checked analytically and against
the real ``relion_stack_create --apply_transformation``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryolatent import pose


def blobs(D: int, centres, widths, amps, dtype=torch.float64) -> torch.Tensor:
    """(D, D) sum of Gaussians at (x, y) relative to (D//2, D//2), float64 analytic."""
    r = np.arange(D) - D // 2
    y, x = np.meshgrid(r, r, indexing="ij")
    img = np.zeros((D, D))
    for (cx, cy), w, a in zip(centres, widths, amps):
        img += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * w * w))
    return torch.as_tensor(img, dtype=dtype)


ASYM = dict(centres=[(7.0, -3.0), (-5.0, 8.0), (0.0, 0.0)], widths=[3.5, 3.0, 5.0],
            amps=[1.0, 0.6, 0.3])


def test_rotation_matrix_exact_and_orthonormal():
    R = pose.rotation_matrix(torch.tensor([0.0, 90.0, 180.0, 270.0, -90.0, 450.0]))
    ref = np.array([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]],
                    [[0, 1], [-1, 0]], [[0, 1], [-1, 0]], [[0, -1], [1, 0]]], dtype=float)
    assert np.array_equal(R.numpy(), ref)  # exact zeros and ones
    a = np.array([12.5, -200.0, 33.3])
    R = pose.rotation_matrix(a).numpy()
    ra = np.radians(a)
    assert np.allclose(R[:, 0, 0], np.cos(ra)) and np.allclose(R[:, 0, 1], -np.sin(ra))
    assert np.allclose(R[:, 1, 0], np.sin(ra)) and np.allclose(R[:, 1, 1], np.cos(ra))
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(2))


def test_wrap_and_units():
    assert pose.wrap_deg(-30.0) == 330.0 and pose.wrap_deg(720.0) == 0.0
    assert np.allclose(pose.wrap_deg(np.array([-360.0, 359.5, 365.0])), [0.0, 359.5, 5.0])
    assert pose.wrap_deg_180(190.0) == -170.0 and pose.wrap_deg_180(180.0) == 180.0
    assert pose.wrap_deg_180(-180.0) == 180.0
    w = pose.wrap_deg(torch.tensor([-1e-20, 370.0]))
    assert ((w >= 0) & (w < 360)).all()
    assert pose.px_to_angstrom(3.0, 1.5) == 4.5 and pose.angstrom_to_px(4.5, 1.5) == 3.0


@pytest.mark.parametrize("D", [48, 47])
def test_blob_lands_where_the_convention_says(D):
    """A blob at canonical position a appears at x = R(psi)^T a - t in the particle
    (from particle(x) = canonical(R(psi)(x + t))). Centroids in float64."""
    a = np.array([6.0, -4.0])
    psis = np.array([0.0, 30.0, 90.0, -135.0, 200.0])
    ts = np.array([[0.0, 0.0], [2.5, -1.0], [-3.0, 4.25], [1.0, 1.0], [0.0, -5.5]])
    can = blobs(D, [tuple(a)], [2.0], [1.0]).expand(len(psis), D, D)
    part = pose.transform_to_particle(can, psis, ts).numpy()
    r = np.arange(D) - D // 2
    y, x = np.meshgrid(r, r, indexing="ij")
    for i, (p, t) in enumerate(zip(psis, ts)):
        c, s = math.cos(math.radians(p)), math.sin(math.radians(p))
        want = np.array([[c, s], [-s, c]]) @ a - t
        got = np.array([(part[i] * x).sum(), (part[i] * y).sum()]) / part[i].sum()
        assert np.allclose(got, want, atol=0.05), (p, t, got, want)


def test_positive_psi_on_an_axis():
    """psi = 90: the canonical point (x, y) = (5, 0) (right of centre) shows up at (0, -5),
    i.e. above the centre (row c - 5): content turns clockwise on screen for positive psi."""
    D = 33
    can = torch.zeros(1, D, D, dtype=torch.float64)
    c = D // 2
    can[0, c, c + 5] = 1.0
    part = pose.transform_to_particle(can, [90.0], [[0.0, 0.0]])
    assert part[0, c - 5, c] == 1.0 and part.sum() == 1.0


@pytest.mark.parametrize("D", [16, 17])
def test_multiples_of_90_with_integer_shifts_are_exact(D):
    g = torch.Generator().manual_seed(0)
    can = torch.rand(4, D, D, generator=g, dtype=torch.float64)
    c = D // 2
    part = pose.transform_to_particle(can, [90.0, 180.0, 270.0, 0.0], torch.zeros(4, 2))
    # psi=90: particle[row, col] = canonical(x'=-(row-c), y'=col-c) = canonical[col, 2c-row]
    for row in range(D):
        for col in range(D):
            src = 2 * c - row
            want = can[0, col, src] if 0 <= src < D else 0.0
            assert part[0, row, col] == want
    assert torch.equal(part[3], can[3])
    # an exact inverse where nothing leaves the box
    t = torch.tensor([[2.0, -1.0]] * 4)
    back = pose.align_particles(pose.transform_to_particle(can, [90, 180, 270, 0], t),
                                [90, 180, 270, 0], t)
    inner = slice(3, D - 3)
    assert torch.equal(back[:, inner, inner], can[:, inner, inner])


@pytest.mark.parametrize("method", ["bilinear", "fourier"])
def test_align_inverts_transform(method):
    D = 64
    can = blobs(D, **ASYM).expand(5, D, D).contiguous()
    psis = torch.tensor([17.0, -63.0, 144.5, 250.0, 359.0])
    ts = torch.tensor([[1.3, -2.7], [-4.0, 0.5], [3.3, 3.3], [0.0, -6.1], [-2.2, 1.1]])
    part = pose.transform_to_particle(can, psis, ts, method=method)
    back = pose.align_particles(part, psis, ts, method=method)
    assert (back - can).abs().max() < 0.05  # two bilinear passes on smooth blobs (peak 1)
    # and the particle itself agrees with the analytic particle (blobs moved analytically)
    for i in range(5):
        c, s = math.cos(math.radians(psis[i])), math.sin(math.radians(psis[i]))
        Rt = np.array([[c, s], [-s, c]])
        cen = [tuple(Rt @ np.array(a) - ts[i].numpy()) for a in ASYM["centres"]]
        ref = blobs(D, cen, ASYM["widths"], ASYM["amps"])
        assert (part[i] - ref).abs().max() < 0.02


def test_fourier_shift_matches_roll_and_subpixel_analytic():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 20, 20, generator=g, dtype=torch.float64)
    out = pose.fourier_shift(img, torch.tensor([[3.0, -2.0], [0.0, 5.0]]))
    assert torch.allclose(out[0], torch.roll(img[0], shifts=(-2, 3), dims=(0, 1)), atol=1e-12)
    assert torch.allclose(out[1], torch.roll(img[1], shifts=(5, 0), dims=(0, 1)), atol=1e-12)
    D = 64
    b = blobs(D, [(0.0, 0.0)], [3.0], [1.0])[None]
    sh = pose.fourier_shift(b, torch.tensor([[1.37, -2.61]]))[0]
    assert (sh - blobs(D, [(1.37, -2.61)], [3.0], [1.0])).abs().max() < 1e-6


def test_batched_equals_one_by_one_and_keeps_dtype():
    D = 32
    g = torch.Generator().manual_seed(2)
    imgs = torch.rand(3, D, D, generator=g)
    psis = [10.0, 200.0, -33.0]
    ts = [[1.5, 0.25], [-2.0, 3.0], [0.0, 0.0]]
    batch = pose.align_particles(imgs, psis, ts)
    assert batch.dtype == torch.float32 and batch.shape == (3, D, D)
    for i in range(3):
        one = pose.align_particles(imgs[i:i + 1], [psis[i]], [ts[i]])
        assert torch.allclose(one[0], batch[i], atol=1e-6)
    with pytest.raises(ValueError):
        pose.align_particles(imgs, [1.0, 2.0], ts)


def _write_relion_set(folder, particles, psi, t_px, apix):
    import pandas as pd

    from cryolatent.io import write_mrcs, write_star
    from cryolatent.simulate import image_names, optics_table

    B, D, _ = particles.shape
    write_mrcs(folder / "in.mrcs", particles.astype(np.float32), apix)
    df = pd.DataFrame({"rlnImageName": image_names(B, "in.mrcs"), "rlnOpticsGroup": 1,
                       "rlnAnglePsi": psi, "rlnOriginXAngst": t_px[:, 0] * apix,
                       "rlnOriginYAngst": t_px[:, 1] * apix})
    write_star(folder / "in.star", df, optics_table(D, apix))


@pytest.mark.relion
@pytest.mark.parametrize("D", [64, 63])
def test_relion_stack_create_agrees(relion, tmp_path, D):
    """RELION's --apply_transformation output == pose.align_particles (same bilinear
    interpolation, so to float precision away from the border), and both recover the
    canonical image: RELION's aligned(R(psi)(x + t)) = particle(x)."""
    import mrcfile

    apix = 1.7
    psi = np.array([30.0, -75.0, 160.0, 90.0, 0.0, 245.3])
    t = np.array([[3.0, -2.0], [-4.5, 1.25], [0.0, 6.0], [2.0, 0.0], [-3.3, -1.7], [1.1, 2.9]])
    can = blobs(D, **ASYM).expand(len(psi), D, D).contiguous()
    part = pose.transform_to_particle(can, psi, t).numpy().astype(np.float32)
    _write_relion_set(tmp_path, part, psi, t, apix)
    relion("relion_stack_create", "--i", "in.star", "--o", "out", "--apply_transformation",
           cwd=tmp_path)
    rel = mrcfile.read(tmp_path / "out.mrcs").astype(np.float64)
    mine = pose.align_particles(torch.from_numpy(part).double(), psi, t).numpy()
    r = np.arange(D) - D // 2
    inner = (r[:, None] ** 2 + r[None, :] ** 2) < (D // 2 - 8) ** 2
    assert np.abs(rel - mine)[:, inner].max() < 1e-5
    assert np.abs(rel - can.numpy())[:, inner].max() < 0.05
    # the other readings of the convention are clearly wrong
    for wrong in (pose.align_particles(torch.from_numpy(part).double(), -psi, t).numpy(),
                  pose.align_particles(torch.from_numpy(part).double(), psi, -t).numpy()):
        assert np.abs(rel - wrong)[:, inner].max() > 0.2


@pytest.mark.relion
def test_relion_aligns_simulated_cryoem(relion, tmp_path, write_pdb):
    """`simulate cryoem` (noiseless, no CTF) + RELION aligning with the truth columns of its
    own particles.star recovers the canonical projection (psi = 0, t = 0)."""
    import mrcfile

    from cryolatent.io import read_star
    from cryolatent.simulate import simulate_cryoem
    from cryolatent.simulate.cryoem import load_structure, render_projections

    pdb = write_pdb(tmp_path / "obj.pdb")

    out = tmp_path / "sim"
    simulate_cryoem(out, [pdb], n=6, box=48, apix=1.0, snr=None, seed=3, ctf=False,
                    shift_sd=2.0, blur=2.0)
    relion("relion_stack_create", "--i", "particles.star", "--o", "aligned",
           "--apply_transformation", cwd=out)
    rel = mrcfile.read(out / "aligned.mrcs").astype(np.float64)
    tab = read_star(out / "particles.star")["particles"]
    st = load_structure(pdb)
    can = render_projections(st.coords, st.weights, tab.rlnAngleRot, tab.rlnAngleTilt,
                             np.zeros(6), np.zeros((6, 2)), 48, 1.0, 2.0).double().numpy()
    scale = (rel * can).sum() / (can * can).sum()  # simulate normalises the signal
    err = np.abs(rel - scale * can).max() / np.abs(scale * can).max()
    assert err < 0.06, err  # one bilinear pass on 2-px Gaussians


def test_centre_class_frames_least_squares_and_recovery():
    """Per class, the offset is the least-squares c of t_i ~ R(-psi_i) c (numpy lstsq as the
    reference); planted per-class frame offsets are removed up to sampling noise."""
    from cryolatent.pose import centre_class_frames

    rng = np.random.default_rng(4)
    n = 4000
    psi = rng.uniform(-180, 180, n)
    labels = rng.integers(1, 4, n)
    planted = {1: np.array([3.0, -2.0]), 2: np.array([-1.0, 0.5]), 3: np.array([0.0, 4.0])}
    t_true = rng.normal(0, 2.0, (n, 2))
    r = np.deg2rad(psi)
    c, s = np.cos(r), np.sin(r)
    ck = np.stack([planted[k] for k in labels])
    t_obs = t_true + np.stack([c * ck[:, 0] + s * ck[:, 1], -s * ck[:, 0] + c * ck[:, 1]], -1)

    out, offs = centre_class_frames(psi, t_obs, labels, prior_count=0.0)
    for i, k in enumerate((1, 2, 3)):
        m = labels == k
        A = np.zeros((2 * m.sum(), 2))  # rows of R(-psi_i) for the unknown c
        A[0::2, 0], A[0::2, 1] = c[m], s[m]
        A[1::2, 0], A[1::2, 1] = -s[m], c[m]
        ref = np.linalg.lstsq(A, t_obs[m].reshape(-1), rcond=None)[0]
        np.testing.assert_allclose(offs[i], ref, atol=1e-10)
        np.testing.assert_allclose(offs[i], planted[k], atol=0.25)   # 2 / sqrt(1300) * 5
    err_before = np.sqrt(((t_obs - t_true) ** 2).sum(1).mean())
    err_after = np.sqrt(((out - t_true) ** 2).sum(1).mean())
    assert err_before > 2.0 and err_after < 0.2
    # one class (labels None) = one offset for all; shrinkage pulls a tiny class to it
    out1, offs1 = centre_class_frames(psi, t_obs, None)
    assert offs1.shape == (1, 2)
    lab2 = labels.copy()
    lab2[0] = 9
    _, offs2 = centre_class_frames(psi, t_obs, lab2, prior_count=50.0)
    np.testing.assert_allclose(offs2[-1], offs1[0], atol=0.3)
