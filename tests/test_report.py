"""``cryolatent report`` (one self-contained HTML page) and ``select --selection``, with the
page driven in headless Chromium (Debian's chromium + chromedriver through Selenium; those
tests skip where no Chromium exists)."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryolatent.cli import main
from cryolatent.errors import CryolatentError
from cryolatent.io import read_star, write_mrcs, write_star, write_star_blocks
from cryolatent.report.build import encode_names, quantize_column

OPTICS = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                       "rlnImagePixelSize": [2.0], "rlnImageSize": [8],
                       "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                       "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})


def make_star(folder: Path, n: int = 240, stem: str = "emb", seed: int = 0,
              summary: bool = True, class_images: bool = True) -> tuple[Path, pd.DataFrame]:
    """An ``embed``-like STAR of ``n`` particles in 3 classes, 4-D latents separated by
    class, a stack for its names, its trust report and ``_classes.mrcs`` beside it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cls = np.repeat([1, 2, 3], [n // 2, n // 3, n - n // 2 - n // 3])
    cls = cls[rng.permutation(n)]
    centres = np.array([[-4.0, 0, 0, 0], [4.0, 3.0, 0, 0], [4.0, -3.0, 0, 0]])
    z = (centres[cls - 1] + rng.normal(0, 0.7, (n, 4))).astype(np.float32)
    write_mrcs(folder / f"{stem}_parts.mrcs", np.zeros((n, 8, 8), np.float32), 2.0)
    du = rng.uniform(8000, 20000, n)
    p = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stem}_parts.mrcs" for i in range(n)],
        "rlnMicrographName": [f"mics/m{i // 50:03d}.mrc" for i in range(n)],
        "rlnCoordinateX": rng.uniform(0, 4000, n).round(1),
        "rlnOpticsGroup": np.ones(n, np.int64),
        "rlnDefocusU": du, "rlnDefocusV": du - 200.0, "rlnDefocusAngle": rng.uniform(-90, 90, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.normal(0, 2, n),
        "rlnOriginYAngst": rng.normal(0, 2, n), "rlnClassNumber": cls,
    })
    for d in range(4):
        p[f"cryolatentZ{d + 1}"] = z[:, d]
    star = write_star(folder / f"{stem}.star", p, OPTICS)
    sizes = np.bincount(cls, minlength=4)[1:]
    if summary:
        rep = {"kind": "embed", "particles": n, "apix": 2.0,
               "classes": [{"class": k, "size": int(sizes[k - 1]),
                            "resolution_A": [6.1, 9.5, None][k - 1],
                            "limited_by_nyquist": False,
                            "beats_aligned_noise": [True, True, False][k - 1]}
                           for k in (1, 2, 3)],
               "indistinguishable_pairs": [{"classes": [1, 2]}],
               "warnings": ["classes indistinguishable: 1-2"]}
        (folder / f"{stem}_summary.json").write_text(json.dumps(rep))
    if class_images:
        yy, xx = np.mgrid[:16, :16]
        imgs = np.stack([np.exp(-((xx - 4 * k) ** 2 + (yy - 8) ** 2) / 8.0) for k in (1, 2, 3)])
        write_mrcs(folder / f"{stem}_classes.mrcs", imgs.astype(np.float32), 2.0)
    return star, p


def fake_umap(z, sample=None, seed=0):
    """A stand-in for UMAP (seconds of numba compilation avoided): a warp of the PCA."""
    from cryolatent.analysis.plots import pca_2d

    xy, _ = pca_2d(z)
    return np.stack([np.tanh(xy[:, 0] / 3) * 10, xy[:, 1] + 0.1 * xy[:, 0] ** 2], axis=1)


class BlobGenerator:
    """Stand-in generator (no training): a Gaussian blob at x = z[0] px."""

    box = 16
    training = False

    def __init__(self):
        import torch

        self._p = torch.nn.Parameter(torch.zeros(()))

    def parameters(self):
        return iter([self._p])

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, z, size):
        import torch

        r = torch.arange(size, dtype=torch.float32) - size // 2
        y, x = torch.meshgrid(r, r, indexing="ij")
        return torch.exp(-0.5 * ((x - z[:, 0, None, None]) ** 2 + y ** 2) / 4.0)


