"""cryolatent.preprocess: Fourier crop against sampling and a numpy reference, RELION-style
normalisation, phase flip against an analytic CTF, and the `preprocess` command end to end."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryolatent.ctf import CTFParams, compute_ctf
from cryolatent.preprocess import background_mask, fourier_crop, invert, normalize, phase_flip


# ------------------------------------------------------------------------------ fourier crop
def _bandlimited(n: int, terms) -> np.ndarray:
    """sum_k a cos(2 pi (kx x + ky y) + phi) sampled on an n x n grid over the unit square,
    pixel n//2 at x = 0 (the grids of any two sizes share their centre, RELION's convention)."""
    y, x = (np.mgrid[0:n, 0:n] - n // 2) / n
    out = np.zeros((n, n))
    for a, kx, ky, phi in terms:
        out += a * np.cos(2 * np.pi * (kx * x + ky * y) + phi)
    return out


def test_crop_constant_stays_constant():
    for D, d in [(64, 32), (64, 48), (50, 20), (32, 32), (65, 32), (63, 21), (129, 43)]:
        img = np.full((3, D, D), 2.75, dtype=np.float32)
        out = fourier_crop(img, d)
        assert out.shape == (3, d, d) and out.dtype == np.float32
        np.testing.assert_allclose(out, 2.75, rtol=1e-6)


@pytest.mark.parametrize("D,d", [(64, 32), (64, 48), (96, 40), (64, 33), (65, 32), (63, 21),
                                 (129, 43), (130, 65), (65, 33)])
def test_crop_of_bandlimited_function_equals_sampling_on_the_coarse_grid(D, d):
    h = d // 2
    terms = [(1.3, 0, 0, 0.0), (1.0, 3, 5, 0.0), (0.5, 7, -2, 0.3), (0.8, -h + 1, 4, 1.1),
             (0.6, 2, h - 1, -0.4)]
    if d % 2 == 0:  # exactly at the coarse Nyquist frequency, on each axis and the corner
        terms += [(0.7, h, 0, 0.0), (0.4, 4, h, 0.2), (0.3, h, h, 0.1), (0.25, h, -3, 0.9)]
    a = _bandlimited(D, terms)[None]
    b = _bandlimited(d, terms)
    out = fourier_crop(a, d)[0]
    np.testing.assert_allclose(out, b, atol=1e-10)
    # float32 / torch input gives the same to single precision
    out32 = fourier_crop(torch.from_numpy(a.astype(np.float32)), d)
    assert isinstance(out32, torch.Tensor) and out32.dtype == torch.float32
    np.testing.assert_allclose(out32[0].numpy(), b, atol=2e-5)


def test_crop_matches_numpy_reference_on_noise():
    """Reference with numpy's full complex FFT, centred spectrum: take the central d x d
    window (indices D/2-d/2 .. D/2+d/2-1), give the Nyquist row/column (index 0 of the window)
    the sum of -d/2 and +d/2 (the +d/2 row/column lies just past the window), inverse."""
    rng = np.random.default_rng(0)
    D, d = 40, 16
    x = rng.normal(size=(4, D, D))
    F = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    c, h = D // 2, d // 2
    lo, hi = c - h, c + h
    G = F[:, lo:hi + 1, lo:hi + 1].copy()  # (d+1, d+1): -h .. +h
    G[:, 0, :] += G[:, -1, :]               # fold +h row onto -h
    G[:, :, 0] += G[:, :, -1]               # fold +h column onto -h
    G = G[:, :d, :d]
    ref = np.fft.ifft2(np.fft.ifftshift(G, axes=(-2, -1))).real * (d / D) ** 2
    np.testing.assert_allclose(fourier_crop(x, d), ref, atol=1e-12)
    # odd sizes: scipy's FFT with RELION's CenterFFT on both grids
    for D, d in [(40, 15), (41, 16), (41, 15), (63, 21)]:
        x = rng.normal(size=(3, D, D))
        np.testing.assert_allclose(fourier_crop(x, d), _centerfft_crop_reference(x, d),
                                   atol=1e-12)


def _centerfft_crop_reference(x: np.ndarray, d: int) -> np.ndarray:
    """Fourier crop as RELION does it, with scipy: CenterFFT (roll pixel (D//2, D//2) to
    (0, 0)), FFT, keep the centred frequencies -d//2 .. (d-1)//2 (for even d the +d/2 row and
    column folded onto -d/2), inverse FFT, roll (0, 0) back to (d//2, d//2), scale (d/D)^2."""
    import scipy.fft

    D = x.shape[-1]
    c, h = D // 2, d // 2
    F = scipy.fft.fftshift(scipy.fft.fft2(np.roll(x, (-c, -c), axis=(-2, -1))), axes=(-2, -1))
    G = F[:, c - h:c + h + 1, c - h:c + h + 1].copy()     # -h .. +h (odd D: c is frequency 0)
    if d % 2 == 0:
        G[:, 0, :] += G[:, -1, :]
        G[:, :, 0] += G[:, :, -1]
    G = G[:, :d, :d]
    y = scipy.fft.ifft2(scipy.fft.ifftshift(G, axes=(-2, -1))).real * (d / D) ** 2
    return np.roll(y, (h, h), axis=(-2, -1))


def _blob(n: int, cx: float, cy: float, sigma: float) -> np.ndarray:
    """Gaussian centred at (n//2 + cx, n//2 + cy), x = column."""
    c = np.arange(n) - n // 2
    return np.exp(-((c[None, :] - cx) ** 2 + (c[:, None] - cy) ** 2) / (2 * sigma ** 2))


@pytest.mark.parametrize("D,d", [(65, 32), (63, 21), (129, 43), (130, 65), (64, 33), (101, 50),
                                 (64, 32), (96, 40)])
def test_crop_keeps_the_centre_for_odd_and_even_boxes(D, d):
    """A blob at D//2 + s px lands at d//2 + s·d/D (centroid to 1e-6 px), and the crop is the
    same Gaussian sampled on the coarse grid (sigma 1.7 cropped px: band-limited on both)."""
    sigma = 1.7 * D / d
    for s in [(0.0, 0.0), (2.5, -3.25), (-4.0, 1.5)]:
        for x in (_blob(D, *s, sigma)[None], torch.from_numpy(_blob(D, *s, sigma)[None])):
            out = np.asarray(fourier_crop(x, d))[0]
            c = np.arange(d) - d // 2
            cen = np.array([(out * c[None, :]).sum(), (out * c[:, None]).sum()]) / out.sum()
            np.testing.assert_allclose(cen, np.array(s) * d / D, atol=1e-6)
            np.testing.assert_allclose(out, _blob(d, s[0] * d / D, s[1] * d / D, sigma * d / D),
                                       atol=1e-6)


def test_crop_between_even_boxes_is_the_plain_fft_window():
    """Between even boxes the centres D/2 and d/2 are the same fraction of the box, so the
    crop is the plain FFT window (phase origin at pixel 0), unchanged by the centring."""
    from cryolatent.preprocess import crop_matrix

    for D, d in [(64, 32), (40, 16), (128, 64), (100, 64)]:
        F = np.fft.fft(np.eye(D), axis=0)
        h = d // 2
        G = np.concatenate([F[:h], (F[h] + F[D - h])[None], F[D - h + 1:]])
        np.testing.assert_allclose(crop_matrix(D, d), np.fft.ifft(G, axis=0).real * d / D,
                                   atol=1e-14)


def test_fft_crop_path_equals_matrix_path():
    """The FFT crop used on accelerators gives the same result as the GEMM crop."""
    from cryolatent.preprocess import _crop_torch_fft, crop_matrix

    rng = np.random.default_rng(5)
    for D, d in [(40, 16), (40, 15), (64, 48), (41, 16), (41, 15), (65, 32), (129, 43)]:
        x = rng.normal(size=(2, D, D))
        A = crop_matrix(D, d)
        ref = A @ x @ A.T
        np.testing.assert_allclose(_crop_torch_fft(torch.from_numpy(x), d).numpy(), ref,
                                   atol=1e-12)
        np.testing.assert_allclose(fourier_crop(torch.from_numpy(x), d).numpy(), ref,
                                   atol=1e-12)


# ------------------------------------------------------------------------------ normalise
def test_normalize_background_statistics():
    rng = np.random.default_rng(1)
    D = 48
    imgs = rng.normal(3.0, 2.5, size=(5, D, D)).astype(np.float32)
    imgs[:, 14:34, 14:34] += 40.0  # a bright "particle" inside the circle
    out = normalize(imgs)
    # independent background: distance from (D//2, D//2) greater than 0.75*D/2
    yy, xx = np.mgrid[0:D, 0:D]
    bg = np.hypot(yy - D // 2, xx - D // 2) > 0.375 * D
    np.testing.assert_array_equal(background_mask(D), bg)
    for k in range(5):
        v = out[k][bg].astype(np.float64)
        assert abs(v.mean()) < 1e-5 and abs(v.std() - 1.0) < 1e-5
        # the transform is affine with the background's statistics
        m, s = imgs[k][bg].astype(np.float64).mean(), imgs[k][bg].astype(np.float64).std()
        np.testing.assert_allclose(out[k], (imgs[k] - m) / s, rtol=1e-4, atol=1e-4)
    # other diameter
    out2 = normalize(torch.from_numpy(imgs), diameter_fraction=0.5)
    bg2 = np.hypot(yy - D // 2, xx - D // 2) > 0.25 * D
    assert abs(out2[0].numpy()[bg2].mean()) < 1e-5
    np.testing.assert_array_equal(invert(out), -out)


# ------------------------------------------------------------------------------ phase flip
def _ctf(n, D, apix, astig=True):
    rng = np.random.default_rng(2)
    u = rng.uniform(8000, 20000, n)
    v = u - (rng.uniform(0, 1500, n) if astig else 0)
    return CTFParams(u, v, rng.uniform(-180, 180, n), 300.0, 2.7, 0.1, 0.0)


def test_phase_flip_against_analytic_ctf():
    D, apix, n = 64, 1.5, 3
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, D, D))
    ctf = compute_ctf(_ctf(n, D, apix), D, apix, dtype=torch.float64).numpy()
    y = phase_flip(x, ctf)
    assert y.shape == x.shape and np.isrealobj(y)
    # spectrum of the flipped image = spectrum of the image times sign(CTF) (RELION: 0 -> +1),
    # away from the Nyquist row/column, where an astigmatic CTF is not Hermitian on the grid
    Fx, Fy = np.fft.fft2(x), np.fft.fft2(y)
    sgn = np.where(ctf < 0, -1.0, 1.0)
    k = np.fft.fftfreq(D) * D
    ok = (np.abs(k)[:, None] < D // 2) & (np.abs(k)[None, :] < D // 2)
    np.testing.assert_allclose(Fy[:, ok], (Fx * sgn)[:, ok], atol=1e-9)
    np.testing.assert_allclose(np.abs(Fy)[:, ok], np.abs(Fx)[:, ok], atol=1e-9)
    # flipping twice gives the image back (up to the Nyquist terms)
    z = phase_flip(y, ctf)
    Fz = np.fft.fft2(z)
    np.testing.assert_allclose(Fz[:, ok], Fx[:, ok], atol=1e-9)
    # non-astigmatic CTF: point-symmetric on the grid, so exact everywhere
    ctf0 = compute_ctf(_ctf(n, D, apix, astig=False), D, apix, dtype=torch.float64).numpy()
    np.testing.assert_allclose(phase_flip(phase_flip(x, ctf0), ctf0), x, atol=1e-12)
    # a CTF that is positive everywhere leaves the image unchanged
    np.testing.assert_allclose(phase_flip(x, np.ones((D, D))), x, atol=1e-12)


# ------------------------------------------------------------------------------ end to end
def _make_dataset(folder: Path, n=10, D=32, apix=1.5, nan_at=None, original=False):
    rng = np.random.default_rng(4)
    imgs = rng.normal(size=(n, D, D)).astype(np.float32)
    imgs += _bandlimited(D, [(3.0, 1, 2, 0.0), (1.0, 0, 0, 0.0)]).astype(np.float32)
    if nan_at is not None:
        imgs[nan_at, 3, 5] = np.nan
    folder.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(folder / "stack.mrcs", overwrite=True) as m:
        m.set_data(imgs)
        m.set_image_stack()
        m.voxel_size = apix
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [D],
                           "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
        "rlnDefocusU": rng.uniform(9000, 15000, n), "rlnDefocusV": rng.uniform(9000, 15000, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnOpticsGroup": np.ones(n, int),
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.normal(size=n),
        "rlnOriginYAngst": rng.normal(size=n), "rlnMicrographName": ["mic.mrc"] * n,
    })
    if original:
        parts["rlnImageOriginalName"] = [f"{i + 1}@first.mrcs" for i in range(n)]
    starfile.write({"optics": optics, "particles": parts}, folder / "in.star", overwrite=True)
    return imgs, parts


def _run(args):
    from cryolatent.cli import main
    return main(args)


def test_command_end_to_end(tmp_path, capsys):
    from cryolatent.io import load_particles

    imgs, parts = _make_dataset(tmp_path / "in", n=10, D=32, apix=1.5)
    out = tmp_path / "out"
    rc = _run(["preprocess", str(tmp_path / "in" / "in.star"), "-o", str(out), "--box", "16",
               "--chunk-size", "3"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "particles.star").exists() and (out / "particles.mrcs").exists()
    assert (out / "preprocess.log").read_text().count("preprocess") >= 1
    ps = load_particles(out / "particles.star")
    assert len(ps) == 10 and ps.box == 16
    assert ps.apix == pytest.approx(3.0)
    with mrcfile.open(out / "particles.mrcs", permissive=True) as m:
        assert m.voxel_size.x == pytest.approx(3.0)
        assert m.data.shape == (10, 16, 16)
    # images: crop then normalise, compared with the library functions and statistics
    expect = normalize(fourier_crop(imgs.astype(np.float64), 16))
    np.testing.assert_allclose(ps.images(np.arange(10)), expect, atol=1e-4)
    bg = background_mask(16)
    got = ps.images(np.arange(10))
    np.testing.assert_allclose(got[:, bg].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(got[:, bg].std(axis=1), 1, atol=1e-4)
    # every column and row kept, in order; names moved
    t = ps.table
    for col in parts.columns:
        assert col in t.columns
        if col != "rlnImageName":
            if parts[col].dtype.kind == "f":
                np.testing.assert_allclose(t[col].to_numpy(float), parts[col], rtol=1e-5)
            else:
                assert list(t[col]) == list(parts[col])
    # the input's names, its stack named as it resolves from the current directory (SPEC:
    # absolute, as the input lies outside it), so that RELION finds the originals too
    orig = (tmp_path / "in").resolve() / "stack.mrcs"
    assert list(t["rlnImageOriginalName"]) == [
        x.replace("@stack.mrcs", f"@{orig}") for x in parts["rlnImageName"]]
    # relative to the current directory, or absolute where the output lies outside it
    stack = (tmp_path / "out").resolve() / "particles.mrcs"
    assert list(t["rlnImageName"]) == [f"{i + 1:06d}@{stack}" for i in range(10)]
    assert int(ps.optics["rlnImageSize"].iloc[0]) == 16
    # the input was not touched
    with mrcfile.open(tmp_path / "in" / "stack.mrcs") as m:
        np.testing.assert_array_equal(m.data, imgs)


def test_command_invert_phase_flip_and_original_name(tmp_path, capsys):
    from cryolatent.io import load_particles

    imgs, parts = _make_dataset(tmp_path / "in", n=6, D=32, apix=1.2, original=True)
    out = tmp_path / "out"
    rc = _run(["preprocess", str(tmp_path / "in" / "in.star"), "-o", str(out),
               "--no-normalize", "--invert", "--phase-flip"])
    assert rc == 0, capsys.readouterr().err
    ps = load_particles(out / "particles.star")
    assert ps.box == 32 and ps.apix == pytest.approx(1.2)
    params = CTFParams.from_relion(parts, pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1]}))
    ctf = compute_ctf(params, 32, 1.2, dtype=torch.float64).numpy()
    expect = -phase_flip(imgs.astype(np.float64), ctf)
    np.testing.assert_allclose(ps.images(np.arange(6)), expect, atol=1e-4)
    # an existing rlnImageOriginalName is kept as it is
    assert list(ps.table["rlnImageOriginalName"]) == list(parts["rlnImageOriginalName"])
    assert int(ps.optics["rlnCtfDataArePhaseFlipped"].iloc[0]) == 1


