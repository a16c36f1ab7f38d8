#!/usr/bin/env bash
# The GPU session's measurements in three calls (benchmarks/GPU_SESSION.md has the plan):
#
#   bash benchmarks/gpu_session.sh speed   # throughput x4, bf16-vs-fp32 check, embed 128 px,
#                                          # torchrun 1-proc overhead, full 161,292 x 100 px epoch
#   bash benchmarks/gpu_session.sh tvae    # MNIST(U) timeline, TARGET-VAE P16 z32
#   bash benchmarks/gpu_session.sh irl     # MNIST(U) timeline, IRL-INR z32
#   bash benchmarks/gpu_session.sh all     # the three, one after the other
#
# Everything lands in $OUT (default runs/gpu_out) as at most 2 files per step:
#   speed.json + speed.log, mnist_tvae.json + mnist_tvae.log, mnist_irl.json + mnist_irl.log.
# Scratch goes to $WORK (default /tmp/cryolatent_gpu). No install: the repo is put on
# PYTHONPATH and the CLI runs as `python -m cryolatent` (nothing it needs imports mrcfile,
# starfile, gemmi or umap).
#
# Environment:
#   DRYRUN=1        every step tiny and on the CPU (one thread): checks the whole chain here
#   PY              python interpreter [python3]
#   MNIST           mnist.npz [runs/gpu_carry/mnist.npz, else ../shared/data/mnist/mnist.npz]
#   SPEED_DEADLINE_S  seconds after which `speed` skips the remaining steps [400]
#   TVAE_BUDGET_S / TVAE_WALL_S, IRL_BUDGET_S / IRL_WALL_S  training budget / whole-process
#                   limit of the MNIST timelines [360 / 430]
#   FULL_N          particles of the full-epoch set [161292]
set -u
STEP=${1:-all}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-$REPO/runs/gpu_out}
WORK=${WORK:-/tmp/cryolatent_gpu}
DRYRUN=${DRYRUN:-0}
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)

if [ "$DRYRUN" = 1 ]; then
    DEVICE=cpu
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    # tiny model options understood by `cryolatent train` and mnist_quality.py
    TINY_TVAE="--enc-channels 4 --gen-width 16 --gen-layers 1 --fourier-features 8 --kernel 7 --translation-range 3"
    TINY_IRL="--enc-width 4 --hyper-width 16 --inr-width 16 --fourier-features 8"
else
    DEVICE=cuda
    TINY_TVAE=""
    TINY_IRL=""
fi

if [ -z "${MNIST:-}" ]; then
    for m in "$REPO/runs/gpu_carry/mnist.npz" "$REPO/../shared/data/mnist/mnist.npz"; do
        if [ -f "$m" ]; then MNIST=$m; break; fi
    done
fi

# ------------------------------------------------------------------ helper (python)
HELPER=$WORK/gpu_helper.py
cat > "$HELPER" <<'PYEOF'
"""Small steps of benchmarks/gpu_session.sh: env, makeset, predict, runlog, merge."""
import csv, glob, json, os, sys, time
from pathlib import Path


def env():
    import platform
    import torch
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count)
    mods = {}
    from importlib.metadata import PackageNotFoundError, version
    for m in ("numpy", "pandas", "scipy", "scikit-learn", "click", "tqdm", "matplotlib",
              "numba", "mrcfile", "starfile", "gemmi", "umap-learn", "pynndescent"):
        try:
            mods[m] = version(m)
        except PackageNotFoundError:
            mods[m] = "missing"
    info["modules"] = mods
    import cryolatent.train, cryolatent.inference, cryolatent.metrics  # noqa: F401
    info["cryolatent_import"] = "ok"
    print(json.dumps(info))


