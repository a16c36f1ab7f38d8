"""STAR reading/writing against independent readings (starfile, line counts) and RELION's files."""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryolatent.errors import InputError
from cryolatent.io import read_star, upgrade_relion30, write_star
from cryolatent.io.star import parse_star_bytes

PARTICLE_DIRS = ["relion30_no_optics", "relion31_optics", "cryosparc_csparc2star", "topaz"]


def _count_loop_rows(path: Path) -> dict[str, int]:
    """Independent count: rows = non-blank, non-comment lines after each loop's labels."""
    counts: dict[str, int] = {}
    name, state = None, None
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        s = line.strip()
        if s.startswith("data_"):
            name, state = s[5:], None
            continue
        if s.startswith("loop_"):
            state = "labels"
            counts[name] = 0
            continue
        if state == "labels" and s.startswith("_"):
            continue
        if state in ("labels", "body"):
            if not s or s.startswith("#"):
                if state == "body" and not s:
                    continue
                continue
            state = "body"
            counts[name] += 1
    return counts


def _particle_files(shared_data):
    out = []
    for d in PARTICLE_DIRS:
        out += sorted((shared_data / "interop" / d).glob("*.star"))
    out += sorted((shared_data / "particles").rglob("*.star"))
    return out


def test_every_particle_table_matches_starfile_and_line_counts(shared_data):
    import starfile

    files = _particle_files(shared_data)
    assert len(files) >= 25
    for f in files:
        ours = read_star(f)
        counts = _count_loop_rows(f)
        ref = starfile.read(f, always_dict=True)
        ptab = [k for k, v in ours.items() if "rlnImageName" in v.columns or
                "rlnCoordinateX" in v.columns]
        assert ptab, f
        for k in ptab:
            df = ours[k]
            assert len(df) == counts[k], (f, k)
            r = ref[k]
            assert list(df.columns) == list(r.columns), (f, k)
            for c in df.columns:
                a, b = df[c], r[c]
                if pd.api.types.is_numeric_dtype(a.dtype):
                    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float),
                                               rtol=1e-12, err_msg=f"{f} {c}")
                else:
                    assert (a.astype(str).to_numpy() == b.astype(str).to_numpy()).all(), (f, c)
            if "rlnImageName" in df.columns:
                assert pd.api.types.is_string_dtype(df["rlnImageName"].dtype)
                assert all(isinstance(v, str) for v in df["rlnImageName"].head(5))


def test_non_particle_tables_parse(shared_data):
    files = sorted((shared_data / "interop" / "relion_other_tables").glob("*.star"))
    assert len(files) >= 10
    for f in files:
        blocks = read_star(f)
        assert blocks
    model = read_star(shared_data / "interop/relion_other_tables/ref_it002_model.star")
    assert len(model["model_general"]) == 1 and len(model["model_class_1"]) == 51
    pipe = read_star(shared_data / "interop/relion_other_tables/starfile__default_pipeline.star")
    assert pd.api.types.is_string_dtype(pipe["pipeline_processes"].iloc[:, 0].dtype)


