"""Tests of ``cryolatent embed`` (cryolatent/inference.py, commands/embed.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryolatent import pose
from cryolatent.errors import CryolatentError
from cryolatent.inference import cs_with_alignments, model_pose_to_input, output_paths


# ---------------------------------------------------------------- independent references
def np_fourier_crop(img: np.ndarray, d: int) -> np.ndarray:
    """Reference Fourier crop (float64), with the phase origin at the rotation centre.

    The image is first rolled so that pixel (N//2, N//2) becomes (0, 0) (RELION's CenterFFT),
    so the FFT's phase origin is the rotation centre for both sizes and the centre maps onto
    the centre (for odd sizes an FFT with the origin at pixel 0 would not: pixel j would map
    to j·d/N and N//2 to a point off d//2). Then the centred d×d block of frequencies is kept
    and the result rolled back. Scaled so that the mean pixel value is unchanged."""
    n = img.shape[-1]
    x = np.roll(img.astype(np.float64), (-(n // 2), -(n // 2)), axis=(-2, -1))
    f = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    s = n // 2 - d // 2
    g = f[..., s:s + d, s:s + d]
    y = np.fft.ifft2(np.fft.ifftshift(g, axes=(-2, -1))).real * (d * d) / (n * n)
    return np.roll(y, (d // 2, d // 2), axis=(-2, -1))


def gaussian(n: int, cx: float, cy: float, sigma: float) -> np.ndarray:
    """Gaussian blob centred at (cx, cy) relative to (n//2, n//2), x = column."""
    y, x = np.mgrid[:n, :n] - n // 2
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))


def centroid(img: np.ndarray) -> np.ndarray:
    """(x, y) intensity centroid relative to (n//2, n//2)."""
    n = img.shape[-1]
    y, x = np.mgrid[:n, :n] - n // 2
    w = np.clip(img, 0, None)
    return np.array([(w * x).sum(), (w * y).sum()]) / w.sum()


# ---------------------------------------------------------------- pose units
@pytest.mark.parametrize("n_in,d", [(128, 64), (129, 43), (96, 96), (100, 64)])
def test_fourier_crop_keeps_the_physical_centre_so_shift_angstrom_is_invariant(n_in, d):
    """A blob at -t (px of the original) sits at -t·d/n_in in the cropped image; the model
    reports t·d/n_in cropped pixels and model_pose_to_input gives back t·apix_in Å."""
    apix_in = 1.3
    t = np.array([5.0, -7.5])                      # true origin in original pixels
    img = gaussian(n_in, -t[0], -t[1], sigma=4.0)  # particle centre at -t (RELION)
    cropped = np_fourier_crop(img, d)
    shift_model_px = -centroid(cropped)            # what an exact model would report
    np.testing.assert_allclose(shift_model_px, t * d / n_in, atol=1e-3)
    psi, origin = model_pose_to_input([33.0], shift_model_px[None], d, n_in, apix_in)
    np.testing.assert_allclose(origin[0], t * apix_in, atol=2e-3 * apix_in)
    assert psi[0] == 33.0


def test_model_pose_to_input_formula_and_wrapping():
    psi, origin = model_pose_to_input(np.array([-30.0, 370.0, 0.0]),
                                      np.array([[1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]]),
                                      box_model=64, box_input=256, apix_input=1.1)
    np.testing.assert_allclose(psi, [330.0, 10.0, 0.0])
    np.testing.assert_allclose(origin, np.array([[1.0, 2.0], [-3.0, 0.5], [0, 0]]) * 1.1 * 4)
    # per-particle pixel size (several optics groups)
    _, o = model_pose_to_input([0, 0], [[1, 1], [1, 1]], 64, 64, np.array([1.0, 2.0]))
    np.testing.assert_allclose(o, [[1, 1], [2, 2]])
    with pytest.raises(ValueError):
        model_pose_to_input([0, 0], [[1, 1]], 64, 64, 1.0)


def test_pose_after_crop_aligns_the_unbinned_particle():
    """Full chain with cryolatent.pose: a particle made at box 128 with (psi, t), seen by a
    model at box 64 with pose (psi, t/2 px), written in Å, aligns the 128-px particle."""
    n_in, d, apix = 128, 64, 1.7
    canon = gaussian(n_in, -6, 0, 5) + 0.6 * gaussian(n_in, 9, 4, 3)   # asymmetric
    psi_true, t_true = 47.0, np.array([6.0, -4.0])
    part = pose.transform_to_particle(torch.tensor(canon)[None], [psi_true], [t_true])[0].numpy()
    # the model sees the cropped particle; its exact pose there is (psi, t·d/n_in)
    psi, origin = model_pose_to_input([psi_true], [t_true * d / n_in], d, n_in, apix)
    aligned = pose.align_particles(torch.tensor(part)[None], psi, origin / apix)[0].numpy()
    inner = gaussian(n_in, 0, 0, 30) > 0.3        # ignore the border zeros of the transforms
    r = np.corrcoef(aligned[inner], canon[inner])[0, 1]
    assert r > 0.999


# ---------------------------------------------------------------- output names
def test_output_paths(tmp_path):
    o = output_paths(tmp_path / "out.star", tmp_path / "in.star", "star")
    assert (o.star.name, o.z.name, o.cs) == ("out.star", "out.z.npy", None)
    o = output_paths(tmp_path / "out", tmp_path / "in.cs", "cs")
    assert (o.star.name, o.z.name, o.cs.name) == ("out.star", "out.z.npy", "out.cs")
    with pytest.raises(CryolatentError, match="overwrite"):
        output_paths(tmp_path / "in.star", tmp_path / "in.star", "star")
    with pytest.raises(CryolatentError, match="overwrite"):   # OUT.cs would be INPUT
        output_paths(tmp_path / "in.star", tmp_path / "in.cs", "cs")
    with pytest.raises(CryolatentError, match="only when INPUT is .cs"):
        output_paths(tmp_path / "x.cs", tmp_path / "in.star", "star")


# ---------------------------------------------------------------- .cs fields
def test_cs_with_alignments_adds_fields_keeps_everything(shared_data):
    cs = np.load(shared_data / "interop/cryosparc_cs/cryosparc_J2_particles_exported.cs")
    base = np.array(cs[[n for n in cs.dtype.names if not n.startswith("alignments2D")]])
    n = len(base)
    psi = np.linspace(0, 350, n)
    origin = np.stack([np.linspace(-5, 5, n), np.linspace(3, -3, n)], 1)
    labels = np.arange(n) % 3
    out = cs_with_alignments(base, psi, origin, base["blob/psize_A"], labels)
    assert out.dtype.names[:len(base.dtype.names)] == base.dtype.names
    for name in base.dtype.names:
        assert np.array_equal(out[name], base[name])
    assert set(out.dtype.names) >= set(cs.dtype.names)      # the full cryoSPARC alignments2D
    np.testing.assert_allclose(out["alignments2D/pose"], np.deg2rad(psi), rtol=1e-6)
    np.testing.assert_allclose(out["alignments2D/shift"] * out["alignments2D/psize_A"][:, None],
                               origin, atol=1e-4)
    assert out["alignments2D/class"].tolist() == labels.tolist()
    # on an array that already has alignments2D: the same fields, overwritten
    out2 = cs_with_alignments(cs, psi, origin, cs["blob/psize_A"], None)
    assert out2.dtype == cs.dtype
    assert np.array_equal(out2["alignments2D/class"], cs["alignments2D/class"])  # kept
    np.testing.assert_allclose(out2["alignments2D/pose"], np.deg2rad(psi), rtol=1e-6)
