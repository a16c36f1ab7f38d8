"""``cryolatent train INPUT -o RUNDIR --model {target-vae,irl-inr} ...`` (thin layer over
:func:`cryolatent.launch.train_from_options`).

Several GPUs or nodes: the same command under ``torchrun`` (docs/distributed.md), e.g.
``torchrun --nproc_per_node 4 --no-python cryolatent train ...``; ``--batch-size`` is then
the global batch, split over the processes.

Options not given are chosen from the data and the machine when the run starts
(:func:`cryolatent.config.resolve`; each option's help ends with its default or that rule,
:func:`cryolatent.config.default_text`), or, with ``--resume``, taken from the run.
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from ..config import TrainConfig, default_text, literal_choices
from .common import force_option, threads_option

#: click type of an option whose choices are its TrainConfig field's ``Literal``
CHOICE = "choice"

# (option or (option, alias...), TrainConfig field, click type, help); booleans become
# --x/--no-x flags. Each help ends with the field's default in [brackets], from
# cryolatent.config (tests/test_config.py checks them and the choices).
_OPTIONS = [
    ("--model", "model", CHOICE, "Model to train"),
    ("--rotations", "rotations", CHOICE,
     "TARGET-VAE: discrete rotations of the P_r group convolution"),
    ("--z-dim", "z_dim", int, "Latent dimension"),
    ("--epochs", "epochs", int, "Maximum number of epochs"),
    ("--batch-size", "batch_size", int, "Images per step, over all processes under torchrun"),
    ("--lr", "lr", float, "AdamW learning rate"),
    ("--weight-decay", "weight_decay", float, "AdamW (decoupled) weight decay"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--seed", "seed", int, "Random seed (split, initialisation, sampling)"),
    ("--val-fraction", "val_fraction", float, "Share of particles held out"),
    ("--lr-patience", "lr_patience", int, "Epochs without improvement before lr drops"),
    ("--lr-factor", "lr_factor", float, "Learning-rate drop factor"),
    ("--early-stop", "early_stop", int, "Stop after N epochs without improvement, 0 never"),
    ("--kl-warmup", "kl_warmup", float,
     "TARGET-VAE: epochs over which the weight of the latent's KL rises from 0 to 1"),
    ("--kl-free-bits", "kl_free_bits", float,
     "TARGET-VAE: nats per latent dimension below which its KL is not penalised in "
     "training (free bits)"),
    ("--converge-window", "converge_window", int,
     "Convergence test over the last N epochs (see --converge-tol)"),
    ("--converge-tol", "converge_tol", float,
     "Stop when the validation loss fell over the last --converge-window epochs by less than "
     "this share of its fall since epoch 1; 0 never (--epochs caps the run)"),
    ("--amp", "amp", CHOICE,
     "Mixed precision: auto = bf16 autocast on CUDA and on CPUs with hardware bf16 (AMX, "
     "AVX512-BF16); off = float32"),
    ("--compile", "compile", bool, "torch.compile the loss"),
    ("--num-workers", "num_workers", int, "Reader processes for sets too large for memory"),
    ("--ctf", "ctf", bool, "Put each particle's CTF in the likelihood (Gaussian)"),
    ("--enc-channels", "enc_channels", int, "TARGET-VAE group-conv filters"),
    ("--kernel", "kernel", int, "TARGET-VAE group-conv kernel px"),
    ("--enc-layers", "enc_layers", int, "TARGET-VAE 1x1 group-conv layers"),
    ("--gen-width", "gen_width", int, "TARGET-VAE generator width"),
    ("--gen-layers", "gen_layers", int, "TARGET-VAE generator hidden layers"),
    ("--gen-fourier-features", "gen_fourier_features", int,
     "TARGET-VAE random Fourier features of the generator's coordinates"),
    ("--gen-fourier-sigma", "gen_fourier_sigma", float,
     "TARGET-VAE Fourier-feature sd, cycles/pixel"),
    ("--rotation-prior", "rotation_prior", CHOICE,
     "TARGET-VAE prior over the discrete rotations"),
    ("--rotation-prior-sd", "rotation_prior_sd", float,
     "SD in degrees of the normal rotation prior"),
    ("--translation-prior", "translation_prior", float,
     "SD of the translation prior in px of the training images (so its value in Å follows "
     "their pixel size: see --translation-prior-angst)"),
    ("--translation-prior-angst", "translation_prior_angst", float,
     "SD of the translation prior in Å; converted to px of the training images (replaces "
     "--translation-prior)"),
    ("--translation-range", "translation_range", int,
     "TARGET-VAE max |shift| on the grid, px of the training images (see "
     "--translation-range-angst)"),
    ("--translation-range-angst", "translation_range_angst", float,
     "TARGET-VAE max |shift| on the grid in Å; converted to px of the training images, "
     "rounded up (replaces --translation-range)"),
    ("--likelihood", "likelihood", CHOICE,
     "auto: Bernoulli for images in [0, 1] without CTF, else Gaussian"),
    ("--learn-sigma", "learn_sigma", bool, "Gaussian likelihood: learned per-pixel SD"),
    ("--mask", "mask", bool, "Likelihood only inside a circle (see --mask-diameter)"),
    ("--mask-diameter", "mask_diameter", float, "TARGET-VAE: diameter of that circle in px "
     "of the training images; turns the mask on (see --particle-diameter for Å)"),
    ("--particle-diameter", "particle_diameter", float,
     "Å, as RELION's mask diameter: TARGET-VAE scores the likelihood inside this circle "
     "only (replaces --mask-diameter)"),
    ("--gumbel-tau", "gumbel_tau", float, "TARGET-VAE Gumbel-softmax temperature"),
    ("--subpixel", "subpixel", bool,
     "TARGET-VAE: sub-pixel offset inside each translation cell"),
    ("--pixel-fraction", "pixel_fraction", float,
     "Share of the likelihood's pixels each training step renders and scores, a "
     "new random draw per step, scaled so the loss stays unbiased; validation and embed use "
     "all pixels. Must be 1 with the CTF"),
    ("--recentre", "recentre", bool,
     "TARGET-VAE: report poses about the generated object's centre of mass"),
    ("--enc-width", "enc_width", int, "IRL-INR ResNet-18 base width"),
    ("--hyper-width", "hyper_width", int, "IRL-INR hypernetwork width"),
    ("--hyper-layers", "hyper_layers", int, "IRL-INR hypernetwork layers"),
    ("--inr-width", "inr_width", int, "IRL-INR implicit network width"),
    ("--inr-layers", "inr_layers", int, "IRL-INR implicit network layers"),
    ("--inr-fourier-features", "inr_fourier_features", int,
     "IRL-INR random Fourier features of the INR's coordinates"),
    (("--inr-fourier-sigma", "--fourier-sigma"), "inr_fourier_sigma", float,
     "IRL-INR Fourier-feature SD, cycles per half box (--fourier-sigma: the old name)"),
    ("--fourier-features", "fourier_features", int,
     "Old name: sets --gen-fourier-features and --inr-fourier-features (those win when "
     "given too)"),
    ("--lambda-recon", "lambda_recon", float, "IRL-INR reconstruction weight"),
    ("--lambda-consistency", "lambda_consistency", float, "IRL-INR consistency weight"),
    ("--lambda-symmetry", "lambda_symmetry", float, "IRL-INR symmetry weight"),
    ("--consistency-loss", "consistency_loss", CHOICE,
     "IRL-INR consistency loss between the two views' z: mse (as the paper's sec. 4.2) or "
     "cosine (its SCAN setting)"),
    ("--rotation-rule", "rotation_rule", CHOICE, "IRL-INR canonical rotation rule"),
]

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
    """One click option per :data:`_OPTIONS` row: default None (not given: the run's
    configuration decides), help ending with the configuration's default."""
    for opt, field, typ, helptext in reversed(_OPTIONS):
        opts = (opt,) if isinstance(opt, str) else tuple(opt)
        helptext = f"{helptext} [{default_text(field)}]."
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
@force_option
@threads_option
@_add_options
@click.pass_context
def command(ctx, input, outdir, datadir, resume, force, **opts):
    """Train TARGET-VAE or IRL-INR on INPUT (.star, .cs or .mrcs).

    --force starts a new run in a used RUNDIR: its config.json, log.csv, run.log,
    summary.json and checkpoints/ are deleted first (a folder holding anything else is
    refused).
    """
    from ..launch import is_main_process, train_from_options

    rundir = train_from_options(input, outdir, given_options(ctx, opts), resume=resume,
                                force=force, datadir=datadir)
    if is_main_process():  # under torchrun: rank 0 only
        click.echo(str(rundir))


def given_options(ctx: click.Context, opts: dict) -> dict:
    """The TrainConfig options (and ``threads``) given on the command line, typed."""
    given = {k: v for k, v in opts.items()
             if ctx.get_parameter_source(k) != ParameterSource.DEFAULT and v is not None}
    if "rotations" in given:
        given["rotations"] = int(given["rotations"])
    return given


def parse_options(args: list[str]) -> dict:
    """The options given in ``args``, written as ``train``'s (e.g. ``["--z-dim", "4"]``: a
    RELION job's --train-args), as :func:`cryolatent.launch.train_from_options` takes them."""
    ctx = command.make_context("train", ["INPUT", "-o", "RUNDIR", *args])
    return given_options(ctx, {k: v for k, v in ctx.params.items()
                               if k not in ("input", "outdir", "datadir", "resume", "force")})
