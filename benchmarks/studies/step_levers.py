"""Issue 14's micro-benchmarks: each lever of the training step timed alone against the
computation it replaced (benchmarks/README.md, "Training cost per particle, session 5").

    python benchmarks/studies/step_levers.py [--dtype bfloat16|float32] [--reps 3]

Shapes (threads, batch B, padded input H, kernel k, filters R*C): P8 / P16 at 50 px (1 thread,
B 16, the SPEC rows), the cryo-EM 64-px setting (2 threads, B 100) and 32 px (2 threads, B 32).
Prints one line per shape and lever: the best of ``--reps`` forward + backward times in ms.

* lifting conv, filter gradient: autograd's conv2d backward vs ``_LiftingCorrelation``;
* lifting conv + channels-last layout: the direct path vs im2col + one product (GroupConvP's
  two paths, forced by ``UNFOLD_MAX``);
* FFT correlation (forward only, float32): rfft2 / product / irfft2 on a 72-px grid vs conv2d;
* Fourier features + first generator layer: plain composition vs ``fourier_linear``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryolatent.models import blocks  # noqa: E402

SHAPES = {"P8-50": (1, 16, 71, 31, 8, 128), "P16-50": (1, 16, 71, 31, 16, 128),
          "cryo-64": (2, 100, 59, 39, 8, 64), "cryo-32": (2, 32, 31, 21, 8, 64)}


def best_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(min(ts) * 1000, 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    dt = getattr(torch, a.dtype)
    for name, (thr, b, h, k, r, c) in SHAPES.items():
        torch.set_num_threads(thr)
        torch.manual_seed(0)
        x = torch.randn(b, 1, h, h)
        gc = blocks.GroupConvP(c, k, r)
        up = torch.randn(b, h - k + 1, h - k + 1, r, c, dtype=dt)
        x_dt, bank = x.to(dt), gc.filter_bank().detach().to(dt)

        def autograd_grad():
            w = bank.clone().requires_grad_()
            F.conv2d(x_dt, w).backward(up.permute(0, 3, 4, 1, 2).reshape(b, r * c, h - k + 1, -1))

        def own_grad():
            w = bank.clone().requires_grad_()
            blocks._LiftingCorrelation.apply(x_dt, w).backward(
                up.permute(0, 3, 4, 1, 2).reshape(b, r * c, h - k + 1, -1))

        def path(limit):
            def run():
                blocks.UNFOLD_MAX = limit
                with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
                    y = gc(x, (0, 0, 0, 0))
                y.backward(up.to(y.dtype))
            return run

        line = {"filter grad: autograd": best_ms(autograd_grad, a.reps),
                "own": best_ms(own_grad, a.reps),
                "conv+layout: direct": best_ms(path(0), a.reps),
                "im2col": best_ms(path(2 ** 40), a.reps)}
        blocks.UNFOLD_MAX = 2 ** 25
        if dt == torch.float32:
            n = 72 if h <= 72 else h
            line["fwd: conv2d"] = best_ms(lambda: F.conv2d(x, bank), a.reps)
            line["fwd: FFT"] = best_ms(
                lambda: torch.fft.irfft2(torch.fft.rfft2(x, s=(n, n))
                                         * torch.fft.rfft2(bank.flip(-1, -2),
                                                           s=(n, n)).transpose(0, 1),
                                         s=(n, n))[..., k - 1:h, k - 1:h], a.reps)
        print(name, line, flush=True)
    # the generator's first layer at the cryo-EM settings (64 Fourier features, width 128)
    torch.set_num_threads(2)
    ff, lin = blocks.FourierFeatures(64, 10.0), torch.nn.Linear(128, 128)
    for rows in (32 * 32 * 32, 100 * 64 * 64):
        xs = torch.randn(rows, requires_grad=True)
        ys = torch.randn(rows, requires_grad=True)

        def plain():
            with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
                h = lin(ff(torch.stack([xs, ys], -1)))
            h.float().sum().backward()

        def fused():
            with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
                h = blocks.fourier_linear(ff, lin, xs, ys)
            h.float().sum().backward()

        print(f"first layer, {rows} rows", {"plain": best_ms(plain, a.reps),
                                            "fused": best_ms(fused, a.reps)}, flush=True)


if __name__ == "__main__":
    main()
