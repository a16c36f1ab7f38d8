"""evaluate metrics against hand-written formulas, scipy and brute force."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cryolatent import metrics
from cryolatent.errors import InputError


def js_corr_reference(a_deg, b_deg) -> float:
    """Jammalamadaka–SenGupta, written out with plain Python loops and math."""
    a = [math.radians(v) for v in a_deg]
    b = [math.radians(v) for v in b_deg]
    ma = math.atan2(sum(math.sin(v) for v in a), sum(math.cos(v) for v in a))
    mb = math.atan2(sum(math.sin(v) for v in b), sum(math.cos(v) for v in b))
    num = sum(math.sin(x - ma) * math.sin(y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum(math.sin(x - ma) ** 2 for x in a) * sum(math.sin(y - mb) ** 2 for y in b))
    return num / den


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_circular_corr_matches_reference(rng):
    a = rng.uniform(0, 360, 300)
    b = a + rng.normal(0, 40, 300)
    assert np.isclose(metrics.circular_corr(a, b), js_corr_reference(a, b), atol=1e-12)
    c = rng.vonmises(0.5, 2.0, 300) * 180 / math.pi
    d = rng.uniform(-180, 180, 300)
    assert np.isclose(metrics.circular_corr(c, d), js_corr_reference(c, d), atol=1e-12)


def test_offset_invariance_and_sign(rng):
    a = rng.uniform(0, 360, 500)
    assert np.isclose(metrics.circular_corr(a + 123.4, a), 1.0)
    assert np.isclose(metrics.circular_corr(a - 720 + 10, a), 1.0)           # wrapping
    assert np.isclose(metrics.circular_corr(-a, a), -1.0)                    # mirrored
    assert np.isclose(metrics.circular_corr(77.0 - a, a), -1.0)
    noisy = a + rng.normal(0, 20, 500)
    r = metrics.circular_corr(noisy + 50, a)
    assert 0.5 < r < 1.0
    assert np.isclose(metrics.circular_corr(-(noisy + 50), a), -r)
    # narrow N(0, 45°) angles (MNIST(N)) shifted by a constant
    n = rng.normal(0, 45, 500)
    assert np.isclose(metrics.circular_corr(n + 200, n), 1.0)
    assert metrics.circular_corr([1.0], [2.0]) is None
    assert metrics.circular_corr(np.zeros(5), a[:5]) is None


def test_per_class_offsets(rng):
    a = rng.uniform(0, 360, 600)
    cls = np.repeat([1, 2, 3], 200)
    pred = a + np.array([0.0, 90.0, 200.0])[cls - 1]
    assert metrics.circular_corr(pred, a) < 0.9
    assert np.isclose(metrics.rotation_corr_per_class(pred, a, cls), 1.0)


def test_rotation_agreement_and_error_against_loops(rng):
    """Resultant length and median error per class against plain-loop computations; robust
    where the J-S correlation is not (uniform angles, a few wrong particles)."""
    n = 400
    cls = np.repeat([1, 2], n // 2)
    true = rng.uniform(0, 360, n)
    err = rng.normal(0, 5, n)
    const = np.where(cls == 1, 40.0, -100.0)
    pred = true + const + err
    wrong = rng.choice(n, 30, replace=False)          # 7.5 % of particles anywhere
    pred[wrong] = rng.uniform(0, 360, 30)

    def loops(c):
        d = [math.radians(p - t) for p, t, k in zip(pred, true, cls) if k == c]
        C, S = sum(math.cos(v) for v in d) / len(d), sum(math.sin(v) for v in d) / len(d)
        m = math.atan2(S, C)
        res = [abs(math.degrees(math.atan2(math.sin(v - m), math.cos(v - m)))) for v in d]
        return math.hypot(C, S), float(np.median(res))

    ref = [loops(1), loops(2)]
    agree = metrics.rotation_agreement_per_class(pred, true, cls)
    error = metrics.rotation_error_per_class(pred, true, cls)
    assert agree == pytest.approx(np.mean([r[0] for r in ref]), abs=1e-12)
    assert error == pytest.approx(np.mean([r[1] for r in ref]), abs=1e-9)
    assert agree > 0.85 and error < 6.0                 # mostly right: both metrics say so
    # mirrored or random angles: agreement near 0
    assert metrics.rotation_agreement_per_class(100 - true, true, cls) < 0.15
    assert metrics.rotation_agreement_per_class(rng.uniform(0, 360, n), true, cls) < 0.15
    # exact up to a per-class constant: 1 and 0
    assert metrics.rotation_agreement_per_class(true + const, true, cls) == pytest.approx(1.0)
    assert metrics.rotation_error_per_class(true + const, true, cls) == pytest.approx(0, abs=1e-9)


def test_pearson_and_cluster_accuracy(rng):
    x = rng.normal(size=200)
    y = 0.5 * x + rng.normal(size=200)
    assert np.isclose(metrics.pearson(x, y), stats.pearsonr(x, y)[0], atol=1e-12)
    assert metrics.pearson(np.ones(5), x[:5]) is None
    true = rng.integers(0, 4, 300)
    perm = np.array([2, 0, 3, 1])
    assert metrics.cluster_accuracy(perm[true] + 10, true) == 1.0
    # against brute force over all one-to-one maps, with more predicted clusters than true
    pred = rng.integers(0, 5, 300)
    pred[:150] = true[:150]
    best = 0
    for p in itertools.permutations(range(5), 4):  # true label j <- predicted p[j]
        best = max(best, sum(int((pred == p[j])[true == j].sum()) for j in range(4)))
    assert np.isclose(metrics.cluster_accuracy(pred, true), best / 300)


def _tables(rng, n=120):
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    truth = pd.DataFrame({"rlnImageName": names,
                          "rlnAnglePsi": rng.uniform(-180, 180, n),
                          "rlnOriginXAngst": rng.normal(0, 5, n),
                          "rlnOriginYAngst": rng.normal(0, 5, n),
                          "rlnClassNumber": rng.integers(1, 4, n)})
    pred = pd.DataFrame({"rlnImageName": names,
                         "rlnAnglePsi": truth.rlnAnglePsi + 30 + rng.normal(0, 10, n),
                         "rlnOriginXAngst": truth.rlnOriginXAngst + rng.normal(0, 1, n),
                         "rlnOriginYAngst": truth.rlnOriginYAngst + rng.normal(0, 1, n),
                         "rlnClassNumber": np.array([3, 1, 2])[truth.rlnClassNumber - 1]})
    return pred, truth


def test_matching_by_name_not_row_order(rng):
    pred, truth = _tables(rng)
    ref = metrics.evaluate_tables(pred, truth)
    assert ref["n"] == 120 and ref["cluster_accuracy"] == 1.0
    assert np.isclose(ref["nmi"], 1.0) and np.isclose(ref["ari"], 1.0)
    assert ref["rotation_corr"] > 0.9
    assert np.isclose(ref["translation_corr_x"],
                      stats.pearsonr(pred.rlnOriginXAngst, truth.rlnOriginXAngst)[0])
    shuffled = pred.sample(frac=1.0, random_state=3).reset_index(drop=True)
    got = metrics.evaluate_tables(shuffled, truth)
    for k, v in ref.items():
        assert np.isclose(got[k], v), k
    # row order alone would be wrong
    naive = metrics.circular_corr(shuffled.rlnAnglePsi, truth.rlnAnglePsi)
    assert abs(naive) < 0.3
    # a subset of the truth is fine
    sub = metrics.evaluate_tables(shuffled.iloc[:50], truth)
    assert sub["n"] == 50


def test_rewritten_stack_uses_original_names(rng):
    pred, truth = _tables(rng)
    order = rng.permutation(len(pred))
    p = pred.iloc[order].reset_index(drop=True)
    p["rlnImageOriginalName"] = p["rlnImageName"]
    # the rewritten stack: same file name in another folder, new order -> names collide
    p["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(len(p))]
    ref = metrics.evaluate_tables(pred, truth)
    got = metrics.evaluate_tables(p, truth)
    assert np.isclose(got["rotation_corr"], ref["rotation_corr"])
    # names written with different folders still match (index, stack file)
    q = pred.copy()
    q["rlnImageName"] = [f"{i + 1}@Simulate/job001/particles.mrcs" for i in range(len(q))]
    assert np.isclose(metrics.evaluate_tables(q, truth)["rotation_corr"], ref["rotation_corr"])


def test_missing_columns_and_mismatch(rng):
    pred, truth = _tables(rng)
    res = metrics.evaluate_tables(pred.drop(columns=["rlnClassNumber", "rlnOriginYAngst"]), truth)
    assert res["cluster_accuracy"] is None and res["nmi"] is None and res["ari"] is None
    assert res["translation_corr_y"] is None and res["translation_corr_x"] is not None
    bad = pred.copy()
    bad.loc[5, "rlnImageName"] = "000999@other.mrcs"
    with pytest.raises(InputError) as e:
        metrics.evaluate_tables(bad, truth)
    assert "\n" not in str(e.value) and "000999@other.mrcs" in str(e.value)
    with pytest.raises(InputError, match="rlnImageName"):
        metrics.evaluate_tables(pred.drop(columns=["rlnImageName"]), truth)


def test_cli_evaluate_json(tmp_path, rng, capsys):
    from cryolatent.cli import main
    from cryolatent.io import write_star
    from cryolatent.simulate import optics_table

    pred, truth = _tables(rng)
    pred["rlnOpticsGroup"] = truth["rlnOpticsGroup"] = 1
    write_star(tmp_path / "truth.star", truth, optics_table(50, 1.0))
    write_star(tmp_path / "pred.star", pred.drop(columns=["rlnClassNumber"]).iloc[::-1],
               optics_table(50, 1.0))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "pred.star"), "--truth",
                 str(tmp_path / "truth.star")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    res = json.loads(out[0])
    assert set(res) == {"rotation_corr", "rotation_corr_per_class",
                        "rotation_agreement_per_class", "rotation_error_deg_per_class",
                        "translation_corr_x", "translation_corr_y", "cluster_accuracy", "nmi",
                        "ari", "n"}
    assert res["n"] == 120 and res["cluster_accuracy"] is None and res["rotation_corr"] > 0.9
    assert main(["evaluate", str(tmp_path / "nope.star"), "--truth",
                 str(tmp_path / "truth.star")]) == 1
    assert "nope.star" in capsys.readouterr().err
