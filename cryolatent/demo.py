"""``cryolatent demo``: the whole chain on a built-in example, on the CPU in a few minutes.

simulate → preprocess → train → embed → refine → plot → classes → evaluate, on particles of the
package's own two-conformation pseudo-protein (:func:`cryolatent.simulate.synthetic.hinge_pair`;
no download, no ``../shared`` needed): one view, random in-plane angle and shift, CTF and noise,
like a 2D-classification problem with two conformations. The model is deliberately small so
that a 2-core CPU trains it in about two minutes; the figures it reaches say that the chain
works, not what a full GPU training reaches (``benchmarks/README.md`` has those). The demo
ends with a verdict against its truth (:data:`PASS_ACCURACY`), as the README's figure over
seeds is stated.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


log = logging.getLogger("cryolatent")


#: options the demo fixes to the values its published figures were measured with (before
#: `train` derived them from the data: a cryo-EM set now gets a sharper Gumbel-softmax, a KL
#: warm-up, a masked likelihood, a 0.15-box search, bf16 on AMX CPUs and a convergence stop)
PINNED = dict(gumbel_tau=1.0, kl_warmup=0.0, kl_free_bits=0.0, mask=False,
              translation_range=8, amp="off", converge_tol=0.0, ctf=False)


@dataclass
class DemoSettings:
    """Sizes of the demo; ``quick()`` is the variant the test suite runs."""

    n: int = 1000            # particles
    box: int = 48            # simulated box, px
    train_box: int = 24      # box after `preprocess` (Fourier crop)
    snr: float = 3.0
    epochs: int = 25
    batch_size: int = 50
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    model_options: dict = field(default_factory=lambda: dict(
        rotations=8, z_dim=2, enc_channels=16, kernel=11, gen_width=64, gen_layers=2,
        fourier_features=32, translation_prior=2.0, likelihood="gaussian",
        **PINNED))

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(n=120, box=32, train_box=16, epochs=2, batch_size=30,
                   model_options=dict(rotations=4, z_dim=2, enc_channels=4, kernel=7,
                                      gen_width=16, gen_layers=1, fourier_features=8,
                                      translation_prior=2.0, likelihood="gaussian",
                                      **PINNED))


#: what the demo writes into its folder (``force`` removes these first)
DEMO_OUTPUTS = ("simulated", "preprocessed", "run", "embedded.star", "embedded.z.npy",
                "embedded_summary.json", "refined.star", "refined_classes.mrcs",
                "refined_refine.json", "refine.log", "plots", "classes", "evaluation.json",
                "evaluation_model.json", "summary.json")

#: the accuracy the demo's published figure promises for every seed (README, benchmarks/
#: README.md "demo over seeds"); below it the demo prints a WARNING
PASS_ACCURACY = 0.95


def run_demo(outdir: str | Path, settings: DemoSettings | None = None, echo=print,
             force: bool = False) -> dict:
    """Run the chain into ``outdir`` (created; must be empty or absent unless ``force``: then
    the demo's own outputs from an earlier run, :data:`DEMO_OUTPUTS`, are removed first).
    Returns a summary dict with the paths written and the evaluation against the truth."""
    from .analysis.class_averages import make_class_averages
    from .analysis.plots import plot_all
    from .metrics import evaluate_files
    from .config import TrainConfig
    from .inference import embed
    from .analysis.refine2d import refine_star
    from .preprocess import preprocess
    from .simulate.cryoem import simulate_cryoem
    from .simulate.synthetic import hinge_pair
    from .train import train
    from .utils import command_line

    s = settings or DemoSettings()
    out = Path(outdir)
    from .utils import check_outdir

    check_outdir(out, force)
    if force and out.is_dir():
        from .utils import remove_entries

        remove_entries(out, DEMO_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    steps: list[tuple[str, float]] = []

    def step(i: int, what: str):
        echo(f"[{i}/8] {what}")
        return time.time()

    t = step(1, f"simulate {s.n} particles of a two-conformation pseudo-protein "
                f"({s.box} px, one view, CTF, SNR {s.snr:g})")
    sim = simulate_cryoem(out / "simulated", hinge_pair(atoms=1000), n=s.n, box=s.box,
                          snr=s.snr, seed=s.seed, views=1, shift_sd=1.5, device=s.device)
    steps.append(("simulate", time.time() - t))

    t = step(2, f"preprocess: Fourier-crop to {s.train_box} px, phase-flip, normalise")
    prep = preprocess(sim, out / "preprocessed", box=s.train_box, phase_flip=True)
    prep_star = out / "preprocessed" / "particles.star"
    steps.append(("preprocess", time.time() - t))

    t = step(3, f"train TARGET-VAE ({s.epochs} epochs on {s.device})")
    cfg = TrainConfig(input=str(prep_star), outdir=str(out / "run"), model="target-vae",
                      epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                      device=s.device, early_stop=0, num_workers=0,
                      command=command_line(), **s.model_options).validate()
    rundir = train(cfg)
    steps.append(("train", time.time() - t))

    t = step(4, "embed the ORIGINAL particles (the run's preprocessing applied on the fly)")
    emb = out / "embedded.star"
    embed(rundir, sim, emb, clusters=2, device=s.device, datadir=out / "simulated")
    steps.append(("embed", time.time() - t))

    t = step(5, "refine the classes and poses by 2D alignment (CTF-aware EM)")
    refined = out / "refined.star"
    refine_star(emb, refined, datadir=out / "simulated", show_progress=False)
    steps.append(("refine", time.time() - t))

    t = step(6, "plot the latent space, poses and training curves")
    plot_all(refined, out / "plots", rundir=rundir, methods=("pca", "umap") if s.n >= 200
             else ("pca",), seed=s.seed)
    steps.append(("plot", time.time() - t))

    t = step(7, "class averages: aligned (CTF-corrected) and denoised")
    make_class_averages(rundir, refined, out / "classes", datadir=out / "simulated",
                        device=s.device)
    steps.append(("classes", time.time() - t))

    t = step(8, "evaluate against the ground truth")
    metrics = evaluate_files(refined, sim)
    model_metrics = evaluate_files(emb, sim)
    (out / "evaluation.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "evaluation_model.json").write_text(json.dumps(model_metrics, indent=2) + "\n")
    steps.append(("evaluate", time.time() - t))

    summary = {
        "outdir": str(out),
        "simulated": str(sim), "preprocessed": str(prep_star), "run": str(rundir),
        "embedded": str(emb), "refined": str(refined), "plots": str(out / "plots"),
        "classes": str(out / "classes"), "evaluation": metrics,
        "evaluation_model": model_metrics, "verdict": verdict(metrics),
        "seconds": {k: round(v, 1) for k, v in steps} | {"total": round(time.time() - t_all, 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    del prep
    return summary


def verdict(metrics: dict) -> dict:
    """Pass/fail of one demo run against :data:`PASS_ACCURACY` (the share of particles in
    their right conformation)."""
    acc = metrics.get("cluster_accuracy")
    ok = acc is not None and acc >= PASS_ACCURACY
    return {"pass": bool(ok), "accuracy": acc, "threshold": PASS_ACCURACY}


def format_summary(summary: dict) -> str:
    """Human-readable lines for the end of ``cryolatent demo``."""
    m = summary["evaluation"]

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        f"done in {summary['seconds']['total']:.0f} s. Everything is in {summary['outdir']}/:",
        f"  simulated particles + truth  {summary['simulated']}",
        f"  preprocessed (training) set  {summary['preprocessed']}",
        f"  training run                 {summary['run']}  (config.json, log.csv, checkpoints/)",
        f"  poses, latents, classes      {summary['embedded']}  (RELION 3.1 STAR; the model's)",
        f"  refined classes and poses    {summary['refined']}  (RELION 3.1 STAR)",
        f"  latent maps and histograms   {summary['plots']}/",
        f"  class averages and gallery   {summary['classes']}/gallery.png",
        "evaluation against the truth (evaluation.json; the model alone: "
        "evaluation_model.json):",
        f"  conformations recovered (cluster accuracy)  {f(m.get('cluster_accuracy'))} "
        f"(the model alone {f(summary['evaluation_model'].get('cluster_accuracy'))})",
        f"  in-plane angle: agreement per class (0..1)   "
        f"{f(m.get('rotation_agreement_per_class'))}, median error "
        f"{f(m.get('rotation_error_deg_per_class'))}°, J-S corr per class "
        f"{f(m.get('rotation_corr_per_class'))}",
        f"  shift corr x / y                            {f(m.get('translation_corr_x'))} / "
        f"{f(m.get('translation_corr_y'))}",
        "next: cryolatent select <refined.star> --classes 1 -o class1.star; "
        "relion_stack_create --i class1.star --o aligned --apply_transformation",
    ]
    v = summary["verdict"]
    if v["pass"]:
        lines.append(f"verdict: PASS: {100 * v['accuracy']:.1f}% of the particles in their "
                     f"right conformation (the demo promises >= {100 * v['threshold']:.0f}%)")
    else:
        lines.append(f"WARNING: verdict: FAIL: only {100 * (v['accuracy'] or 0):.1f}% of the "
                     f"particles in their right conformation (the demo promises >= "
                     f"{100 * v['threshold']:.0f}%); please report it with "
                     f"{summary['outdir']}/summary.json and run/run.log")
    return "\n".join(lines)
