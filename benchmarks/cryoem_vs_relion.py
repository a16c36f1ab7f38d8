"""The project's cryo-EM benchmark: cryolatent (defaults of ``train``) against RELION 3.1
Class2D on the same simulated particles, scored against the truth, CPU time of each.

Data (SPEC, "Quality against RELION on cryo-EM"): ``simulate cryoem``, 6,000 particles,
64 px, 3 Å/px, 2 structures x 3 fixed views (Fibonacci directions) = 6 true classes, CTF
(mean defocus U(1.0, 2.5) µm, astigmatism up to 0.05 µm), SNR 0.1, psi ~ U(0, 360),
shifts N(0, 2²) px per axis. The simulation draws protein white; the benchmark writes

* ``SET/particles.star`` + ``particles.mrcs``: protein DARK (as RELION's Extract writes
  it without --invert), normalised as Extract does (background outside the 0.75-box circle
  to mean 0, sd 1), truth columns removed: what cryolatent trains on;
* ``SET/relion/particles.star`` + ``white.mrcs``: the same images negated (protein white,
  as RELION needs them), no truth columns;
* ``SET/truth.star``: the truth, with rlnClassNumber = 3 (structure - 1) + view.

Sets: ``A`` (GluA3 NTD tetramer 3O21 / dimer 3P3W, the benchmark) and ``B`` (CasX 6NY1 /
RuvAB-HJ 7PBL, a held-out check that nothing is tuned to A); ``C`` (adenylate kinase open
4AKE / closed 1AKE: one 23 kDa protein in two conformations, views that look alike; 1.5 Å/px
so that it fills the box) and ``D`` (lidless chaperonin open 3IYF / closed 3J03, 864 kDa
16-mers; 4 Å/px so that they fit), held out from every change made since.

The peer: ``relion_refine`` 2D classification as the RELION GUI's Class2D job runs it by
default (K 6, 25 iterations, --ctf, in-plane sampling 6°, offset range 5 px step 1,
--zero_mask --flatten_solvent --norm --scale, tau2_fudge 2, 2 threads), mask diameter
1.2x the largest structure's diameter (a user's choice). Its CPU time is relion_refine's
user+sys.

Steps are cached in OUTDIR: a rerun skips a set's simulation or RELION run that finished
(its ``done.json`` exists), so one command produces the whole table; ``--redo relion``
forces.

    python benchmarks/cryoem_vs_relion.py --outdir /tmp/cvr [--sets A B] [--skip-relion]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from relion_peer import LoadSampler, relion_bin, relion_env  # noqa: E402

STRUCTURES = REPO.parent / "shared" / "data" / "structures"
SETS = {
    "A": {"structures": ["3O21_GluA3_NTD_tetramer_xray.cif", "3P3W_GluA3_NTD_dimeric_xray.pdb"],
          "seed": 1},
    "B": {"structures": ["6NY1_CasX_gRNA_DNA_stateII_cryoEM.pdb", "7PBL_RuvAB_HJ_cryoEM.pdb"],
          "seed": 2},
    # held out (never tuned on): structures A and B do not use, made the same way
    "C": {"structures": ["adk_open_4AKE_MDA.pdb", "adk_closed_1AKE_MDA.pdb"],
          "seed": 3, "apix": 1.5},
    "D": {"structures": ["3IYF_lidless_MmCpn_open_cryoEM.pdb",
                         "3J03_lidless_MmCpn_closed_cryoEM.pdb"], "seed": 4, "apix": 4.0},
}
N, BOX, APIX, SNR, VIEWS, SHIFT_SD = 6000, 64, 3.0, 0.1, 3, 2.0
TRUTH_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                 "rlnOriginYAngst", "rlnClassNumber", "cryolatentViewNumber")


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def make_set(name: str, out: Path) -> dict:
    """Simulate, then write the dark (cryolatent) and white (RELION) copies and the truth."""
    from cryolatent.io import read_star, write_mrcs, write_star
    from cryolatent.io.mrc import read_images, read_header
    from cryolatent.preprocess import normalize
    from cryolatent.simulate.cryoem import load_structure

    done = out / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec = SETS[name]
    apix = spec.get("apix", APIX)
    sim = out / "sim"
    cmd = [str(REPO / ".venv" / "bin" / "cryolatent"), "simulate", "cryoem", "-o", str(sim),
           "--n", str(N), "--box", str(BOX), "--apix", str(apix), "--snr", str(SNR),
           "--views", str(VIEWS), "--shift-sd", str(SHIFT_SD), "--seed", str(spec["seed"]),
           "--defocus-min", "10000", "--defocus-max", "25000", "--astigmatism", "500"]
    for s in spec["structures"]:
        cmd += ["--structure", str(STRUCTURES / s)]
    subprocess.run(cmd, check=True)
    blocks = read_star(sim / "particles.star")
    p, optics = blocks["particles"], blocks["optics"]
    stack = sim / "particles.mrcs"
    imgs = read_images(stack, np.arange(N), read_header(stack))
    dark = normalize(-imgs.astype(np.float32))          # protein dark, Extract's normalisation
    write_mrcs(out / "particles.mrcs", dark, apix)
    (out / "relion").mkdir()
    write_mrcs(out / "relion" / "white.mrcs", -dark, apix)
    user = p.drop(columns=[c for c in TRUTH_COLUMNS if c in p.columns])
    idx = [v.split("@", 1)[0] for v in p["rlnImageName"]]
    u = user.copy()
    u["rlnImageName"] = [f"{i}@particles.mrcs" for i in idx]
    write_star(out / "particles.star", u, optics)
    w = user.copy()
    w["rlnImageName"] = [f"{i}@white.mrcs" for i in idx]
    write_star(out / "relion" / "particles.star", w, optics)
    t = p.copy()
    t["rlnImageName"] = u["rlnImageName"]
    t["rlnClassNumber"] = 3 * (p["rlnClassNumber"].astype(int) - 1) + \
        p["cryolatentViewNumber"].astype(int)
    write_star(out / "truth.star", t, optics)
    radius = max(load_structure(STRUCTURES / s).radius for s in spec["structures"])
    shutil.rmtree(sim)
    info = {"set": name, "structures": spec["structures"], "seed": spec["seed"], "n": N,
            "box": BOX, "apix": apix, "snr": SNR, "views": VIEWS, "shift_sd_px": SHIFT_SD,
            "max_radius_A": round(radius, 1)}
    done.write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_relion(setdir: Path, info: dict, b: Path, threads: int, iters: int, redo: bool) -> dict:
    """relion_refine Class2D with the GUI's defaults, in SET/relion (cached)."""

    out = setdir / "relion"
    done = out / "done.json"
    if done.exists() and not redo:
        res = json.loads(done.read_text())
    else:
        shutil.rmtree(out / "Class2D", ignore_errors=True)
        (out / "Class2D").mkdir()
        diameter = int(round(1.2 * 2 * info["max_radius_A"]))
        diameter = min(diameter, int(BOX * info["apix"]) - 2)
        cmd = [str(b / "relion_refine"), "--i", "particles.star", "--o", "Class2D/run",
               "--K", "6", "--iter", str(iters), "--tau2_fudge", "2",
               "--particle_diameter", str(diameter), "--psi_step", "6", "--offset_range", "5",
               "--offset_step", "1", "--ctf", "--zero_mask", "--flatten_solvent", "--norm",
               "--scale", "--j", str(threads), "--pool", "30",
               "--dont_combine_weights_via_disc", "--random_seed", "0"]
        print("  relion", " ".join(cmd[1:]), flush=True)
        c0, t0, load = _cpu_children(), time.time(), LoadSampler()
        with open(out / "relion.log", "w") as log:
            r = subprocess.run(cmd, cwd=out, env=relion_env(b), stdout=log,
                               stderr=subprocess.STDOUT)
        wall, cpu = time.time() - t0, _cpu_children() - c0
        if r.returncode != 0:
            sys.exit(f"relion_refine failed ({r.returncode}); see {out / 'relion.log'}")
        res = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": threads,
               "load": load.stop(), "particle_diameter_A": diameter, "iters": iters,
               "command": "relion_refine " + " ".join(cmd[1:]),
               "data_star": str(out / "Class2D" / f"run_it{iters:03d}_data.star"),
               "classes_mrcs": str(out / "Class2D" / f"run_it{iters:03d}_classes.mrcs")}
        done.write_text(json.dumps(res, indent=2) + "\n")
    res["metrics"] = score(_as_truth_names(Path(res["data_star"]), out / "data_named.star"),
                           setdir / "truth.star", centre=True)
    return res