def makeset(n, box, outdir, device):
    """n synthetic particles (Gaussian blobs + noise, float32) -> outdir/particles.star."""
    import numpy as np
    import pandas as pd
    import torch
    from cryolatent.io import MRCStackWriter, write_star
    n, box = int(n), int(box)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device if (device != "cuda" or torch.cuda.is_available()) else "cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    c = torch.arange(box, device=dev, dtype=torch.float32) - box // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    t = time.perf_counter()
    with MRCStackWriter(out / "particles.mrcs", box, 1.0) as w:
        for s in range(0, n, 4096):
            k = min(4096, n - s)
            cx, cy = (torch.randn(2, k, 1, 1, generator=g, device=dev) * box / 16)
            img = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (box / 10) ** 2))
            img = img + 0.5 * torch.randn(k, box, box, generator=g, device=dev)
            w.write(img.float().cpu().numpy())
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [1.0], "rlnImageSize": [box],
                           "rlnImageDimensionality": [2]})
    write_star(out / "particles.star", pd.DataFrame({"rlnImageName": names,
                                                     "rlnOpticsGroup": np.ones(n, int)}),
               optics)
    print(json.dumps({"makeset": str(out), "n": n, "box": box,
                      "gib": round(n * box * box * 4 / 2**30, 2),
                      "seconds": round(time.perf_counter() - t, 1)}))


def predict(throughput_json, config, n, val_fraction="0.1"):
    """Predicted seconds of one epoch of n particles from throughput.py's images/s."""
    n = int(n)
    try:
        rows = json.loads(Path(throughput_json).read_text())
        ips = next(r["images_per_s"] for r in rows if r["config"] == config)
    except Exception:  # noqa: BLE001
        print(-1)
        return
    f = float(val_fraction)
    # training step at ips; validation (forward only) taken as 1/3 of a step; 45 s startup
    print(int(n * (1 - f) / ips + n * f / (3 * ips) + 45))


def runlog(rundir, label, wall):
    """One JSON line from a run folder's log.csv (+ the command's wall seconds)."""
    path = Path(rundir) / "log.csv"
    rows = list(csv.DictReader(open(path))) if path.exists() else []
    res = {"label": label, "wall_s": float(wall), "epochs": len(rows),
           "log": [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()}
                   for r in rows]}
    ips = [r["images_per_s"] for r in res["log"] if r.get("images_per_s")]
    if ips:
        steady = ips[1:] or ips
        res["images_per_s_first"] = ips[0]
        res["images_per_s_steady_median"] = sorted(steady)[len(steady) // 2]
    rl = Path(rundir) / "run.log"
    if rl.exists():
        res["run_log_tail"] = rl.read_text().splitlines()[-12:]
    print(json.dumps(res))


def merge(workdir, out):
    """speed/*.json|*.jsonl|*.out -> one JSON object (NAME.out -> key NAME_stdout)."""
    res = {}
    for p in sorted(glob.glob(os.path.join(workdir, "*"))):
        name = Path(p).stem + ("_stdout" if p.endswith(".out") else "")
        text = Path(p).read_text().strip()
        if not text:
            continue
        try:
            res[name] = json.loads(text)
        except ValueError:
            vals = []
            for line in text.splitlines():
                try:
                    vals.append(json.loads(line))
                except ValueError:
                    vals.append(line)
            res[name] = vals
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}: {', '.join(res)}")


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
PYEOF

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}'; }

# step NAME TIMEOUT_S CMD...: runs CMD (stdout to $SW/NAME.out), logs rc and seconds to
# $SW/steps.jsonl; skipped once the speed deadline is past.
step() {
    local name=$1 limit=$2; shift 2
    local now=$(( $(date +%s) - T0 ))
    if [ "$now" -ge "${DEADLINE:-999999}" ]; then
        echo "== $name: skipped (deadline ${DEADLINE}s reached at ${now}s)"
        echo "{\"step\": \"$name\", \"skipped\": \"deadline\", \"at_s\": $now}" >> "$SW/steps.jsonl"
        return 0
    fi
    echo "== $name (limit ${limit}s, at ${now}s): $*"
    local t=$(date +%s.%N)
    set -o pipefail
    timeout --kill-after=10 "$limit" "$@" | tee "$SW/$name.out"
    local rc=$?
    set +o pipefail
    local dt=$(since "$t")
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"at_s\": $now}" >> "$SW/steps.jsonl"
    echo "== $name: rc $rc, ${dt}s"
    return 0
}