def test_parser_edge_cases(shared_data):
    d = shared_data / "interop" / "parser_edge_cases"
    for q in ("double", "single"):
        kv = read_star(d / f"starfile__basic_{q}_quote.star")[""]
        assert kv.iloc[0].tolist() == ["noquote", "quote string", " ", ""]
        lp = read_star(d / f"starfile__loop_{q}_quote.star")[""]
        assert len(lp) == 2
        assert lp["quote_string"].tolist() == ["quote string"] * 2
        assert lp["whitespace_string"].tolist() == [" "] * 2
        assert lp["empty_string"].tolist() == ["", ""]
        assert lp["number"].tolist() == [6.0, 7.0]
        assert lp["empty_string_and_normal_string"].tolist() == ["", "test"]
    e = read_star(d / "starfile__empty_loop.star")[""]
    assert list(e.columns) == ["rlnCoordinateX"] and len(e) == 0
    two = read_star(d / "starfile__two_single_line_loop_blocks.star")
    assert two["block_0"].iloc[0].tolist() == [1.0, 2.0, 3.0]
    assert two["block_1"].iloc[0].tolist() == ["A", "B", "C"]
    mid = read_star(d / "starfile__single_line_middle_of_multiblock.star")
    assert [len(v) for v in mid.values()] == [1, 1]
    dup = read_star(d / "starfile_old__single_line_c_engine.star")
    assert list(dup) == ["block_3", "block_3#2"] and len(dup["block_3#2"]) == 1
    kv = read_star(d / "starfile__two_basic_blocks.star")
    assert kv["block_0"].iloc[0].tolist() == [1.0, 2.0, 3.0]
    gen = d / "aspire__sample_generic_star.star"  # 'Mars ... extra': 5 values in a 4-column loop
    with pytest.raises(InputError, match=r"aspire__sample_generic_star.star: line 20"):
        read_star(gen)
    # the first block (key/values) is fine once the ragged loop is cut off
    ok = parse_star_bytes(gen.read_bytes().split(b"# Planetary")[0])
    assert ok["general"].iloc[0].tolist() == [3, 2, 3.1415, "hello"]


def test_crlf_bom_comments_and_large_class2d(shared_data, tmp_path):
    f = shared_data / "interop/relion30_no_optics/relion_git2015__ap_s_c2d_betagal_8915ptcls.star"
    ref = read_star(f)[""]
    assert len(ref) == 8915 and ref.shape[1] == 26
    assert ref["rlnClassNumber"].dtype == np.int64
    assert ref["rlnDefocusU"].dtype == np.float64
    raw = f.read_bytes()
    g = tmp_path / "crlf_bom.star"
    g.write_bytes(b"\xef\xbb\xbf# a comment\r\n" + raw.replace(b"\n", b"\r\n"))
    got = read_star(g)[""]
    pd.testing.assert_frame_equal(got, ref)
    # a comment line inside the loop body, and a full-line comment between labels
    lines = raw.split(b"\n")
    lines.insert(40, b"# comment inside the body")
    lines.insert(6, b"# comment between labels")
    h = tmp_path / "comments.star"
    h.write_bytes(b"\n".join(lines))
    pd.testing.assert_frame_equal(read_star(h)[""], ref)


def test_bad_star_raises_naming_file_and_line(tmp_path):
    f = tmp_path / "bad.star"
    f.write_text("data_\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3\n")
    with pytest.raises(InputError, match="bad.star: row 2"):
        read_star(f)
    f.write_text("this is not star\n")
    with pytest.raises(InputError, match="bad.star"):
        read_star(f)
    f.write_text("")
    with pytest.raises(InputError, match="bad.star: empty"):
        read_star(f)
    f.write_text('data_\n_rlnA 1 2\n')
    with pytest.raises(InputError, match="bad.star: line 2"):
        read_star(f)


def test_write_layout_and_round_trip(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["og1", "og2"],
                           "rlnImagePixelSize": [1.1, 0.1 + 0.2], "rlnVoltage": [300.0, 200.0]})
    parts = pd.DataFrame({
        "rlnImageName": ["000001@a b.mrcs", "000002@x.mrcs", "3@'q'.mrcs"],
        "rlnMicrographName": ["00123", "", "m.mrc"],
        "rlnDefocusU": [1e4 / 3, np.nan, -np.inf],
        "rlnOpticsGroup": [1, 2, 1],
        "rlnClassNumber": pd.array([1, None, 3], dtype="Int64"),
        "rlnAnglePsi": np.array([0.1, 1e-30, 123456.789], dtype=np.float32),
    })
    p = tmp_path / "out.star"
    write_star(p, parts, optics)
    text = p.read_bytes()
    assert b"\r" not in text and b"<NA>" not in text
    assert text.startswith(b"\n# version 30001\n\ndata_optics\n")
    assert text.index(b"data_optics") < text.index(b"data_particles")
    assert b'"000001@a b.mrcs"' in text and b'""' in text
    # no blank line inside a loop
    body = text.split(b"data_particles")[1].split(b"\n")
    labels_end = max(i for i, s in enumerate(body) if s.startswith(b"_"))
    assert all(body[labels_end + 1:labels_end + 4])
    back = read_star(p)
    pd.testing.assert_frame_equal(back["optics"], optics, check_dtype=False)
    b = back["particles"]
    assert b["rlnImageName"].tolist() == parts["rlnImageName"].tolist()
    assert b["rlnMicrographName"].tolist() == ["00123", "", "m.mrc"]
    np.testing.assert_array_equal(b["rlnDefocusU"].to_numpy(), parts["rlnDefocusU"].to_numpy())
    np.testing.assert_array_equal(b["rlnAnglePsi"].to_numpy(np.float32), parts["rlnAnglePsi"])
    assert b["rlnOpticsGroup"].dtype == np.int64
    assert np.isnan(b["rlnClassNumber"][1]) and b["rlnClassNumber"][2] == 3


