"""The typed training configuration, saved as ``RUNDIR/config.json`` and inside checkpoints.

One class per model holds that model's options, with their defaults and choices
(:class:`TargetVAEConfig`, :class:`IRLINRConfig`; the models are built as ``Model(box, cfg)``);
:class:`TrainConfig` adds the options every run shares (data, optimisation, stopping) and
inherits both models' fields, so that ``config.json`` stays one flat table (an old run
folder's loads as it is: :meth:`TrainConfig.from_dict` maps the renamed options) and every
option stays ``cfg.name``. The CLI's options are checked against these classes
(``tests/test_config.py``). Only plain types (str, int, float, bool, None, lists) appear, so
checkpoints load with ``torch.load(weights_only=True)``.

Renamed options (the old names still work in the CLI, in ``TrainConfig(...)``, as model
keywords and in old ``config.json`` files): ``fourier_features`` (one count for both models)
is now ``gen_fourier_features`` (TARGET-VAE's generator) and ``inr_fourier_features``
(IRL-INR's INR); ``fourier_sigma`` (IRL-INR's, in cycles per half box) is
``inr_fourier_sigma``; ``gen_fourier_sigma`` (TARGET-VAE's, cycles per pixel) is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import CryolatentError


#: model sizes of the papers (TARGET-VAE encoder filters, generator width, Fourier features)
PAPER_SIZES = {"enc_channels": 128, "gen_width": 512, "gen_fourier_features": 256}
#: optimiser settings per model (the papers'), where not given
MODEL_OPTIM = {"target-vae": {"lr": 2e-4, "batch_size": 100, "weight_decay": 0.0},
               "irl-inr": {"lr": 1e-4, "batch_size": 128, "weight_decay": 5e-4}}
#: TARGET-VAE on cryo-EM particle sets (CTF parameters present), where not given: at SNR ~0.1
#: the paper's batch 100 and lr 2e-4 leave the latent unused for many epochs; smaller batches
#: (more steps per epoch), a sharper Gumbel-softmax and a KL warm-up on z let it learn the
#: classes (benchmarks/README.md, cryo-EM benchmark)
CRYO_TARGET_VAE = {"z_dim": 8, "lr": 1e-3, "batch_size": 32, "weight_decay": 0.0, "gumbel_tau": 0.5,
                   "kl_warmup": 5.0, "kl_free_bits": 0.0}
#: Both models without CTF, boxes >= 48 px: share of the pixels each training step renders
#: and scores (benchmarks/README.md, "Training cost per particle": the generator is most of a
#: step; quality at equal wall time on MNIST(U) in the same section)
PIXEL_FRACTION = 0.25
#: TARGET-VAE sizes chosen on the CPU when left to "auto" (benchmarks/README.md: cryo-EM
#: benchmark against RELION)
CPU_SIZES = {"enc_channels": 64, "gen_width": 128, "gen_fourier_features": 64}
#: IRL-INR's sizes in the paper (ResNet-18 base width, hypernetwork, INR), taken on a GPU
IRL_PAPER_SIZES = {"enc_width": 64, "hyper_width": 256, "hyper_layers": 3, "inr_width": 256,
                   "inr_layers": 3, "inr_fourier_features": 256}
#: IRL-INR on the CPU, where not given: the paper's sizes train at ~13 images/s there (bf16,
#: 32 px), so a 10-CPU-minute budget is ~60 steps at its lr 1e-4 and nothing is learned; these
#: (~240 images/s) learn poses and classes of a centred 3-class set in ~3 CPU-min
#: (benchmarks/README.md, "IRL-INR on centred particles (issue 15.4)")
IRL_CPU = {"enc_width": 8, "hyper_width": 64, "hyper_layers": 2, "inr_width": 32,
           "inr_layers": 2, "inr_fourier_features": 32, "lr": 1e-3, "batch_size": 64}


class _ModelConfig:
    """What both model configurations share: building one from another configuration (a
    :class:`TrainConfig`) and keyword options, old option names included."""

    #: old option name -> this model's field
    ALIASES: ClassVar[dict[str, str]] = {}

    @classmethod
    def of(cls, cfg=None, **options):
        """This model's configuration: the fields of ``cfg`` (any object that has them, e.g.
        a :class:`TrainConfig`; None: the defaults), then ``options`` (field names or
        :attr:`ALIASES`). An unknown option raises TypeError."""
        names = [f.name for f in dataclasses.fields(cls)]
        vals = {n: getattr(cfg, n) for n in names if cfg is not None and hasattr(cfg, n)}
        for k, v in options.items():
            k = cls.ALIASES.get(k, k)
            if k not in names:
                raise TypeError(f"{cls.__name__}: unknown option {k!r}")
            vals[k] = v
        return cls(**vals)


@dataclass
class TargetVAEConfig(_ModelConfig):
    """TARGET-VAE's options (:class:`cryolatent.models.target_vae.TargetVAE`). ``None``: chosen
    from the data and the device by :meth:`TrainConfig.resolve_defaults`; a model built from
    a configuration that was not resolved takes the paper's values."""

    ALIASES: ClassVar[dict[str, str]] = {"fourier_features": "gen_fourier_features",
                                         "fourier_sigma": "gen_fourier_sigma"}

    z_dim: int | None = None          # latent dimension (None: 2, the papers' MNIST setting;
                                      #   TARGET-VAE on cryo-EM sets 8)
    ctf: bool | None = None           # put each particle's CTF in the likelihood (None: on when
                                      #   the particle set has CTF parameters)
    likelihood: Literal["auto", "bernoulli", "gaussian"] = "auto"
    mask: bool | None = None          # likelihood only inside the circle of diameter box
                                      #   (None: on for cryo-EM sets, off otherwise)
    mask_diameter: float | None = None  # TARGET-VAE: that circle's diameter, px of the training
                                      #   images (None: the box; train --particle-diameter Å)
    rotations: Literal[4, 8, 16] = 8  # P_r group
    enc_channels: int | None = None   # kernels of the group convolution (None: 128, the
                                      #   paper's, on a GPU; 64 on the CPU)
    kernel: int | None = None         # group-conv kernel size (None: derived from the box)
    enc_layers: int = 3               # 1x1 group convolutions after the first layer
    gen_width: int | None = None      # generator width (None: 512 on a GPU, 128 on the CPU)
    gen_layers: int = 2
    gen_fourier_features: int | None = None  # random Fourier features of the generator's
                                      #   coordinates (None: 256, the paper's; 64 on the CPU)
    gen_fourier_sigma: float = 0.05   # their sd, cycles/pixel
    rotation_prior: Literal["uniform", "normal"] = "uniform"
    rotation_prior_sd: float = 45.0   # degrees, for rotation_prior == "normal"
    translation_prior: float | None = None  # sigma_t of p(t), px of the training images
                                      #   (None: cryo-EM sets T/2, other sets 5 px)
    translation_range: int | None = None  # |t| px covered by the translation grid (None:
                                      #   cryo-EM sets round(0.15 box); other sets
                                      #   min(box//2, ceil(4 * translation_prior)))
    learn_sigma: bool = False         # Gaussian likelihood: learned per-pixel scale
    gumbel_tau: float | None = None   # Gumbel-softmax temperature over (t, r) (None: 1, the
                                      #   paper's; cryo-EM sets 0.5)
    kl_warmup: float | None = None    # epochs over which the weight of KL_z rises 0 -> 1
                                      #   (None: 0, cryo-EM sets 5)
    kl_free_bits: float | None = None # nats per latent dimension below which its KL is not
                                      #   penalised in training (None: 0, off)
    subpixel: bool = False            # sub-pixel offset within each translation cell
    pixel_fraction: float | None = None  # training steps render and score this share of the
                                      #   likelihood's pixels, a fresh uniform draw each step,
                                      #   scaled to an unbiased estimate (None: 0.25 for boxes
                                      #   >= 48 px without CTF, else 1; with CTF always 1)
    recentre: bool = True             # report poses about the generated object's centre of mass


