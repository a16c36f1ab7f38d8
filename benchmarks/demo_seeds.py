"""The demo over seeds and precisions: `cryolatent demo --seed S` for every S, with the
training precision forced to float32 and to bf16 (``CRYOLATENT_PRECISION``), each run in its
own process (as a user runs it), scored by the demo's own evaluation.

    python benchmarks/demo_seeds.py --outdir /tmp/demo_seeds --seeds 0-9 \\
        --precision float32 bf16

Writes OUTDIR/results.json (one row per run: seed, precision, the model's and the refined
accuracy, ψ and shift figures, seconds, the verdict) and prints a min / median / max table.
Cached: a run whose summary.json exists is read, not re-run (``--redo`` re-runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from cryolatent.train import cpu_name

REPO = Path(__file__).resolve().parents[1]
CLI = str(REPO / ".venv" / "bin" / "cryolatent")


def seeds_arg(text: str) -> list[int]:
    """"0-9" or "0,3,5" -> list of ints."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def run_one(outdir: Path, seed: int, precision: str, redo: bool, extra: list[str]) -> dict:
    out = outdir / f"{precision}_seed{seed}"
    summ = out / "summary.json"
    if redo and out.exists():
        shutil.rmtree(out)
    wall = None
    if not summ.exists():
        if out.exists():
            shutil.rmtree(out)
        env = dict(os.environ, CRYOLATENT_PRECISION=precision)
        t = time.time()
        r = subprocess.run([CLI, "demo", "-o", str(out), "--seed", str(seed), *extra], env=env,
                           capture_output=True, text=True)
        wall = time.time() - t
        out.mkdir(parents=True, exist_ok=True)
        (out.parent / f"{out.name}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            return {"seed": seed, "precision": precision, "error": r.stderr.strip()[-300:]}
    s = json.loads(summ.read_text())
    m, mm = s["evaluation"], s.get("evaluation_model", {})
    return {"seed": seed, "precision": precision,
            "accuracy": m.get("cluster_accuracy"),
            "model_accuracy": mm.get("cluster_accuracy"),
            "psi_agreement": m.get("rotation_agreement_per_class"),
            "psi_median_deg": m.get("rotation_error_deg_per_class"),
            "shift_corr_x": m.get("translation_corr_x"),
            "shift_corr_y": m.get("translation_corr_y"),
            "seconds": s["seconds"]["total"], "wall_s": wall,
            "pass": s.get("verdict", {}).get("pass")}


def table(rows: list[dict]) -> str:
    lines = ["| precision | runs | metric | min | median | max |", "|---|---|---|---|---|---|"]
    for prec in sorted({r["precision"] for r in rows}):
        rr = [r for r in rows if r["precision"] == prec and "error" not in r]
        for key in ("accuracy", "model_accuracy", "psi_agreement", "psi_median_deg",
                    "shift_corr_x", "seconds"):
            v = np.array([r[key] for r in rr if r.get(key) is not None], dtype=float)
            if len(v):
                lines.append(f"| {prec} | {len(v)} | {key} | {v.min():.3f} | "
                             f"{np.median(v):.3f} | {v.max():.3f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outdir", type=Path, default=Path("/tmp/demo_seeds"))
    ap.add_argument("--seeds", type=seeds_arg, default=list(range(10)))
    ap.add_argument("--precision", nargs="+", default=["float32", "bf16"],
                    choices=["float32", "bf16"])
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--demo-args", default="", help="extra options for cryolatent demo")
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for prec in a.precision:
        for seed in a.seeds:
            r = run_one(a.outdir, seed, prec, a.redo, a.demo_args.split())
            rows.append(r)
            print(json.dumps(r), flush=True)
    res = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (a.outdir / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"CPU: {res['cpu']}")
    print(table(rows))
    bad = [r for r in rows if r.get("error")]
    if bad:
        print(f"{len(bad)} runs failed", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