def relion_partial(setdir: Path) -> dict | None:
    """A relion_refine run still going (or stopped): its newest finished iteration scored,
    with the CPU time it had used by then (from the log's timestamps is not possible, so:
    the running process's user+sys now, read from /proc, and the iteration it reached).
    Lets the table compare both tools at equal CPU time when RELION's 25 iterations do not
    fit in a session."""
    import glob
    import re

    out = setdir / "relion"
    its = sorted(glob.glob(str(out / "Class2D" / "run_it[0-9][0-9][0-9]_data.star")))
    its = [p for p in its if not p.endswith("it000_data.star")]
    if not its:
        return None
    last = Path(its[-1])
    it = int(re.search(r"_it(\d+)_data", last.name).group(1))
    cpu = None
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"relion_refine") and Path(cwd) == out:
            f = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    # a run continued with --continue is a new process: the CPU seconds its predecessors
    # used are recorded (one number, seconds) in SET/relion/cpu_offset.txt
    off = out / "cpu_offset.txt"
    if cpu is not None and off.exists():
        cpu += float(off.read_text().split()[0])
    res = {"partial": True, "iteration": it, "cpu_s_now": cpu,
           "data_star": str(last), "mtime": time.ctime(last.stat().st_mtime)}
    res["metrics"] = score(_as_truth_names(last, out / "data_named.star"),
                           setdir / "truth.star", centre=True)
    return res