@dataclass
class IRLINRConfig(_ModelConfig):
    """IRL-INR's options (:class:`cryolatent.models.irl_inr.IRLINR`)."""

    ALIASES: ClassVar[dict[str, str]] = {"fourier_features": "inr_fourier_features",
                                         "fourier_sigma": "inr_fourier_sigma"}

    z_dim: int | None = None          # latent dimension (None: 2)
    ctf: bool | None = None           # apply each particle's CTF to the rendering (None: on
                                      #   when the particle set has CTF parameters)
    # sizes (None: the paper's, IRL_PAPER_SIZES, on a GPU; IRL_CPU's on the CPU)
    enc_width: int | None = None      # ResNet-18 base width (paper 64)
    hyper_width: int | None = None    # (paper 256)
    hyper_layers: int | None = None   # (paper 3)
    inr_width: int | None = None      # (paper 256)
    inr_layers: int | None = None     # (paper 3)
    inr_fourier_features: int | None = None  # random Fourier features of the INR's
                                      #   coordinates (paper 256)
    inr_fourier_sigma: float = 2.0    # their sd, cycles per half box
    lambda_recon: float = 1.0
    lambda_consistency: float = 1.0
    lambda_symmetry: float = 15.0
    consistency_loss: Literal["mse", "cosine"] = "mse"   # "mse" (paper, sec. 4.2) | "cosine"
    rotation_rule: Literal["moments", "com"] = "moments"  # "moments" (ours) | "com" (paper)
    pixel_fraction: float | None = None  # training steps render this share of the pixels
                                      #   for the reconstruction loss (a fresh uniform draw,
                                      #   its mean is unbiased; None: as TARGET-VAE's)


