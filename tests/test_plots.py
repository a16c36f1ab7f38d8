"""Latent maps, pose histograms, training curves and `cryolatent plot`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryolatent.analysis import plots
from cryolatent.cli import main


def clusters(n_per: int = 100, K: int = 3, D: int = 6, seed: int = 0):
    """(N, D) latents in K well separated Gaussian clusters, labels 1..K, random psi."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (K, D))
    labels = np.repeat(np.arange(1, K + 1), n_per)
    z = centres[labels - 1] + rng.normal(0, 0.5, (len(labels), D))
    psi = rng.uniform(0, 360, len(labels))
    return z, labels, psi


def read_png(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.02, f"{path} looks blank"
    return img


def knn_accuracy(xy: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of the labels in the 2-D map."""
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[np.argmin(d, axis=1)] == labels).mean())


def test_pca_matches_sklearn_and_writes_png(tmp_path):
    from sklearn.decomposition import PCA

    z, labels, psi = clusters()
    res = plots.plot_latents(z, labels, psi, tmp_path, method="pca", fmt=("png", "pdf"))
    ref = PCA(n_components=2).fit(z)
    proj = ref.transform(z)
    for j in range(2):  # same axes up to sign
        c = np.corrcoef(res["coords"][:, j], proj[:, j])[0, 1]
        assert abs(c) > 0.9999
    names = sorted(p.name for p in res["files"])
    assert names == ["latent_pca.pdf", "latent_pca.png"]
    read_png(tmp_path / "latent_pca.png")
    assert (tmp_path / "latent_pca.pdf").read_bytes()[:4] == b"%PDF"
    _, expl = plots.pca_2d(z)
    np.testing.assert_allclose(expl, ref.explained_variance_ratio_, rtol=1e-6)


def test_density_beyond_scatter_limit_and_one_dim(tmp_path):
    z, labels, psi = clusters(n_per=200)
    res = plots.plot_latents(z, labels, psi, tmp_path, method="pca", max_scatter=250)
    assert {p.name for p in res["files"]} == {"latent_pca.png", "latent_pca_density.png"}
    read_png(tmp_path / "latent_pca_density.png")
    # D = 1, no colouring: a density / scatter map only
    res = plots.plot_latents(z[:, :1], out_dir=tmp_path / "one", method="pca")
    assert [p.name for p in res["files"]] == ["latent_pca.png"]
    assert np.all(res["coords"][:, 1] == 0)


@pytest.mark.slow  # numba compiles UMAP's fit and transform: ~20-60 s on 2 cores
def test_umap_small_separates_clusters_and_transforms_rest(tmp_path):
    z, labels, psi = clusters(n_per=100)
    a = plots.umap_2d(z, sample=200, seed=1)   # 200 fitted, 100 transformed
    assert a.shape == (300, 2) and np.all(np.isfinite(a))
    assert knn_accuracy(a, labels) > 0.98
    res = plots.plot_latents(z, labels, psi, tmp_path, method="umap", coords=a)
    read_png(res["files"][0])


def test_pose_histograms_and_training_curves(tmp_path):
    rng = np.random.default_rng(0)
    files = plots.plot_pose_histograms(rng.uniform(-180, 180, 500), rng.normal(0, 4, (500, 2)),
                                       tmp_path)
    read_png(files[0])
    ep = np.arange(1, 11)
    pd.DataFrame({"epoch": ep, "images": 900, "train_loss": 50 / ep, "val_loss": 55 / ep,
                  "train_kl": np.log1p(ep), "lr": 1e-3 * 0.5 ** (ep // 4)}).to_csv(
        tmp_path / "log.csv", index=False)
    files = plots.plot_training_curves(tmp_path / "log.csv", tmp_path)
    read_png(files[0])
    groups = plots._curve_groups(["epoch", "images", "train_loss", "val_loss", "train_kl", "lr"])
    assert groups == {"loss": {"train": "train_loss", "val": "val_loss"},
                      "kl": {"train": "train_kl"}}


def _write_out_star(path, n_per=60, with_z=True):
    from cryolatent.io import write_star

    z, labels, psi = clusters(n_per=n_per, D=4)
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@p.mrcs" for i in range(len(z))],
                       "rlnAnglePsi": psi - 180, "rlnOriginXAngst": rng.normal(0, 3, len(z)),
                       "rlnOriginYAngst": rng.normal(0, 3, len(z)), "rlnClassNumber": labels,
                       "rlnOpticsGroup": 1})
    if with_z:
        for d in range(z.shape[1]):
            df[f"cryolatentZ{d + 1}"] = z[:, d]
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [1.5], "rlnImageSize": [32],
                           "rlnImageDimensionality": [2]})
    write_star(path, df, optics)


def test_cli_plot(tmp_path):
    star = tmp_path / "out.star"
    _write_out_star(star)
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"epoch": [1, 2, 3], "images": 100, "loss": [3.0, 2.0, 1.5],
                  "lr": 2e-4}).to_csv(run / "log.csv", index=False)
    rc = main(["plot", str(star), "-o", str(tmp_path / "plots"), "--no-umap",
               "--rundir", str(run)])
    assert rc == 0
    got = {p.name for p in (tmp_path / "plots").iterdir()}
    assert got == {"latent_pca.png", "pose_histograms.png", "training_curves.png"}
    for n in ("latent_pca.png", "pose_histograms.png", "training_curves.png"):
        read_png(tmp_path / "plots" / n)


def test_cli_plot_errors(tmp_path, capsys):
    star = tmp_path / "noz.star"
    _write_out_star(star, with_z=False)
    assert main(["plot", str(star), "-o", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cryolatentZ" in err and "embed" in err
    assert main(["plot", str(tmp_path / "missing.star"), "-o", str(tmp_path / "p")]) == 1
    assert "missing.star" in capsys.readouterr().err
    star2 = tmp_path / "ok.star"
    _write_out_star(star2)
    assert main(["plot", str(star2), "-o", str(tmp_path / "p"), "--no-umap",
                 "--rundir", str(tmp_path)]) == 1
    assert "log.csv" in capsys.readouterr().err


def test_shift_bins_follow_a_grid():
    grid = 6.67 * np.array([-3, -1, 0, 0, 2, 5, 5])
    edges = plots._shift_bins(grid, 60)
    w = np.diff(edges)
    np.testing.assert_allclose(w, 6.67, rtol=1e-9)
    counts, _ = np.histogram(grid, edges)
    # every grid value sits mid-bin: the counts are exact
    assert counts.tolist() == [1, 0, 1, 2, 0, 1, 0, 0, 2]
    cont = np.random.default_rng(0).normal(0, 5, 1000)
    assert len(plots._shift_bins(cont, 40)) == 41
