"""cryolatent vs RELION 3.1 2D classification on simulated particles with ground truth.

For each SNR: ``cryolatent.demo.run_demo`` (DemoSettings defaults apart from n / box / snr:
simulate -> preprocess -> train TARGET-VAE -> embed -> plot -> classes -> evaluate) on the
built-in two-conformation pseudo-protein (one view, random psi, shifts N(0, 1.5²) px, CTF),
then ``relion_refine`` 2D classification (no --ref, --K 2, CPU, --j THREADS) on the SAME
particle stack, and ``cryolatent evaluate`` of RELION's final ``_itNNN_data.star`` against the
simulation's truth. Prints one table (metric × tool, wall time, CPU time, threads, load
average) as text and JSON, and writes ``OUTDIR/results.json``.

RELION gets what a real user has: the particles' names, optics and CTF. The truth columns
(rlnAnglePsi, rlnOriginX/YAngst, rlnClassNumber, rot/tilt, view number) are removed from its
input STAR, because relion_refine uses input offsets as the centre of its first translational
search.

    python benchmarks/relion_peer.py --outdir /tmp/relion_peer [--snr 3 1] [--iter 25]

The RELION binaries are looked up as tests/conftest.py does: $RELION_BIN, PATH, or the
repository's .relion/usr/bin (libraries in .relion/usr/lib[/x86_64-linux-gnu]).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("cluster_accuracy", "nmi", "rotation_corr", "rotation_corr_per_class",
           "translation_corr_x", "translation_corr_y",
           # benchmark-local (psi_agreement below), not `cryolatent evaluate` keys
           "psi_resultant_per_class", "psi_within_15deg_per_class", "shift_rms_px")
#: truth columns the simulation writes; RELION must not see them
TRUTH_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                 "rlnOriginYAngst", "rlnClassNumber", "cryolatentViewNumber")


def psi_agreement(pred_star: str | Path, truth_star: str | Path) -> dict:
    """Benchmark-local, robust companions of ``rotation_corr_per_class`` (not library code).

    The Jammalamadaka-SenGupta correlation centres each angle set on its circular mean; for
    psi ~ U(0, 360) that mean is ill-defined (resultant length ~ 1/sqrt(n)), so a few
    outliers move it by tens of degrees and the correlation becomes ~cos(that error), anything
    in [-1, 1], even when most angles are right up to the class constant. Per true class, with
    d = pred - truth: ``psi_resultant_per_class`` = |mean exp(i d)| (1: pred = truth + const,
    ~0: unrelated), ``psi_within_15deg_per_class`` = fraction with |d - circmean(d)| < 15 deg;
    both averaged over the true classes. ``shift_rms_px`` = RMS |t_pred - t_true| in pixels
    of the simulated box (no per-class constant removed).
    """
    import numpy as np

    from cryolatent.io import read_star
    from cryolatent.metrics import match_particles

    blocks_p, blocks_t = read_star(pred_star), read_star(truth_star)
    P, T = blocks_p["particles"], blocks_t["particles"]
    apix = float(blocks_t["optics"]["rlnImagePixelSize"].iloc[0])
    pi, ti = match_particles(P, T)
    P, T = P.iloc[pi].reset_index(drop=True), T.iloc[ti].reset_index(drop=True)
    d_all = np.radians(P["rlnAnglePsi"].to_numpy(float) - T["rlnAnglePsi"].to_numpy(float))
    res, w15 = [], []
    for c in np.unique(T["rlnClassNumber"].to_numpy()):
        m = (T["rlnClassNumber"] == c).to_numpy()
        z = np.exp(1j * d_all[m]).mean()
        res.append(abs(z))
        w15.append(float(np.mean(np.abs(np.angle(np.exp(1j * (d_all[m] - np.angle(z)))))
                                 < np.radians(15))))
    cols = ["rlnOriginXAngst", "rlnOriginYAngst"]
    dt = (P[cols].to_numpy(float) - T[cols].to_numpy(float)) / apix
    return {"psi_resultant_per_class": float(np.mean(res)),
            "psi_within_15deg_per_class": float(np.mean(w15)),
            "shift_rms_px": float(np.sqrt((dt ** 2).sum(1).mean()))}


class LoadSampler:
    """Samples os.getloadavg()[0] every ``every`` s in a thread; ``stop()`` -> summary."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self._stop = every, [os.getloadavg()[0]], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        self.samples.append(os.getloadavg()[0])
        s = self.samples
        return {"load1_mean": round(sum(s) / len(s), 2), "load1_min": round(min(s), 2),
                "load1_max": round(max(s), 2), "samples": len(s)}