def fake_run(folder: Path, monkeypatch) -> Path:
    run = folder / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    monkeypatch.setattr("cryolatent.run.load_run",
                        lambda rundir, device="auto", which="best": (BlobGenerator(), None))
    return run


def page_parts(html: str) -> tuple[dict, dict[str, bytes]]:
    """The page's metadata and its arrays (bytes), as the page's script reads them."""
    meta = json.loads(re.search(r'<script type="application/json" id="cl-meta">(.*?)</script>',
                                html, re.S).group(1))
    blobs = {k: base64.b64decode(v) for k, v in re.findall(
        r'<script type="application/octet-stream" id="blob-([^"]+)">([^<]*)</script>', html)}
    return meta, blobs


def decode_names(meta: dict, blobs: dict) -> list[str]:
    """The particle names as the page rebuilds them for a selection file."""
    nm = meta["names"]
    if nm["kind"] == "json":
        return json.loads(blobs["names-json"].decode())
    num = np.frombuffer(blobs["names-num"], "<u4")
    st = np.frombuffer(blobs["names-stack"], "<u2" if nm["stack_dtype"] == "u16" else "<u4")
    return [str(a).zfill(nm["width"]) + "@" + nm["stacks"][b] for a, b in zip(num, st)]


@pytest.fixture
def report(tmp_path, monkeypatch):
    """A report of a 240-particle STAR with a stand-in run (traversals) and UMAP stand-in."""
    import cryolatent.analysis.plots as plots

    monkeypatch.setattr(plots, "umap_2d", fake_umap)
    star, table = make_star(tmp_path / "data")
    run = fake_run(tmp_path, monkeypatch)
    out = tmp_path / "report.html"
    assert main(["report", str(run), str(star), "-o", str(out)]) == 0
    return out, star, table


# ------------------------------------------------------------------------------ the page
def test_report_is_one_offline_file(report):
    """No script, style, font or image is fetched: no src/href/url points outside the file,
    in the markup or in the inlined JavaScript (BokehJS's loaders of MathJax, Google Maps
    and an icon font, unused here, are blanked)."""
    out, star, table = report
    html = out.read_text(encoding="utf-8")
    assert re.search(r"<script[^>]*\bsrc\s*=", html) is None       # every script inline
    assert re.search(r"""<link[^>]*href\s*=\s*["']?(https?:)?//""", html) is None
    assert re.search(r"""\b(src|href|_url)\s*=\s*["'`]?(https?:)?//""", html) is None
    assert re.search(r"""(@import|url\()\s*["']?https?:""", html) is None
    assert "cdn." not in html and "googleapis" not in html
    assert "Bokeh" in html and "cl-meta" in html
    meta, blobs = page_parts(html)
    assert meta["n"] == len(table) and meta["star"] == str(star.resolve())
    assert [m["name"] for m in meta["maps"]] == ["UMAP", "PCA"]
    names = [c["name"] for c in meta["columns"]]
    assert names[0] == "rlnClassNumber"
    assert {"defocus", "rlnAnglePsi", "rlnDefocusU", "cryolatentZ1"} <= set(names)
    assert "rlnOpticsGroup" not in names and "rlnMicrographName" not in names  # constant/text
    # gallery: sizes, resolution and warnings from the trust report, images of refine
    # (_classes.mrcs) and of the generator at the class centres
    g = meta["gallery"]
    assert [c["size"] for c in g["classes"]] == np.bincount(table["rlnClassNumber"])[1:].tolist()
    assert g["classes"][0]["resolution"] == "6.1 Å" and g["classes"][2]["resolution"] == "no signal"
    assert any("indistinguishable from class 2" in w for w in g["classes"][0]["warnings"])
    assert any("noise" in w for w in g["classes"][2]["warnings"])
    assert any("select --auto drops it" in w for w in g["classes"][2]["warnings"])
    assert g["image_kinds"] == ["refine's average", "generator"]
    assert all(u.startswith("data:image/png;base64,") for c in g["classes"] for u in c["images"])
    assert g["warnings"] == ["classes indistinguishable: 1-2"]
    # traversals along the 2 principal axes, 7 steps each
    t = meta["traversal"]
    assert [len(r["images"]) for r in t["rows"]] == [7, 7]
    assert t["rows"][0]["explained"] > t["rows"][1]["explained"]
    # the arrays decode to the table's values
    assert decode_names(meta, blobs) == table["rlnImageName"].tolist()
    col = next(c for c in meta["columns"] if c["name"] == "rlnAnglePsi")
    codes = np.frombuffer(blobs[col["blob"]], np.uint8)
    np.testing.assert_allclose(col["offset"] + codes * col["scale"], table["rlnAnglePsi"],
                               atol=col["scale"] / 2 + 1e-9)
    cls = np.frombuffer(blobs["col-class"], "<u2")
    np.testing.assert_array_equal(cls, table["rlnClassNumber"])


