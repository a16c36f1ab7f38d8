"""benchmarks/reference_speed.py: cryolatent's side runs (tiny models), the alternating timer
and the summary/table logic give the right ratios, the JSON is written; the reference side
only where its code has been fetched into benchmarks/.refcode (never committed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("reference_speed",
                                                  REPO / "benchmarks" / "reference_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reference_speed"] = mod
    spec.loader.exec_module(mod)
    return mod


rs = _load_bench()


def test_summary_and_table():
    times = {"reference": [2.0, 4.0, 3.0], "cryolatent": [1.0, 1.0, 2.0]}
    rows = rs.summarise(times, batch=6)
    assert rows["reference"]["images_per_s"] == pytest.approx(2.0)   # 6 / median 3 s
    assert rows["cryolatent"]["images_per_s"] == pytest.approx(6.0)  # 6 / median 1 s
    assert rows["cryolatent"]["ratio"] == pytest.approx(3.0)
    assert rows["cryolatent"]["ratio_paired"] == pytest.approx(2.0)  # median of 2, 4, 1.5
    assert "ratio" not in rows["reference"]
    table = rs.format_table([{"config": "tvae-p8-z2-50", "sides": rows}])
    line = [ln for ln in table.splitlines() if "cryolatent" in ln][0]
    assert line.split()[-2:] == ["3.00x", "2.00x"] and line.split()[2] == "6.00"
    # no reference: no ratio column value, no crash
    only = rs.summarise({"cryolatent": [0.5]}, batch=2)
    assert "ratio" not in only["cryolatent"]
    assert rs.format_table([{"config": "x", "sides": only}]).splitlines()[-1].endswith("-")


def test_alternating_order_and_counts():
    calls = []
    sides = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    times = rs.time_alternating(sides, torch.zeros(1), warmup=1, reps=4)
    assert [len(v) for v in times.values()] == [4, 4]
    assert calls[:2] == ["a", "b"]          # warm-up
    timed = calls[2:]
    firsts = [timed[2 * i] for i in range(4)]
    assert set(firsts) == {"a", "b"}        # the order alternates


def test_parse_variant_and_new_options():
    name, over = rs.parse_variant("fast:subpixel=true,translation_range=4,likelihood=gaussian")
    assert name == "fast"
    assert over == {"subpixel": True, "translation_range": 4, "likelihood": "gaussian"}
    assert isinstance(rs.new_options(), dict)


def test_cryolatent_side_runs_and_writes_json(tmp_path):
    out = tmp_path / "rs.json"
    threads = torch.get_num_threads()
    rc = rs.main(["--no-ref", "--tiny", "--box", "16", "--batch", "2", "--warmup", "0",
                  "--reps", "2", "--configs", "tvae-p8-z2-50", "irl-inr-50",
                  "--ref-dir", str(tmp_path / "none"), "--variant", "sub:subpixel=true",
                  "--out", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # restored for the rest of the session
    d = json.loads(out.read_text())
    names = [r["config"] for r in d["results"]]
    assert names == ["tvae-p8-z2-50", "irl-inr-50"]
    assert d["results"][0]["sides"]["cryolatent[sub]"]["images_per_s"] > 0
    from cryolatent.config import TrainConfig

    if hasattr(TrainConfig, "resolve_defaults"):  # rows for train's CPU defaults
        assert "cryolatent[cpu,cryo-EM]" in d["results"][0]["sides"]
        assert d["results"][0]["defaults_cryoem"]["ctf"] is True
    assert d["results"][0]["sides"]["cryolatent"]["gflop_per_image"] > 0
    for r in d["results"]:
        assert r["sides"]["cryolatent"]["images_per_s"] > 0
        assert len(r["sides"]["cryolatent"]["step_s"]) == 2
    assert d["meta"]["threads"] == 1


@pytest.mark.skipif(not (rs.ref_available(rs.DEFAULT_REF_DIR, "tvae")
                         and rs.ref_available(rs.DEFAULT_REF_DIR, "irl")),
                    reason="reference code not fetched into benchmarks/.refcode")
def test_reference_side_tiny(tmp_path):
    try:
        rs._ref_import_path(rs.DEFAULT_REF_DIR)
        import cv2  # noqa: F401
    except ImportError as e:
        pytest.skip(f"reference dependencies missing ({e})")
    out = tmp_path / "rs.json"
    assert rs.main(["--tiny", "--box", "16", "--batch", "2", "--warmup", "0", "--reps", "1",
                    "--no-flops", "--no-defaults", "--configs", "tvae-p8-z2-50",
                    "irl-inr-50", "--out", str(out)]) == 0
    for r in json.loads(out.read_text())["results"]:
        assert r["sides"]["reference"]["images_per_s"] > 0
        assert r["sides"]["cryolatent"]["ratio"] > 0