_label = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=12)
_safe_text = st.text(alphabet=string.ascii_letters + string.digits + " _-@./'\"#:;$",
                     min_size=0, max_size=12).filter(
    lambda s: not (re.search(r'"(\s|$)', s) and re.search(r"'(\s|$)", s)))


@st.composite
def _tables(draw):
    ncol = draw(st.integers(1, 6))
    names = draw(st.lists(_label, min_size=ncol, max_size=ncol, unique=True))
    n = draw(st.integers(1, 8))
    cols = {}
    for nm in names:
        kind = draw(st.sampled_from(["int", "float", "str"]))
        if kind == "int":
            cols["i" + nm] = draw(st.lists(st.integers(-2**62, 2**62), min_size=n, max_size=n))
        elif kind == "float":
            cols["f" + nm] = draw(st.lists(st.floats(allow_nan=False, width=64), min_size=n,
                                           max_size=n))
        else:  # text that is not a number: prefix with a letter
            cols["s" + nm] = ["x" + v for v in draw(st.lists(_safe_text, min_size=n,
                                                             max_size=n))]
    return pd.DataFrame(cols)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(df=_tables())
def test_property_star_round_trip(tmp_path, df):
    p = tmp_path / "rt.star"
    optics = pd.DataFrame({"rlnOpticsGroup": [1]})
    write_star(p, df, optics)
    back = read_star(p)["particles"]
    assert list(back.columns) == list(df.columns)
    for c in df.columns:
        if c.startswith("f"):
            np.testing.assert_array_equal(back[c].to_numpy(np.float64), df[c].to_numpy())
        elif c.startswith("i"):
            assert back[c].dtype == np.int64
            assert back[c].tolist() == df[c].tolist()
        else:
            assert back[c].astype(str).tolist() == df[c].tolist()


def test_upgrade_matches_relion_convert_star(shared_data, tmp_path):
    d = shared_data / "interop"
    src = read_star(d / "relion30_no_optics/relion_git2015__ap_s_c2d_betagal_8915ptcls.star")[""]
    ref = read_star(d / "relion31_optics/relion3.1.3_convert_star__betagal_ap_s_c2d.star")
    parts, optics = upgrade_relion30(src)
    # written and read back, as a user would get it
    write_star(tmp_path / "up.star", parts, optics)
    got = read_star(tmp_path / "up.star")
    for key in ("optics", "particles"):
        a, b = got[key], ref[key]
        assert list(a.columns) == list(b.columns), key
        assert len(a) == len(b)
        for c in a.columns:
            if pd.api.types.is_numeric_dtype(b[c].dtype):
                # RELION prints 6 decimals: compare to that precision
                np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float),
                                           rtol=1e-6, atol=1e-5, err_msg=c)
            else:
                assert (a[c].to_numpy() == b[c].to_numpy()).all(), c