def _as_truth_names(star: Path, out: Path) -> Path:
    """RELION's output with its image names (N@white.mrcs) as the truth names them
    (N@particles.mrcs), so that evaluate pairs the particles."""
    from cryolatent.io import read_star, write_star

    blocks = read_star(star)
    p = blocks["particles"].copy()
    p["rlnImageName"] = [v.split("@", 1)[0] + "@particles.mrcs" for v in p["rlnImageName"]]
    write_star(out, p, blocks["optics"])
    return out


CLI = str(REPO / ".venv" / "bin" / "cryolatent")
#: the training box: the user's Fourier crop before training (README workflow step 1)
TRAIN_BOX = 32


def _timed(cmd: list[str], log: Path, cwd: Path | None = None) -> tuple[float, float]:
    """Run a cryolatent command; (wall s, CPU s = user + sys of the child)."""
    print("  $", " ".join(cmd), flush=True)
    c0, t0 = _cpu_children(), time.time()
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    if r.returncode != 0:
        sys.exit(f"{cmd[1]} failed ({r.returncode}); see {log}")
    return time.time() - t0, _cpu_children() - c0


def centred_copy(star: Path, out: Path) -> Path:
    """``star`` with each predicted class's frame centred (:func:`cryolatent.pose.
    centre_class_frames`), as cryolatent's embed does by default: SPEC's shift figure is
    taken after this per-class centring, for both tools."""
    from cryolatent.io import read_star, write_star
    from cryolatent.pose import centre_class_frames

    blocks = read_star(star)
    p = blocks["particles"].copy()
    cols = ["rlnOriginXAngst", "rlnOriginYAngst"]
    t, _ = centre_class_frames(p["rlnAnglePsi"].to_numpy(float), p[cols].to_numpy(float),
                               p["rlnClassNumber"].to_numpy())
    p[cols[0]], p[cols[1]] = t[:, 0], t[:, 1]
    write_star(out, p, blocks["optics"])
    return out


