"""Tests of ``cryolatent select`` and of the clustering behind ``embed --clusters``."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cryolatent.analysis.cluster import METHODS, cluster_latents, relabel_by_size
from cryolatent.errors import CryolatentError


def _blobs(n_per=(60, 40, 25), d=4, sep=12.0, seed=0):
    """Well-separated Gaussian blobs: (z (N, d), true labels (N,)), shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per), d)) * sep
    z = np.concatenate([c + rng.normal(size=(m, d)) for c, m in zip(centres, n_per)])
    y = np.repeat(np.arange(len(n_per)), n_per)
    p = rng.permutation(len(y))
    return z[p].astype(np.float32), y[p]


# ---------------------------------------------------------------- clustering
@pytest.mark.parametrize("method", METHODS)
def test_cluster_recovers_separated_blobs(method):
    z, y = _blobs()
    lab = cluster_latents(z, 3, method, seed=1)
    assert lab.shape == y.shape and lab.dtype == np.int64
    assert set(lab.tolist()) == {0, 1, 2}
    assert adjusted_rand_score(y, lab) == pytest.approx(1.0)
    # class 0 is the largest blob (60), then 40, then 25
    assert np.bincount(lab).tolist() == [60, 40, 25]
    # deterministic
    assert np.array_equal(lab, cluster_latents(z, 3, method, seed=1))


def test_agglomerative_subsample_and_gmm_subsample_assign_everyone():
    z, y = _blobs(n_per=(300, 200, 100), seed=3)
    lab = cluster_latents(z, 3, "agglomerative", max_ward=50)
    assert adjusted_rand_score(y, lab) == pytest.approx(1.0)
    lab = cluster_latents(z, 3, "gmm", max_gmm_fit=90)
    assert adjusted_rand_score(y, lab) == pytest.approx(1.0)


def test_kmeans_minibatch_path(monkeypatch):
    import cryolatent.analysis.cluster as cl

    monkeypatch.setattr(cl, "MINIBATCH_ABOVE", 100)
    z, y = _blobs(n_per=(300, 200, 100), seed=4)
    assert adjusted_rand_score(y, cl.cluster_latents(z, 3, "kmeans")) == pytest.approx(1.0)


def test_relabel_by_size():
    lab = np.array([5, 2, 2, 7, 7, 7, 5, 9])
    # sizes: 7 -> 3, 2 -> 2, 5 -> 2 (first at 0, before 2 at 1), 9 -> 1
    assert relabel_by_size(lab).tolist() == [1, 2, 2, 0, 0, 0, 1, 3]


def test_cluster_errors():
    z, _ = _blobs()
    with pytest.raises(CryolatentError, match="cluster-method"):
        cluster_latents(z, 3, "dbscan")
    with pytest.raises(CryolatentError, match="more classes"):
        cluster_latents(z[:2], 3)
    with pytest.raises(CryolatentError, match=">= 1"):
        cluster_latents(z, 0)
    z[7, 1] = np.nan
    with pytest.raises(CryolatentError, match="particle 7"):
        cluster_latents(z, 3)
    assert cluster_latents(z[:5] * 0, 1).tolist() == [0] * 5


# ---------------------------------------------------------------- select
import pandas as pd  # noqa: E402

from cryolatent.analysis.cluster import parse_classes, select_classes  # noqa: E402


def test_parse_classes():
    assert parse_classes("1,3") == [1, 3]
    assert parse_classes(" 5-7, 2,2") == [2, 5, 6, 7]
    for bad in ("a", "3-1", "0", "-2", "", "1;2"):
        with pytest.raises(CryolatentError):
            parse_classes(bad)


@pytest.fixture
def classed_star(tmp_path):
    """A RELION 3.1 STAR with two optics groups, text and number columns and classes 1..4."""
    from cryolatent.io import write_star

    rng = np.random.default_rng(0)
    n = 50
    p = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/job007/mic{i % 5}.mrcs" for i in range(n)],
        "rlnMicrographName": [f"MotionCorr/mic {i % 5}.mrc" for i in range(n)],  # quoted
        "rlnDefocusU": rng.uniform(1e4, 3e4, n),
        "rlnOpticsGroup": (np.arange(n) % 2 + 1).astype(np.int64),
        "rlnAnglePsi": rng.uniform(0, 360, n),
        "rlnOriginXAngst": rng.normal(0, 3, n),
        "rlnOriginYAngst": rng.normal(0, 3, n),
        "rlnClassNumber": rng.integers(1, 5, n),
        "cryolatentZ1": rng.normal(size=n).astype(np.float32),
    })
    o = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["og1", "og2"],
                      "rlnImagePixelSize": [1.1, 1.1], "rlnImageSize": [200, 200],
                      "rlnImageDimensionality": [2, 2], "rlnVoltage": [300.0, 300.0],
                      "rlnSphericalAberration": [2.7, 2.7], "rlnAmplitudeContrast": [0.1, 0.1]})
    write_star(tmp_path / "in.star", p, o)
    return tmp_path / "in.star", p, o