def test_upgrade_several_optics_groups(shared_data):
    src = read_star(shared_data / "particles/betagal_17/sample_particles_relion30.star")
    df = next(iter(src.values()))
    parts, optics = upgrade_relion30(df)
    # groups = distinct voltage/Cs/Q0/pixel combinations, numbered by first appearance
    key = df[["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
              "rlnDetectorPixelSize", "rlnMagnification"]].astype(float)
    firsts = key.drop_duplicates()
    assert len(optics) == len(firsts) == 2
    for g, (_, row) in enumerate(firsts.iterrows(), start=1):
        mask = (key == row).all(axis=1).to_numpy()
        assert (parts["rlnOpticsGroup"].to_numpy()[mask] == g).all()
        o = optics[optics["rlnOpticsGroup"] == g].iloc[0]
        assert o["rlnVoltage"] == row["rlnVoltage"]
        assert o["rlnImagePixelSize"] == pytest.approx(1e4 * row["rlnDetectorPixelSize"]
                                                        / row["rlnMagnification"])
    ap = optics.set_index("rlnOpticsGroup")["rlnImagePixelSize"][parts["rlnOpticsGroup"]]
    np.testing.assert_allclose(parts["rlnOriginXAngst"], df["rlnOriginX"] * ap.to_numpy())
    assert "rlnOriginX" not in parts and "rlnVoltage" not in parts
    assert list(parts.columns[-3:]) == ["rlnOpticsGroup", "rlnOriginXAngst", "rlnOriginYAngst"]


def test_write_star_emits_no_warning(tmp_path):
    """A write (strings needing quotes, bytes, None/NaN, bools, ints, floats, optics) runs
    clean under ``-W error`` (no pandas "pattern has match groups" UserWarning)."""
    import warnings

    n = 6
    parts = pd.DataFrame({
        "rlnImageName": pd.Series([f"{i + 1:06d}@s t.mrcs" for i in range(n)], dtype=str),
        "rlnX": np.arange(n, dtype=np.float32), "rlnY": np.arange(n, dtype=np.float64) / 3,
        "rlnClassNumber": np.arange(n), "rlnFlag": [True] * n,
        "rlnMicrographName": ["_a", "#b", None, b"c", np.nan, "data_x"],
        "rlnOpticsGroup": np.ones(n, np.int64)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [1.5]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_star(tmp_path / "w.star", parts, optics)
        back = read_star(tmp_path / "w.star")
    assert back["particles"]["rlnImageName"].tolist() == parts["rlnImageName"].tolist()
    assert back["particles"]["rlnMicrographName"].tolist()[:2] == ["_a", "#b"]


@pytest.mark.parametrize("cells", [1, 5, 14, 1 << 20])
def test_write_star_text_does_not_depend_on_chunking(tmp_path, monkeypatch, cells):
    """write_star formats rows a chunk at a time (CHUNK_CELLS values, bounded memory): every
    chunk size gives the same bytes, equal to a row-by-row text built here."""
    import cryolatent.io.star as star

    n = 11
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@s t.mrcs" for i in range(n)],
        "rlnAnglePsi": np.arange(n, dtype=np.float64) / 3,
        "cryolatentZ1": np.linspace(-1, 1, n, dtype=np.float32),
        "rlnClassNumber": np.arange(n, dtype=np.int64) + 1,
        "rlnOpticsGroup": np.ones(n, np.int64)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [1.5]})
    monkeypatch.setattr(star, "CHUNK_CELLS", cells)
    write_star(tmp_path / "c.star", parts, optics)
    rows = [f'"{a}" {b!r} {c} {d} {e}' for a, b, c, d, e in
            zip(parts.rlnImageName, parts.rlnAnglePsi.tolist(), parts.cryolatentZ1.astype(str),
                parts.rlnClassNumber, parts.rlnOpticsGroup)]
    expect = ("\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n"
              "_rlnOpticsGroupName #2\n_rlnImagePixelSize #3\n1 opticsGroup1 1.5\n\n"
              "# version 30001\n\ndata_particles\n\nloop_\n"
              + "".join(f"_{c} #{i + 1}\n" for i, c in enumerate(parts.columns))
              + "\n".join(rows) + "\n\n")
    assert (tmp_path / "c.star").read_bytes() == expect.encode()
