"""Benchmark: particles/s of ``cryolatent simulate cryoem`` (default GluA3 pair, CTF, noise).

Runs the real command line in a child process (``--device`` as given, default cpu), ``--repeats``
times, and reports wall time, particles/s and peak RSS (``os.wait4`` ru_maxrss). Also times
``simulate mnist-u`` for comparison when the MNIST file is present.

    python benchmarks/simulate_bench.py [--n 1000 --box 128 --repeats 2 --device cpu]

Prints a JSON summary on stdout (and writes WORKDIR/results.json).

Measured (see docs/conventions.md, "Speed"): record new numbers there with date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode()
    rc = os.waitstatus_to_exitcode(status)
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(wall, 2),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "user_s": round(ru.ru_utime, 2),
            "stderr_tail": err[-400:] if rc else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/cryolatent_simulate_bench")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mnist-n", type=int, default=10000)
    ap.add_argument("--cryolatent", default=str(Path(sys.executable).parent / "cryolatent"))
    args = ap.parse_args()

    work = Path(args.workdir)
    jobs = {
        "cryoem": [args.cryolatent, "simulate", "cryoem", "--n", str(args.n), "--box",
                   str(args.box), "--device", args.device],
        "cryoem_no_ctf": [args.cryolatent, "simulate", "cryoem", "--n", str(args.n), "--box",
                          str(args.box), "--no-ctf", "--device", args.device],
        "mnist-u": [args.cryolatent, "simulate", "mnist-u", "--n", str(args.mnist_n),
                    "--device", args.device],
    }
    counts = {"cryoem": args.n, "cryoem_no_ctf": args.n, "mnist-u": args.mnist_n}
    results: dict[str, list] = {k: [] for k in jobs}
    for r in range(args.repeats):
        for name, cmd in jobs.items():
            out = work / f"{name}_{r}"
            shutil.rmtree(out, ignore_errors=True)
            res = run([*cmd, "-o", str(out)])
            res["particles_per_s"] = round(counts[name] / res["wall_s"], 1) if res["rc"] == 0 else None
            results[name].append(res)
            print(f"{name:14s} run {r}: {res['wall_s']:7.2f} s  "
                  f"{res['particles_per_s']} particles/s  RSS {res['peak_rss_mb']} MB  "
                  f"rc {res['rc']}", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)

    import torch

    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "n": args.n, "box": args.box, "device": args.device,
        "best_particles_per_s": {k: max((x["particles_per_s"] or 0) for x in v)
                                 for k, v in results.items()},
        "runs": results,
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
