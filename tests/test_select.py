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
