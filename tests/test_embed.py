"""Tests of ``cryolatent embed`` (cryolatent/inference.py, commands/embed.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryolatent import pose
from cryolatent.errors import CryolatentError
from cryolatent.inference import output_paths
from cryolatent.io.cs import cs_with_alignments
from cryolatent.pose import model_pose_to_input


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
def _pp_crop(img, d):
    from cryolatent.preprocess import fourier_crop

    return np.asarray(fourier_crop(img[None].astype(np.float64), d))[0]


def _crop_centre_offset(D: int, d: int) -> float:
    """Where the centre (D//2, D//2) of a D-px image lands relative to (d//2, d//2) after
    preprocess.fourier_crop, in cropped px: measured from the phase of the first Fourier
    coefficient of a cropped, centred, band-limited Gaussian (exact for a periodic
    band-limited image; a pixel-0 phase origin would give (D//2)·d/D − d//2, e.g. 1/3 for
    129 -> 43)."""
    g = gaussian(D, 0.0, 0.0, sigma=1.7 * D / d)
    prof = _pp_crop(g, d).sum(0)                                  # along x (columns)
    f1 = np.sum(prof * np.exp(-2j * np.pi * np.arange(d) / d))
    pos = -np.angle(f1) * d / (2 * np.pi)                         # mod d
    return (pos - d // 2 + d / 2) % d - d / 2


def test_crop_centre_offset_is_zero_for_every_box():
    """The crop maps centre onto centre for even and odd boxes, so embed needs no
    correction for odd-box crops."""
    for D, d in [(128, 64), (129, 43), (130, 65), (101, 50), (100, 64), (65, 32), (63, 21),
                 (64, 33), (97, 97)]:
        assert abs(_crop_centre_offset(D, d)) < 1e-9, (D, d)


@pytest.mark.parametrize("crop", ["reference", "preprocess"])
@pytest.mark.parametrize("n_in,d", [(128, 64), (129, 43), (130, 65), (101, 50), (96, 96),
                                    (100, 64)])
def test_origin_angstrom_is_the_physical_shift_after_a_crop(n_in, d, crop):
    """A blob at -t (px of the original) seen by an exact model in the d-px crop: the model
    reports -centroid (cropped px) = t·d/D, for the centre-origin reference crop and for
    cryolatent.preprocess.fourier_crop alike (odd boxes too); model_pose_to_input gives back
    t·apix_in Å."""
    apix_in = 1.3
    t = np.array([5.0, -7.5])                      # true origin in original pixels
    img = gaussian(n_in, -t[0], -t[1], sigma=4.0)  # particle centre at -t (RELION)
    cropped = np_fourier_crop(img, d) if crop == "reference" else _pp_crop(img, d)
    shift_model_px = -centroid(cropped)            # what an exact model would report
    np.testing.assert_allclose(shift_model_px, t * d / n_in, atol=1e-3)
    psi, origin = model_pose_to_input([33.0], shift_model_px[None], d, n_in, apix_in)
    np.testing.assert_allclose(origin[0], t * apix_in, atol=2e-3 * apix_in)
    assert psi[0] == 33.0


def test_model_pose_to_input_formula_and_wrapping():
    psi, origin = model_pose_to_input(np.array([-30.0, 370.0, 0.0]),
                                      np.array([[1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]]),
                                      box_model=64, box_input=256, apix_input=1.1)
    np.testing.assert_allclose(psi, [-30.0, 10.0, 0.0])          # RELION's (-180, 180]
    assert model_pose_to_input([180.0, -180.0], [[0, 0], [0, 0]], 8, 8, 1.0)[0].tolist() \
        == [180.0, 180.0]
    np.testing.assert_allclose(origin, np.array([[1.0, 2.0], [-3.0, 0.5], [0, 0]]) * 1.1 * 4)
    # per-particle pixel size (several optics groups)
    _, o = model_pose_to_input([0, 0], [[1, 1], [1, 1]], 64, 64, np.array([1.0, 2.0]))
    np.testing.assert_allclose(o, [[1, 1], [2, 2]])
    with pytest.raises(ValueError):
        model_pose_to_input([0, 0], [[1, 1]], 64, 64, 1.0)
    # an odd crop: just the pixel-size ratio (the crop keeps the centre)
    _, o = model_pose_to_input([0], [[1.0, -2.0]], 43, 129, 1.0)
    np.testing.assert_allclose(o, [[3.0, -6.0]])


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


# ================================================================ embed with a stand-in model
# A real trained model is not needed to test the writing path and the conventions: this
# stand-in is an honest estimator (template matching against the class templates over an
# angle grid and all integer shifts) that returns its pose in RELION's convention in pixels
# of its own (cropped) input, as every LatentModel must.
from cryolatent.models.base import Inference, LatentModel  # noqa: E402

BOX_RAW, BOX_MODEL, APIX_RAW, ANGLE_STEP = 128, 64, 1.5, 6.0


class TemplateModel(LatentModel):
    """Stand-in LatentModel: exhaustive template matching. z = per-class best correlation."""

    name = "template-standin"

    def __init__(self, templates: np.ndarray, angle_step: float = ANGLE_STEP):
        super().__init__()
        k, d, _ = templates.shape
        self.box, self.z_dim = d, k
        angles = np.arange(0.0, 360.0, angle_step)
        bank = []
        for t in templates:    # rotated templates P_a(x) = t(R(a) x): particle = P_a(x + s)
            bank.append(pose.transform_to_particle(
                torch.tensor(t, dtype=torch.float64)[None].expand(len(angles), d, d),
                angles, np.zeros((len(angles), 2))))
        bank = torch.cat(bank).float()                          # (K*A, d, d)
        bank = bank - bank.mean((1, 2), keepdim=True)
        bank = bank / bank.norm(dim=(1, 2), keepdim=True)
        self.register_buffer("fbank", torch.fft.rfft2(bank))
        self.angles = torch.tensor(angles)
        self.k = k

    @torch.no_grad()
    def infer(self, images: torch.Tensor) -> Inference:
        b, d, _ = images.shape
        x = images - images.mean((1, 2), keepdim=True)
        x = x / x.norm(dim=(1, 2), keepdim=True)
        # cc[u] = sum_x img(x + u) T(x): peak at u = -t when img(x) = T(x + t)
        cc = torch.fft.irfft2(torch.fft.rfft2(x)[:, None] * self.fbank.conj()[None], s=(d, d))
        cc = cc.reshape(b, self.k, -1, d * d)                    # (B, K, A, d*d)
        best, where = cc.flatten(2).max(2)                        # per class
        cls = best.argmax(1)
        w = where[torch.arange(b), cls]
        a, u = w // (d * d), w % (d * d)
        uy, ux = u // d, u % d
        ux = torch.where(ux >= d // 2, ux - d, ux)
        uy = torch.where(uy >= d // 2, uy - d, uy)
        return Inference(psi_deg=self.angles[a].float(),
                         shift_px=torch.stack([-ux, -uy], 1).float(),
                         z_mean=best.float(), z_std=torch.ones_like(best),
                         confidence=torch.ones(b))


def _canonical(n: int, k: int) -> np.ndarray:
    """Two asymmetric canonical shapes (class 0: an L of blobs, class 1: a bar and a dot)."""
    s = n / 128
    if k == 0:
        return (gaussian(n, 0, 0, 6 * s) + 0.8 * gaussian(n, 14 * s, 0, 4 * s)
                + 0.6 * gaussian(n, 0, -16 * s, 3 * s))
    return (sum(gaussian(n, x * s, 4 * s, 3.5 * s) for x in (-12, -4, 4, 12))
            + 0.9 * gaussian(n, 6 * s, -14 * s, 4 * s))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Raw 128-px particles (STAR + .mrcs + .cs), their 64-px preprocessed training set, the
    truth, and the stand-in model built from 64-px templates."""
    import pandas as pd

    from cryolatent.io import write_cs, write_mrcs, write_star
    from cryolatent.preprocess import fourier_crop, preprocess

    d = tmp_path_factory.mktemp("sim")
    rng = np.random.default_rng(7)
    n_per, k = 16, 2
    cls = np.repeat(np.arange(k), n_per)
    n = len(cls)
    psi = rng.integers(0, int(360 / ANGLE_STEP), n) * ANGLE_STEP
    shift = rng.integers(-4, 5, (n, 2)) * 2.0                     # even px: integer at 64 px
    canon = np.stack([_canonical(BOX_RAW, c) for c in range(k)])
    parts = pose.transform_to_particle(torch.tensor(canon[cls]), psi, shift,
                                       method="fourier").numpy()
    parts = 40.0 * parts + 5.0 + rng.normal(0, 2.0, parts.shape)    # unnormalised, noisy
    write_mrcs(d / "particles.mrcs", parts.astype(np.float32), APIX_RAW)
    table = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
        "rlnMicrographName": [f"mic{i % 3}.mrc" for i in range(n)],
        "rlnCoordinateX": rng.uniform(100, 3000, n).round(1),
        "rlnCoordinateY": rng.uniform(100, 3000, n).round(1),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [APIX_RAW], "rlnImageSize": [BOX_RAW],
                           "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_star(d / "raw.star", table, optics)
    truth = table.assign(rlnAnglePsi=psi, rlnOriginXAngst=shift[:, 0] * APIX_RAW,
                         rlnOriginYAngst=shift[:, 1] * APIX_RAW, rlnClassNumber=cls + 1)
    cs = np.zeros(n, dtype=[("uid", "<u8"), ("blob/path", "S32"), ("blob/idx", "<u4"),
                            ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"),
                            ("blob/sign", "<f4"), ("location/micrograph_uid", "<u8")])
    cs["uid"] = rng.integers(1, 2**63, n, dtype=np.uint64)
    cs["blob/path"] = b"particles.mrcs"
    cs["blob/idx"] = np.arange(n)
    cs["blob/shape"] = BOX_RAW
    cs["blob/psize_A"] = APIX_RAW
    cs["blob/sign"] = -1.0
    cs["location/micrograph_uid"] = np.arange(n) % 3 + 11
    write_cs(d / "raw.cs", cs)
    preprocess(d / "raw.star", d / "prep", box=BOX_MODEL)          # normalised, 64 px
    templates = fourier_crop(canon.astype(np.float32), BOX_MODEL)
    return dict(dir=d, truth=truth, cls=cls, psi=psi, shift=shift, canon=canon, cs=cs,
                model=TemplateModel(templates), prep=d / "prep" / "particles.star")


@pytest.fixture
def standin(sim, monkeypatch):
    """Make embed load the stand-in model with a run config whose input is the 64-px set."""
    import cryolatent.inference as inf
    from cryolatent.config import TrainConfig

    cfg = TrainConfig(input=str(sim["prep"]), z_dim=2, batch_size=7)
    monkeypatch.setattr(inf, "_load_run", lambda rundir, device, checkpoint="best":
                        (sim["model"].to(device), cfg))
    rundir = sim["dir"] / "run"
    rundir.mkdir(exist_ok=True)
    return rundir


def _circ_diff(a, b):
    return (np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0


def test_embed_raw_set_writes_true_pose_in_input_angstrom(sim, standin, tmp_path):
    """INPUT = the 128-px originals: cropped to 64 on the fly; origins come out in Å of the
    128-px particles (= truth), psi unchanged, every input column and row kept in order."""
    from cryolatent.inference import embed
    from cryolatent.io import read_star

    out = embed(standin, sim["dir"] / "raw.star", tmp_path / "out.star", clusters=2,
                centre=False)  # the exact pose conversion; centring has its own test
    blocks = read_star(out)
    inp = read_star(sim["dir"] / "raw.star")
    p, t = blocks["particles"], sim["truth"]
    assert list(p.columns[:len(inp["particles"].columns)]) == list(inp["particles"].columns)
    for c in inp["particles"].columns:
        if c != "rlnImageName":
            assert p[c].tolist() == inp["particles"][c].tolist()
    # the same images, their stack named so that it resolves from the current directory
    from cryolatent.io import particle_keys

    assert list(particle_keys(p["rlnImageName"])) == \
        list(particle_keys(inp["particles"]["rlnImageName"]))
    assert all(Path(x.split("@", 1)[1]).is_file() for x in p["rlnImageName"])
    assert blocks["optics"].equals(inp["optics"])
    for c in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "cryolatentZ1",
              "cryolatentZ2", "rlnClassNumber"):
        assert c in p.columns
    np.testing.assert_allclose(_circ_diff(p["rlnAnglePsi"], t["rlnAnglePsi"]), 0, atol=1e-6)
    np.testing.assert_allclose(p["rlnOriginXAngst"], t["rlnOriginXAngst"], atol=1e-6)
    np.testing.assert_allclose(p["rlnOriginYAngst"], t["rlnOriginYAngst"], atol=1e-6)
    cls = p["rlnClassNumber"].to_numpy()
    assert set(cls) == {1, 2}
    assert adjusted_rand(cls, sim["cls"]) == pytest.approx(1.0)
    z = np.load(tmp_path / "out.z.npy")
    assert z.shape == (len(p), 2) and z.dtype == np.float32
    np.testing.assert_array_equal(z[:, 0], p["cryolatentZ1"].to_numpy(np.float32))
    assert not list(tmp_path.glob(".*tmp"))                      # no temporary files left


def adjusted_rand(a, b):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b)


def test_embed_training_set_gives_the_same_angstrom(sim, standin, tmp_path):
    """INPUT = the 64-px training set (3 Å/px): same Å origins as from the 128-px originals."""
    from cryolatent.inference import embed
    from cryolatent.io import read_star

    out = embed(standin, sim["prep"], tmp_path / "prep_out.star", centre=False)
    p = read_star(out)["particles"]
    np.testing.assert_allclose(p["rlnOriginXAngst"], sim["truth"]["rlnOriginXAngst"], atol=1e-6)
    np.testing.assert_allclose(p["rlnOriginYAngst"], sim["truth"]["rlnOriginYAngst"], atol=1e-6)
    assert "rlnClassNumber" not in p.columns and "rlnImageOriginalName" in p.columns


def test_embed_adapter_reproduces_the_preprocessed_images(sim):
    """Cropping + normalising the originals on the fly gives the training images: from the
    description preprocess wrote into the training set's optics table, and from one judged
    from the images (the set's optics without it, as an older preprocess wrote them)."""
    from cryolatent.inference import InputAdapter
    from cryolatent.io import load_particles, write_star
    from cryolatent.preprocess import OPTICS_COLUMNS, describe_particles

    tps = load_particles(sim["prep"])
    prep = describe_particles(tps)
    assert prep.source == "preprocess" and (prep.box, prep.original_box) == (BOX_MODEL, BOX_RAW)
    assert prep.normalize and not prep.invert and not prep.phase_flip
    assert prep.apix == pytest.approx(APIX_RAW * 2)
    ps = load_particles(sim["dir"] / "raw.star")
    idx = np.arange(5)
    ad = InputAdapter(ps, prep)
    assert (ad.crop, ad.flip, ad.invert, ad.normalize) == (True, False, False, True)
    np.testing.assert_allclose(ad(ps.images(idx), idx).numpy(), tps.images(idx), atol=1e-4)
    # the same set without the description: judged normalised from its backgrounds
    old = sim["dir"] / "prep" / "old.star"
    write_star(old, tps.table, tps.optics.drop(columns=list(OPTICS_COLUMNS.values())))
    otps = load_particles(old)
    guess = describe_particles(otps, source="inferred")
    assert guess.source == "inferred" and guess.normalize and guess.original_box is None
    ad = InputAdapter(ps, guess, training=otps)
    ad.calibrate()
    assert ad.calibration > 0.999 and not ad.invert
    np.testing.assert_allclose(ad(ps.images(idx), idx).numpy(), tps.images(idx), atol=1e-4)
    # INPUT = a copy of the training images (described alike): used as they are
    ad = InputAdapter(tps, prep)
    assert ad.same and ad(tps.images(idx), idx).numpy().tobytes() == tps.images(idx).tobytes()


def test_embed_updates_stale_pixel_origins(sim, standin, tmp_path):
    """A 3.1 STAR that also carries rlnOriginX/Y in pixels (relion_project writes them): they
    are kept as columns but made consistent with the new origins in Å."""
    from cryolatent.inference import embed
    from cryolatent.io import read_star, write_star

    b = read_star(sim["dir"] / "raw.star")
    write_star(sim["dir"] / "px.star", b["particles"].assign(rlnOriginX=0.0, rlnOriginY=0.0),
               b["optics"])
    p = read_star(embed(standin, sim["dir"] / "px.star", tmp_path / "px_out.star",
                           centre=False))["particles"]
    np.testing.assert_allclose(p["rlnOriginX"], sim["shift"][:, 0], atol=1e-6)
    np.testing.assert_allclose(p["rlnOriginY"], sim["shift"][:, 1], atol=1e-6)
    np.testing.assert_allclose(p["rlnOriginXAngst"], sim["shift"][:, 0] * APIX_RAW, atol=1e-6)


def test_embed_cs_input_writes_cs_loadable_by_cryosparc_tools(sim, standin, tmp_path):
    from cryosparc.dataset import Dataset

    from cryolatent.inference import embed
    from cryolatent.io import read_star

    out = embed(standin, sim["dir"] / "raw.cs", tmp_path / "o.star", clusters=2,
                cluster_method="agglomerative", centre=False)
    assert (tmp_path / "o.cs").is_file() and out == tmp_path / "o.star"
    ds = Dataset.load(str(tmp_path / "o.cs"))
    assert len(ds) == len(sim["cs"])
    np.testing.assert_array_equal(ds["uid"], sim["cs"]["uid"])
    raw = np.load(tmp_path / "o.cs")                # every original field, byte for byte
    assert raw.dtype.names[:len(sim["cs"].dtype.names)] == sim["cs"].dtype.names
    for f in sim["cs"].dtype.names:
        np.testing.assert_array_equal(raw[f], sim["cs"][f])
    assert ds["blob/path"][0] == "particles.mrcs"
    t = sim["truth"]
    np.testing.assert_allclose(
        _circ_diff(np.rad2deg(ds["alignments2D/pose"]), t["rlnAnglePsi"]), 0, atol=1e-4)
    np.testing.assert_allclose(ds["alignments2D/psize_A"], APIX_RAW)
    np.testing.assert_allclose(ds["alignments2D/shift"], sim["shift"], atol=1e-4)   # px
    assert adjusted_rand(ds["alignments2D/class"], sim["cls"]) == pytest.approx(1.0)
    assert set(ds["alignments2D/class"].tolist()) == {0, 1}
    p = read_star(out)["particles"]
    np.testing.assert_array_equal(ds["alignments2D/class"] + 1, p["rlnClassNumber"])


def test_embed_refuses_to_overwrite_input_and_bad_options(sim, standin, tmp_path):
    from cryolatent.inference import embed

    with pytest.raises(CryolatentError, match="overwrite"):
        embed(standin, sim["dir"] / "raw.star", sim["dir"] / "raw.star")
    with pytest.raises(CryolatentError, match="overwrite"):
        embed(standin, sim["dir"] / "raw.cs", sim["dir"] / "raw.star")   # raw.cs is INPUT
    with pytest.raises(CryolatentError, match="cluster-method"):
        embed(standin, sim["dir"] / "raw.star", tmp_path / "x.star", 2, "dbscan")
    with pytest.raises(CryolatentError, match="more classes"):
        embed(standin, sim["dir"] / "raw.star", tmp_path / "x.star", clusters=1000)
    assert not (tmp_path / "x.star").exists()


def test_embed_cli(sim, standin, tmp_path):
    from cryolatent.cli import main

    rc = main(["embed", str(standin), str(sim["dir"] / "raw.star"), "-o",
               str(tmp_path / "c.star"), "--clusters", "2", "--cluster-method", "gmm",
               "--batch-size", "5", "--device", "cpu"])
    assert rc == 0 and (tmp_path / "c.star").is_file() and (tmp_path / "c.z.npy").is_file()
    rc = main(["embed", str(standin), str(sim["dir"] / "raw.star"), "-o",
               str(sim["dir"] / "raw.star")])
    assert rc == 1


@pytest.mark.relion
def test_relion_reads_and_aligns_embed_output(sim, standin, relion, tmp_path):
    """relion_star_handler keeps every row; relion_stack_create --apply_transformation with
    OUT.star's poses aligns the 128-px particles onto their class template."""
    import mrcfile

    from cryolatent.inference import embed

    out = embed(standin, sim["dir"] / "raw.star", sim["dir"] / "relion_out.star", clusters=2)
    relion("relion_star_handler", "--i", out, "--o", tmp_path / "copy.star",
           cwd=sim["dir"])
    from cryolatent.io import read_star

    copy = read_star(tmp_path / "copy.star")["particles"]
    assert len(copy) == len(sim["cls"])
    relion("relion_stack_create", "--i", out, "--o", tmp_path / "aligned",
           "--apply_transformation", cwd=sim["dir"])
    with mrcfile.open(tmp_path / "aligned.mrcs", permissive=True) as m:
        aligned = np.asarray(m.data, dtype=np.float64)
    with mrcfile.open(sim["dir"] / "particles.mrcs", permissive=True) as m:
        raw = np.asarray(m.data, dtype=np.float64)
    assert aligned.shape == raw.shape
    inner = gaussian(BOX_RAW, 0, 0, 40) > 0.3

    def corr(a, b):
        return np.corrcoef(a[inner], b[inner])[0, 1]

    labels = read_star(out)["particles"]["rlnClassNumber"].to_numpy()
    for c in np.unique(labels):
        sel = labels == c
        true_cls = int(np.bincount(sim["cls"][sel]).argmax())
        mean_al, mean_raw = aligned[sel].mean(0), raw[sel].mean(0)
        r_al = np.array([corr(a, mean_al) for a in aligned[sel]])
        r_raw = np.array([corr(a, mean_raw) for a in raw[sel]])
        assert r_al.mean() > 0.9 and r_al.mean() > r_raw.mean() + 0.15, \
            (c, r_al.mean(), r_raw.mean())
        # and the aligned particles are the canonical template itself (RELION's convention)
        r_canon = np.array([corr(a, sim["canon"][true_cls]) for a in aligned[sel]])
        assert np.median(r_canon) > 0.9, np.median(r_canon)


# ================================================================ end to end, real chain
@pytest.mark.slow
def test_end_to_end_simulate_train_embed_original_and_training_set(tmp_path, shared_data):
    """simulate (MNIST, 48 px) -> preprocess to 24 px -> train a tiny TARGET-VAE -> embed the
    48-px originals and the 24-px training set: the on-the-fly crop + normalisation feeds
    the model the training images, so both give the same psi, the same origins in Å and the
    same latents, and every row comes back in order."""
    from cryolatent.config import TrainConfig
    from cryolatent.inference import embed
    from cryolatent.io import read_star
    from cryolatent.preprocess import preprocess
    from cryolatent.simulate.mnist import simulate_mnist
    from cryolatent.train import train

    star = simulate_mnist(tmp_path / "sim", n=96, box=48, seed=1,
                          mnist=shared_data / "mnist" / "mnist.npz")
    preprocess(star, tmp_path / "prep", box=24)
    cfg = TrainConfig(input=str(tmp_path / "prep" / "particles.star"), outdir=str(tmp_path / "run"),
                      model="target-vae", epochs=1, batch_size=32, z_dim=2, rotations=4,
                      enc_channels=8, enc_layers=1, gen_width=32, gen_layers=1,
                      fourier_features=16, device="cpu", num_workers=0)
    train(cfg)
    o1 = embed(tmp_path / "run", star, tmp_path / "o1.star", clusters=3, device="cpu")
    o2 = embed(tmp_path / "run", tmp_path / "prep" / "particles.star", tmp_path / "o2.star",
               clusters=3, device="cpu")   # the same classes, so the same centred frames
    a, b = read_star(o1)["particles"], read_star(o2)["particles"]
    truth = read_star(star)["particles"]
    assert a["rlnImageName"].tolist() == truth["rlnImageName"].tolist()
    assert b["rlnImageOriginalName"].tolist() == truth["rlnImageName"].tolist()
    for c in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "cryolatentZ1", "cryolatentZ2"):
        assert np.isfinite(a[c]).all()
    # the same decisions from the originals and from the training set (up to rare ties)
    same = np.isclose(_circ_diff(a["rlnAnglePsi"], b["rlnAnglePsi"]), 0, atol=1e-2) \
        & np.isclose(a["rlnOriginXAngst"], b["rlnOriginXAngst"], atol=1e-3) \
        & np.isclose(a["rlnOriginYAngst"], b["rlnOriginYAngst"], atol=1e-3)
    assert same.mean() > 0.95
    np.testing.assert_allclose(a["cryolatentZ1"], b["cryolatentZ1"], atol=1e-2, rtol=1e-3)
    assert set(a["rlnClassNumber"]) == {1, 2, 3}
    z = np.load(tmp_path / "o1.z.npy")
    np.testing.assert_array_equal(z[:, 1], a["cryolatentZ2"].to_numpy(np.float32))


