"""benchmarks/mnist_quality.py: its in-memory MNIST(U)/(N) equals what ``simulate`` writes,
its scoring gives the analytic values for known predictions, and a tiny run writes a timeline."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("mnist_quality",
                                                  REPO / "benchmarks" / "mnist_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mnist_quality"] = mod
    spec.loader.exec_module(mod)
    return mod


mq = _load_bench()


@pytest.mark.parametrize("variant,split,seed", [("u", "train", 0), ("n", "test", 3)])
def test_in_memory_set_equals_simulate(shared_data, tmp_path, variant, split, seed):
    from cryolatent.io import load_particles
    from cryolatent.simulate import simulate_mnist

    mnist = shared_data / "mnist" / "mnist.npz"
    n = 37
    star = simulate_mnist(tmp_path / "sim", variant=variant, n=n, seed=seed, mnist=mnist,
                          split=split)
    ps = load_particles(star)
    x, psi, t, labels = mq.make_mnist(variant, split, n, seed, mnist)
    np.testing.assert_array_equal(x, ps.images(np.arange(n)))
    tab = ps.table
    np.testing.assert_allclose(psi, tab["rlnAnglePsi"].to_numpy(float), atol=1e-6)
    np.testing.assert_allclose(t[:, 0], tab["rlnOriginXAngst"].to_numpy(float), atol=1e-6)
    np.testing.assert_allclose(t[:, 1], tab["rlnOriginYAngst"].to_numpy(float), atol=1e-6)
    np.testing.assert_array_equal(labels + 1, tab["rlnClassNumber"].to_numpy(int))


def test_score_known_predictions():
    rng = np.random.default_rng(0)
    n, k = 300, 3
    labels = np.repeat(np.arange(k), n // k)
    psi_true = rng.uniform(-180, 180, n)
    t_true = rng.normal(0, 5, (n, 2))
    # right up to one constant angle, shifts scaled/offset (Pearson 1), z separates classes
    z = np.eye(k)[labels] * 10 + rng.normal(0, 0.01, (n, k))
    pred = {"psi": psi_true + 77.0, "shift": 2 * t_true + 1, "z": z.astype(np.float32)}
    m, cl, _ = mq.score(pred, psi_true, t_true, labels, k=k, centre=False)
    assert m["rotation_corr"] == pytest.approx(1.0, abs=1e-9)
    assert m["translation_corr_x"] == pytest.approx(1.0, abs=1e-9)
    assert m["translation_corr_y"] == pytest.approx(1.0, abs=1e-9)
    assert m["cluster_accuracy"] == 1.0 and m["cluster_accuracy_kmeans"] == 1.0
    # a mirrored angle is -1, and the targets say so
    m2, _, _ = mq.score({**pred, "psi": 30.0 - psi_true}, psi_true, t_true, labels, k=k,
                        centre=False)
    assert m2["rotation_corr"] == pytest.approx(-1.0, abs=1e-9)
    met = mq.targets_met(m2, mq.TARGETS[("target-vae", "mnist-u")])
    assert met == {"rotation_corr": False, "translation_corr_x": True,
                   "translation_corr_y": True, "cluster_accuracy": True}


def test_score_centres_class_frames_like_embed():
    """Shifts off by a per-class frame offset turned with psi (t + R(-psi) c_k): embed's
    centring (default) removes it, the raw correlation keeps the error."""
    rng = np.random.default_rng(1)
    n, k = 600, 3
    labels = np.repeat(np.arange(k), n // k)
    psi = rng.uniform(-180, 180, n)
    t = rng.normal(0, 5, (n, 2))
    c = np.array([[6.0, -4.0], [-5.0, 0.0], [0.0, 7.0]])[labels]
    a = np.radians(psi)
    back = np.stack([np.cos(a) * c[:, 0] + np.sin(a) * c[:, 1],
                     -np.sin(a) * c[:, 0] + np.cos(a) * c[:, 1]], -1)      # R(-psi) c
    z = (np.eye(k)[labels] * 10).astype(np.float32)
    m, _, _ = mq.score({"psi": psi, "shift": t + back, "z": z}, psi, t, labels, k=k)
    assert m["frames_centred"] is True
    assert m["translation_corr_x_raw"] < 0.8 and m["translation_corr_y_raw"] < 0.8
    # (not exact: c_k is estimated from 200 noisy shifts and pulled towards the all-class mean)
    assert m["translation_corr_x"] > 0.95 and m["translation_corr_y"] > 0.95
    assert m["translation_corr_x"] > m["translation_corr_x_raw"] + 0.2


def test_tiny_run_writes_timeline(shared_data, tmp_path):
    out = tmp_path / "mq"
    opts = ["--device", "cpu", "--mnist", str(shared_data / "mnist" / "mnist.npz"),
            "--n-train", "60", "--n-test", "30", "--enc-channels", "4", "--gen-width", "16",
            "--gen-layers", "1", "--fourier-features", "8", "--kernel", "7",
            "--translation-range", "2", "--batch-size", "20", "--z-dim", "3",
            "--eval-every-epochs", "1", "--outdir", str(out), "--json", str(tmp_path / "t.json")]
    mq.main(opts + ["--epochs", "1"])
    assert json.loads((tmp_path / "t.json").read_text())["epochs"] == 1
    with pytest.raises(SystemExit):          # a used folder needs --resume
        mq.main(opts + ["--epochs", "2"])
    mq.main(opts + ["--epochs", "2", "--resume"])   # the timeline goes on from epoch 1
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["status"] == "epochs" and res["epochs"] == 2
    assert [r["epoch"] for r in res["timeline"]] == [1, 2]
    # 60 particles, 10 % held out -> 54 train, batches of 20, last partial batch dropped
    assert [r["images_seen"] for r in res["timeline"]] == [40, 80]
    assert res["options"]["z_dim"] == 3 and res["options"]["lr"] == 2e-4
    assert all(-1 <= r["rotation_corr"] <= 1 for r in res["timeline"])
    assert (out / "timeline.csv").read_text().count("\n") == 3
    p = np.load(out / "predictions.npz")
    assert p["z"].shape == (30, 3) and p["psi_pred"].shape == (30,)


def test_rotation_diagnostics_flips_and_grid():
    n = 400
    labels = np.repeat([0, 1], n // 2)
    true = np.linspace(-179, 179, n)
    flip = (np.arange(n) % 4) == 0                     # a quarter flipped by 180°
    pred = true + np.where(labels == 0, 30.0, -100.0) + 180.0 * flip
    d = mq.rotation_diagnostics(pred, true, labels)
    assert d["rotation_agreement_mod180_per_class"] == pytest.approx(1.0, abs=1e-9)
    assert d["flip_frac_per_class"] == pytest.approx(0.25)
    m, _, _ = mq.score({"psi": pred, "shift": np.c_[true, -true], "z": np.c_[labels, labels]
                        .astype(np.float32)}, true, np.c_[true, -true], labels, k=2)
    assert m["rotation_agreement_per_class"] == pytest.approx(0.5, abs=1e-9)  # |0.75 - 0.25|
    g = mq.rotation_diagnostics(np.array([0.0, 45.2, 90.0, 100.0]), np.zeros(4), np.zeros(4))
    assert g["psi_on_grid_frac_P8"] == 0.75 and g["psi_on_grid_frac_P4"] == 0.5


def test_options_take_their_fields_types():
    """Every TrainConfig field is an option of its own type, also those whose default is None
    (a float option parsed as int rejected "--pixel-fraction 0.25")."""
    a = mq.build_parser().parse_args(["--outdir", "x", "--pixel-fraction", "0.25", "--lr", "1e-3",
                                      "--translation-prior", "2.5", "--kernel", "25",
                                      "--subpixel", "on", "--amp", "off"])
    assert (a.cfg_pixel_fraction, a.cfg_lr, a.cfg_translation_prior, a.cfg_kernel,
            a.cfg_subpixel, a.cfg_amp) == (0.25, 1e-3, 2.5, 25, True, "off")
    assert isinstance(a.cfg_kernel, int)
