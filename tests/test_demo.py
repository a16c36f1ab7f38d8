"""`cryolatent demo --quick`: the whole chain runs on the CPU and writes what it promises."""

from __future__ import annotations

import json

from cryolatent.cli import main
from cryolatent.demo import PASS_ACCURACY
from cryolatent.io import load_particles, read_star


def test_demo_quick_runs_the_whole_chain(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "evaluation against the truth" in printed and str(out) in printed

    sim = load_particles(out / "simulated" / "particles.star")
    prep = load_particles(out / "preprocessed" / "particles.star")
    assert (sim.box, prep.box) == (32, 16) and len(sim) == len(prep) == 120
    assert abs(prep.apix - sim.apix * 2) < 1e-6           # Fourier crop 32 -> 16 px

    emb = read_star(out / "embedded.star")["particles"]
    assert len(emb) == 120
    assert list(emb["rlnImageName"]) == list(sim.table["rlnImageName"])   # originals, in order
    assert {"rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "cryolatentZ1",
            "cryolatentZ2"} <= set(emb.columns)
    assert set(emb["rlnClassNumber"]) <= {1, 2}

    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["n"] == 120 and 0.5 <= ev["cluster_accuracy"] <= 1.0
    # the refined STAR is what was scored; the model's own answer is scored beside it
    ref = read_star(out / "refined.star")["particles"]
    assert len(ref) == 120 and set(ref["rlnClassNumber"]) <= {1, 2}
    evm = json.loads((out / "evaluation_model.json").read_text())
    assert evm["n"] == 120
    # the verdict line says what the evaluation says
    verdict = [ln for ln in printed.splitlines() if "verdict:" in ln]
    assert len(verdict) == 1
    if ev["cluster_accuracy"] >= PASS_ACCURACY:
        assert verdict[0].startswith("verdict: PASS")
    else:
        assert verdict[0].startswith("WARNING: verdict: FAIL")
    assert f"{100 * ev['cluster_accuracy']:.1f}%" in verdict[0]
    for f in ("run/config.json", "run/log.csv", "run/checkpoints/last.pt",
              "plots/latent_pca.png", "plots/pose_histograms.png",
              "classes/gallery.png", "classes/aligned_averages.mrcs", "summary.json"):
        assert (out / f).stat().st_size > 0, f
    for png in out.rglob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_demo_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["demo", "--quick", "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "not empty" in err[-1]
    assert (tmp_path / "keep.txt").read_text() == "user data"
