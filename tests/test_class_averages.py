"""Aligned and denoised class averages, traversals, the gallery and `cryolatent classes`.

References: particles are made from known analytic canonical images with
``cryolatent.pose.transform_to_particle`` (and a CTF applied in Fourier space with
``cryolatent.ctf.compute_ctf``), so the aligned average must give the canonical image back.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cryolatent.analysis.averages import aligned_class_averages
from cryolatent.analysis.class_averages import (class_centres, denoised_class_averages,
                                                latent_traversal, make_class_averages,
                                                match_table, plot_gallery)
from cryolatent.errors import CryolatentError
from cryolatent.io import load_particles, write_mrcs, write_star
from cryolatent.models.base import LatentModel

D = 48
APIX = 2.0


def blob(D: int, cx: float, cy: float, sx: float, sy: float, theta: float = 0.0) -> np.ndarray:
    """Anisotropic Gaussian (D, D), centre (cx, cy) px from (D//2, D//2), float64."""
    r = np.arange(D) - D // 2
    y, x = np.meshgrid(r, r, indexing="ij")
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
    return np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))


def canonical_images(D: int = D) -> np.ndarray:
    """Three smooth asymmetric shapes (3, D, D): no rotational symmetry, band-limited."""
    a = blob(D, 0, 0, 7, 3) + 0.6 * blob(D, 6, -5, 2.5, 2.5)
    b = blob(D, -3, 2, 3, 6, 0.4) + 0.8 * blob(D, 6, 6, 2.5, 2.5)
    c = blob(D, 0, 4, 8, 2.5) + blob(D, -5, -4, 2.5, 3.5) - 0.5 * blob(D, 4, -4, 2.5, 2.5)
    return np.stack([a, b, c])


def make_particles(tmp_path, n_per_class: int = 12, ctf: bool = False, seed: int = 0,
                   astig_A: tuple[float, float] = (500, 2000), name: str = "particles"):
    """Write particles.star + .mrcs made from canonical_images() with random poses.

    Returns (star path, canonical (K, D, D), table DataFrame).
    """
    from cryolatent.pose import transform_to_particle

    rng = np.random.default_rng(seed)
    canon = canonical_images()
    K = len(canon)
    labels = np.repeat(np.arange(1, K + 1), n_per_class)
    n = len(labels)
    psi = rng.uniform(0, 360, n)
    shift_px = rng.uniform(-3, 3, (n, 2))
    parts = transform_to_particle(torch.as_tensor(canon[labels - 1]), torch.as_tensor(psi),
                                  torch.as_tensor(shift_px)).numpy()
    table = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{name}.mrcs" for i in range(n)],
        "rlnAnglePsi": psi, "rlnOriginXAngst": shift_px[:, 0] * APIX,
        "rlnOriginYAngst": shift_px[:, 1] * APIX, "rlnClassNumber": labels,
        "rlnOpticsGroup": 1,
    })
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [APIX], "rlnImageSize": [D],
                           "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    if ctf:
        from cryolatent.ctf import CTFParams, compute_ctf

        du = rng.uniform(8000, 25000, n)
        dv = du - rng.uniform(*astig_A, n)
        ang = rng.uniform(0, 180, n)
        p = CTFParams(defocus_u=du, defocus_v=dv, astigmatism=ang, voltage=300.0, cs=2.7,
                      amplitude_contrast=0.1, phase_shift=0.0)
        c = compute_ctf(p, D, APIX, dtype=torch.float64).numpy()
        parts = np.fft.ifft2(np.fft.fft2(parts) * c).real
        table["rlnDefocusU"], table["rlnDefocusV"], table["rlnDefocusAngle"] = du, dv, ang
    write_mrcs(tmp_path / f"{name}.mrcs", parts.astype(np.float32), APIX)
    star = tmp_path / f"{name}.star"
    write_star(star, table, optics)
    return star, canon, table


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inner(img: np.ndarray, margin: int = 8) -> np.ndarray:
    """The central part (the border gets zeros from rotating the box corners in)."""
    return img[..., margin:-margin, margin:-margin]


# ----------------------------------------------------------------------------- aligned
def test_aligned_average_equals_canonical(tmp_path):
    star, canon, table = make_particles(tmp_path, n_per_class=10)
    ps = load_particles(star)
    avg, counts = aligned_class_averages(ps, batch_size=7)  # batches cross class borders
    assert avg.shape == (3, D, D) and avg.dtype == np.float32
    assert counts.tolist() == [10, 10, 10]
    for k in range(3):
        # bilinear interpolation twice (make + align) blurs slightly: a few % at most
        assert rel_err(inner(avg[k]), inner(canon[k])) < 0.05, k
        # and far closer to its own class than to another one
        assert rel_err(inner(avg[k]), inner(canon[(k + 1) % 3])) > 0.5


