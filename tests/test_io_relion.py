"""RELION 3.1 reads what cryolatent.io writes (STAR and .mrcs)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryolatent.io import load_particles, read_star, write_mrcs, write_star

pytestmark = pytest.mark.relion


def test_relion_reads_our_star_and_stack(relion, tmp_path):
    rng = np.random.default_rng(0)
    n, box = 7, 16
    imgs = rng.standard_normal((n, box, box)).astype(np.float32)
    write_mrcs(tmp_path / "stk.mrcs", imgs, 2.0)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [2.0],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@stk.mrcs" for i in range(n)],
                          "rlnDefocusU": rng.uniform(1e4, 2e4, n), "rlnDefocusV": 1.5e4,
                          "rlnDefocusAngle": 0.1 + 1 / 3, "rlnAnglePsi": 0.0,
                          "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0,
                          "rlnOpticsGroup": 1, "rlnClassNumber": np.arange(n) % 3 + 1})
    write_star(tmp_path / "w.star", parts, optics)
    relion("relion_star_handler", "--i", "w.star", "--o", "copy.star", cwd=tmp_path)
    back = read_star(tmp_path / "copy.star")
    assert len(back["particles"]) == n
    assert back["particles"]["rlnImageName"].tolist() == parts["rlnImageName"].tolist()
    np.testing.assert_allclose(back["particles"]["rlnDefocusU"], parts["rlnDefocusU"],
                               rtol=1e-6)
    relion("relion_stack_create", "--i", "w.star", "--o", "stack", cwd=tmp_path)
    with mrcfile.open(tmp_path / "stack.mrcs", permissive=True) as m:
        np.testing.assert_allclose(m.data, imgs, atol=1e-5)


def test_relion_reads_upgraded_30_input(relion, shared_data, tmp_path):
    ps = load_particles(shared_data / "particles/betagal_17/sample_particles_relion30.star")
    (tmp_path / "sample.mrcs").symlink_to(ps.stack_paths[0])
    write_star(tmp_path / "up.star", ps.table, ps.optics)
    relion("relion_star_handler", "--i", "up.star", "--o", "copy.star", cwd=tmp_path)
    back = read_star(tmp_path / "copy.star")
    assert len(back["particles"]) == len(ps)
    assert len(back["optics"]) == len(ps.optics)
    np.testing.assert_allclose(back["particles"]["rlnOriginXAngst"],
                               ps.table["rlnOriginXAngst"], atol=1e-5)


def test_setup_s_relion_wrappers_run_without_ld_library_path(tmp_path):
    """scripts/relion_wrappers.sh (run by setup.sh --test) puts relion_* scripts in a bin
    folder that set RELION's LD_LIBRARY_PATH themselves: with that folder on the PATH and no
    LD_LIBRARY_PATH, `relion_stack_create` reads a STAR cryolatent wrote (README step 6)."""
    import os
    import shutil
    import subprocess

    from conftest import REPO, _relion_bin

    b = _relion_bin()
    if b is None or not (b.parent / "lib").is_dir():
        pytest.skip("no unpacked RELION (.relion/usr from setup.sh --test)")
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    bin_ = tmp_path / "venv bin"                      # a space in the path, quoted right
    res = subprocess.run(["bash", str(REPO / "scripts" / "relion_wrappers.sh"), str(b.parent),
                          str(bin_)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (bin_ / "relion_stack_create").is_file() and (bin_ / "relion_star_handler").is_file()
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PATH"] = f"{bin_}:/usr/bin:/bin"
    imgs = np.random.default_rng(1).standard_normal((3, 8, 8)).astype(np.float32)
    write_mrcs(tmp_path / "stk.mrcs", imgs, 2.0)
    write_star(tmp_path / "w.star",
               pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@stk.mrcs" for i in range(3)],
                             "rlnOpticsGroup": 1}),
               pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                             "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                             "rlnAmplitudeContrast": [0.1],
                             "rlnImagePixelSize": [2.0], "rlnImageSize": [8],
                             "rlnImageDimensionality": [2]}))
    res = subprocess.run(["relion_stack_create", "--i", "w.star", "--o", "stack"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    with mrcfile.open(tmp_path / "stack.mrcs", permissive=True) as m:
        np.testing.assert_allclose(m.data, imgs, atol=1e-5)
    # running it again rewrites its own wrappers
    res = subprocess.run(["bash", str(REPO / "scripts" / "relion_wrappers.sh"), str(b.parent),
                          str(bin_)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "exists and is not a wrapper" not in res.stderr