def test_embed_when_the_training_set_is_gone(sim, tmp_path, monkeypatch, caplog):
    """The run's training set moved away: the model's box is used (with a warning), the
    originals are still cropped to it and the origins are still right in Å."""
    import logging

    import cryolatent.inference as inf
    from cryolatent.config import TrainConfig
    from cryolatent.io import read_star

    cfg = TrainConfig(input=str(tmp_path / "moved" / "particles.star"), z_dim=2, batch_size=8)
    monkeypatch.setattr(inf, "_load_run", lambda rundir, device, checkpoint="best":
                        (sim["model"], cfg))
    logger = logging.getLogger("cryolatent")
    logger.addHandler(caplog.handler)          # works whether or not it propagates
    try:
        out = inf.embed(tmp_path, sim["dir"] / "raw.star", tmp_path / "gone.star",
                        centre=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert "cannot be opened" in caplog.text
    p = read_star(out)["particles"]
    np.testing.assert_allclose(p["rlnOriginXAngst"], sim["truth"]["rlnOriginXAngst"], atol=1e-6)


def test_adapter_reproduces_a_phase_flipped_inverted_training_set(tmp_path):
    """Training set = preprocess(raw, box 32, phase flip, invert, normalise): the adapter
    turns the raw 64-px particles into the same images (flip with each particle's CTF at the
    cropped pixel size), from the recorded description; without it (an older training set)
    the inversion is found by calibration."""
    import pandas as pd

    from cryolatent.inference import InputAdapter
    from cryolatent.io import load_particles, write_mrcs, write_star
    from cryolatent.preprocess import OPTICS_COLUMNS, describe_particles, preprocess

    rng = np.random.default_rng(3)
    n, box = 12, 64
    imgs = np.stack([gaussian(box, *rng.normal(0, 4, 2), 6) for _ in range(n)])
    imgs = (imgs + rng.normal(0, 0.3, imgs.shape)).astype(np.float32)
    write_mrcs(tmp_path / "raw.mrcs", imgs, 1.2)
    t = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@raw.mrcs" for i in range(n)],
                      "rlnDefocusU": rng.uniform(8000, 20000, n),
                      "rlnDefocusV": rng.uniform(8000, 20000, n),
                      "rlnDefocusAngle": rng.uniform(0, 180, n),
                      "rlnOpticsGroup": np.ones(n, dtype=np.int64)})
    o = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["og"],
                      "rlnImagePixelSize": [1.2], "rlnImageSize": [box],
                      "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                      "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_star(tmp_path / "raw.star", t, o)
    res = preprocess(tmp_path / "raw.star", tmp_path / "prep", box=32, phase_flip=True,
                     invert=True)
    tps = load_particles(tmp_path / "prep" / "particles.star")
    prep = describe_particles(tps)
    assert prep == res.preprocessing
    assert (prep.box, prep.original_box, prep.phase_flip, prep.invert, prep.normalize) == \
        (32, 64, True, True, True)
    ps = load_particles(tmp_path / "raw.star")
    idx = np.arange(n)[::-1].copy()
    ad = InputAdapter(ps, prep)
    assert ad.flip and ad.invert and ad.normalize
    np.testing.assert_allclose(ad(ps.images(idx), idx).numpy(), tps.images(idx), atol=2e-3)
    # an older training set (no description): flip and normalisation judged from it, the
    # inversion found by comparing with the originals
    write_star(tmp_path / "prep" / "old.star", tps.table,
               tps.optics.drop(columns=list(OPTICS_COLUMNS.values())))
    otps = load_particles(tmp_path / "prep" / "old.star")
    guess = describe_particles(otps, source="inferred")
    assert guess.phase_flip and guess.normalize and not guess.invert and guess.box == 32
    ad = InputAdapter(ps, guess, training=otps)
    assert ad.flip and not ad.invert
    ad.calibrate()
    assert ad.invert and ad.calibration > 0.999
    np.testing.assert_allclose(ad(ps.images(idx), idx).numpy(), tps.images(idx), atol=2e-3)


def test_embed_bare_mrcs_input(sim, standin, tmp_path):
    """A bare .mrcs INPUT: OUT.star names the stack by absolute path (it opens from any
    folder) and carries the poses in Å of the stack's pixel size."""
    from cryolatent.inference import embed
    from cryolatent.io import load_particles, read_star

    out = embed(standin, sim["dir"] / "particles.mrcs", tmp_path / "sub" / "m.star",
                centre=False)
    p = read_star(out)["particles"]
    assert p["rlnImageName"][0] == f"000001@{(sim['dir'] / 'particles.mrcs').resolve()}"
    assert len(load_particles(out)) == len(sim["cls"])
    np.testing.assert_allclose(p["rlnOriginYAngst"], sim["truth"]["rlnOriginYAngst"], atol=1e-6)