def test_report_arrays_are_compact(tmp_path):
    """Typed arrays, base64: ~1 byte per particle per colouring, 4 per map coordinate."""
    star, table = make_star(tmp_path, n=3000, summary=False, class_images=False)
    out = tmp_path / "r.html"
    assert main(["report", str(star), "-o", str(out), "--no-umap"]) == 0
    html = out.read_text()
    meta, blobs = page_parts(html)
    assert len(blobs["col-1"]) == 3000 and len(blobs["col-class"]) == 6000
    assert len(blobs["names-num"]) == 4 * 3000
    # the map's coordinates: float32 arrays in base64 inside the Bokeh document
    assert html.count('"dtype":"float32"') >= 2 and '"type":"ndarray"' in html
    assert out.stat().st_size < 1.6e6 + 3000 * 45   # BokehJS, then ~40 bytes a particle
    assert meta["gallery"]["report"] is None and meta["traversal"] is None


def test_encode_names_fallbacks():
    blobs: dict = {}
    info = encode_names(np.array(["12@a/s.mrcs", "000013@a/s.mrcs"], dtype=object), blobs)
    assert info["kind"] == "json"    # two paddings: kept as written
    assert json.loads(base64.b64decode(blobs["names-json"])) == ["12@a/s.mrcs", "000013@a/s.mrcs"]
    blobs = {}
    info = encode_names(np.array(["1@x.mrcs", "2@x.mrcs", "1@x.mrcs", "10@y.mrcs"], object), blobs)
    assert info["kind"] == "compact" and info["width"] == 1 and info["occurrence"]
    assert np.frombuffer(base64.b64decode(blobs["names-occ"]), "<u2").tolist() == [0, 0, 1, 0]
    meta = {"names": info}
    assert decode_names(meta, {k: base64.b64decode(v) for k, v in blobs.items()}) == \
        ["1@x.mrcs", "2@x.mrcs", "1@x.mrcs", "10@y.mrcs"]


def test_quantize_column():
    codes, q = quantize_column(np.array([3.0, 5.0, np.nan, 4.0]))
    assert codes.tolist() == [0, 2, 255, 1] and q["exact"] and q["offset"] == 3.0
    v = np.linspace(-1, 1, 1000) ** 3
    codes, q = quantize_column(v)
    assert codes.max() == 254 and not q["exact"]
    inside = (v >= q["lo"]) & (v <= q["hi"])
    np.testing.assert_allclose(q["offset"] + codes[inside] * q["scale"], v[inside],
                               atol=q["scale"] / 2 + 1e-12)
    codes, q = quantize_column(np.array([-179.5, 0.25, 179.0, 90.0]), cyclic=True)
    assert (q["lo"], q["hi"]) == (-180.0, 180.0)


