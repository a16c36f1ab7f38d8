"""The best accuracy any 2D classifier can reach on a simulated cryo-EM set: an oracle that
knows every particle's true in-plane angle, shift and CTF (only its class is hidden) and
picks, for each particle, the class whose clean projection in that pose correlates best
with the image.

Use it to check that a benchmark set's classes can be told apart at all: two views of a
symmetric complex (a D8 chaperonin seen from tilts 48° and 132°, say) give the same image,
and no method can beat the oracle on them. The oracle is an upper bound only in spirit (it
fits one scale and offset per particle and hypothesis, not the simulation's exact noise
model), but a method that scores near it has lost nothing to a poor start.

Projections are rendered once per class on a ψ grid of ``--psi-step`` degrees (the
particle's ψ rounded to it: 0.25° at most, 0.1 px at 25 px from the centre) at zero shift,
then shifted in Fourier space and multiplied by each particle's CTF, exactly as
``simulate cryoem`` renders them.

    python benchmarks/oracle_bound.py /tmp/cvr/D          # a cryoem_vs_relion.py set folder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
STRUCTURES = REPO.parent / "shared" / "data" / "structures"


def class_templates(structures, views: int, apix: float, box: int, psi_step: float):
    """(C, P, box, box) clean projections of class c = 3 (structure) + view at ψ = j·step;
    the class order of the benchmark's truth (rlnClassNumber = views·s + v + 1)."""
    from cryolatent.simulate.cryoem import fibonacci_views, load_structure, render_projections

    rot, tilt = fibonacci_views(views)
    psi = np.arange(0.0, 360.0, psi_step)
    out = []
    for s in structures:
        m = load_structure(STRUCTURES / s)
        for v in range(views):
            out.append(render_projections(m.coords, m.weights, np.full(len(psi), rot[v]),
                                          np.full(len(psi), tilt[v]), psi,
                                          np.zeros((len(psi), 2)), box, apix,
                                          max(1.0, apix)))
    return torch.stack(out)


def fourier_shift(img: torch.Tensor, shift_px: np.ndarray) -> torch.Tensor:
    """img (B, D, D) moved by −shift_px (B, 2) = (rlnOriginX, rlnOriginY) px, the way
    ``render_projections`` applies an origin (content at x − t)."""
    D = img.shape[-1]
    k = torch.fft.fftfreq(D, dtype=torch.float64)
    t = torch.as_tensor(shift_px, dtype=torch.float64)
    ph = torch.exp(2j * np.pi * (k[None, None, :] * t[:, 0, None, None]
                                 + k[None, :, None] * t[:, 1, None, None]))
    return torch.fft.ifft2(torch.fft.fft2(img.double()) * ph).real.float()


def oracle(setdir: Path, psi_step: float = 0.5, chunk: int = 200) -> dict:
    from cryolatent.ctf import CTFParams
    from cryolatent.io import read_star
    from cryolatent.io.mrc import read_header, read_images
    from cryolatent.simulate.cryoem import apply_ctf

    info = json.loads((setdir / "done.json").read_text())
    blocks = read_star(setdir / "truth.star")
    t, optics = blocks["particles"], blocks["optics"]
    apix, box, views = float(info["apix"]), int(info["box"]), int(info["views"])
    stack = setdir / "particles.mrcs"
    x = torch.as_tensor(read_images(stack, np.arange(len(t)), read_header(stack)))
    truth = t["rlnClassNumber"].to_numpy().astype(int) - 1
    psi = t["rlnAnglePsi"].to_numpy() % 360.0
    sh = t[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / apix
    ctf = CTFParams.from_relion(t, optics)
    t0 = time.process_time()
    tmpl = class_templates(info["structures"], views, apix, box, psi_step)
    C, P = tmpl.shape[:2]
    j = np.rint(psi / psi_step).astype(int) % P
    yy, xx = np.mgrid[:box, :box] - box // 2
    mask = torch.as_tensor((yy ** 2 + xx ** 2) <= (0.45 * box) ** 2)
    cc = np.zeros((len(t), C))
    for a in range(0, len(t), chunk):
        idx = np.arange(a, min(a + chunk, len(t)))
        xi = x[idx][:, mask]
        xi = xi - xi.mean(1, keepdim=True)
        xi = xi / xi.norm(dim=1, keepdim=True)
        for c in range(C):
            p = apply_ctf(fourier_shift(tmpl[c, j[idx]], sh[idx]), ctf.subset(idx), apix)
            p = -p[:, mask]                                    # the set's protein is dark
            p = p - p.mean(1, keepdim=True)
            p = p / p.norm(dim=1, keepdim=True)
            cc[idx, c] = (xi * p).sum(1).numpy()
    pred = cc.argmax(1)
    confusion = np.zeros((C, C), dtype=int)
    np.add.at(confusion, (truth, pred), 1)
    # how alike the classes' clean projections are, each pair at its best in-plane angle
    from cryolatent.analysis.refine2d import aligned_similarity

    sim = aligned_similarity(tmpl[:, 0].numpy(), 2.0)
    return {"set": setdir.name, "n": len(t), "oracle_accuracy": float((pred == truth).mean()),
            "per_class": np.round(np.diag(confusion) / confusion.sum(1), 3).tolist(),
            "confusion": confusion.tolist(),
            "clean_aligned_similarity": np.round(sim, 3).tolist(),
            "cpu_s": round(time.process_time() - t0, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sets", nargs="+", type=Path, help="set folders of cryoem_vs_relion.py")
    ap.add_argument("--psi-step", type=float, default=0.5)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    for s in a.sets:
        r = oracle(s, a.psi_step)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
