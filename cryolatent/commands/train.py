"""``cryolatent train INPUT -o RUNDIR --model {target-vae,irl-inr} ...``

Several GPUs or nodes: the same command under ``torchrun`` (docs/distributed.md), e.g.
``torchrun --nproc_per_node 4 --no-python cryolatent train ...``; ``--batch-size`` is then
the global batch, split over the processes.

Options not given take the model's defaults (TARGET-VAE: lr 2e-4, batch 100, no weight
decay; IRL-INR: lr 1e-4, batch 128, weight decay 5e-4; on the CPU lr 1e-3, batch 64 and
smaller networks) or, with ``--resume``, the values stored in RUNDIR/config.json.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click
from click.core import ParameterSource

from ..config import TrainConfig
from .common import force_option, threads_option

#: what a run folder holds (removed by ``--force`` before a new run starts there)
RUN_FILES = ("config.json", "log.csv", "run.log", "checkpoints", "summary.json")


#: click type of an option whose choices are its TrainConfig field's ``Literal``
CHOICE = "choice"

# (option or (option, alias...), TrainConfig field, click type, help); booleans become
# --x/--no-x flags. Defaults in [brackets] and choices are checked against the configuration
# classes (cryolatent.config) by tests/test_config.py.
_OPTIONS = [
    ("--model", "model", CHOICE,
     "Model to train [target-vae]."),
    ("--rotations", "rotations", CHOICE,
     "TARGET-VAE: discrete rotations of the P_r group convolution [8]."),
    ("--z-dim", "z_dim", int, "Latent dimension [2; TARGET-VAE on particle sets with CTF "
     "parameters 8]."),
    ("--epochs", "epochs", int, "Maximum number of epochs [100]."),
    ("--batch-size", "batch_size", int,
     "Images per step, over all processes under torchrun [TARGET-VAE 100, on particle sets "
     "with CTF parameters 32; IRL-INR 128, on the CPU 64]."),
    ("--lr", "lr", float, "AdamW learning rate [TARGET-VAE 2e-4, on particle sets with CTF "
     "parameters 1e-3; IRL-INR 1e-4, on the CPU 1e-3]."),
    ("--weight-decay", "weight_decay", float,
     "AdamW (decoupled) weight decay [0; IRL-INR 5e-4]."),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N [auto]."),
    ("--seed", "seed", int, "Random seed (split, initialisation, sampling) [0]."),
    ("--val-fraction", "val_fraction", float, "Share of particles held out [0.1]."),
    ("--lr-patience", "lr_patience", int, "Epochs without improvement before lr drops [10]."),
    ("--lr-factor", "lr_factor", float, "Learning-rate drop factor [0.5]."),
    ("--early-stop", "early_stop", int, "Stop after N epochs without improvement, 0 never [20]."),
    ("--kl-warmup", "kl_warmup", float,
     "TARGET-VAE: epochs over which the weight of the latent's KL rises from 0 to 1 [0; on "
     "particle sets with CTF parameters 5]."),
    ("--kl-free-bits", "kl_free_bits", float,
     "TARGET-VAE: nats per latent dimension below which its KL is not penalised in "
     "training (free bits) [0]."),
    ("--converge-window", "converge_window", int,
     "Convergence test over the last N epochs (see --converge-tol) [5]."),
    ("--converge-tol", "converge_tol", float,
     "Stop when the validation loss fell over the last --converge-window epochs by less than "
     "this share of its fall since epoch 1; 0 never (--epochs caps the run) [0.01]."),
    ("--amp", "amp", CHOICE,
     "Mixed precision: auto = bf16 autocast on CUDA and on CPUs with hardware bf16 (AMX, "
     "AVX512-BF16); off = float32 [auto]."),
    ("--compile", "compile", bool, "torch.compile the loss [off]."),
    ("--num-workers", "num_workers", int, "Reader processes for sets too large for memory [2]."),
    ("--ctf", "ctf", bool, "Put each particle's CTF in the likelihood (Gaussian) [on when "
     "the particle set has CTF parameters]."),
    ("--enc-channels", "enc_channels", int,
     "TARGET-VAE group-conv filters [128 (the paper's) on a GPU, 64 on the CPU]."),
    ("--kernel", "kernel", int, "TARGET-VAE group-conv kernel px [smallest odd >= 0.6 box]."),
    ("--enc-layers", "enc_layers", int, "TARGET-VAE 1x1 group-conv layers [3]."),
    ("--gen-width", "gen_width", int,
     "TARGET-VAE generator width [512 (the paper's) on a GPU, 128 on the CPU]."),
    ("--gen-layers", "gen_layers", int, "TARGET-VAE generator hidden layers [2]."),
    ("--gen-fourier-features", "gen_fourier_features", int,
     "TARGET-VAE random Fourier features of the generator's coordinates [256 (the paper's) "
     "on a GPU, 64 on the CPU]."),
    ("--gen-fourier-sigma", "gen_fourier_sigma", float,
     "TARGET-VAE Fourier-feature sd, cycles/pixel [0.05]."),
    ("--rotation-prior", "rotation_prior", CHOICE,
     "TARGET-VAE prior over the discrete rotations [uniform]."),
    ("--rotation-prior-sd", "rotation_prior_sd", float,
     "SD in degrees of the normal rotation prior [45]."),
    ("--translation-prior", "translation_prior", float,
     "SD of the translation prior in px of the training images (so its value in Å follows "
     "their pixel size: see --translation-prior-angst) [particle sets with CTF parameters: "
     "half the translation range; others 5]."),
    ("--translation-range", "translation_range", int,
     "TARGET-VAE max |shift| on the grid, px of the training images (see "
     "--translation-range-angst) [particle sets with CTF parameters: 0.15 x box, at least 3; "
     "others min(box/2, 4 x prior SD)]."),
    ("--likelihood", "likelihood", CHOICE,
     "auto: Bernoulli for images in [0, 1], else Gaussian [auto]."),
    ("--learn-sigma", "learn_sigma", bool, "Gaussian likelihood: learned per-pixel SD [off]."),
    ("--mask", "mask", bool, "Likelihood only inside the circle of diameter box [on for "
     "particle sets with CTF parameters, off otherwise]."),
    ("--mask-diameter", "mask_diameter", float, "TARGET-VAE: diameter of that circle in px "
     "of the training images; turns the mask on (see --particle-diameter for Å) [the box]."),
    ("--gumbel-tau", "gumbel_tau", float, "TARGET-VAE Gumbel-softmax temperature [1; on "
     "particle sets with CTF parameters 0.5]."),
    ("--subpixel", "subpixel", bool,
     "TARGET-VAE: sub-pixel offset inside each translation cell [off]."),
    ("--pixel-fraction", "pixel_fraction", float,
     "Share of the likelihood's pixels each training step renders and scores, a "
     "new random draw per step, scaled so the loss stays unbiased; validation and embed use "
     "all pixels. Must be 1 with the CTF [0.25 for boxes >= 48 px without CTF, else 1]."),
    ("--recentre", "recentre", bool,
     "TARGET-VAE: report poses about the generated object's centre of mass [on]."),
    ("--enc-width", "enc_width", int, "IRL-INR ResNet-18 base width [64 (the paper's) on a "
     "GPU, 8 on the CPU]."),
    ("--hyper-width", "hyper_width", int, "IRL-INR hypernetwork width [256 on a GPU, 64 on "
     "the CPU]."),
    ("--hyper-layers", "hyper_layers", int, "IRL-INR hypernetwork layers [3 on a GPU, 2 on "
     "the CPU]."),
    ("--inr-width", "inr_width", int, "IRL-INR implicit network width [256 on a GPU, 32 "
     "on the CPU]."),
    ("--inr-layers", "inr_layers", int, "IRL-INR implicit network layers [3 on a GPU, 2 "
     "on the CPU]."),
    ("--inr-fourier-features", "inr_fourier_features", int,
     "IRL-INR random Fourier features of the INR's coordinates [256 on a GPU, 32 on the "
     "CPU]."),
    (("--inr-fourier-sigma", "--fourier-sigma"), "inr_fourier_sigma", float,
     "IRL-INR Fourier-feature SD, cycles per half box (--fourier-sigma: the old name) [2]."),
    ("--fourier-features", "fourier_features", int,
     "Old name: sets --gen-fourier-features and --inr-fourier-features (those win when "
     "given too) [the model's]."),
    ("--lambda-recon", "lambda_recon", float, "IRL-INR reconstruction weight [1]."),
    ("--lambda-consistency", "lambda_consistency", float, "IRL-INR consistency weight [1]."),
    ("--lambda-symmetry", "lambda_symmetry", float, "IRL-INR symmetry weight [15]."),
    ("--consistency-loss", "consistency_loss", CHOICE,
     "IRL-INR consistency loss between the two views' z: mse (as the paper's sec. 4.2) or cosine (its SCAN setting) [mse]."),
    ("--rotation-rule", "rotation_rule", CHOICE,
     "IRL-INR canonical rotation rule [moments]."),
]


def _angstrom_to_px(cfg: TrainConfig, input, datadir, prior_a, range_a,
                    diameter_a=None) -> None:
    """Set cfg.translation_prior / translation_range / mask_diameter (px of the training
    images) from Å, with the training set's pixel size (its median, when the optics groups
    differ); the Å values are kept in config.json under "extra"."""
    import logging
    import math

    import numpy as np

    from ..io import load_particles

    from ..utils import setup_logging

    setup_logging(None)
    ps = load_particles(input, datadir=datadir)
    apix = float(np.median(np.asarray(ps.apix_per_particle, dtype=float)))
    log = logging.getLogger("cryolatent")
    if prior_a is not None:
        cfg.translation_prior = prior_a / apix
        cfg.extra["translation_prior_angst"] = prior_a
        log.info("--translation-prior-angst %g Å = %.4g px of the %.4g Å/px training images",
                 prior_a, cfg.translation_prior, apix)
    if range_a is not None:
        cfg.translation_range = max(1, math.ceil(range_a / apix - 1e-6))
        cfg.extra["translation_range_angst"] = range_a
        log.info("--translation-range-angst %g Å = %d px of the %.4g Å/px training images",
                 range_a, cfg.translation_range, apix)
    if diameter_a is not None:
        cfg.mask_diameter = diameter_a / apix
        cfg.mask = True
        cfg.extra["particle_diameter_angst"] = diameter_a
        log.info("--particle-diameter %g Å = %.4g px of the %.4g Å/px training images: the "
                 "likelihood's disc", diameter_a, cfg.mask_diameter, apix)


#: the options shown first by ``train --help``; every other one is listed under "Expert
#: options" (click parameter names)
COMMON = {"outdir", "datadir", "resume", "force", "threads", "model", "rotations", "z_dim",
          "epochs", "batch_size", "lr", "device", "seed"}
EXPERT_HEADING = "Expert options (the defaults are picked from the data and the machine)"


class GroupedHelpCommand(click.Command):
    """A click command whose ``--help`` lists the options in two sections: "Options" (the
    names in :data:`COMMON`) first, then "Expert options" (all others, in their order)."""

    def format_options(self, ctx, formatter):
        common, expert = [], []
        help_option = self.get_help_option(ctx)
        for param in self.get_params(ctx):
            rec = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if rec is not None:
                first = param.name in COMMON or param is help_option
                (common if first else expert).append(rec)
        for title, rows in (("Options", common), (EXPERT_HEADING, expert)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _add_options(f):
    from ..config import literal_choices

    for opt, field, typ, helptext in reversed(_OPTIONS):
        opts = (opt,) if isinstance(opt, str) else tuple(opt)
        if typ is bool:
            name = opts[0][2:]
            f = click.option(f"--{name}/--no-{name}", field, default=None, help=helptext)(f)
        else:
            if typ == CHOICE:
                typ = click.Choice([str(c) for c in literal_choices(TrainConfig, field)])
            f = click.option(*opts, field, type=typ, default=None, help=helptext)(f)
    return f


@click.command("train", cls=GroupedHelpCommand)
@click.argument("input", type=click.Path(dir_okay=False))
@click.option("-o", "--outdir", "outdir", required=True, type=click.Path(file_okay=False),
              help="Run folder (must be new or empty unless --resume or --force).")
@click.option("--datadir", type=click.Path(file_okay=False), default=None,
              help="Folder where relative stack paths are looked up [default: beside INPUT, "
                   "then the current directory].")
@click.option("--resume", is_flag=True,
              help="Continue RUNDIR from checkpoints/last.pt [default: a new run].")
@click.option("--translation-prior-angst", "translation_prior_angst", default=None,
              type=click.FloatRange(min=0, min_open=True),
              help="SD of the translation prior in Å; converted to px of the training images "
                   "(replaces --translation-prior) [default: --translation-prior px].")
@click.option("--translation-range-angst", "translation_range_angst", default=None,
              type=click.FloatRange(min=0, min_open=True),
              help="TARGET-VAE max |shift| on the grid in Å; converted to px of the training "
                   "images, rounded up (replaces --translation-range) [default: "
                   "--translation-range].")
@click.option("--particle-diameter", "particle_diameter", default=None,
              type=click.FloatRange(min=0, min_open=True),
              help="Å, as RELION's mask diameter: TARGET-VAE scores the likelihood inside "
                   "this circle only (replaces --mask-diameter) [default: the box].")
@force_option
@threads_option
@_add_options
@click.pass_context
def command(ctx, input, outdir, datadir, resume, translation_prior_angst,
            translation_range_angst, particle_diameter, force, **opts):
    """Train TARGET-VAE or IRL-INR on INPUT (.star, .cs or .mrcs).

    --force starts a new run in a used RUNDIR: its config.json, log.csv, run.log,
    summary.json and checkpoints/ are deleted first (a folder holding anything else is
    refused).
    """
    import contextlib
    import shutil

    from ..errors import CryolatentError
    from ..train import train
    from ..utils import available_cores, command_line, output_folder, set_threads

    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    main_rank = os.environ.get("RANK", "0") in ("", "0")
    if not resume and main_rank:
        from ..utils import check_outdir

        check_outdir(outdir, force, extra=", --resume to continue it")
        if force and Path(outdir).is_dir():
            other = sorted(p.name for p in Path(outdir).iterdir() if p.name not in RUN_FILES)
            if other:
                raise CryolatentError(
                    f"{outdir}: --force starts a new run in a folder that holds a run "
                    f"({', '.join(RUN_FILES)}) and nothing else, but it also holds "
                    f"{other[0]}; choose another -o")
            if not Path(input).exists():   # never delete a run for a command that fails
                raise CryolatentError(f"{input}: no such file")
            for name in RUN_FILES:
                p = Path(outdir) / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
    # default threads: the cores this process may use, shared by the processes of a node
    threads = opts.get("threads")
    set_threads(threads or max(1, available_cores()
                               // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))

    given = {k: v for k, v in opts.items()
             if ctx.get_parameter_source(k) != ParameterSource.DEFAULT and v is not None}
    stored = Path(outdir) / "config.json"
    if resume and stored.exists():
        cfg = TrainConfig.load(stored)
    else:
        model = given.get("model", "target-vae")
        cfg = TrainConfig(model=model)
    if "rotations" in given:
        given["rotations"] = int(given["rotations"])
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in given.items():
        if k in names:
            setattr(cfg, k, v)
    cfg.apply_old_names()   # --fourier-features: onto the per-model options not given
    cfg.threads = given.get("threads")   # not inherited by --resume: the default is fresh
    if (translation_prior_angst is not None or translation_range_angst is not None
            or particle_diameter is not None):
        if resume:
            raise click.UsageError("--translation-*-angst and --particle-diameter cannot "
                                   "change a run under --resume")
        _angstrom_to_px(cfg, input, datadir, translation_prior_angst, translation_range_angst,
                        particle_diameter)
    cfg.input, cfg.outdir = str(input), str(outdir)
    if datadir is not None or not resume:
        cfg.datadir = datadir
    cfg.command = command_line()
    if not resume:   # where relative paths were resolved (commands given RUNDIR look there)
        cfg.extra["cwd"] = os.getcwd()
    # a run that fails before its first checkpoint removes the folder it created
    cleanup = output_folder(outdir, force=True,
                            keep=lambda p: (p / "checkpoints" / "last.pt").exists()) \
        if main_rank and not resume else contextlib.nullcontext()
    with cleanup:
        rundir = train(cfg, resume=resume)
    if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun: rank 0 only
        click.echo(str(rundir))