def test_select_star_keeps_rows_columns_optics(classed_star, tmp_path):
    from cryolatent.io import read_star

    path, p, o = classed_star
    out = select_classes(path, [1, 3], tmp_path / "sub.star")
    b = read_star(out)
    keep = p["rlnClassNumber"].isin([1, 3]).to_numpy()
    sub = b["particles"]
    assert list(sub.columns) == list(p.columns)
    assert sub["rlnImageName"].tolist() == p["rlnImageName"][keep].tolist()   # order kept
    assert sub["rlnMicrographName"].tolist() == p["rlnMicrographName"][keep].tolist()
    np.testing.assert_array_equal(sub["rlnAnglePsi"], p["rlnAnglePsi"][keep])
    np.testing.assert_array_equal(sub["cryolatentZ1"].astype(np.float32), p["cryolatentZ1"][keep])
    pd.testing.assert_frame_equal(b["optics"], read_star(path)["optics"])
    inv = read_star(select_classes(path, "1,3", tmp_path / "rest.star", invert=True))
    assert inv["particles"]["rlnImageName"].tolist() == p["rlnImageName"][~keep].tolist()


def test_select_errors(classed_star, tmp_path):
    path, p, _ = classed_star
    with pytest.raises(CryolatentError, match="overwrite"):
        select_classes(path, [1], path)
    with pytest.raises(CryolatentError, match="must end in .star"):
        select_classes(path, [1], tmp_path / "x.cs")
    with pytest.raises(CryolatentError, match="empty"):
        select_classes(path, [9], tmp_path / "x.star")
    with pytest.raises(CryolatentError, match="empty"):
        select_classes(path, [1, 2, 3, 4], tmp_path / "x.star", invert=True)
    from cryolatent.io import write_star

    write_star(tmp_path / "noclass.star", p.drop(columns="rlnClassNumber"), None)
    with pytest.raises(CryolatentError, match="rlnClassNumber"):
        select_classes(tmp_path / "noclass.star", [1], tmp_path / "x.star")
    assert not (tmp_path / "x.star").exists()


def test_select_relion30_class2d_table(shared_data, tmp_path):
    """A RELION 3.0 Class2D _data.star: the subset is written in 3.1 layout, rows kept."""
    from cryolatent.io import read_star

    src = shared_data / "interop/relion30_no_optics/relion_git2015__ap_s_c2d_betagal_8915ptcls.star"
    orig = read_star(src)[""]
    out = select_classes(src, [1, 6], tmp_path / "sub.star")
    b = read_star(out)
    keep = orig["rlnClassNumber"].isin([1, 6]).to_numpy()
    assert 0 < keep.sum() < len(orig)
    assert b["particles"]["rlnImageName"].tolist() == orig["rlnImageName"][keep].tolist()
    assert "optics" in b and "rlnImagePixelSize" in b["optics"].columns
    np.testing.assert_allclose(b["particles"]["rlnOriginXAngst"],
                               orig["rlnOriginX"][keep] * b["optics"]["rlnImagePixelSize"][0])


def test_select_cs(shared_data, tmp_path):
    from cryosparc.dataset import Dataset

    src = shared_data / "interop/cryosparc_cs/cryosparc_J2_particles_exported.cs"
    arr = np.load(src)
    out = select_classes(src, [2, 5], tmp_path / "sub.cs")      # alignments2D/class 1 and 4
    sub = np.load(out)
    keep = np.isin(arr["alignments2D/class"], [1, 4])
    assert sub.dtype == arr.dtype and 0 < len(sub) == keep.sum()
    assert np.array_equal(sub, arr[keep])
    ds = Dataset.load(str(out))
    np.testing.assert_array_equal(ds["uid"], arr["uid"][keep])
    with pytest.raises(CryolatentError, match="must end in .cs"):
        select_classes(src, [2], tmp_path / "sub.star")


def test_select_cli(classed_star, tmp_path):
    from cryolatent.cli import main
    from cryolatent.io import read_star

    path, p, _ = classed_star
    assert main(["select", str(path), "--classes", "2-3", "-o", str(tmp_path / "s.star"),
                 "--invert"]) == 0
    got = read_star(tmp_path / "s.star")["particles"]["rlnClassNumber"]
    assert set(got) <= {1, 4} and len(got) == (~p["rlnClassNumber"].isin([2, 3])).sum()
    assert main(["select", str(path), "--classes", "x", "-o", str(tmp_path / "t.star")]) == 1


@pytest.mark.relion
def test_select_matches_relion_star_handler_select(classed_star, relion, tmp_path):
    """Our subset = relion_star_handler --select rlnClassNumber on the same file, and RELION
    reads our subset back with every row."""
    from cryolatent.io import read_star

    path, p, _ = classed_star
    ours = select_classes(path, [3], tmp_path / "ours.star")
    relion("relion_star_handler", "--i", path, "--o", tmp_path / "theirs.star",
           "--select", "rlnClassNumber", "--minval", "3", "--maxval", "3")
    relion("relion_star_handler", "--i", ours, "--o", tmp_path / "back.star")
    a = read_star(ours)["particles"]
    b = read_star(tmp_path / "theirs.star")["particles"]
    c = read_star(tmp_path / "back.star")["particles"]
    assert a["rlnImageName"].tolist() == b["rlnImageName"].tolist() == c["rlnImageName"].tolist()
    np.testing.assert_allclose(a["rlnAnglePsi"], b["rlnAnglePsi"], atol=1e-5)
