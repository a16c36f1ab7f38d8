"""load_particles: STAR / .cs / .mrcs sets, path lookup, CTF, and every bad-input error."""

from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from cryolatent.errors import InputError
from cryolatent.io import (cs_to_relion, load_particles, read_cs, read_star, write_cs,
                           write_mrcs, write_star)


def _make_set(tmp_path, n=6, box=8, apix=1.5, stacks=2):
    rng = np.random.default_rng(0)
    imgs = rng.standard_normal((n, box, box)).astype(np.float32)
    names, per = [], n // stacks
    for s in range(stacks):
        sub = imgs[s * per:(s + 1) * per]
        write_mrcs(tmp_path / "Particles" / f"s{s}.mrcs", sub, apix)
        names += [f"{i + 1:06d}@Particles/s{s}.mrcs" for i in range(len(sub))]
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [apix],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnImageName": names, "rlnDefocusU": np.linspace(1e4, 2e4, n),
                          "rlnDefocusV": np.linspace(1e4, 2e4, n) + 100,
                          "rlnDefocusAngle": np.full(n, 30.0), "rlnOpticsGroup": np.ones(n, int)})
    return parts, optics, imgs


def test_star_set_images_ctf_and_lookup(tmp_path, monkeypatch):
    parts, optics, imgs = _make_set(tmp_path)
    star = tmp_path / "p.star"
    write_star(star, parts, optics)
    ps = load_particles(star)
    assert (len(ps), ps.box, ps.apix, ps.kind) == (6, 8, 1.5, "star")
    order = [5, 0, 3, 3, 1]
    np.testing.assert_array_equal(ps.images(order), imgs[order])
    np.testing.assert_array_equal(ps.optics_value("rlnVoltage"), np.full(6, 300.0))
    ctf = ps.ctf_params()
    if ctf is not None:
        np.testing.assert_allclose(ctf.defocus_u, parts["rlnDefocusU"])
        np.testing.assert_allclose(ctf.defocus_v, parts["rlnDefocusV"])
        np.testing.assert_allclose(ctf.voltage, 300.0)
        np.testing.assert_allclose(ctf.phase_shift, 0.0)
    # --datadir: stacks looked up there (also by bare file name)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(star, other / "p.star")
    with pytest.raises(InputError, match=r"stack Particles/s0.mrcs not found.*000001@Particles"):
        load_particles(other / "p.star")
    assert len(load_particles(other / "p.star", datadir=tmp_path)) == 6
    assert len(load_particles(other / "p.star", datadir=tmp_path / "Particles")) == 6
    monkeypatch.chdir(tmp_path)  # else: the current directory
    assert len(load_particles(other / "p.star")) == 6


def test_relion30_star_upgraded_on_load(shared_data):
    ps = load_particles(shared_data / "particles/betagal_17/sample_particles_relion30.star")
    assert "rlnOriginXAngst" in ps.table and "rlnOriginX" not in ps.table
    assert list(ps.optics["rlnImageSize"]) == [200] * len(ps.optics)
    assert len(ps.optics) == 2
    np.testing.assert_allclose(ps.apix_per_particle, 1.338)
    raw = next(iter(read_star(shared_data / "particles/betagal_17/"
                                         "sample_particles_relion30.star").values()))
    np.testing.assert_allclose(ps.shifts_angst()[:, 0], raw["rlnOriginX"] * 1.338)
    ctf = ps.ctf_params()
    if ctf is not None:
        np.testing.assert_allclose(ctf.voltage, raw["rlnVoltage"])


def test_two_optics_groups(shared_data):
    f = shared_data / "interop/relion31_optics/aspire__sample_particles_relion31_2opticsgroups.star"
    blocks = read_star(f)
    assert len(blocks["optics"]) == 2
    v = blocks["optics"].set_index("rlnOpticsGroup")["rlnVoltage"]
    ps = load_particles(shared_data / "particles/betagal_17/sample_particles_relion31.star")
    g = ps.table["rlnOpticsGroup"].to_numpy()
    ref = read_star(shared_data / "particles/betagal_17/sample_particles_relion31.star")
    vv = ref["optics"].set_index("rlnOpticsGroup")["rlnVoltage"]
    np.testing.assert_array_equal(ps.optics_value("rlnVoltage"), vv[g].to_numpy())
    assert set(v.index) == {1, 2}