def relion_bin(arg: str | None) -> Path:
    cands = [arg, os.environ.get("RELION_BIN"), REPO / ".relion" / "usr" / "bin"]
    w = shutil.which("relion_refine")
    if w:
        cands.insert(1, str(Path(w).parent))
    for c in cands:
        if c and (Path(c) / "relion_refine").exists():
            return Path(c)
    sys.exit("relion_refine not found: give --relion-bin or set RELION_BIN")


def relion_env(b: Path) -> dict:
    env = dict(os.environ)
    libs = [b.parent / "lib" / "x86_64-linux-gnu", b.parent / "lib"]
    env["LD_LIBRARY_PATH"] = ":".join(str(p) for p in libs if p.is_dir()) + ":" + \
        env.get("LD_LIBRARY_PATH", "")
    env.setdefault("OMPI_MCA_plm", "isolated")
    return env


def run_cryolatent(out: Path, n: int, box: int, snr: float, seed: int) -> dict:
    """The demo chain in this process; wall and CPU seconds (all threads of this process)."""
    import torch

    from cryolatent.demo import DemoSettings, run_demo

    s = DemoSettings(n=n, box=box, snr=snr, seed=seed)
    r0, t0, load = resource.getrusage(resource.RUSAGE_SELF), time.time(), LoadSampler()
    summary = run_demo(out, s, echo=lambda m: print("  cryolatent", m, flush=True))
    wall, r1 = time.time() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    sec = summary["seconds"]
    metrics = dict(summary["evaluation"]) | psi_agreement(summary["embedded"],
                                                          summary["simulated"])
    return {"metrics": metrics, "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "threads": torch.get_num_threads(),
            "steps_s": sec,
            # what replaces relion_refine: preprocess + train + embed (not simulate/plots/...)
            "core_wall_s": round(sec["preprocess"] + sec["train"] + sec["embed"], 1),
            "load": load.stop(), "simulated": summary["simulated"],
            "embedded": summary["embedded"],
            "settings": {"epochs": s.epochs, "train_box": s.train_box, **s.model_options}}


def relion_input(sim_star: Path, out_star: Path) -> None:
    """Copy of the simulation's STAR without the truth columns, image names made relative
    to ``out_star``'s folder (relion_refine runs there)."""
    from cryolatent.io import read_star, write_star

    blocks = read_star(sim_star)
    p = blocks["particles"].drop(columns=[c for c in TRUTH_COLUMNS
                                          if c in blocks["particles"].columns])
    rel = os.path.relpath(sim_star.parent, out_star.parent)

    def name(v: str) -> str:
        i, stack = v.split("@", 1)
        return f"{i}@{rel}/{stack}"

    p["rlnImageName"] = p["rlnImageName"].map(name)
    write_star(out_star, p, blocks["optics"])