def test_aligned_average_detects_wrong_pose(tmp_path):
    """Independent check that the pose is used: negated angles do not give the shape."""
    star, canon, table = make_particles(tmp_path, n_per_class=10)
    ps = load_particles(star)
    wrong = table.copy()
    wrong["rlnAnglePsi"] = -wrong["rlnAnglePsi"]
    avg, _ = aligned_class_averages(ps, wrong)
    assert rel_err(inner(avg[0]), inner(canon[0])) > 0.3


def test_ctf_wiener_average_recovers_canonical(tmp_path):
    """CTF-modulated (astigmatic, varied defocus) particles: the Wiener average undoes the
    CTF. The astigmatism angle must be rotated with the particle (+psi)."""
    star, canon, _ = make_particles(tmp_path, n_per_class=40, ctf=True)
    ps = load_particles(star)
    assert ps.ctf_params() is not None
    avg, counts = aligned_class_averages(ps, wiener_snr=1e3)
    plain, _ = aligned_class_averages(ps, ctf=False)
    for k in range(3):
        e = rel_err(inner(avg[k]), inner(canon[k]))
        assert e < 0.12, (k, e)
        assert rel_err(inner(plain[k]), inner(canon[k])) > 3 * e  # the CTF did matter


def test_ctf_rotation_of_astigmatism(tmp_path):
    """Rotating by psi turns the astigmatism angle by +psi (not -psi): with strong
    astigmatism the wrong sign gives a visibly worse average."""
    from cryolatent.analysis import class_averages as ca
    from cryolatent.ctf import CTFParams

    star, canon, table = make_particles(tmp_path, n_per_class=20, ctf=True,
                                        astig_A=(5000, 6000))
    ps = load_particles(star)
    good, _ = aligned_class_averages(ps, wiener_snr=1e3)
    orig = ps.ctf_params

    def flipped_ctf():
        p = orig()
        # astig' = astig - 2 psi, so the function's "+psi" gives the wrong "-psi"
        return CTFParams(defocus_u=p.defocus_u, defocus_v=p.defocus_v,
                         astigmatism=p.astigmatism - 2 * table["rlnAnglePsi"].to_numpy(),
                         voltage=p.voltage, cs=p.cs, amplitude_contrast=p.amplitude_contrast,
                         phase_shift=p.phase_shift)

    ps.ctf_params = flipped_ctf
    bad, _ = ca.aligned_class_averages(ps, wiener_snr=1e3)
    for k in range(3):
        e_good = rel_err(inner(good[k]), inner(canon[k]))
        e_bad = rel_err(inner(bad[k]), inner(canon[k]))
        assert e_good < 0.05 and e_bad > 1.5 * e_good, (k, e_good, e_bad)


def test_empty_class_and_missing_columns(tmp_path):
    star, canon, table = make_particles(tmp_path, n_per_class=4)
    ps = load_particles(star)
    t = table.copy()
    t["rlnClassNumber"] = np.where(t["rlnClassNumber"] == 2, 4, t["rlnClassNumber"])
    avg, counts = aligned_class_averages(ps, t)
    assert counts.tolist() == [4, 0, 4, 4]
    assert np.all(avg[1] == 0)
    with pytest.raises(CryolatentError, match="rlnClassNumber"):
        aligned_class_averages(ps, table.drop(columns=["rlnClassNumber"]))
    with pytest.raises(CryolatentError, match="rlnAnglePsi"):
        aligned_class_averages(ps, table.drop(columns=["rlnAnglePsi"]))


def test_match_table_by_original_name():
    out = pd.DataFrame({"rlnImageName": ["000001@bin/a.mrcs", "000002@bin/a.mrcs"],
                        "rlnImageOriginalName": ["000002@raw/a.mrcs", "000001@raw/a.mrcs"]})
    rows = match_table(["1@/data/raw/a.mrcs", "2@/data/raw/a.mrcs", "3@/data/raw/a.mrcs"],
                       out)
    assert rows.tolist() == [1, 0, -1]


