"""cryolatent.run: the run folder, and the preprocessing ``train`` records so that ``embed``
never needs the training set (a tiny real run: preprocess -> train 1 epoch -> embed)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from cryolatent.config import TrainConfig
from cryolatent.io import load_particles, read_star, write_mrcs, write_star
from cryolatent.preprocess import Preprocessing, describe_particles, preprocess

BOX_RAW, BOX, APIX, N = 48, 24, 2.0, 40
COLUMNS = ["rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "cryolatentZ1", "cryolatentZ2"]


def _raw_set(folder):
    """N noisy 48-px particles (two blob shapes at random positions) with CTF parameters."""
    rng = np.random.default_rng(11)
    y, x = np.mgrid[:BOX_RAW, :BOX_RAW] - BOX_RAW // 2
    imgs = []
    for i in range(N):
        cx, cy = rng.normal(0, 3, 2)
        img = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 5.0 ** 2))
        if i % 2:
            img += 0.8 * np.exp(-((x - cx - 8) ** 2 + (y - cy) ** 2) / (2 * 3.0 ** 2))
        imgs.append(30.0 * img + 7.0 + rng.normal(0, 3.0, img.shape))
    folder.mkdir(parents=True)
    write_mrcs(folder / "raw.mrcs", np.asarray(imgs, np.float32), APIX)
    t = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@raw.mrcs" for i in range(N)],
                      "rlnDefocusU": rng.uniform(8000, 20000, N),
                      "rlnDefocusV": rng.uniform(8000, 20000, N),
                      "rlnDefocusAngle": rng.uniform(0, 180, N),
                      "rlnOpticsGroup": np.ones(N, dtype=np.int64)})
    o = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["og"],
                      "rlnImagePixelSize": [APIX], "rlnImageSize": [BOX_RAW],
                      "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                      "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    write_star(folder / "raw.star", t, o)
    return folder / "raw.star"


def _embed(run, star, out):
    from cryolatent.inference import embed

    embed(run, star, out, device="cpu", trust=False)
    return read_star(out)["particles"]


def _strip_record(run):
    """Make ``run`` look like one of an older cryolatent (no recorded preprocessing)."""
    cfg = json.loads((run / "config.json").read_text())
    cfg.pop("preprocessing")
    (run / "config.json").write_text(json.dumps(cfg))
    for ck in (run / "checkpoints").glob("*.pt"):
        d = torch.load(ck, weights_only=True)
        d["config"].pop("preprocessing")
        torch.save(d, ck)


@pytest.fixture
def log_text(caplog):
    logger = logging.getLogger("cryolatent")
    logger.addHandler(caplog.handler)          # works whether or not it propagates
    yield lambda: caplog.text
    logger.removeHandler(caplog.handler)


def test_embed_without_the_training_set_gives_the_same_poses_and_latents(tmp_path, log_text):
    """Train on preprocess(originals: crop 48 -> 24, phase flip, invert, normalise), embed the
    originals, move the training set away, embed again: the same poses and latents, from
    the preprocessing the run recorded (config.json and the checkpoints). A run without the
    record (an older cryolatent) cannot do this: its latents then differ."""
    from cryolatent.run import RunDir, load_checkpoint, load_run
    from cryolatent.train import train

    raw = _raw_set(tmp_path / "raw")
    res = preprocess(raw, tmp_path / "prep", box=BOX, phase_flip=True, invert=True)
    expect = describe_particles(load_particles(tmp_path / "prep" / "particles.star"))
    assert expect == res.preprocessing and expect.steps() == \
        ["Fourier crop 48 -> 24 px", "phase flip", "invert", "normalise"]
    run = tmp_path / "run"
    train(TrainConfig(input=str(tmp_path / "prep" / "particles.star"), outdir=str(run),
                      epochs=1, batch_size=16, z_dim=2, rotations=4, enc_channels=8,
                      enc_layers=1, gen_width=32, gen_layers=1, fourier_features=16,
                      device="cpu", num_workers=0, seed=3))

    # the record: config.json, both checkpoints (weights_only), RunDir, load_run
    on_disk = json.loads((run / "config.json").read_text())["preprocessing"]
    assert Preprocessing.from_dict(on_disk) == expect
    for which in ("best", "last"):
        ck = load_checkpoint(run / "checkpoints" / f"{which}.pt")
        assert ck["config"]["preprocessing"] == on_disk
    assert RunDir(run).preprocessing() == expect
    assert TrainConfig.load(run / "config.json").preprocessing == expect.to_dict()
    model, cfg = load_run(run, "cpu")
    assert cfg.preprocessing == on_disk and model.box == BOX

    before = _embed(run, raw, tmp_path / "before.star")
    shutil.move(tmp_path / "prep", tmp_path / "elsewhere")
    after = _embed(run, raw, tmp_path / "after.star")
    assert "records no preprocessing" not in log_text()
    for c in COLUMNS:
        np.testing.assert_allclose(after[c].to_numpy(float), before[c].to_numpy(float),
                                   rtol=1e-6, atol=1e-6, err_msg=c)
    assert np.isfinite(before[COLUMNS].to_numpy(float)).all()

    # control: the same run without the record and without its training set
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    _strip_record(old)
    stale = _embed(old, raw, tmp_path / "stale.star")
    assert "records no preprocessing" in log_text() and "cannot be opened" in log_text()
    z = before[["cryolatentZ1", "cryolatentZ2"]].to_numpy(float)
    z_stale = stale[["cryolatentZ1", "cryolatentZ2"]].to_numpy(float)
    assert np.abs(z_stale - z).max() > 1e-2
    # ... and with its training set back, judged from it: the same as the recorded run
    shutil.move(tmp_path / "elsewhere", tmp_path / "prep")
    judged = _embed(old, raw, tmp_path / "judged.star")
    for c in COLUMNS:
        np.testing.assert_allclose(judged[c].to_numpy(float), before[c].to_numpy(float),
                                   rtol=1e-6, atol=1e-6, err_msg=c)


def test_train_records_a_set_not_made_by_preprocess(tmp_path):
    """Training images given as an array: recorded as stored (no steps but what they are)."""
    from cryolatent.run import RunDir
    from cryolatent.train import train

    x = np.random.default_rng(0).normal(size=(24, 16, 16)).astype(np.float32)
    run = train(TrainConfig(outdir=str(tmp_path / "run"), epochs=1, batch_size=8, z_dim=2,
                            rotations=4, enc_channels=8, enc_layers=1, gen_width=16,
                            gen_layers=1, fourier_features=8, device="cpu", num_workers=0),
                data=x)
    prep = RunDir(run).preprocessing()
    assert prep == Preprocessing(box=16, normalize=True, source="stored")
    assert prep.steps(32) == ["Fourier crop 32 -> 16 px", "normalise"]