def test_command_nan_particle_fails_cleanly(tmp_path, capsys):
    _make_dataset(tmp_path / "in", n=9, D=32, nan_at=6)
    out = tmp_path / "out"
    rc = _run(["preprocess", str(tmp_path / "in" / "in.star"), "-o", str(out), "--box", "16",
               "--chunk-size", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    last = err[-1]
    assert last.startswith("error:") and "000007@stack.mrcs" in last, err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()   # the folder it created is removed again (issue 17)


def test_command_refuses_to_overwrite_input(tmp_path, capsys):
    folder = tmp_path / "in"
    _make_dataset(folder, n=3, D=16)
    # an input stack named like the output
    (folder / "stack.mrcs").rename(folder / "particles.mrcs")
    s = (folder / "in.star").read_text().replace("@stack.mrcs", "@particles.mrcs")
    (folder / "in.star").write_text(s)
    before = (folder / "particles.mrcs").read_bytes()
    rc = _run(["preprocess", str(folder / "in.star"), "-o", str(folder)])
    assert rc != 0
    assert "overwrite" in capsys.readouterr().err
    assert (folder / "particles.mrcs").read_bytes() == before
    assert not (folder / "particles.star").exists()
    # the STAR itself as the output name
    (folder / "in.star").rename(folder / "particles.star")
    (folder / "particles.mrcs").rename(folder / "stack2.mrcs")
    (folder / "particles.star").write_text(s.replace("@particles.mrcs", "@stack2.mrcs"))
    rc = _run(["preprocess", str(folder / "particles.star"), "-o", str(folder)])
    assert rc != 0 and "overwrite" in capsys.readouterr().err
    assert "@stack2.mrcs" in (folder / "particles.star").read_text()


def test_command_mrcs_input(tmp_path, capsys):
    from cryolatent.io import load_particles

    imgs, _ = _make_dataset(tmp_path / "in", n=4, D=32, apix=2.0)
    out = tmp_path / "out"
    rc = _run(["preprocess", str(tmp_path / "in" / "stack.mrcs"), "-o", str(out),
               "--box", "24"])
    assert rc == 0, capsys.readouterr().err
    ps = load_particles(out / "particles.star")
    assert ps.box == 24 and ps.apix == pytest.approx(2.0 * 32 / 24)
    np.testing.assert_allclose(ps.images(np.arange(4)),
                               normalize(fourier_crop(imgs.astype(np.float64), 24)), atol=1e-4)


def test_command_cs_input_writes_star(tmp_path, capsys):
    """A cryoSPARC .cs (plain numpy structured array) in, RELION STAR + .mrcs out."""
    from cryolatent.io import load_particles

    imgs, parts = _make_dataset(tmp_path / "in", n=5, D=32, apix=1.5)
    n = 5
    dt = [("uid", "<u8"), ("blob/path", "S32"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
          ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/accel_kv", "<f4"),
          ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
          ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")]
    a = np.zeros(n, dtype=dt)
    a["uid"] = np.arange(n) + 1000
    a["blob/path"] = b">stack.mrcs"
    a["blob/idx"] = np.arange(n)
    a["blob/shape"] = 32
    a["blob/psize_A"] = 1.5
    a["blob/sign"] = -1
    a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"] = 300, 2.7, 0.1
    a["ctf/df1_A"], a["ctf/df2_A"] = 12000, 11000
    with open(tmp_path / "in" / "particles.cs", "wb") as f:
        np.save(f, a)
    out = tmp_path / "out"
    rc = _run(["preprocess", str(tmp_path / "in" / "particles.cs"), "-o", str(out),
               "--box", "16", "--phase-flip"])
    assert rc == 0, capsys.readouterr().err
    text = (out / "particles.star").read_text()
    assert "data_optics" in text and "data_particles" in text
    ps = load_particles(out / "particles.star")
    assert len(ps) == n and ps.box == 16 and ps.apix == pytest.approx(3.0)
    orig = (tmp_path / "in").resolve() / "stack.mrcs"      # from the current directory
    assert list(ps.table["rlnImageOriginalName"]) == [f"{i + 1:06d}@{orig}" for i in range(n)]
    # pixel values kept as stored (blob/sign is not applied): crop, flip on the 16-grid, normalise
    params = CTFParams(12000.0, 11000.0, 0.0, 300.0, 2.7, 0.1, 0.0)
    ctf = compute_ctf(params, 16, 3.0, dtype=torch.float64).numpy()[0]
    expect = normalize(phase_flip(fourier_crop(imgs.astype(np.float64), 16), ctf))
    np.testing.assert_allclose(ps.images(np.arange(n)), expect, atol=1e-4)


def test_phase_flip_torch_matches_numpy():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 24, 24))
    ctf = compute_ctf(_ctf(2, 24, 2.0), 24, 2.0, dtype=torch.float64)
    np.testing.assert_allclose(phase_flip(torch.from_numpy(x), ctf).numpy(),
                               phase_flip(x, ctf), atol=1e-12)


# ------------------------------------------------------------------------------ the description
def test_preprocessing_apply_is_what_preprocess_wrote(tmp_path):
    """preprocess (crop 32 -> 16, phase flip, invert, normalise) records its Preprocessing in
    the output's optics; apply() on the input stack gives the written images (numpy: the same
    pipeline; torch: to float precision), and both equal the composition of the public
    transforms in float64 (each CTF at the cropped pixel size)."""
    from cryolatent.io import load_particles
    from cryolatent.preprocess import Preprocessing, describe_particles, preprocess

    imgs, parts = _make_dataset(tmp_path / "in", n=7, D=32, apix=1.5)
    res = preprocess(tmp_path / "in" / "in.star", tmp_path / "out", box=16, phase_flip=True,
                     invert=True, chunk=3)
    desc = res.preprocessing
    assert desc == Preprocessing(box=16, apix=3.0, original_box=32, phase_flip=True,
                                 invert=True, normalize=True, diameter_fraction=0.75,
                                 source="preprocess")
    out = load_particles(tmp_path / "out" / "particles.star")
    assert describe_particles(out) == desc          # read back from the optics table
    assert int(out.optics["cryolatentOriginalImageSize"].iloc[0]) == 32
    written = out.images(np.arange(7))
    src = load_particles(tmp_path / "in" / "in.star")
    params = src.ctf_params()
    idx = np.arange(7)[::-1].copy()                 # any rows, in any order
    got = desc.apply(imgs[idx], apix=1.5, ctf=params, idx=idx)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (7, 16, 16)
    np.testing.assert_allclose(got, written[idx], atol=1e-6)
    t = desc.apply(torch.from_numpy(imgs[idx]), apix=np.full(7, 1.5), ctf=params, idx=idx)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), written[idx], atol=1e-5)
    ctf = compute_ctf(params, 16, 3.0, idx=idx, dtype=torch.float64).numpy()
    expect = normalize(invert(phase_flip(fourier_crop(imgs[idx].astype(np.float64), 16), ctf)))
    np.testing.assert_allclose(written[idx], expect, atol=1e-4)
    # every step is needed: without the flip the images differ
    from dataclasses import replace
    assert np.abs(replace(desc, phase_flip=False).apply(imgs[idx]) - written[idx]).max() > 0.1
    with pytest.raises(ValueError, match="CTF"):
        desc.apply(imgs)
    with pytest.raises(ValueError, match="smaller"):
        desc.apply(imgs[:, :8, :8], apix=1.5, ctf=params)