#: ``--model`` name -> its configuration class
MODEL_CONFIGS: dict[str, type] = {"target-vae": TargetVAEConfig, "irl-inr": IRLINRConfig}


@dataclass
class RunConfig:
    """The options every run shares, whatever the model."""

    # --- data and run -----------------------------------------------------------------
    input: str = ""                   # particle set (.star / .cs / .mrcs)
    outdir: str = ""                  # run folder
    datadir: str | None = None        # where relative stack paths are looked up
    model: Literal["target-vae", "irl-inr"] = "target-vae"
    seed: int = 0
    device: str = "auto"              # "auto" | "cpu" | "cuda" | "cuda:N"
    command: str = ""                 # the command line that made the run
    preprocessing: dict[str, Any] | None = None  # what the training images are, relative to
                                      #   the original particles (written by train:
                                      #   cryolatent.preprocess.Preprocessing.to_dict())

    # --- optimisation -------------------------------------------------------------------
    epochs: int = 100
    batch_size: int | None = None     # None: the model's (MODEL_OPTIM), or CRYO_TARGET_VAE
    lr: float | None = None           # None: as batch_size
    weight_decay: float | None = None # None: as batch_size
    val_fraction: float = 0.1         # held-out share for the validation loss
    lr_patience: int = 10             # ReduceLROnPlateau: epochs without improvement
    lr_factor: float = 0.5
    early_stop: int = 20              # stop after this many epochs without improvement (0: never)
    converge_window: int = 5          # convergence: stop when, over this many epochs, the best
    converge_tol: float = 0.01        #   validation loss fell by less than converge_tol x its
                                      #   whole fall since epoch 1 (0: never; --epochs caps)
    amp: Literal["auto", "bf16", "off"] = "auto"  # "auto": bf16 on CUDA and AMX/AVX512-BF16 CPUs
    compile: bool = False             # torch.compile the model's loss
    num_workers: int = 2              # data-loading worker processes (out-of-core sets)
    threads: int | None = None        # CPU threads (None: leave the process's setting; the
                                      #   CLI passes -j, default the cores it may use)

    extra: dict[str, Any] = field(default_factory=dict)  # forward-compatible free options


def literal_choices(cls: type, name: str) -> tuple | None:
    """The allowed values of field ``name`` of the dataclass ``cls`` when its type is a
    ``Literal`` (possibly ``| None``), else None."""
    hint = _hints(cls).get(name)
    for t in (hint, *typing.get_args(hint)):
        if typing.get_origin(t) is Literal:
            return typing.get_args(t)
    return None


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