# ------------------------------------------------------------------------ generator side
class AnalyticModel(LatentModel):
    """Stand-in generator: a Gaussian blob whose x position is z[0] (px) and width 2 + |z[1]|.

    ``size`` resamples the same field of view (as the real models do).
    """

    name = "analytic"

    def __init__(self, box: int = 32):
        super().__init__()
        self.box = box
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def generate(self, z, size):
        scale = self.box / size
        r = (torch.arange(size, dtype=torch.float64) - size // 2) * scale
        y, x = torch.meshgrid(r, r, indexing="ij")
        cx = z[:, 0, None, None].double()
        w = 2.0 + z[:, 1, None, None].double().abs()
        return torch.exp(-0.5 * ((x - cx) ** 2 + y ** 2) / w ** 2).float()


def test_denoised_and_traversal():
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 2, 3], 50)
    centres = np.array([[-6.0, 0.0, 0.0], [0.0, 2.0, 0.0], [6.0, 0.0, 0.0]])
    z = centres[labels - 1] + rng.normal(0, 0.3, (150, 3))
    m = AnalyticModel(32)
    den = denoised_class_averages(m, z, labels)
    assert den.shape == (3, 32, 32)
    c, counts = class_centres(z, labels)
    ref = m.generate(torch.as_tensor(c), 32).numpy()
    np.testing.assert_allclose(den, ref, atol=1e-6)
    # the blob of class 1 sits left of centre, class 3 right (x = column)
    assert np.argmax(den[0].sum(0)) < 16 < np.argmax(den[2].sum(0))

    tr = latent_traversal(m, z, n_axes=2, steps=5)
    assert tr.images.shape == (2, 5, 32, 32)
    # the first principal axis is (±1, 0, 0) (classes spread along z0): the blob moves
    assert abs(tr.axes[0, 0]) > 0.95
    cols = [np.argmax(tr.images[0, s].sum(0)) for s in range(5)]
    assert cols == sorted(cols) and cols[-1] - cols[0] >= 8
    # consecutive images differ along each axis
    for a in range(2):
        for s in range(4):
            assert np.abs(tr.images[a, s + 1] - tr.images[a, s]).max() > 1e-3
    assert np.all(np.diff(tr.offsets[0]) > 0)


def test_gallery_png(tmp_path):
    import matplotlib.image as mpimg

    canon = canonical_images().astype(np.float32)
    files = plot_gallery(tmp_path / "g.png", canon, np.array([5, 0, 7]), canon[:, ::2, ::2],
                         apix=APIX, denoised_apix=2 * APIX)
    img = mpimg.imread(files[0])
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05  # not blank


# --------------------------------------------------------------------------- end to end
def test_make_class_averages_without_model(tmp_path):
    import mrcfile

    star, canon, table = make_particles(tmp_path, n_per_class=6)
    res = make_class_averages(None, star, tmp_path / "classes")
    out = tmp_path / "classes"
    with mrcfile.open(out / "aligned_averages.mrcs", permissive=True) as f:
        assert f.data.shape == (3, D, D)
        assert float(f.voxel_size.x) == pytest.approx(APIX)
        assert rel_err(inner(f.data[1]), inner(canon[1])) < 0.05
    counts = pd.read_csv(out / "class_counts.csv")
    assert counts["class"].tolist() == [1, 2, 3] and counts["count"].tolist() == [6, 6, 6]
    assert (out / "gallery.png").stat().st_size > 1000
    assert res["counts"].tolist() == [6, 6, 6]