def score(pred: Path, truth: Path, centre: bool) -> dict:
    from cryolatent.metrics import evaluate_files

    m = evaluate_files(pred, truth)
    if centre:
        c = evaluate_files(centred_copy(pred, pred.with_name(pred.stem + "_centred.star")),
                           truth)
        m["translation_corr_x_centred"] = c["translation_corr_x"]
        m["translation_corr_y_centred"] = c["translation_corr_y"]
    else:  # embed centred them already
        m["translation_corr_x_centred"] = m["translation_corr_x"]
        m["translation_corr_y_centred"] = m["translation_corr_y"]
    return m


def _cached(out: Path, redo: bool) -> dict | None:
    """The result a step saved in OUT/done.json, or None after emptying OUT for a fresh run
    (no done.json, or ``redo``)."""
    done = out / "done.json"
    if done.exists() and not redo:
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return None


def run_cryolatent(setdir: Path, threads: int, redo: bool, train_args: list[str]) -> dict:
    """preprocess (Fourier crop to TRAIN_BOX) + train (defaults) + embed (the original 64-px
    particles, 6 classes), timed; then classes (the gallery, not timed). Cached."""
    out = setdir / "cryolatent"
    done = out / "done.json"
    res = _cached(out, redo)
    if res is None:
        log, j = out / "commands.log", ["-j", str(threads)]
        steps = {}
        steps["preprocess"] = _timed([CLI, "preprocess", str(setdir / "particles.star"), "-o",
                                      str(out / "prep"), "--box", str(TRAIN_BOX), *j], log)
        steps["train"] = _timed([CLI, "train", str(out / "prep" / "particles.star"), "-o",
                                 str(out / "run"), *j, *train_args], log)
        steps["embed"] = _timed([CLI, "embed", str(out / "run"), str(setdir / "particles.star"),
                                 "-o", str(out / "embedded.star"), "--clusters", "6", *j], log)
        wall = sum(w for w, _ in steps.values())
        cpu = sum(c for _, c in steps.values())
        _timed([CLI, "classes", str(out / "run"), str(out / "embedded.star"), "-o",
                str(out / "classes"), *j], log)
        cfg = json.loads((out / "run" / "config.json").read_text())
        import csv

        with open(out / "run" / "log.csv") as f:
            rows = list(csv.DictReader(f))
        res = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": threads,
               "steps": {k: {"wall_s": round(w, 1), "cpu_s": round(c, 1)}
                         for k, (w, c) in steps.items()},
               "epochs": len(rows), "train_box": TRAIN_BOX,
               "images_per_s": [round(float(r["images_per_s"]), 1) for r in rows],
               "train_args": train_args,
               "config": {k: cfg.get(k) for k in (
                   "z_dim", "rotations", "enc_channels", "kernel", "gen_width", "gen_layers",
                   "gen_fourier_features", "translation_range", "translation_prior", "ctf", "mask",
                   "lr", "batch_size", "amp", "likelihood")},
               "embedded": str(out / "embedded.star")}
        done.write_text(json.dumps(res, indent=2) + "\n")
    res["metrics"] = score(Path(res["embedded"]), setdir / "truth.star", centre=False)
    return res


def run_refine(setdir: Path, threads: int, redo: bool, start: str = "model") -> dict:
    """``cryolatent refine`` (2D alignment EM, default options) started from the model's
    classes and poses (``start="model"``: embed's output, SET/cryolatent/refine), or — the
    control that says what the model's start is worth — from random classes with zero poses
    (``start="random"``, SET/cryolatent/refine_random). Timed (CPU of the refine command only;
    the model's start also costs preprocess+train+embed). Cached."""
    out = setdir / "cryolatent" / ("refine" if start == "model" else "refine_random")
    done = out / "done.json"
    res = _cached(out, redo)
    if res is None:
        if start == "model":
            src = setdir / "cryolatent" / "embedded.star"
        else:
            from cryolatent.io import read_star, write_star

            blocks = read_star(setdir / "particles.star")
            p = blocks["particles"].copy()
            p["rlnClassNumber"] = np.random.default_rng(0).integers(1, 7, len(p))
            p["rlnAnglePsi"] = 0.0
            p["rlnOriginXAngst"] = 0.0
            p["rlnOriginYAngst"] = 0.0
            src = write_star(out / "random_start.star", p, blocks["optics"])
        w, c = _timed([CLI, "refine", str(src), "-o", str(out / "refined.star"), "--datadir",
                       str(setdir), "-j", str(threads)], out / "commands.log")
        info = json.loads((out / "refined_refine.json").read_text())
        res = {"start": start, "wall_s": round(w, 1), "cpu_s": round(c, 1),
               "threads": threads, "rounds": info["iterations_run"],
               "search_box": info["search_box"], "history": info["history"],
               "refined": str(out / "refined.star"),
               "classes_mrcs": str(out / "refined_classes.mrcs")}
        done.write_text(json.dumps(res, indent=2) + "\n")
    res["metrics"] = score(Path(res["refined"]), setdir / "truth.star", centre=False)
    return res