@dataclass
class TrainConfig(IRLINRConfig, TargetVAEConfig, RunConfig):
    """Every option of ``cryolatent train``: :class:`RunConfig`'s, then each model's
    (:class:`TargetVAEConfig`, :class:`IRLINRConfig`; :meth:`model_config` is the running
    model's), and the old names ``fourier_features`` / ``fourier_sigma`` as input only."""

    # the old names (module docstring), for old scripts (benchmarks list the fields as
    # options): given, they go to the new fields still at their defaults and are cleared
    # (:meth:`apply_old_names`, run on construction, by validate() and by the CLI)
    fourier_features: int | None = None   # gen_fourier_features and inr_fourier_features
    fourier_sigma: float | None = None    # inr_fourier_sigma

    def __post_init__(self) -> None:
        self.apply_old_names()

    def apply_old_names(self) -> "TrainConfig":
        """Move ``fourier_features`` / ``fourier_sigma`` (old names) onto the new fields that
        are still at their defaults (so the new names win when both are given); clear them."""
        default = {f.name: f.default for f in dataclasses.fields(self)}
        if self.fourier_features is not None:
            for name in ("gen_fourier_features", "inr_fourier_features"):
                if getattr(self, name) == default[name]:
                    setattr(self, name, self.fourier_features)
            self.fourier_features = None
        if self.fourier_sigma is not None:
            if self.inr_fourier_sigma == default["inr_fourier_sigma"]:
                self.inr_fourier_sigma = self.fourier_sigma
            self.fourier_sigma = None
        return self

    def model_config(self):
        """The running model's configuration (:data:`MODEL_CONFIGS`), a copy."""
        return MODEL_CONFIGS[self.model].of(self)

    # -------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise CryolatentError naming the first bad option."""
        from .models import MODELS

        self.apply_old_names()
        if self.model not in MODELS:
            raise CryolatentError(f"--model {self.model!r}: choose from {', '.join(MODELS)}")
        if self.rotations not in (4, 8, 16):
            raise CryolatentError(f"--rotations {self.rotations}: must be 4, 8 or 16")
        for name in ("epochs", "batch_size", "z_dim", "enc_channels", "gen_width",
                     "gen_layers", "enc_width", "hyper_width", "inr_width",
                     "gen_fourier_features", "inr_fourier_features"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CryolatentError(f"--{name.replace('_', '-')} must be >= 1")
        if not (0.0 <= self.val_fraction < 1.0):
            raise CryolatentError("--val-fraction must be in [0, 1)")
        for name, lo, strict in (("converge_window", 1, False), ("converge_tol", 0, False),
                                 ("kl_warmup", 0, False), ("kl_free_bits", 0, False),
                                 ("gumbel_tau", 0, True)):
            v = getattr(self, name)
            if v is not None and (v <= lo if strict else v < lo):
                raise CryolatentError(f"--{name.replace('_', '-')} {v}: must be "
                                      f"{'>' if strict else '>='} {lo}")
        if self.lr is not None and self.lr <= 0:
            raise CryolatentError("--lr must be > 0")
        if self.pixel_fraction is not None and not (0 < self.pixel_fraction <= 1):
            raise CryolatentError(f"--pixel-fraction {self.pixel_fraction}: must be in (0, 1]")
        if self.kernel is not None and self.kernel < 1:
            raise CryolatentError("--kernel must be >= 1")
        for f in dataclasses.fields(self):      # the Literal choices of the classes
            allowed = literal_choices(type(self), f.name)
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise CryolatentError(
                    f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: choose from "
                    + ", ".join(map(str, allowed)))
        return self

    def resolve_defaults(self, box: int, has_ctf: bool, device_type: str = "cpu") -> list[str]:
        """Fill the options left ``None`` ("auto") from the data and the device, in place.

        box: the training images' box (px); has_ctf: whether the set carries CTF parameters
        (then it is taken as a cryo-EM particle set); device_type: "cpu" or "cuda". Returns
        one note per decision, for the run log. See :data:`PAPER_SIZES`, :data:`CPU_SIZES`.
        """
        notes = []
        if self.ctf is None:
            self.ctf = bool(has_ctf) and self.likelihood != "bernoulli"
            if self.ctf:
                notes.append("CTF in the likelihood: on (the set has CTF parameters)")
        sizes = PAPER_SIZES if device_type == "cuda" else CPU_SIZES
        for name, value in sizes.items() if self.model == "target-vae" else ():
            if getattr(self, name) is None:
                setattr(self, name, value)
                notes.append(f"{name.replace('_', '-')} {value} ("
                             + ("the paper's" if value == PAPER_SIZES[name]
                                else f"CPU size; the paper's {PAPER_SIZES[name]} on a GPU")
                             + ")")
        if self.model == "irl-inr":
            irl = IRL_PAPER_SIZES if device_type == "cuda" else IRL_CPU
            chosen = [f"{k.replace('_', '-')} {v:g}" for k, v in irl.items()
                      if getattr(self, k) is None]
            for k, v in irl.items():
                if getattr(self, k) is None:
                    setattr(self, k, v)
            if chosen:
                notes.append(", ".join(chosen) + (" (the paper's)" if device_type == "cuda"
                                                  else " (IRL-INR CPU settings)"))
        cryo_tvae = self.model == "target-vae" and bool(has_ctf)
        table = dict(MODEL_OPTIM.get(self.model, MODEL_OPTIM["target-vae"]))
        table.update({"gumbel_tau": 1.0, "kl_warmup": 0.0, "kl_free_bits": 0.0, "z_dim": 2})
        if cryo_tvae:
            table.update(CRYO_TARGET_VAE)
        chosen = []
        for name, value in table.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
                chosen.append(f"{name} {value:g}")
        if chosen:
            notes.append(("cryo-EM TARGET-VAE settings: " if cryo_tvae else "")
                         + ", ".join(chosen))
        if self.model == "target-vae":
            cryo = bool(has_ctf)
            if self.translation_range is None and cryo:
                self.translation_range = max(3, round(0.15 * box))
                notes.append(f"translation search +-{self.translation_range} px (0.15 box)")
            if self.translation_prior is None:
                self.translation_prior = (max(1.0, self.translation_range / 2) if cryo
                                          else 5.0)
            if self.mask is None:
                self.mask = cryo or self.mask_diameter is not None
            if self.mask_diameter is not None and not 0 < self.mask_diameter <= box:
                raise CryolatentError(
                    f"--particle-diameter / --mask-diameter: {self.mask_diameter:.4g} px is "
                    f"not inside the {box}-px training box")
        elif self.mask is None:
            self.mask = False
        if self.pixel_fraction is None:
            self.pixel_fraction = PIXEL_FRACTION if (box >= 48 and not self.ctf) else 1.0
            if self.pixel_fraction < 1:
                notes.append(f"training steps score a random {self.pixel_fraction:g} of "
                             "the pixels (unbiased; validation uses all)")
        elif self.pixel_fraction < 1 and self.ctf:   # given, or resolved from the data above
            raise CryolatentError("--pixel-fraction below 1 needs a likelihood without CTF "
                                  "(the CTF mixes every pixel; this run has the CTF on: "
                                  "add --no-ctf)")
        return notes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From :meth:`to_dict`'s table, or an older one (renamed options, module docstring;
        unknown keys go to ``extra``)."""
        d = dict(d)
        if "fourier_features" in d:      # one count for both models: the run's model's
            v = d.pop("fourier_features")
            if v is not None:
                d.setdefault("inr_fourier_features" if d.get("model") == "irl-inr"
                             else "gen_fourier_features", v)
        if d.get("fourier_sigma") is not None:
            d.setdefault("inr_fourier_sigma", d.pop("fourier_sigma"))
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        cfg = cls(**known)
        cfg.extra.update(extra)
        return cfg

    def save(self, path: str | Path) -> None:
        from .utils import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise CryolatentError(f"{path}: cannot read the run configuration ({e})")

