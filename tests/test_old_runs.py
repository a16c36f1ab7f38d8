"""Run folders written by an older cryolatent load and embed as they did then.

``tests/data/old_runs_0_1/``: two tiny TARGET-VAE runs made with cryolatent 0.1.0 at commit
0e8f916 (before every option was resolved and a version recorded: their config.json holds
``kernel: null``, the second ``translation_range: null`` too), with the particles they were
trained on and the embedding that commit's ``embed`` wrote (``tests/data/old_runs_0_1/
README.md``). The embedding today must equal it to float tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryolatent.inference import embed
from cryolatent.io.star import read_star
from cryolatent.run import load_run

DATA = Path(__file__).parent / "data" / "old_runs_0_1"

#: run folder, its training input (what was embedded), the embedding written then
RUNS = [("run_tvae_ctf", "sim/particles.star", "emb_ctf.star"),
        ("run_tvae_bars", "bars.mrcs", "emb_bars.star")]

COLUMNS = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _particles(path: Path):
    return read_star(path)["particles"]


@pytest.mark.parametrize("run, input, then", RUNS)
def test_an_old_run_embeds_as_it_did(tmp_path, run, input, then):
    out = embed(DATA / run, DATA / input, tmp_path / "emb.star", clusters=2, device="cpu",
                datadir=DATA, seed=0)
    new, old = _particles(out), _particles(DATA / then)
    assert len(new) == len(old)
    dpsi = (new["rlnAnglePsi"].to_numpy() - old["rlnAnglePsi"].to_numpy() + 180) % 360 - 180
    assert np.abs(dpsi).max() < 1e-2
    for col in COLUMNS[1:]:
        np.testing.assert_allclose(new[col].to_numpy(), old[col].to_numpy(), atol=1e-3)
    np.testing.assert_allclose(np.load(tmp_path / "emb.z.npy"),
                               np.load(DATA / then.replace(".star", ".z.npy")), atol=1e-4)
    assert (new["rlnClassNumber"].to_numpy() == old["rlnClassNumber"].to_numpy()).all()


@pytest.mark.parametrize("run", [r[0] for r in RUNS])
def test_an_old_run_loads_with_its_kernel(run):
    model, cfg = load_run(DATA / run, device="cpu")
    ck = torch.load(DATA / run / "checkpoints" / "best.pt", weights_only=True)
    assert model.kernel == {24: 15, 16: 11}[int(ck["box"])]   # the rule of 0.1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k