def gallery(setdir: Path, out_png: Path) -> None:
    """RELION's class averages (top) beside cryolatent's aligned averages and generator
    images (below), each tool's classes in its own order, with class sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryolatent.io import read_star
    from cryolatent.io.mrc import read_header, read_images

    rows = []
    rel = setdir / "relion" / "done.json"
    its = sorted((setdir / "relion" / "Class2D").glob("run_it[0-9][0-9][0-9]_classes.mrcs"))
    its = [p for p in its if "_it000_" not in p.name]
    if rel.exists() or its:
        if rel.exists():
            r = json.loads(rel.read_text())
            st, data, label = Path(r["classes_mrcs"]), r["data_star"], "RELION Class2D"
        else:
            st = its[-1]
            data = str(st).replace("_classes.mrcs", "_data.star")
            label = f"RELION it {st.name[6:9]} (unfinished)"
        imgs = read_images(st, np.arange(read_header(st).nz), read_header(st))
        d = read_star(data)["particles"]["rlnClassNumber"].astype(int)
        rows.append((label, imgs, [int((d == k + 1).sum()) for k in range(len(imgs))]))
    cdir = setdir / "cryolatent" / "classes"
    emb = setdir / "cryolatent" / "embedded.star"
    if cdir.exists():
        d = read_star(emb)["particles"]["rlnClassNumber"].astype(int)
        for stem, label in (("aligned_averages", "cryolatent aligned"),
                            ("denoised_averages", "cryolatent generator")):
            st = cdir / f"{stem}.mrcs"
            if st.exists():
                imgs = read_images(st, np.arange(read_header(st).nz), read_header(st))
                rows.append((label, imgs, [int((d == k + 1).sum()) for k in range(len(imgs))]))
    ref = setdir / "cryolatent" / "refine" / "done.json"
    if ref.exists():
        r = json.loads(ref.read_text())
        st = Path(r["classes_mrcs"])
        imgs = read_images(st, np.arange(read_header(st).nz), read_header(st))
        d = read_star(r["refined"])["particles"]["rlnClassNumber"].astype(int)
        rows.append(("cryolatent model + refine", imgs,
                     [int((d == k + 1).sum()) for k in range(len(imgs))]))
    if not rows:
        return
    k = max(len(r[1]) for r in rows)
    fig, ax = plt.subplots(len(rows), k, figsize=(1.6 * k, 1.8 * len(rows)), squeeze=False)
    for i, (label, imgs, sizes) in enumerate(rows):
        for j in range(k):
            a = ax[i][j]
            a.set_xticks([]), a.set_yticks([])
            if j < len(imgs):
                a.imshow(imgs[j], cmap="gray")
                a.set_title(f"{sizes[j]}", fontsize=7)
            if j == 0:
                a.set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outdir", type=Path, default=Path("/tmp/cryoem_vs_relion"))
    ap.add_argument("--sets", nargs="+", default=["A", "B"], choices=sorted(SETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iter", type=int, default=25)
    ap.add_argument("--relion-bin", default=None)
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--relion-partial", action="store_true",
                    help="do not run relion_refine: score the newest iteration of the run in "
                         "SET/relion (still going or stopped) with its CPU time so far")
    ap.add_argument("--only", choices=["data", "relion"], default=None,
                    help="stop after this step (e.g. start RELION early)")
    ap.add_argument("--redo", nargs="*", default=[], choices=["relion", "cryolatent", "refine"])
    ap.add_argument("--no-refine", action="store_true",
                    help="stop cryolatent after embed (the model's answer alone)")
    ap.add_argument("--refine-control", action="store_true",
                    help="also run refine from random classes and zero poses: what the "
                         "model's start is worth")
    ap.add_argument("--train-args", default="",
                    help="extra options for cryolatent train (default none: its defaults)")
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    b = None if a.skip_relion else relion_bin(a.relion_bin)
    results = {"sets": {}}
    for name in a.sets:
        setdir = a.outdir / name
        info = make_set(name, setdir)
        r = results["sets"][name] = {"data": info}
        if a.only == "data":
            continue
        if a.relion_partial:
            r["relion"] = relion_partial(setdir)
        elif b is not None:
            r["relion"] = run_relion(setdir, info, b, a.threads, a.iter, "relion" in a.redo)
        if r.get("relion"):
            print("relion", json.dumps(r["relion"]["metrics"]), flush=True)
        if a.only == "relion":
            continue
        r["cryolatent"] = run_cryolatent(setdir, a.threads, "cryolatent" in a.redo,
                                         a.train_args.split())
        print("cryolatent", json.dumps(r["cryolatent"]["metrics"]), flush=True)
        if not a.no_refine:
            r["refine"] = run_refine(setdir, a.threads, "refine" in a.redo, "model")
            print("cryolatent + refine", json.dumps(r["refine"]["metrics"]), flush=True)
        if a.refine_control:
            r["refine_random"] = run_refine(setdir, a.threads, "refine" in a.redo, "random")
            print("refine from random classes", json.dumps(r["refine_random"]["metrics"]),
                  flush=True)
        gallery(setdir, a.outdir / f"gallery_{name}.png")
    (a.outdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return results


METRICS = ("cluster_accuracy", "nmi", "rotation_corr_per_class",
           "rotation_error_deg_per_class", "rotation_agreement_per_class",
           "translation_corr_x_centred", "translation_corr_y_centred",
           "translation_corr_x", "translation_corr_y")


def table(results: dict) -> str:
    def f(v, d=3):
        return "n/a" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    lines = []
    for name, r in results["sets"].items():
        c, rl = r.get("cryolatent"), r.get("relion")
        rf, rr = r.get("refine"), r.get("refine_random")
        lines += [f"set {name} ({', '.join(r['data']['structures'])})", "",
                  "| metric | cryolatent model (train+embed) | model + refine | "
                  "refine from random classes (control) | RELION 3.1 Class2D |",
                  "|---|---|---|---|---|"]
        for m in METRICS:
            lines.append(f"| {m} | {f(c and c['metrics'].get(m))} | "
                         f"{f(rf and rf['metrics'].get(m))} | "
                         f"{f(rr and rr['metrics'].get(m))} | "
                         f"{f(rl and rl['metrics'].get(m))} |")
        if rl and rl.get("partial"):
            rcpu = (f"{f(rl['cpu_s_now'], 1)} so far (iteration {rl['iteration']} of 25 scored;"
                    " unfinished)")
        else:
            rcpu = f(rl and rl.get("cpu_s"), 1)
        both = c and rf and c["cpu_s"] + rf["cpu_s"]
        lines.append(f"| CPU s (preprocess+train+embed / + refine / refine / relion_refine) | "
                     f"{f(c and c['cpu_s'], 1)} | {f(both, 1)} | {f(rr and rr['cpu_s'], 1)} | "
                     f"{rcpu} |")
        lines.append(f"| wall s | {f(c and c['wall_s'], 1)} | "
                     f"{f(c and rf and c['wall_s'] + rf['wall_s'], 1)} | "
                     f"{f(rr and rr['wall_s'], 1)} | {f(rl and rl.get('wall_s'), 1)} |")
        if rf:
            lines.append(f"| refine rounds (search box px) | | {rf['rounds']} "
                         f"({rf['search_box']}) | {rr and rr['rounds']} | |")
        if c:
            lines.append(f"| epochs run (convergence or the --epochs cap) | {c['epochs']} | |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
