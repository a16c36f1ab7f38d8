"""Training throughput of the SPEC speed configurations (images/s, ms/step, memory, TFLOP/s).

    python benchmarks/throughput.py                      # all configurations, GPU
    python benchmarks/throughput.py --device cpu --tiny --steps 2 --warmup 1 --repeats 1
    python benchmarks/throughput.py --check              # bf16 vs fp32 (CUDA) / cached filters

Each configuration builds the real model and runs the real training step
(:class:`cryolatent.train.StepRunner`: bf16 autocast on CUDA, fused Adam, no host sync) on
synthetic images resident on the device. Timing: ``--warmup`` untimed steps, then
``--repeats`` timed blocks of ``--steps`` steps (CUDA events, synchronised at block ends);
the median block gives images/s and ms/step. FLOPs per step come from
``torch.utils.flop_counter.FlopCounterMode`` over one step (matrix products and
convolutions, forward + backward), so TFLOP/s = FLOPs per step / median step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryolatent.config import TrainConfig  # noqa: E402
from cryolatent.models import build_model  # noqa: E402
from cryolatent.train import StepRunner, amp_dtype, make_optimizer, set_fast_math  # noqa: E402

# name -> (box, TrainConfig overrides, reference images/s on an H100, SPEC target)
CONFIGS = {
    "tvae-p8-z2-50": (50, dict(model="target-vae", rotations=8, z_dim=2, batch_size=100,
                               gen_width=512, gen_layers=2, fourier_features=256), 1250, 12500),
    "tvae-p16-z32-50": (50, dict(model="target-vae", rotations=16, z_dim=32, batch_size=100,
                                 gen_width=512, gen_layers=2, fourier_features=256), 760, 7600),
    "tvae-p8-100-gen6": (100, dict(model="target-vae", rotations=8, z_dim=2, batch_size=100,
                                   gen_width=512, gen_layers=6, fourier_features=256), 204, 2000),
    "irl-inr-50": (50, dict(model="irl-inr", batch_size=128, lr=1e-4, weight_decay=5e-4,
                            fourier_features=256), 248, 5000),
}
TINY = dict(enc_channels=8, gen_width=32, gen_layers=1, fourier_features=16, enc_width=8,
            hyper_width=32, inr_width=32, batch_size=8)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make(name: str, device: torch.device, tiny: bool, amp: str, batch: int | None,
         compile: bool):
    box, over, ref, target = CONFIGS[name]
    over = dict(over)
    if tiny:
        over.update(TINY)
        box = 24
    if batch:
        over["batch_size"] = batch
    cfg = TrainConfig(**over, amp=amp, compile=compile,
                      likelihood="bernoulli" if over["model"] == "target-vae" else "auto")
    torch.manual_seed(0)
    model = build_model(cfg, box).to(device)
    opt, _ = make_optimizer(model, cfg)
    runner = StepRunner(model, opt, device, amp_dtype(amp, device), compile)
    x = torch.rand(cfg.batch_size, box, box, device=device)
    return cfg, box, model, runner, x, ref, target


def bench(name: str, args, device: torch.device) -> dict | None:
    try:
        cfg, box, model, runner, x, ref, target = make(name, device, args.tiny, args.amp,
                                                       args.batch_size, args.compile)
    except (ImportError, ModuleNotFoundError) as e:
        print(f"{name}: skipped ({e})", file=sys.stderr)
        return None
    for _ in range(args.warmup):
        runner.train_step(x)
    _sync(device)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        runner.train_step(x)
    flops = fc.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(args.steps):
                runner.train_step(x)
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) / 1000 / args.steps)
        else:
            t = time.perf_counter()
            for _ in range(args.steps):
                runner.train_step(x)
            times.append((time.perf_counter() - t) / args.steps)
    step = statistics.median(times)
    b = x.shape[0]
    res = {"config": name, "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else "cpu", "box": box, "batch": b, "tiny": args.tiny,
           "amp": str(runner.amp).replace("torch.", "") if runner.amp else "off",
           "compile": args.compile, "images_per_s": b / step, "ms_per_step": step * 1000,
           "gflop_per_image": flops / b / 1e9, "tflop_per_s": flops / step / 1e12,
           "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                            if device.type == "cuda" else None),
           "reference_images_per_s": ref, "target_images_per_s": target,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    return res


def check(args, device: torch.device) -> int:
    """CUDA: bf16 autocast vs fp32 on one batch (loss and inferred poses/latents).
    CPU: inference with the cached filter bank equals the freshly built one."""
    cfg, box, model, runner, x, *_ = make("tvae-p8-z2-50", device, args.tiny, "off", None,
                                          False)
    model.eval()
    with torch.no_grad():
        a = model.encode(x, cache=False)
        b = model.encode(x, cache=True)
    same = all(torch.equal(a[k], b[k]) for k in a)
    print(json.dumps({"check": "cached_filters_equal_plain", "ok": same}))
    ok = same
    if device.type == "cuda":
        with torch.no_grad():
            torch.manual_seed(1)
            l32, _ = model.loss(x)
            i32 = model.infer_internal(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                torch.manual_seed(1)
                l16, _ = model.loss(x)
                i16 = model.infer_internal(x)
        rel = float((l16.float() - l32).abs() / l32.abs())
        same_cell = float((i16["cell"] == i32["cell"]).float().mean())
        zc = float(torch.nn.functional.cosine_similarity(i16["z_mu"].float().flatten(),
                                                         i32["z_mu"].flatten(), dim=0))
        print(json.dumps({"check": "bf16_vs_fp32", "loss_rel_diff": rel,
                          "same_pose_cell": same_cell, "z_cosine": zc}))
        ok = ok and rel < 2e-2
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="small widths and 24-px images (smoke)")
    p.add_argument("--check", action="store_true", help="agreement checks instead of timing")
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available())
                       else ("cpu" if args.device == "auto" else args.device))
    set_fast_math(dev)
    if args.check:
        return check(args, dev)
    results = []
    for name in args.configs:
        r = bench(name, args, dev)
        if r is None:
            continue
        results.append(r)
        print(json.dumps(r))
        print(f"{name:18s} {r['images_per_s']:10.1f} img/s {r['ms_per_step']:9.2f} ms/step "
              f"{r['gflop_per_image']:7.2f} GFLOP/img {r['tflop_per_s']:8.3f} TFLOP/s"
              + (f" {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "")
              + f"  (target {r['target_images_per_s']})", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