def run_relion(sim_star: Path, out: Path, b: Path, iters: int, threads: int,
               fast_subsets: bool, seed: int) -> dict:
    from cryolatent.commands.evaluate import evaluate_files
    from cryolatent.io import read_star

    (out / "Class2D").mkdir(parents=True, exist_ok=True)   # relion_refine: --o's folder must exist
    relion_input(sim_star, out / "particles.star")
    optics = read_star(sim_star)["optics"].iloc[0]
    apix, box = float(optics["rlnImagePixelSize"]), int(optics["rlnImageSize"])
    diameter = round(0.9 * box * apix)
    cmd = [str(b / "relion_refine"), "--i", "particles.star", "--o", "Class2D/run", "--K", "2",
           "--iter", str(iters), "--tau2_fudge", "2", "--particle_diameter", str(diameter),
           "--psi_step", "10", "--offset_range", "5", "--offset_step", "1", "--ctf",
           "--zero_mask", "--flatten_solvent", "--norm", "--scale", "--j", str(threads),
           "--pool", "30", "--dont_combine_weights_via_disc", "--random_seed", str(seed)]
    if fast_subsets:
        cmd.append("--fast_subsets")
    print("  relion", " ".join(cmd[1:]), flush=True)
    r0, t0, load = resource.getrusage(resource.RUSAGE_CHILDREN), time.time(), LoadSampler()
    with open(out / "relion.log", "w") as log:
        res = subprocess.run(cmd, cwd=out, env=relion_env(b), stdout=log,
                             stderr=subprocess.STDOUT)
    wall, r1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    lo = load.stop()
    if res.returncode != 0:
        sys.exit(f"relion_refine failed ({res.returncode}); see {out / 'relion.log'}")
    data = out / "Class2D" / f"run_it{iters:03d}_data.star"
    metrics = evaluate_files(data, sim_star) | psi_agreement(data, sim_star)
    return {"metrics": metrics, "wall_s": round(wall, 1),
            "cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 1),
            "threads": threads, "load": lo, "data_star": str(data),
            "command": f"cd {out} && " + " ".join(["relion_refine", *cmd[1:]]),
            "particle_diameter_A": diameter, "apix": apix, "box": box}


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def table(results: dict) -> str:
    lines = []
    for key, r in results["runs"].items():
        c, rl = r.get("cryolatent"), r.get("relion")
        lines += [f"### {key}", "", "| metric | cryolatent (demo) | RELION 2D (relion_refine) |",
                  "|---|---|---|"]
        for m in METRICS:
            lines.append(f"| {m} | {fmt(c and c['metrics'].get(m))} | "
                         f"{fmt(rl and rl['metrics'].get(m))} |")
        g = lambda d, k: fmt(d and d[k], 1)  # noqa: E731
        lines += [
            f"| wall s (whole run) | {g(c, 'wall_s')} | {g(rl, 'wall_s')} |",
            f"| wall s (preprocess+train+embed / relion_refine) | {g(c, 'core_wall_s')} | "
            f"{g(rl, 'wall_s')} |",
            f"| CPU s | {g(c, 'cpu_s')} | {g(rl, 'cpu_s')} |",
            f"| threads | {g(c, 'threads')} | {g(rl, 'threads')} |",
            "| load avg (1 min) mean / max during run | "
            + (f"{c['load']['load1_mean']} / {c['load']['load1_max']}" if c else "n/a") + " | "
            + (f"{rl['load']['load1_mean']} / {rl['load']['load1_max']}" if rl else "n/a")
            + " |", ""]
    return "\n".join(lines)


def rescore(path: Path) -> dict:
    """Metrics of an earlier run again (e.g. after adding one), from the files it wrote."""
    from cryolatent.commands.evaluate import evaluate_files

    results = json.loads(path.read_text())
    for r in results["runs"].values():
        c, rl = r.get("cryolatent"), r.get("relion")
        sim = c["simulated"] if c else str(Path(rl["data_star"]).parents[2] / "cryolatent"
                                           / "simulated" / "particles.star")
        if c:
            emb = c.get("embedded") or str(Path(sim).parent.parent / "embedded.star")
            c["embedded"] = emb
            c["metrics"] = evaluate_files(emb, sim) | psi_agreement(emb, sim)
        if rl:
            rl["metrics"] = evaluate_files(rl["data_star"], sim) | psi_agreement(rl["data_star"], sim)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print()
    print(table(results))
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outdir", type=Path, default=Path("/tmp/relion_peer"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--box", type=int, default=48)
    ap.add_argument("--snr", type=float, nargs="+", default=[3.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iter", type=int, default=25, help="relion_refine --iter")
    ap.add_argument("--threads", type=int, default=2, help="relion_refine --j")
    ap.add_argument("--no-fast-subsets", action="store_true")
    ap.add_argument("--relion-bin", default=None)
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--rescore", type=Path, default=None, metavar="RESULTS_JSON",
                    help="recompute the metrics of an earlier run's results.json and print "
                         "the table (runs nothing)")
    a = ap.parse_args(argv)
    if a.rescore:
        return rescore(a.rescore)

    if a.outdir.exists() and any(a.outdir.iterdir()):
        sys.exit(f"{a.outdir}: exists and is not empty")
    a.outdir.mkdir(parents=True, exist_ok=True)
    b = None if a.skip_relion else relion_bin(a.relion_bin)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "loadavg_at_start": os.getloadavg()},
        "relion_bin": str(b) if b else None, "runs": {}}
    for snr in a.snr:
        key = f"n={a.n} box={a.box} snr={snr:g}"
        base = a.outdir / f"snr{snr:g}"
        print(f"== {key}", flush=True)
        r = results["runs"][key] = {}
        r["cryolatent"] = run_cryolatent(base / "cryolatent", a.n, a.box, snr, a.seed)
        (a.outdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if b is not None:
            sim = Path(r["cryolatent"]["simulated"])
            r["relion"] = run_relion(sim, base / "relion", b, a.iter, a.threads,
                                     not a.no_fast_subsets, a.seed)
        (a.outdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    (a.outdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print()
    print(table(results))
    return results


if __name__ == "__main__":
    main()