def test_cs_matches_pyem_and_round_trips(shared_data, tmp_path, monkeypatch):
    d = shared_data / "interop"
    arr = read_cs(d / "cryosparc_cs/cryosparc_J2_particles_exported.cs")
    parts, optics = cs_to_relion(arr)
    ref = read_star(d / "cryosparc_csparc2star/csparc2star_J2_exported.star")
    for ours, theirs in ((parts, ref["particles"]), (optics, ref["optics"])):
        assert list(ours.columns) == list(theirs.columns)
        for c in ours.columns:
            if pd.api.types.is_numeric_dtype(theirs[c].dtype):
                np.testing.assert_allclose(ours[c].to_numpy(float), theirs[c].to_numpy(float),
                                           rtol=1e-6, atol=2e-5, err_msg=c)
            else:
                assert (ours[c].to_numpy() == theirs[c].to_numpy()).all(), c
    # a .cs set with stacks made here (the real stacks are not shipped)
    a = arr.copy()
    a["blob/path"] = np.array([b">stk/p.mrcs"] * len(a), dtype=a.dtype["blob/path"])
    a["blob/shape"] = 8
    a["blob/idx"] = np.arange(len(a))[::-1]
    imgs = np.random.default_rng(2).standard_normal((len(a), 8, 8)).astype(np.float32)
    write_mrcs(tmp_path / "stk" / "p.mrcs", imgs, 1.345)
    write_cs(tmp_path / "x.cs", a)
    assert not list(tmp_path.glob("*.npy"))
    ps = load_particles(tmp_path / "x.cs")
    assert ps.kind == "cs" and ps.cs_array is not None and len(ps) == len(a)
    assert ps.names[0] == str(a["uid"][0])
    np.testing.assert_array_equal(ps.images([0, 1]), imgs[a["blob/idx"][[0, 1]]])
    # the table names the stack from the current directory (absolute: outside it) ...
    assert ps.table["rlnImageName"][0] == f"{len(a):06d}@{tmp_path.resolve()}/stk/p.mrcs"
    monkeypatch.chdir(tmp_path)      # ... relative where it lies below it
    assert load_particles(tmp_path / "x.cs").table["rlnImageName"][0] == \
        f"{len(a):06d}@stk/p.mrcs"
    from cryosparc.dataset import Dataset

    ds = Dataset.load(str(tmp_path / "x.cs"))
    assert len(ds) == len(a)
    np.testing.assert_array_equal(ds["uid"], a["uid"])
    np.testing.assert_array_equal(ds["alignments2D/pose"], a["alignments2D/pose"])


def _expect(match, fn, *a, **k):
    with pytest.raises(InputError, match=match) as e:
        fn(*a, **k)
    assert "\n" not in str(e.value)


@contextlib.contextmanager
def _warnings():
    """The warnings of the ``cryolatent`` logger inside the block (it does not propagate to
    the root logger once the CLI has set it up, so caplog may not see them)."""
    import logging

    seen: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = H(logging.WARNING)
    logger = logging.getLogger("cryolatent")
    logger.addHandler(h)
    try:
        yield seen
    finally:
        logger.removeHandler(h)


