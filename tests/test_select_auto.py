"""``cryolatent select IN.star --auto``: keep the classes that pass IN_summary.json's checks
(hand-written reports on a 60-row STAR with two optics groups and text columns)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cryolatent.analysis.cluster import default_max_resolution, judge_classes, select_auto
from cryolatent.errors import CryolatentError
from cryolatent.io import read_star, write_star


def _one_error(rc, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1, err
    assert "Traceback" not in err and lines and lines[-1].startswith("error:"), err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, err
    return lines[-1]


def _cls(k, size, res, beats, box=64, **kw):
    c = {"class": k, "size": size, "halves": [size // 2, size - size // 2],
         "resolution_A": res, "limited_by_nyquist": False}
    if res is not None:
        c["frc"] = [1.0] + [0.5] * (box // 2)
    if beats is not None:
        c.update({"beats_aligned_noise": beats, "log_snr_above_aligned_noise":
                  2.5 if beats else 0.4, "log_snr_margin": 0.7})
    c.update(kw)
    return c


@pytest.fixture
def classed(tmp_path):
    """IN.star (classes 1..4) and its trust report: classes 1 and 2 pass, 3 does not beat
    aligned noise, 4 is resolved to 31 Å only (the default limit is ring 8 of the 64-px,
    1.25-Å/px averages: 10 Å)."""
    rng = np.random.default_rng(0)
    n = 60
    cls = np.repeat([1, 2, 3, 4], [20, 15, 15, 10])[rng.permutation(n)]
    p = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Extract/job007/mic{i % 5}.mrcs" for i in range(n)],
        "rlnMicrographName": [f"MotionCorr/mic {i % 5}.mrc" for i in range(n)],
        "rlnDefocusU": rng.uniform(1e4, 3e4, n),
        "rlnOpticsGroup": (np.arange(n) % 2 + 1).astype(np.int64),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(0, 3, n), "rlnOriginYAngst": rng.normal(0, 3, n),
        "rlnClassNumber": cls,
        "cryolatentZ1": rng.normal(size=n).astype(np.float32),
    })
    o = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["og1", "og2"],
                      "rlnImagePixelSize": [1.25, 1.25], "rlnImageSize": [128, 128],
                      "rlnImageDimensionality": [2, 2], "rlnVoltage": [300.0, 300.0],
                      "rlnSphericalAberration": [2.7, 2.7], "rlnAmplitudeContrast": [0.1, 0.1]})
    star = tmp_path / "refined.star"
    write_star(star, p, o)
    rep = {"kind": "refine", "particles": n, "apix": 1.25,
           "aligned_noise": {"particles": 40, "apix": 5.0, "frc": [1.0, 0.2, 0.1]},
           "classes": [_cls(1, 20, 6.5, True), _cls(2, 15, 8.0, True),
                       _cls(3, 15, 7.0, False), _cls(4, 10, 31.0, True)],
           "indistinguishable_pairs": [], "warnings": []}
    (tmp_path / "refined_summary.json").write_text(json.dumps(rep))
    return star, p, o, rep


def test_auto_keeps_the_passing_classes_with_every_column(classed, tmp_path, capsys):
    from cryolatent.cli import main

    star, p, o, _ = classed
    out = tmp_path / "good.star"
    capsys.readouterr()
    assert main(["select", str(star), "--auto", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    b = read_star(out)
    keep = p["rlnClassNumber"].isin([1, 2]).to_numpy()
    sub = b["particles"]
    assert list(sub.columns) == list(p.columns)
    assert sub["rlnImageName"].tolist() == p["rlnImageName"][keep].tolist()
    assert sub["rlnMicrographName"].tolist() == p["rlnMicrographName"][keep].tolist()
    np.testing.assert_array_equal(sub["rlnAnglePsi"], p["rlnAnglePsi"][keep])
    np.testing.assert_array_equal(sub["cryolatentZ1"].astype(np.float32),
                                  p["cryolatentZ1"][keep])
    pd.testing.assert_frame_equal(b["optics"], read_star(star)["optics"])
    # one line per dropped class, with its reason
    drop = [ln for ln in err.splitlines() if "dropping class" in ln]
    assert len(drop) == 2
    assert "class 3 (15 particles)" in drop[0] and "noise aligned the same way" in drop[0]
    assert "class 4 (10 particles)" in drop[1] and "31 Å is worse than 10 Å" in drop[1]
    # and the reasons beside the output
    js = json.loads((tmp_path / "good_select.json").read_text())
    assert js["kept"] == [1, 2] and js["dropped"] == [3, 4]
    assert js["max_resolution_A"] == pytest.approx(10.0) and "ring 8" in js["max_resolution_rule"]
    assert js["particles_in"] == 60 and js["particles_kept"] == int(keep.sum())
    why = {c["class"]: c["reasons"] for c in js["classes"]}
    assert why[1] == [] and why[2] == [] and len(why[3]) == 1 and len(why[4]) == 1
    assert "noise" in why[3][0] and "resolution" in why[4][0]
    # an existing output (or its JSON) is refused without --force, kept as it was
    before = out.read_bytes()
    line = _one_error(main(["select", str(star), "--auto", "-o", str(out)]),
                      capsys.readouterr().err)
    assert "file exists" in line and out.read_bytes() == before
    out2 = tmp_path / "good2.star"
    (tmp_path / "good2_select.json").write_text("mine")
    line = _one_error(main(["select", str(star), "--auto", "-o", str(out2)]),
                      capsys.readouterr().err)
    assert "good2_select.json: file exists" in line and not out2.exists()
    # --force overwrites; an explicit --max-resolution keeps class 4 too
    assert main(["select", str(star), "--auto", "-o", str(out), "--force",
                 "--max-resolution", "35"]) == 0
    assert set(read_star(out)["particles"]["rlnClassNumber"]) == {1, 2, 4}
    assert json.loads((tmp_path / "good_select.json").read_text())["dropped"] == [3]


def test_auto_errors_are_one_line_and_write_nothing(classed, tmp_path, capsys):
    from cryolatent.cli import main

    star, p, o, rep = classed
    out = tmp_path / "good.star"
    # no report beside IN.star
    write_star(tmp_path / "other.star", p, o)
    line = _one_error(main(["select", str(tmp_path / "other.star"), "--auto", "-o", str(out)]),
                      capsys.readouterr().err)
    assert "other_summary.json" in line and "no trust report" in line
    assert not out.exists() and not (tmp_path / "good_select.json").exists()
    # a report of other classes (sizes differ: IN.star was edited after embed / refine)
    write_star(tmp_path / "edited.star", p.iloc[5:], o)
    (tmp_path / "edited_summary.json").write_text(json.dumps(rep))
    line = _one_error(main(["select", str(tmp_path / "edited.star"), "--auto", "-o",
                            str(out)]), capsys.readouterr().err)
    assert "does not describe" in line and "class" in line
    assert not out.exists() and not (tmp_path / "good_select.json").exists()
    # not JSON
    (tmp_path / "bad.star").write_bytes(star.read_bytes())
    (tmp_path / "bad_summary.json").write_text("{not json")
    line = _one_error(main(["select", str(tmp_path / "bad.star"), "--auto", "-o", str(out)]),
                      capsys.readouterr().err)
    assert "bad_summary.json" in line
    # every class fails: nothing written
    line = _one_error(main(["select", str(star), "--auto", "-o", str(out),
                            "--max-resolution", "5"]), capsys.readouterr().err)
    assert "no class" in line and not out.exists()
    assert not (tmp_path / "good_select.json").exists()
    # --auto and --classes together, or neither
    for argv in (["--auto", "--classes", "1"], []):
        line = _one_error(main(["select", str(star), *argv, "-o", str(out)]),
                          capsys.readouterr().err)
        assert "--classes or --auto" in line


def test_judge_classes_rules():
    rep = {"apix": 1.5, "classes": [
        _cls(1, 1, None, None, note="fewer than 2 particles"),
        _cls(2, 30, None, None),
        _cls(3, 30, 8.0, None, box=16),
        _cls(4, 0, None, None),
        _cls(5, 30, 7.0, False, box=16)]}
    v = judge_classes(rep)
    # a 16-px box: ring 8 would be 3 Å, finer than half Nyquist (4 × 1.5 Å/px = 6 Å)
    assert v["max_resolution_A"] == pytest.approx(6.0) and "Nyquist" in v["max_resolution_rule"]
    assert v["checks_skipped"] == ["beats_aligned_noise"]      # the report has no null
    why = {c["class"]: c["reasons"] for c in v["classes"]}
    assert "fewer than 2" in why[1][0] and "no resolved signal" in why[2][0]
    assert "8 Å is worse than 6 Å" in why[3][0]
    assert len(why[5]) == 2                  # noise and resolution, both said
    assert v["kept"] == [] and v["dropped"] == [1, 2, 3, 5]       # empty class 4: neither
    assert judge_classes(rep, 10.0)["kept"] == [3]
    # a 128-px box: ring 8 = 24 Å; no FRC curves at all: half Nyquist
    assert default_max_resolution({"apix": 1.5, "classes": [_cls(1, 9, 5.0, True, box=128)]}
                                  )[0] == pytest.approx(24.0)
    assert default_max_resolution({"apix": 2.0, "classes": [_cls(1, 9, None, None)]}
                                  )[0] == pytest.approx(8.0)
    with pytest.raises(CryolatentError, match="apix"):
        judge_classes({"classes": rep["classes"]})


def test_select_auto_library_returns_the_record(classed, tmp_path):
    star, p, _, _ = classed
    doc = select_auto(star, tmp_path / "g.star", max_resolution_A=15.0)
    assert doc["kept"] == [1, 2] and doc["report"].endswith("refined_summary.json")
    assert doc["report_kind"] == "refine"
    assert len(read_star(tmp_path / "g.star")["particles"]) == int(
        p["rlnClassNumber"].isin([1, 2]).sum())