# ------------------------------------------------------------------ speed
speed() {
    SW=$WORK/speed
    rm -rf "$SW"; mkdir -p "$SW"
    DEADLINE=${SPEED_DEADLINE_S:-400}
    nvidia-smi -L 2>/dev/null || true
    step env 120 "$PY" "$HELPER" env
    if [ "$DRYRUN" = 1 ]; then
        TP="--device cpu --tiny --steps 1 --warmup 1 --repeats 1"
    else
        TP="--device cuda --steps 20 --warmup 10 --repeats 5"
    fi
    # 1. training throughput of the SPEC's four configurations (bf16 autocast, fused Adam)
    step throughput 300 "$PY" benchmarks/throughput.py $TP --json "$SW/throughput_rows.json"
    # 2. bf16 vs fp32 agreement (CUDA) and cached filter bank == plain
    step check 120 "$PY" benchmarks/throughput.py --check --device "$DEVICE" \
        $([ "$DRYRUN" = 1 ] && echo --tiny)
    # 3. embed images/s at 128 px, both models at their default size
    if [ "$DRYRUN" = 1 ]; then EB="--n 8 --box 32 --batch-size 4"; else EB="--n 2048 --box 128 --batch-size 256"; fi
    step embed_tvae 150 "$PY" benchmarks/embed_bench.py throughput --model target-vae $EB \
        --device "$DEVICE" --workdir "$WORK/embed_tvae"
    step embed_irl 150 "$PY" benchmarks/embed_bench.py throughput --model irl-inr $EB \
        --device "$DEVICE" --workdir "$WORK/embed_irl"
    # 4. torchrun --nproc_per_node 1 (plain path) and with DDP forced, vs the plain command:
    #    TARGET-VAE config 1 (P8 z2 50 px, 2x512 generator), 3 epochs of 9,000 images
    if [ "$DRYRUN" = 1 ]; then DN=200; DBOX=24; DOPT="$TINY_TVAE --batch-size 20"; else DN=10000; DBOX=50; DOPT=""; fi
    step makeset_ddp 120 "$PY" "$HELPER" makeset $DN $DBOX "$WORK/ddpset" "$DEVICE"
    local v
    for v in plain torchrun ddp; do
        rm -rf "$WORK/ddp_$v"
        local t=$(date +%s.%N)
        case $v in
            plain) step "ddp_run_$v" 150 "$PY" -m cryolatent train "$WORK/ddpset/particles.star" \
                       -o "$WORK/ddp_$v" --epochs 3 --device "$DEVICE" --early-stop 0 $DOPT ;;
            torchrun) step "ddp_run_$v" 150 "$PY" -m torch.distributed.run --standalone \
                       --nproc_per_node 1 -m cryolatent train "$WORK/ddpset/particles.star" \
                       -o "$WORK/ddp_$v" --epochs 3 --device "$DEVICE" --early-stop 0 $DOPT ;;
            ddp) step "ddp_run_$v" 150 env CRYOLATENT_FORCE_DDP=1 "$PY" -m torch.distributed.run \
                       --standalone --nproc_per_node 1 -m cryolatent train \
                       "$WORK/ddpset/particles.star" -o "$WORK/ddp_$v" --epochs 3 \
                       --device "$DEVICE" --early-stop 0 $DOPT ;;
        esac
        "$PY" "$HELPER" runlog "$WORK/ddp_$v" "$v" "$(since "$t")" \
            >> "$SW/ddp_overhead.jsonl"
    done
    # 5. one full epoch of 161,292 x 100 px (EMPIAR-10025's count at the paper's 100 px),
    #    TARGET-VAE P8 z2 with the 6x512 generator, through the CLI from a .star/.mrcs;
    #    skipped when throughput predicts it would not end before the deadline
    if [ "$DRYRUN" = 1 ]; then FN=${FULL_N:-300}; FBOX=24; FOPT="$TINY_TVAE --batch-size 20"; else FN=${FULL_N:-161292}; FBOX=100; FOPT=""; fi
    local cfgname=tvae-p8-100-gen6
    local pred
    pred=$("$PY" "$HELPER" predict "$SW/throughput_rows.json" $cfgname $FN)
    local now=$(( $(date +%s) - T0 ))
    local left=$(( DEADLINE + 60 - now ))
    echo "{\"full_epoch_predicted_s\": $pred, \"left_s\": $left, \"n\": $FN, \"box\": $FBOX}" > "$SW/full_epoch_plan.json"
    if [ "$DRYRUN" = 1 ] || { [ "$pred" -gt 0 ] && [ "$pred" -lt $(( left - 40 )) ]; }; then
        step makeset_full 200 "$PY" "$HELPER" makeset $FN $FBOX "$WORK/fullset" "$DEVICE"
        rm -rf "$WORK/full_run"
        local t=$(date +%s.%N)
        local now2=$(( $(date +%s) - T0 ))
        step full_epoch $(( DEADLINE + 100 - now2 > 30 ? DEADLINE + 100 - now2 : 30 )) \
            "$PY" -m cryolatent train "$WORK/fullset/particles.star" -o "$WORK/full_run" \
            --model target-vae --rotations 8 --z-dim 2 --gen-layers 6 --epochs 1 \
            --device "$DEVICE" $FOPT
        "$PY" "$HELPER" runlog "$WORK/full_run" full_epoch "$(since "$t")" \
            > "$SW/full_epoch.json"
        rm -rf "$WORK/fullset"
    else
        echo "== full_epoch: skipped (predicted ${pred}s, ${left}s left)"
    fi
    "$PY" "$HELPER" merge "$SW" "$OUT/speed.json"
}