def test_report_errors(tmp_path, capsys):
    star, _ = make_star(tmp_path, n=30)
    out = tmp_path / "r.html"
    cases = [
        ([str(tmp_path / "nope.star")], out, "no such file"),
        ([str(star)], tmp_path / "r.txt", "end its name in .html"),
        ([str(tmp_path)], out, "neither a training run folder"),
        ([str(star), str(star)], out, "a second STAR"),
    ]
    for args, o, msg in cases:
        assert main(["report", *args, "-o", str(o), "--no-umap"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    t = read_star(star)["particles"].drop(columns=[f"cryolatentZ{d}" for d in range(1, 5)])
    write_star(tmp_path / "noz.star", t, OPTICS)
    assert main(["report", str(tmp_path / "noz.star"), "-o", str(out), "--no-umap"]) == 1
    assert "no cryolatentZ columns" in capsys.readouterr().err
    assert not out.exists()
    assert main(["report", str(star), "-o", str(out), "--no-umap"]) == 0
    assert main(["report", str(star), "-o", str(out), "--no-umap"]) == 1
    assert "file exists; use --force" in capsys.readouterr().err
    assert main(["report", str(star), "-o", str(out), "--no-umap", "--force"]) == 0


def test_classes_folder_of_other_classes_is_not_shown(tmp_path, caplog):
    """A classes folder made from other classes (embed's, not refine's) shows no images."""
    star, table = make_star(tmp_path, n=60, class_images=False)
    cdir = tmp_path / "classes"
    cdir.mkdir()
    write_mrcs(cdir / "aligned_averages.mrcs", np.ones((3, 8, 8), np.float32), 2.0)
    (cdir / "class_counts.csv").write_text("class,count\n1,20\n2,20\n3,20\n")
    from cryolatent.report.build import make_report

    make_report([star, cdir], tmp_path / "r.html", umap=False)
    meta, _ = page_parts((tmp_path / "r.html").read_text())
    assert meta["gallery"]["image_kinds"] == []
    assert "made from other classes" in caplog.text
    sizes = np.bincount(table["rlnClassNumber"])[1:]
    (cdir / "class_counts.csv").write_text("class,count\n" + "".join(
        f"{k + 1},{s}\n" for k, s in enumerate(sizes)))
    make_report([star, cdir], tmp_path / "r2.html", umap=False)
    meta, _ = page_parts((tmp_path / "r2.html").read_text())
    assert meta["gallery"]["image_kinds"] == ["aligned average"]


# ------------------------------------------------------------------- select --selection
def selection_file(path: Path, star: Path, names, occurrence=None, **extra) -> Path:
    doc = {"format": "cryolatent-selection", "version": 1, "star": str(star),
           "count": len(names), "rlnImageName": list(names)}
    if occurrence is not None:
        doc["occurrence"] = list(occurrence)
    doc.update(extra)
    path.write_text(json.dumps(doc))
    return path


def test_select_selection_keeps_exactly_the_rows(tmp_path):
    star, table = make_star(tmp_path, n=50, summary=False, class_images=False)
    # a STAR with a further block before the optics: kept, in order
    blocks = read_star(star)
    general = pd.DataFrame({"rlnComment": ["keep me"]})
    write_star_blocks(tmp_path / "three.star", {"general": general, "optics": blocks["optics"],
                                                "particles": blocks["particles"]})
    rows = [3, 7, 8, 30, 49]
    sel = selection_file(tmp_path / "sel.json", star,
                         table["rlnImageName"].iloc[rows[::-1]].tolist())  # any order
    out = tmp_path / "sub.star"
    assert main(["select", str(tmp_path / "three.star"), "--selection", str(sel), "-o",
                 str(out)]) == 0
    b = read_star(out)
    assert list(b) == ["general", "optics", "particles"]
    assert b["general"]["rlnComment"].tolist() == ["keep me"]
    pd.testing.assert_frame_equal(b["optics"], blocks["optics"])
    sub = b["particles"]
    assert list(sub.columns) == list(table.columns)
    want = blocks["particles"].iloc[rows].reset_index(drop=True)
    assert sub["rlnImageName"].str.rsplit("@").str[0].tolist() == \
        want["rlnImageName"].str.rsplit("@").str[0].tolist()
    for c in table.columns:
        if c != "rlnImageName":
            pd.testing.assert_series_equal(sub[c], want[c], check_names=False)
    # --invert: every other row
    assert main(["select", str(star), "--selection", str(sel), "-o",
                 str(tmp_path / "rest.star"), "--invert"]) == 0
    rest = read_star(tmp_path / "rest.star")["particles"]
    assert len(rest) == 45 and not set(rest["rlnCoordinateX"]) & set(want["rlnCoordinateX"])
    # an existing output is refused without --force, like the other select modes
    assert main(["select", str(star), "--selection", str(sel), "-o", str(out)]) == 1
    assert main(["select", str(star), "--selection", str(sel), "-o", str(out), "--force"]) == 0


def test_select_selection_moved_stacks_and_repeated_names(tmp_path):
    from cryolatent.report.selection import select_selection

    star, table = make_star(tmp_path, n=20, summary=False, class_images=False)
    moved = [n.replace("@", "@/elsewhere/old/") for n in table["rlnImageName"][[2, 5]]]
    sel = selection_file(tmp_path / "s.json", star, moved)
    got = read_star(select_selection(star, sel, tmp_path / "a.star"))["particles"]
    np.testing.assert_array_equal(got["rlnCoordinateX"], table["rlnCoordinateX"][[2, 5]])
    # a symmetry-expanded set repeats names: the occurrence picks the row
    t2 = pd.concat([table, table], ignore_index=True)
    t2["rlnAnglePsi"] = np.arange(40.0)
    write_star(tmp_path / "exp.star", t2, OPTICS)
    sel = selection_file(tmp_path / "s2.json", star, [table["rlnImageName"][4]] * 2 +
                         [table["rlnImageName"][6]], occurrence=[1, 0, 1])
    got = read_star(select_selection(tmp_path / "exp.star", sel, tmp_path / "b.star"))
    assert got["particles"]["rlnAnglePsi"].tolist() == [4.0, 24.0, 26.0]


@pytest.mark.parametrize("content,msg", [
    ("not json", "not a JSON selection file"),
    ("[1, 2]", "not a selection file"),
    ('{"rlnImageName": []}', "the selection is empty"),
    ('{"rlnImageName": [3]}', "entry 1 is 3, not a particle name"),
    ('{"format": "other", "rlnImageName": ["1@x"]}', "format 'other'"),
    ('{"rlnImageName": ["000001@emb_parts.mrcs", "000001@emb_parts.mrcs"]}', "listed twice"),
    ('{"rlnImageName": ["000001@emb_parts.mrcs"], "occurrence": [-1]}', "occurrence"),
    ('{"rlnImageName": ["000001@emb_parts.mrcs"], "count": 2}', "count says 2"),
    ('{"rlnImageName": ["000001@emb_parts.mrcs", "000099@emb_parts.mrcs"], "star": "o.star"}',
     "1 of its 2 particles are not in"),
])
def test_select_selection_errors(tmp_path, capsys, content, msg):
    star, _ = make_star(tmp_path, n=20, summary=False, class_images=False)
    (tmp_path / "s.json").write_text(content)
    out = tmp_path / "sub.star"
    assert main(["select", str(star), "--selection", str(tmp_path / "s.json"), "-o",
                 str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not out.exists()


def test_select_selection_option_errors(tmp_path, capsys):
    star, table = make_star(tmp_path, n=20, summary=False, class_images=False)
    sel = selection_file(tmp_path / "s.json", star, table["rlnImageName"].tolist())
    for args, msg in [(["--classes", "1"], "give one of --classes or --auto or --selection FILE"),
                      (["--max-resolution", "9"], "--max-resolution applies to --auto only"),
                      (["--invert"], "the selection is empty")]:
        assert main(["select", str(star), "--selection", str(sel), "-o",
                     str(tmp_path / "o.star"), *args]) == 1
        assert msg in capsys.readouterr().err
    assert main(["select", str(star), "--selection", str(tmp_path / "none.json"), "-o",
                 str(tmp_path / "o.star")]) == 1
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(CryolatentError, match="overwrite the input"):
        from cryolatent.report.selection import select_selection

        select_selection(star, sel, star)


# ------------------------------------------------------------------ in headless Chromium
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium (Debian's, through Selenium); skips where there is none."""
    from cryolatent.report.browser import chromium, find_chromium

    found = find_chromium()
    if isinstance(found, str):
        pytest.skip(f"no headless Chromium: {found}")
    dl = tmp_path_factory.mktemp("downloads")
    with chromium(dl, width=1300, height=850) as d:
        d.downloads = dl
        yield d


def _frame_box(d) -> dict:
    """The plot's data frame in viewport pixels."""
    return d.execute_script("""
        const plot = Bokeh.documents[0].get_model_by_name('cl-plot');
        const pv = Bokeh.index.get_one(plot);
        const r = pv.canvas_view.el.getBoundingClientRect(), f = pv.frame.bbox;
        return {left: r.left + f.left, top: r.top + f.top, width: f.width, height: f.height};""")


def _drag(d, points) -> None:
    """Press at the first point, move through the others, release (viewport fractions of
    the plot frame)."""
    from selenium.webdriver.common.action_chains import ActionChains

    f = _frame_box(d)
    xy = [(int(f["left"] + a * f["width"]), int(f["top"] + b * f["height"])) for a, b in points]
    ac = ActionChains(d)
    ptr = ac.w3c_actions.pointer_action
    ptr.move_to_location(*xy[0])
    ptr.pointer_down()
    for p in xy[1:]:
        ptr.move_to_location(*p)
    ptr.pointer_up()
    ac.perform()


def _selected(d) -> list[int]:
    return d.execute_script("return Array.from(Bokeh.documents[0].get_model_by_name("
                            "'cl-points').selected.indices).sort((a, b) => a - b);")


def _save(d, name: str) -> dict:
    """Click Save selection; the downloaded file's content."""
    f = Path(d.downloads) / name
    if f.exists():
        f.unlink()
    d.find_element("id", "cl-save").click()
    for _ in range(300):
        if f.exists() and not list(Path(d.downloads).glob("*.crdownload")):
            try:
                return json.loads(f.read_text())
            except ValueError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no {name} downloaded")


def _open(d, html: Path, n: int) -> None:
    from cryolatent.report.browser import open_report, requested_urls

    requested_urls(d)   # (drain the log)
    r = open_report(d, html, timeout=120)
    assert r["errors"] == [], r["errors"]
    assert r["points"] == n
    assert d.find_element("id", "cl-count").text == f"0 of {n:,} particles selected"
    urls = [u for u in requested_urls(d) if not u.startswith(("data:", "blob:"))]
    assert urls == [html.resolve().as_uri()], urls     # nothing from the network


def _check_round_trip(tmp_path, star, table, doc, rows) -> Path:
    assert doc["rows"] == rows and doc["count"] == len(rows)
    assert doc["rlnImageName"] == table["rlnImageName"].iloc[rows].tolist()
    assert doc["star"] == str(star.resolve())
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps(doc))
    out = tmp_path / "subset.star"
    assert main(["select", str(star), "--selection", str(sel), "-o", str(out)]) == 0
    sub = read_star(out)["particles"]
    np.testing.assert_array_equal(sub["rlnCoordinateX"], table["rlnCoordinateX"].iloc[rows])
    np.testing.assert_array_equal(sub["rlnClassNumber"], table["rlnClassNumber"].iloc[rows])
    return out


def test_browser_box_selection_round_trip(browser, tmp_path, monkeypatch):
    """Open the page, drag a box, save the selection; select --selection gives exactly the
    particles inside the box."""
    import cryolatent.analysis.plots as plots

    monkeypatch.setattr(plots, "umap_2d", fake_umap)
    star, table = make_star(tmp_path, n=400, stem="boxy")
    html = tmp_path / "report.html"
    assert main(["report", str(star), "-o", str(html)]) == 0
    _open(browser, html, 400)
    _drag(browser, [(0.05, 0.05), (0.3, 0.4), (0.55, 0.95)])
    rows = _selected(browser)
    assert 0 < len(rows) < 400
    shown = browser.find_element("id", "cl-count").text
    assert shown == f"{len(rows)} of 400 particles selected"
    # a box: every point inside the selected points' bounding box is selected
    xy = np.array(browser.execute_script(
        "const d = Bokeh.documents[0].get_model_by_name('cl-points').data;"
        "return [Array.from(d.x), Array.from(d.y)];")).T
    lo, hi = xy[rows].min(0), xy[rows].max(0)
    inside = np.flatnonzero(np.all((xy >= lo) & (xy <= hi), axis=1))
    assert inside.tolist() == rows
    doc = _save(browser, "boxy_selection.json")
    assert "box/lasso in the UMAP map" in doc["how"]
    _check_round_trip(tmp_path, star, table, doc, rows)
    assert browser.execute_script("return window.cryolatentReport.errors") == []


def test_browser_classes_colours_and_maps(browser, tmp_path, monkeypatch):
    """Clicking classes selects them (Shift adds); every colouring and both maps draw
    without a JavaScript error; the gallery shows the trust report's warnings."""
    import cryolatent.analysis.plots as plots

    monkeypatch.setattr(plots, "umap_2d", fake_umap)
    star, table = make_star(tmp_path, n=300, stem="cls")
    run = fake_run(tmp_path, monkeypatch)
    html = tmp_path / "report.html"
    assert main(["report", str(run), str(star), "-o", str(html)]) == 0
    _open(browser, html, 300)
    cards = browser.find_elements("css selector", ".cl-card")
    assert len(cards) == 3 and "indistinguishable from class 2" in cards[0].text
    assert len(browser.find_elements("css selector", ".cl-trav-row img")) == 14
    cls = table["rlnClassNumber"].to_numpy()
    cards[1].click()
    assert _selected(browser) == np.flatnonzero(cls == 2).tolist()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(browser).key_down(Keys.SHIFT).click(cards[2]).key_up(Keys.SHIFT).perform()
    assert _selected(browser) == np.flatnonzero(cls >= 2).tolist()
    assert "cl-on" in cards[1].get_attribute("class")
    doc = _save(browser, "cls_selection.json")
    assert doc["how"] == "class 2; plus class 3"
    _check_round_trip(tmp_path, star, table, doc, np.flatnonzero(cls >= 2).tolist())
    for name in browser.execute_script(
            "return window.cryolatentReport.meta.columns.map((c) => c.name);"):
        browser.execute_script("const s = document.getElementById('cl-colour'); s.value = "
                               "arguments[0]; s.dispatchEvent(new Event('change'));", name)
    browser.execute_script("const s = document.getElementById('cl-map'); s.value = '1';"
                           "s.dispatchEvent(new Event('change'));")
    label = browser.execute_script("return Bokeh.documents[0].get_model_by_name('cl-plot')"
                                   ".below[0].axis_label;")
    assert label.startswith("PC 1")
    assert _selected(browser) == np.flatnonzero(cls >= 2).tolist()   # kept across maps
    time.sleep(0.3)
    assert browser.execute_script("return window.cryolatentReport.errors") == []
    from cryolatent.report.browser import console_errors

    assert console_errors(browser) == []


@pytest.mark.relion
def test_browser_lasso_selection_read_by_relion(browser, tmp_path, relion):
    """A lasso selection saved in the page, through select --selection, gives a STAR that
    RELION reads with every row."""
    star, table = make_star(tmp_path, n=300, stem="lasso")
    html = tmp_path / "report.html"
    assert main(["report", str(star), "-o", str(html), "--no-umap"]) == 0
    _open(browser, html, 300)
    browser.execute_script("""
        const plot = Bokeh.documents[0].get_model_by_name('cl-plot');
        const t = plot.toolbar.tools.find((t) => (t.type || t.constructor.__name__) === 'LassoSelectTool');
        t.active = true;""")
    _drag(browser, [(0.1, 0.1), (0.6, 0.15), (0.7, 0.6), (0.4, 0.9), (0.1, 0.7), (0.1, 0.12)])
    rows = _selected(browser)
    assert 0 < len(rows) < 300
    doc = _save(browser, "lasso_selection.json")
    out = _check_round_trip(tmp_path, star, table, doc, rows)
    relion("relion_star_handler", "--i", out, "--o", tmp_path / "back.star")
    back = read_star(tmp_path / "back.star")["particles"]
    sub = read_star(out)["particles"]
    assert back["rlnImageName"].tolist() == sub["rlnImageName"].tolist()
    assert len(back) == len(rows)