def test_bad_inputs(tmp_path, shared_data):
    parts, optics, imgs = _make_set(tmp_path)
    star = tmp_path / "b.star"
    # missing stack: names the stack and the first particle using it
    p2 = parts.copy()
    p2.loc[4:, "rlnImageName"] = ["000001@Particles/gone.mrcs", "000002@Particles/gone.mrcs"]
    write_star(star, p2, optics)
    _expect(r"b.star: stack Particles/gone.mrcs not found.*000001@Particles/gone.mrcs \(row 5\)",
            load_particles, star)
    # index beyond the stack
    p2 = parts.copy()
    p2.loc[2, "rlnImageName"] = "000009@Particles/s0.mrcs"
    write_star(star, p2, optics)
    _expect(r"000009@Particles/s0.mrcs \(row 3\).*beyond the end", load_particles, star)
    # stack shorter than its header says
    s1 = tmp_path / "Particles" / "s1.mrcs"
    good = s1.read_bytes()
    s1.write_bytes(good[:-10])
    write_star(star, parts, optics)
    _expect(r"000003@Particles/s1.mrcs \(row 6\).*shorter than its header", load_particles, star)
    s1.write_bytes(good)
    # zero-row loop
    write_star(star, parts.iloc[:0], optics)
    _expect(r"b.star: data_particles has no particles", load_particles, star)
    # two box sizes
    write_mrcs(tmp_path / "Particles" / "big.mrcs", np.zeros((1, 10, 10), np.float32), 1.5)
    p2 = parts.copy()
    p2.loc[5, "rlnImageName"] = "000001@Particles/big.mrcs"
    write_star(star, p2, optics)
    _expect(r"two box sizes.*000001@Particles/big.mrcs", load_particles, star)
    # unknown / zero pixel size
    write_mrcs(tmp_path / "Particles" / "nopix.mrcs", np.zeros((2, 8, 8), np.float32), 0.0)
    o2 = optics.drop(columns=["rlnImagePixelSize"])
    p2 = parts.iloc[:2].copy()
    p2["rlnImageName"] = ["000001@Particles/nopix.mrcs", "000002@Particles/nopix.mrcs"]
    write_star(star, p2, o2)
    _expect(r"b.star: unknown or zero pixel size", load_particles, star)
    o3 = optics.copy()
    o3["rlnImagePixelSize"] = 0.0
    write_star(star, p2, o3)
    _expect(r"unknown or zero pixel size", load_particles, star)
    assert load_particles(star, apix=1.0).apix == 1.0
    # duplicate particle names: a warning (count and first pair), every row kept
    p2 = parts.copy()
    p2.loc[3, "rlnImageName"] = p2.loc[1, "rlnImageName"]
    write_star(star, p2, optics)
    with _warnings() as seen:
        assert len(load_particles(star)) == len(p2)
    assert any("1 duplicate image names, first 000002@Particles/s0.mrcs (rows 2 and 4); all "
               "rows kept" in m for m in seen), seen
    # text in a numeric column
    p2 = parts.copy().astype({"rlnDefocusU": object})
    p2.loc[2, "rlnDefocusU"] = "abc"
    write_star(star, p2, optics)
    _expect(r"column rlnDefocusU.*000003@Particles/s0.mrcs \(row 3\).*'abc'", load_particles,
            star)
    # unparsable STAR
    star.write_text("data_particles\nloop_\n_rlnImageName\n_rlnDefocusU\na 1 2\n")
    _expect(r"b.star: line 5", load_particles, star)
    # bad image name
    p2 = parts.copy()
    p2.loc[0, "rlnImageName"] = "x@Particles/s0.mrcs"
    write_star(star, p2, optics)
    _expect(r"x@Particles/s0.mrcs \(row 1\).*N@stack", load_particles, star)
    # optics group not defined
    p2 = parts.copy()
    p2.loc[1, "rlnOpticsGroup"] = 7
    write_star(star, p2, optics)
    _expect(r"000002@Particles/s0.mrcs \(row 2\) refers to optics group 7", load_particles, star)
    # .cs without blob/path, and the 0-row cryosparc-tools file
    arr = read_cs(shared_data / "interop/cryosparc_cs/cryosparc_J2_particles_exported.cs")
    keep = [n for n in arr.dtype.names if n != "blob/path"]
    write_cs(tmp_path / "nb.cs", arr[keep])
    _expect(r"nb.cs: no blob/path", load_particles, tmp_path / "nb.cs")
    _expect(r"0rows.cs: the .cs file holds no particles", load_particles,
            shared_data / "interop/cryosparc_cs/cryosparc-tools__4k_dataset_0rows.cs")
    # a CTF without voltage names the column
    ps = None
    f = shared_data / "interop/relion30_no_optics/aspire__sample_incomplete_ctf_params.star"
    os.symlink(shared_data / "particles/betagal_17/sample.mrcs", tmp_path / "sample.mrcs")
    shutil.copy(f, tmp_path / "inc.star")
    ps = load_particles(tmp_path / "inc.star")
    try:
        import cryolatent.ctf  # noqa: F401
    except ImportError:
        pytest.skip("cryolatent.ctf not available yet")
    _expect(r"inc.star: column rlnVoltage is missing", ps.ctf_params)
    # unknown file type
    (tmp_path / "x.txt").write_text("1")
    _expect(r"x.txt: unknown particle file type", load_particles, tmp_path / "x.txt")