def test_cli_classes_full_resolution_with_standin_model(tmp_path, monkeypatch):
    """`cryolatent classes RUNDIR OUT.star --particles FULL.star`: OUT.star describes a
    binned copy (rlnImageOriginalName -> the full set); averages come out at full size."""
    import mrcfile

    import cryolatent.analysis.class_averages as ca_mod
    from cryolatent.cli import main
    from cryolatent.io import read_star

    full, canon, table = make_particles(tmp_path, n_per_class=6, name="full")
    out = table.copy()
    out = out.iloc[::-1].reset_index(drop=True)  # another order than the full set
    out["rlnImageOriginalName"] = out["rlnImageName"]
    out["rlnImageName"] = [f"{i + 1:06d}@bin/small.mrcs" for i in range(len(out))]
    rng = np.random.default_rng(3)
    out["cryolatentZ1"] = (out["rlnClassNumber"] - 2) * 5.0 + rng.normal(0, 0.2, len(out))
    out["cryolatentZ2"] = rng.normal(0, 1, len(out))
    optics = read_star(full)["optics"].copy()
    optics["rlnImageSize"], optics["rlnImagePixelSize"] = D // 2, 2 * APIX
    from cryolatent.io import write_star

    write_star(tmp_path / "out.star", out, optics)
    monkeypatch.setattr(ca_mod, "load_run", lambda rundir, device="auto", which="best":
                        (AnalyticModel(24), None))
    (tmp_path / "run").mkdir()
    rc = main(["classes", str(tmp_path / "run"), str(tmp_path / "out.star"), "-o",
               str(tmp_path / "cls"), "--particles", str(full), "--traversal-steps", "5"])
    assert rc == 0
    cls = tmp_path / "cls"
    with mrcfile.open(cls / "aligned_averages.mrcs", permissive=True) as f:
        assert f.data.shape == (3, D, D)
        assert float(f.voxel_size.x) == pytest.approx(APIX)
        for k in range(3):
            assert rel_err(inner(f.data[k]), inner(canon[k])) < 0.05
    with mrcfile.open(cls / "denoised_averages.mrcs", permissive=True) as f:
        assert f.data.shape == (3, 24, 24)
        assert float(f.voxel_size.x) == pytest.approx(D * APIX / 24)  # same field of view
        # class 1 has z1 ~ -5: its blob lies left of class 3's
        assert np.argmax(f.data[0].sum(0)) < np.argmax(f.data[2].sum(0))
    with mrcfile.open(cls / "traversals.mrcs", permissive=True) as f:
        assert f.data.shape == (10, 24, 24)
    for png in ("gallery.png", "traversals.png"):
        import matplotlib.image as mpimg

        assert mpimg.imread(cls / png)[..., :3].std() > 0.05
    counts = pd.read_csv(cls / "class_counts.csv")
    assert counts["count"].tolist() == [6, 6, 6]
    assert counts["image"].tolist()[0] == "000001@aligned_averages.mrcs"


def test_cli_classes_errors(tmp_path, capsys):
    from cryolatent.cli import main

    star, _, table = make_particles(tmp_path, n_per_class=2)
    (tmp_path / "run").mkdir()
    t = table.drop(columns=["rlnClassNumber"])
    from cryolatent.io import read_star, write_star

    write_star(tmp_path / "nocls.star", t, read_star(star)["optics"])
    assert main(["classes", str(tmp_path / "run"), str(tmp_path / "nocls.star"), "-o",
                 str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "rlnClassNumber" in err[-1] and "--clusters" in err[-1]
    assert main(["classes", str(tmp_path / "nope"), str(star), "-o", str(tmp_path / "c")]) == 1
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("model_name", ["target-vae", "irl-inr"])
def test_real_tiny_models_denoised_and_traversal(model_name):
    """The real generators (untrained, tiny) through the same functions: shapes, finite
    values, and images that change along each traversal axis."""
    from cryolatent.config import TrainConfig
    from cryolatent.models import build_model

    torch.manual_seed(0)
    cfg = TrainConfig(model=model_name, z_dim=3, rotations=4, enc_channels=4, enc_layers=1,
                      gen_width=16, gen_layers=1, fourier_features=8, enc_width=4,
                      hyper_width=16, hyper_layers=1, inr_width=16, inr_layers=1,
                      device="cpu")
    model = build_model(cfg, 16).eval()
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 2], 20)
    z = rng.normal(0, 1, (40, 3)) + 2.0 * (labels[:, None] == 2)
    den = denoised_class_averages(model, z, labels, size=16)
    assert den.shape == (2, 16, 16) and np.isfinite(den).all()
    tr = latent_traversal(model, z, n_axes=2, steps=4, size=16)
    assert tr.images.shape == (2, 4, 16, 16) and np.isfinite(tr.images).all()
    for a in range(2):
        assert np.abs(tr.images[a, -1] - tr.images[a, 0]).max() > 1e-6


def test_denoised_pixel_size_from_the_recorded_preprocessing(tmp_path):
    """The generator's pixel size is the run's recorded field of view (box × apix of the
    training images) over the output size; a run that recorded none gets the old guess
    (the embed input's optics table, else the averaged set)."""
    from types import SimpleNamespace

    from cryolatent.analysis.class_averages import _model_apix
    from cryolatent.config import TrainConfig

    ps = SimpleNamespace(box=64, apix=1.5)
    optics = pd.DataFrame({"rlnImageSize": [32], "rlnImagePixelSize": [2.5]})
    cfg = TrainConfig(preprocessing={"box": 32, "apix": 3.0, "original_box": 64})
    assert _model_apix(tmp_path, cfg, optics, ps, 16) == pytest.approx(32 * 3.0 / 16)
    assert _model_apix(tmp_path, TrainConfig(), optics, ps, 16) == pytest.approx(32 * 2.5 / 16)
    assert _model_apix(tmp_path, None, None, ps, 16) == pytest.approx(64 * 1.5 / 16)