# ------------------------------------------------------------------ MNIST timelines
mnist() {  # mnist LABEL MODEL BUDGET WALL OPTIONS...
    local label=$1 model=$2 budget=$3 wall=$4; shift 4
    if [ -z "${MNIST:-}" ]; then
        echo "no mnist.npz: copy it to runs/gpu_carry/mnist.npz and carry runs/gpu_carry" >&2
        return 1
    fi
    rm -rf "$WORK/mq_$label"
    local sizes=""
    if [ "$DRYRUN" = 1 ]; then sizes="--n-train 300 --n-test 200 --threads 1"; budget=15; wall=60; fi
    nvidia-smi -L 2>/dev/null || true
    set -o pipefail
    "$PY" benchmarks/mnist_quality.py --model "$model" --dataset mnist-u --device "$DEVICE" \
        --mnist "$MNIST" --time-budget-s "$budget" --wall-limit-s "$wall" --eval-every-s 60 \
        --outdir "$WORK/mq_$label" --json "$OUT/mnist_$label.json" $sizes "$@" \
        2>&1 | tee "$OUT/mnist_$label.log"
    local rc=$?
    set +o pipefail
    return $rc
}

tvae() { mnist tvae target-vae "${TVAE_BUDGET_S:-360}" "${TVAE_WALL_S:-430}" \
             --rotations 16 --z-dim 32 $TINY_TVAE; }
irl() { mnist irl irl-inr "${IRL_BUDGET_S:-360}" "${IRL_WALL_S:-430}" --z-dim 32 $TINY_IRL; }

case $STEP in
    speed) speed 2>&1 | tee "$OUT/speed.log" ;;
    tvae) tvae ;;
    irl) irl ;;
    all) speed 2>&1 | tee "$OUT/speed.log"; tvae; irl ;;
    *) echo "usage: $0 {speed|tvae|irl|all}" >&2; exit 2 ;;
esac
echo "== $STEP done in $(( $(date +%s) - T0 ))s; files in $OUT:"; ls -la "$OUT"