def test_optics_flag_and_apix_per_particle(tmp_path):
    parts, optics, _ = _make_set(tmp_path)
    star = tmp_path / "p.star"
    write_star(star, parts, optics)
    ps = load_particles(star)
    assert ps.apix_per_particle.dtype == np.float64 and ps.apix_per_particle.shape == (6,)
    assert not ps.optics_flag("rlnCtfDataArePhaseFlipped").any()          # absent -> False
    optics["rlnCtfDataArePhaseFlipped"] = [1]
    write_star(star, parts, optics)
    flag = load_particles(star).optics_flag("rlnCtfDataArePhaseFlipped")
    assert flag.dtype == bool and flag.all() and flag.shape == (6,)


def test_particle_keys_one_rule():
    """One key rule for every command that pairs particles of two files by name (embed's
    calibration, classes --particles, evaluate): zero padding, folders (/ or \\), white
    space and a missing index do not matter; repeated names pair by position."""
    from cryolatent.io import nth_keys, particle_keys

    names = ["000012@Particles/stack.mrcs", " 12@/abs/Particles/stack.mrcs ",
             "12@C:\\data\\stack.mrcs", "12@stack.mrcs"]
    assert set(particle_keys(names)) == {"12@stack.mrcs"}
    assert list(particle_keys(["img.mrc", "/a/img.mrc", "000@s.mrcs", "x@a/s.mrcs"])) == \
        ["1@img.mrc", "1@img.mrc", "0@s.mrcs", "x@s.mrcs"]
    assert len(particle_keys([])) == 0
    k = nth_keys(["a", "b", "a"])
    assert len(set(k)) == 3 and k[0] != k[2] and k[0] == nth_keys(["a"])[0]


def test_particle_block_one_rule(tmp_path):
    """data_particles, else data_images / data_, else the first block with rlnImageName;
    load_particles and read_particle_table agree."""
    from cryolatent.io import particle_block, read_particle_table

    t = pd.DataFrame({"rlnImageName": ["1@a.mrcs"]})
    other = pd.DataFrame({"rlnFoo": [1.0]})
    assert particle_block({"optics": other, "particles": t}, "x")[0] == "particles"
    assert particle_block({"images": t, "model": other}, "x")[0] == "images"
    assert particle_block({"model": other, "mine": t}, "x")[0] == "mine"
    with pytest.raises(InputError, match="x: no particle table"):
        particle_block({"optics": t, "model": other}, "x")
    star = tmp_path / "p.star"
    star.write_text("data_optics\nloop_\n_rlnOpticsGroup #1\n1\n\n"
                    "data_mine\nloop_\n_rlnImageName #1\n1@a.mrcs\n")
    table, _ = read_particle_table(star)
    assert list(table["rlnImageName"]) == ["1@a.mrcs"]


def test_ctf_alias_is_deprecated(shared_data):
    """ParticleSet.ctf() (parameters, not images) is ctf_params(), with a warning."""
    ps = load_particles(shared_data / "particles/betagal_17/sample_particles_relion30.star")
    with pytest.warns(DeprecationWarning, match="ctf_params"):
        old = ps.ctf()
    new = ps.ctf_params()
    assert (old is None) == (new is None)
    if new is not None:
        np.testing.assert_array_equal(old.defocus_u, new.defocus_u)