def test_preprocessing_dict_round_trip_and_composition(tmp_path):
    import json

    from cryolatent.io import load_particles
    from cryolatent.preprocess import Preprocessing, describe_particles, preprocess

    p = Preprocessing(box=24, apix=2.5, original_box=48, phase_flip=True, normalize=True)
    d = json.loads(json.dumps(p.to_dict()))
    assert Preprocessing.from_dict(d) == p
    assert Preprocessing.from_dict({**d, "future_key": 1}) == p
    with pytest.raises(ValueError):
        Preprocessing.from_dict({"apix": 1.0})
    assert p.steps() == ["Fourier crop 48 -> 24 px", "phase flip", "normalise"]
    # preprocess of a preprocessed set: the record is relative to the first originals
    imgs, _ = _make_dataset(tmp_path / "in", n=4, D=32, apix=1.5)
    preprocess(tmp_path / "in" / "in.star", tmp_path / "a", box=24, invert=True)
    res = preprocess(tmp_path / "a" / "particles.star", tmp_path / "b", box=16)
    assert res.preprocessing == Preprocessing(box=16, apix=3.0, original_box=32, invert=True,
                                              normalize=True)
    out = load_particles(tmp_path / "b" / "particles.star")
    assert describe_particles(out) == res.preprocessing
    np.testing.assert_allclose(res.preprocessing.apply(imgs), out.images(np.arange(4)),
                               atol=1e-4)
    # a set not made by preprocess: described as stored, normalised or not from its images
    from cryolatent.data import ParticleData

    noise = np.random.default_rng(0).normal(size=(5, 16, 16)).astype(np.float32)
    d1 = describe_particles(ParticleData.from_source(noise))
    assert (d1.source, d1.box, d1.apix, d1.normalize, d1.phase_flip) == \
        ("stored", 16, None, True, False)
    assert not describe_particles(ParticleData.from_source(3 * noise + 1)).normalize
    from cryolatent.preprocess import background_stats
    m, sd = background_stats(d1.apply(noise))
    np.testing.assert_allclose(m, 0, atol=1e-6)
    np.testing.assert_allclose(sd, 1, atol=1e-5)


@pytest.mark.relion
def test_relion_keeps_the_preprocessing_columns(tmp_path, relion):
    """relion_star_handler (RELION 3.1) keeps the cryolatent optics columns, so a training
    set that went through RELION's tools still describes its preprocessing."""
    from cryolatent.io import load_particles
    from cryolatent.preprocess import describe_particles, preprocess

    _make_dataset(tmp_path / "in", n=4, D=32, apix=1.5)
    res = preprocess(tmp_path / "in" / "in.star", tmp_path / "out", box=16, phase_flip=True)
    relion("relion_star_handler", "--i", tmp_path / "out" / "particles.star", "--o",
           tmp_path / "copy.star")
    assert describe_particles(load_particles(tmp_path / "copy.star")) == res.preprocessing
