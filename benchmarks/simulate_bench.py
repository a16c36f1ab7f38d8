"""Benchmark: CPU time, particles/s and peak RSS of ``cryolatent simulate cryoem``.

Runs the real command line in a child process (``-j`` threads, ``--device cpu``), and reports
for each run its CPU time (user + sys of the child, ``os.wait4``), wall time, peak RSS,
particles per CPU-second and CPU-minutes per 100,000 particles. The CPU time is the figure to
compare on a shared machine (the wall time grows with the other jobs' load).

    python benchmarks/simulate_bench.py --n 10000 --box 128 --views 6 --junk 0.25 \\
        --threads 1 2                       # the scale benchmark's setting
    python benchmarks/simulate_bench.py --n 2000 --random-views          # uniform views
    python benchmarks/simulate_bench.py --n 2000 --morph A.pdb B.pdb --box 64 --views 2

Prints a JSON summary on stdout (and writes WORKDIR/results.json). Measured figures:
``benchmarks/README.md`` ("Simulator speed").
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
from cryolatent.train import cpu_name


def run_measured(cmd: list[str]) -> dict:
    """``cmd`` in a child; its own CPU time and peak RSS from wait4 (not its siblings')."""
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        p = subprocess.Popen(cmd, stdout=null, stderr=subprocess.PIPE)
        # stderr is small (log lines): read it to the end, then reap the child with wait4
        err = p.stderr.read().decode()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    rc = p.returncode
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(wall, 2),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "user_s": round(ru.ru_utime, 2),
            "sys_s": round(ru.ru_stime, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "stderr_tail": err[-600:] if rc else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/cryolatent_simulate_bench")
    ap.add_argument("--n", type=int, nargs="+", default=[2000],
                    help="set sizes (one run each per thread count)")
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--random-views", action="store_true",
                    help="uniform random views instead of --views K")
    ap.add_argument("--junk", type=float, default=0.25)
    ap.add_argument("--morph", nargs=2, default=None, metavar=("A", "B"))
    ap.add_argument("--structure", action="append", default=[])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cryolatent", default=str(Path(sys.executable).parent / "cryolatent"))
    args = ap.parse_args()

    work = Path(args.workdir)
    results = []
    for n in args.n:
        for th in args.threads:
            for r in range(args.repeats):
                out = work / f"cryoem_{n}_{th}_{r}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [args.cryolatent, "simulate", "cryoem", "-o", str(out), "--n", str(n),
                       "--box", str(args.box), "--junk", str(args.junk), "-j", str(th),
                       "--device", "cpu"]
                if not args.random_views:
                    cmd += ["--views", str(args.views)]
                if args.morph:
                    cmd += ["--morph", *args.morph]
                for s in args.structure:
                    cmd += ["--structure", s]
                res = run_measured(cmd)
                res.update({"n": n, "threads": th})
                if res["rc"] == 0:
                    res["particles_per_cpu_s"] = round(n / res["cpu_s"], 1)
                    res["particles_per_wall_s"] = round(n / res["wall_s"], 1)
                    res["cpu_min_per_100k"] = round(res["cpu_s"] / n * 1e5 / 60, 2)
                    stack = out / "particles.mrcs"
                    res["stack_gb"] = round(stack.stat().st_size / 1e9, 2)
                results.append(res)
                print(f"n {n:7d} threads {th}: CPU {res.get('cpu_s')} s, wall {res['wall_s']} s,"
                      f" {res.get('particles_per_cpu_s')} particles/CPU-s, "
                      f"{res.get('cpu_min_per_100k')} CPU-min/100k, "
                      f"peak RSS {res.get('peak_rss_mb')} MB, rc {res['rc']}", file=sys.stderr)
                shutil.rmtree(out, ignore_errors=True)

    import torch

    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average_at_end": os.getloadavg(),
        "box": args.box, "views": None if args.random_views else args.views,
        "junk": args.junk, "morph": args.morph,
        "runs": results,
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
