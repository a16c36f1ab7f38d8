"""MRC reading (every mode, both byte orders, odd headers) and writing, against raw bytes / mrcfile."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryolatent.errors import InputError
from cryolatent.io import MRCStackWriter, check_finite, load_particles, read_header, write_mrcs
from cryolatent.io.mrc import clear_cache, read_images

MODES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}


def raw_mrc(path, data: np.ndarray, mode: int, order: str, apix: float = 1.5,
            stamp: bool = True, map_id: bytes = b"MAP ", ispg: int = 0, nsymbt: int = 0,
            nz_header: int | None = None):
    """Write an MRC file with plain numpy bytes (independent of the reader under test)."""
    nz, ny, nx = data.shape
    i4, f4 = np.dtype(order + "i4"), np.dtype(order + "f4")
    h = bytearray(1024)

    def put(word, val, dt):
        h[4 * word:4 * word + 4] = np.array([val], dtype=dt).tobytes()

    for w, v in enumerate((nx, ny, nz if nz_header is None else nz_header, mode)):
        put(w, v, i4)
    for w, v in zip((7, 8, 9), (nx, ny, 1)):
        put(w, v, i4)
    for w, v in zip((10, 11, 12), (nx * apix, ny * apix, apix)):
        put(w, v, f4)
    put(22, ispg, i4)
    put(23, nsymbt, i4)
    h[208:212] = map_id
    h[212:214] = (b"\x44\x44" if order == "<" else b"\x11\x11") if stamp else b"\x00\x00"
    with open(path, "wb") as f:
        f.write(bytes(h) + b"\x07" * nsymbt + data.astype(order + MODES[mode]).tobytes())


def _data(mode, rng, shape=(5, 12, 12)):
    if mode in (0, 1, 6):
        info = np.iinfo(np.dtype(MODES[mode]))
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(MODES[mode])
    return rng.standard_normal(shape).astype(MODES[mode])


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("stamp", [True, False])
def test_every_mode_and_byte_order(tmp_path, mode, order, stamp):
    rng = np.random.default_rng(mode)
    data = _data(mode, rng)
    p = tmp_path / f"m{mode}.mrcs"
    raw_mrc(p, data, mode, order, stamp=stamp, map_id=b"\0\0\0\0" if not stamp else b"MAP ",
            ispg=9999 if not stamp else 0, nsymbt=0 if stamp else 96)
    clear_cache()
    h = read_header(p)
    assert (h.nx, h.ny, h.nz, h.mode) == (12, 12, 5, mode)
    assert h.apix == pytest.approx(1.5)
    idx = [4, 0, 2, 2]
    got = read_images(p, idx)
    assert got.dtype == np.float32 and got.shape == (4, 12, 12)
    np.testing.assert_array_equal(got, data[idx].astype(np.float32))
    ps = load_particles(p)
    np.testing.assert_array_equal(ps.images(slice(None)), data.astype(np.float32))
    assert ps.names[0] == f"000001@m{mode}.mrcs" and ps.apix == pytest.approx(1.5)


def test_zero_voxel_size_needs_apix(tmp_path):
    p = tmp_path / "topaz.mrcs"
    raw_mrc(p, np.zeros((2, 8, 8), np.float32), 2, "<", apix=0.0, map_id=b"\0\0\0\0")
    with pytest.raises(InputError, match="topaz.mrcs.*pixel size"):
        load_particles(p)
    assert load_particles(p, apix=2.0).apix == 2.0


def test_truncated_stack_names_particle(tmp_path):
    p = tmp_path / "short.mrcs"
    raw_mrc(p, np.ones((3, 8, 8), np.float32), 2, "<", nz_header=5)
    with pytest.raises(InputError, match=r"000004@short.mrcs.*shorter than its header"):
        load_particles(p)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.integers(-2**31, 2**31 - 1), min_size=4, max_size=4),
       mode=st.sampled_from([0, 1, 2, 6, 12, 3, 4, 101, -1]),
       stamp=st.sampled_from([b"\x44\x44", b"\x11\x11", b"\0\0", b"\xff\xff"]),
       cut=st.integers(0, 3000), small=st.booleans())
def test_property_random_headers(tmp_path, words, mode, stamp, cut, small):
    """Random headers and truncations: either InputError or a correct read, nothing else."""
    rng = np.random.default_rng(abs(sum(words)) % 2**32)
    nx, ny, nz = (words[0] % 9, words[1] % 9, words[2] % 5) if small else words[:3]
    h = np.zeros(256, "<i4")
    h[:4] = (nx, ny, nz, mode)
    h[7] = words[3] % 50
    h.view("<f4")[10] = 10.0
    hb = bytearray(h.tobytes())
    hb[212:214] = stamp
    body = rng.integers(0, 256, size=cut, dtype=np.uint8).tobytes()
    p = tmp_path / "rand.mrcs"
    p.write_bytes(bytes(hb[: min(1024, 1024 if cut else 1024)]) + body)
    clear_cache()
    try:
        hdr = read_header(p)
        n = hdr.n_complete
        imgs = read_images(p, np.arange(n)) if n else np.zeros((0, hdr.ny, hdr.nx))
        if n:
            raw = np.frombuffer(p.read_bytes()[hdr.offset:hdr.offset + n * hdr.nx * hdr.ny *
                                               hdr.dtype.itemsize], dtype=hdr.dtype)
            np.testing.assert_array_equal(imgs.reshape(-1), raw.astype(np.float32))
        if nz > n and n >= 0:
            with pytest.raises(InputError):
                read_images(p, [nz - 1])
    except InputError:
        pass


def test_writer_streams_and_marks_stack(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 16, 16)).astype(np.float32)
    p = tmp_path / "w.mrcs"
    with MRCStackWriter(p, 16, 1.25) as w:
        w.write(a[:3])
        w.write(a[3])
        w.write(a[4:])
        assert not p.exists()  # atomic: only the temp file exists while writing
    with mrcfile.open(p) as m:
        assert m.is_image_stack() and m.header.ispg == 0 and m.data.dtype == np.float32
        assert m.voxel_size.x == pytest.approx(1.25)
        np.testing.assert_array_equal(m.data, a)
        assert float(m.header.dmean) == pytest.approx(float(a.mean()), abs=1e-5)
    assert mrcfile.validate(str(p), print_file=open("/dev/null", "w"))
    with pytest.raises(RuntimeError):
        with MRCStackWriter(tmp_path / "fail.mrcs", 16, 1.0) as w:
            w.write(a)
            raise RuntimeError("boom")
    assert list(tmp_path.glob("*fail*")) == []
    write_mrcs(tmp_path / "x.mrcs", a, 2.0)
    with mrcfile.open(tmp_path / "x.mrcs") as m:
        np.testing.assert_array_equal(m.data, a)


def test_lazy_reads_equal_mrcfile_on_real_stacks(shared_data):
    for star in ("particles/topaz_picked/epu29_particles_b96.star",
                 "particles/topaz_picked/fei_extended_particles_b128.star",
                 "particles/betagal_17/sample_particles_relion31.star"):
        ps = load_particles(shared_data / star)
        with mrcfile.open(ps.stack_paths[0], permissive=True) as m:
            full = np.asarray(m.data, dtype=np.float32)
        rng = np.random.default_rng(1)
        idx = rng.permutation(len(ps))[: min(len(ps), 40)]
        np.testing.assert_array_equal(ps.images(idx), full[ps.image_index[idx]])
        seen = []
        for ii, im in ps.iter_batches(16):
            np.testing.assert_array_equal(im, full[ps.image_index[ii]])
            seen.append(ii)
        assert np.array_equal(np.concatenate(seen), np.arange(len(ps)))
        ahead = list(ps.iter_batches(16, indices=idx, prefetch=2))   # read in a thread
        assert np.array_equal(np.concatenate([ii for ii, _ in ahead]), idx)
        np.testing.assert_array_equal(np.concatenate([im for _, im in ahead]), ps.images(idx))
        assert ps[3].shape == (ps.box, ps.box) and ps.images(3).shape == (1, ps.box, ps.box)


def test_check_finite_names_particle(shared_data):
    ps = load_particles(shared_data / "particles/betagal_17/sample_particles_relion31.star")
    idx = np.array([5, 2])
    im = ps.images(idx)
    check_finite(im, idx, ps)
    im[1, 3, 3] = np.nan
    with pytest.raises(InputError, match=r"000003@sample.mrcs.*NaN"):
        check_finite(im, idx, ps)
