"""The typed training configuration, and the one place where its defaults are decided.

One class per model holds that model's options (:class:`TargetVAEConfig`,
:class:`IRLINRConfig`; the models are built as ``Model(box, cfg)``); :class:`RunConfig` holds
the options every run shares (data, optimisation, stopping); :class:`TrainConfig` joins them
into one flat table, ``RUNDIR/config.json``, and every option stays ``cfg.name``.

Defaults. A field whose default is a value has that value wherever it is not given. A field
whose default is ``None`` ("auto") is chosen from the data and the machine by
:func:`resolve`, and only there; :func:`default_text` says each rule in words for
``train --help`` (built from the same tables, so help and code cannot drift apart). resolve
returns a complete configuration (:func:`missing`: nothing the run's model or the training
loop reads is left ``None``) that records the cryolatent version; the models take only
complete configurations. ``config.json`` is the resolved configuration, so a run is rebuilt
from it alone. A run written before configurations were complete (no ``version``: cryolatent
0.1.0) left a few options to its model; :func:`complete_v0_1` fills them as that model did.

Only plain types (str, int, float, bool, None, lists) appear, so checkpoints load with
``torch.load(weights_only=True)``.

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
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import CryolatentError

# ============================================================================ the defaults
#: what every particle set gets where not given (the papers' settings)
PLAIN = {"gumbel_tau": 1.0, "kl_warmup": 0.0, "kl_free_bits": 0.0, "z_dim": 2}
#: optimiser settings per model (the papers'), where not given
MODEL_OPTIM = {"target-vae": {"lr": 2e-4, "batch_size": 100, "weight_decay": 0.0},
               "irl-inr": {"lr": 1e-4, "batch_size": 128, "weight_decay": 5e-4}}
#: model sizes of the papers (TARGET-VAE encoder filters, generator width, Fourier features),
#: taken on a GPU and when the machine is not known
PAPER_SIZES = {"enc_channels": 128, "gen_width": 512, "gen_fourier_features": 256}
#: TARGET-VAE sizes chosen on the CPU (benchmarks/README.md: cryo-EM benchmark against RELION)
CPU_SIZES = {"enc_channels": 64, "gen_width": 128, "gen_fourier_features": 64}
#: TARGET-VAE on cryo-EM particle sets (CTF parameters present), where not given: at SNR ~0.1
#: the paper's batch 100 and lr 2e-4 leave the latent unused for many epochs; smaller batches
#: (more steps per epoch), a sharper Gumbel-softmax and a KL warm-up on z let it learn the
#: classes (benchmarks/README.md, cryo-EM benchmark)
CRYO_TARGET_VAE = {"z_dim": 8, "lr": 1e-3, "batch_size": 32, "weight_decay": 0.0, "gumbel_tau": 0.5,
                   "kl_warmup": 5.0, "kl_free_bits": 0.0}
#: IRL-INR's sizes in the paper (ResNet-18 base width, hypernetwork, INR), taken on a GPU and
#: when the machine is not known
IRL_PAPER_SIZES = {"enc_width": 64, "hyper_width": 256, "hyper_layers": 3, "inr_width": 256,
                   "inr_layers": 3, "inr_fourier_features": 256}
#: IRL-INR on the CPU, where not given: the paper's sizes train at ~13 images/s there (bf16,
#: 32 px), so a 10-CPU-minute budget is ~60 steps at its lr 1e-4 and nothing is learned; these
#: (~240 images/s) learn poses and classes of a centred 3-class set in ~3 CPU-min
#: (benchmarks/README.md, "IRL-INR on centred particles (issue 15.4)")
IRL_CPU = {"enc_width": 8, "hyper_width": 64, "hyper_layers": 2, "inr_width": 32,
           "inr_layers": 2, "inr_fourier_features": 32, "lr": 1e-3, "batch_size": 64}
#: TARGET-VAE's translation prior sd (px) on sets without CTF parameters (the paper's MNIST(U))
PLAIN_TRANSLATION_PRIOR = 5.0
#: TARGET-VAE on cryo-EM sets: the translation grid covers +-this share of the box (at least
#: CRYO_MIN_RANGE px); the prior's sd is half of it (at least 1 px)
CRYO_TRANSLATION = 0.15
CRYO_MIN_RANGE = 3
#: TARGET-VAE's group-conv kernel: the smallest odd size >= this share of the box (at least 3)
KERNEL_SHARE = 0.6
#: Both models without CTF, boxes >= PIXEL_FRACTION_MIN_BOX px: share of the pixels each
#: training step renders and scores (benchmarks/README.md, "Training cost per particle": the
#: generator is most of a step; quality at equal wall time on MNIST(U) in the same section)
PIXEL_FRACTION = 0.25
PIXEL_FRACTION_MIN_BOX = 48


def default_kernel(box: int) -> int:
    """Smallest odd integer >= KERNEL_SHARE * box (at least 3)."""
    k = max(3, math.ceil(KERNEL_SHARE * box))
    return k if k % 2 else k + 1


def default_translation_range(box: int, sigma_t: float) -> int:
    """min(box//2, ceil(4 sigma_t)) pixels (at least 1 unless box//2 is 0)."""
    return int(min(box // 2, max(1, math.ceil(4 * sigma_t))))


# ============================================================================ the options
class _ModelConfig:
    """What both model configurations share: building one from another configuration (a
    :class:`TrainConfig`) and keyword options, old option names included."""

    #: old option name -> this model's field
    ALIASES: ClassVar[dict[str, str]] = {}

    @classmethod
    def of(cls, cfg=None, **options):
        """This model's configuration: the fields of ``cfg`` (any object that has them, e.g.
        a :class:`TrainConfig`; None: the class defaults), then ``options`` (field names or
        :attr:`ALIASES`). An unknown option raises TypeError."""
        names = [f.name for f in dataclasses.fields(cls)]
        vals = {n: getattr(cfg, n) for n in names if cfg is not None and hasattr(cfg, n)}
        for k, v in options.items():
            k = cls.ALIASES.get(k, k)
            if k not in names:
                raise TypeError(f"{cls.__name__}: unknown option {k!r}")
            vals[k] = v
        return cls(**vals)

    def require_complete(self, model: str) -> None:
        """ValueError naming the options left None (or "auto"): a model takes only values
        (:func:`resolve` chooses the rest)."""
        left = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None]
        if getattr(self, "likelihood", None) == "auto":
            left.append("likelihood")
        if left:
            raise ValueError(f"{model}: {', '.join(left)} not given; resolve the configuration "
                             "first (cryolatent.config.resolve, or build the model with "
                             "cryolatent.models.build_model)")


@dataclass
class TargetVAEConfig(_ModelConfig):
    """TARGET-VAE's options (:class:`cryolatent.models.target_vae.TargetVAE`). ``None``:
    chosen by :func:`resolve` (:func:`default_text` has each rule)."""

    ALIASES: ClassVar[dict[str, str]] = {"fourier_features": "gen_fourier_features",
                                         "fourier_sigma": "gen_fourier_sigma"}

    z_dim: int | None = None          # latent dimension
    ctf: bool | None = None           # put each particle's CTF in the likelihood
    likelihood: Literal["auto", "bernoulli", "gaussian"] = "auto"
    mask: bool | None = None          # likelihood only inside a circle (of mask_diameter)
    mask_diameter: float | None = None  # that circle's diameter, px of the training images
    rotations: Literal[4, 8, 16] = 8  # P_r group
    enc_channels: int | None = None   # kernels of the group convolution
    kernel: int | None = None         # group-conv kernel size, px (odd)
    enc_layers: int = 3               # 1x1 group convolutions after the first layer
    gen_width: int | None = None      # generator width
    gen_layers: int = 2
    gen_fourier_features: int | None = None  # random Fourier features of the generator's
                                      #   coordinates
    gen_fourier_sigma: float = 0.05   # their sd, cycles/pixel
    rotation_prior: Literal["uniform", "normal"] = "uniform"
    rotation_prior_sd: float = 45.0   # degrees, for rotation_prior == "normal"
    translation_prior: float | None = None  # sigma_t of p(t), px of the training images
    translation_range: int | None = None  # |t| px covered by the translation grid
    learn_sigma: bool = False         # Gaussian likelihood: learned per-pixel scale
    gumbel_tau: float | None = None   # Gumbel-softmax temperature over (t, r)
    kl_warmup: float | None = None    # epochs over which the weight of KL_z rises 0 -> 1
    kl_free_bits: float | None = None # nats per latent dimension below which its KL is not
                                      #   penalised in training
    subpixel: bool = False            # sub-pixel offset within each translation cell
    pixel_fraction: float | None = None  # training steps render and score this share of the
                                      #   likelihood's pixels, a fresh uniform draw each step,
                                      #   scaled to an unbiased estimate (1 with the CTF)
    recentre: bool = True             # report poses about the generated object's centre of mass


@dataclass
class IRLINRConfig(_ModelConfig):
    """IRL-INR's options (:class:`cryolatent.models.irl_inr.IRLINR`). ``None``: chosen by
    :func:`resolve`."""

    ALIASES: ClassVar[dict[str, str]] = {"fourier_features": "inr_fourier_features",
                                         "fourier_sigma": "inr_fourier_sigma"}

    z_dim: int | None = None          # latent dimension
    ctf: bool | None = None           # apply each particle's CTF to the rendering
    enc_width: int | None = None      # ResNet-18 base width
    hyper_width: int | None = None
    hyper_layers: int | None = None
    inr_width: int | None = None
    inr_layers: int | None = None
    inr_fourier_features: int | None = None  # random Fourier features of the INR's
                                      #   coordinates
    inr_fourier_sigma: float = 2.0    # their sd, cycles per half box
    lambda_recon: float = 1.0
    lambda_consistency: float = 1.0
    lambda_symmetry: float = 15.0
    consistency_loss: Literal["mse", "cosine"] = "mse"   # "mse" (paper, sec. 4.2) | "cosine"
    rotation_rule: Literal["moments", "com"] = "moments"  # "moments" (ours) | "com" (paper)
    pixel_fraction: float | None = None  # training steps render this share of the pixels
                                      #   for the reconstruction loss (a fresh uniform draw,
                                      #   its mean is unbiased)


#: ``--model`` name -> its configuration class
MODEL_CONFIGS: dict[str, type] = {"target-vae": TargetVAEConfig, "irl-inr": IRLINRConfig}


@dataclass
class RunConfig:
    """The options every run shares, whatever the model."""

    # --- data and run -----------------------------------------------------------------
    input: str = ""                   # particle set (.star / .cs / .mrcs)
    outdir: str = ""                  # run folder
    datadir: str | None = None        # where relative stack paths are looked up (None: none
                                      #   given)
    model: Literal["target-vae", "irl-inr"] = "target-vae"
    seed: int = 0
    device: str = "auto"              # "auto" | "cpu" | "cuda" | "cuda:N"
    command: str = ""                 # the command line that made the run
    preprocessing: dict[str, Any] | None = None  # what the training images are, relative to
                                      #   the original particles (written by train:
                                      #   cryolatent.preprocess.Preprocessing.to_dict())
    version: str | None = None        # the cryolatent that resolved this configuration
                                      #   (None: older than recorded versions, 0.1.0)

    # --- optimisation -------------------------------------------------------------------
    epochs: int = 100
    batch_size: int | None = None     # images per step (global under torchrun)
    lr: float | None = None           # AdamW learning rate
    weight_decay: float | None = None # AdamW (decoupled) weight decay
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
    threads: int | None = None        # CPU threads (None: leave the process's setting;
                                      #   cryolatent.launch sets its default per process)

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


#: TrainConfig fields that are input only: options in Å (:func:`resolve` turns them into the
#: px options of the training images, and they stay as a record) and the old names
INPUT_ONLY = ("translation_prior_angst", "translation_range_angst", "particle_diameter",
              "fourier_features", "fourier_sigma")
#: RunConfig fields that a complete configuration may leave None (see their comments)
MAY_BE_NONE = ("datadir", "threads", "preprocessing", "version")


@dataclass
class TrainConfig(IRLINRConfig, TargetVAEConfig, RunConfig):
    """Every option of ``cryolatent train``: :class:`RunConfig`'s, then each model's
    (:class:`TargetVAEConfig`, :class:`IRLINRConfig`; :meth:`model_config` is the running
    model's), and the :data:`INPUT_ONLY` options."""

    # TARGET-VAE's translation prior, translation range and likelihood disc in Å, converted
    # by resolve() with the particles' pixel size (each replaces the px option)
    translation_prior_angst: float | None = None
    translation_range_angst: float | None = None   # rounded up to whole px
    particle_diameter: float | None = None     # Å, as RELION's mask diameter (the mask on)
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

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "TrainConfig":
        """A new run's configuration from the options given (field names; old names and the
        Å options included): an Å option replaces its px option."""
        options = dict(options)
        for angst, px in (("translation_prior_angst", "translation_prior"),
                          ("translation_range_angst", "translation_range"),
                          ("particle_diameter", "mask_diameter")):
            if options.get(angst) is not None:
                options.pop(px, None)
        return cls(**options)

    # -------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise CryolatentError naming the first bad option."""
        self.apply_old_names()
        if self.model not in MODEL_CONFIGS:
            raise CryolatentError(f"--model {self.model!r}: choose from "
                                  f"{', '.join(MODEL_CONFIGS)}")
        if self.rotations not in (4, 8, 16):
            raise CryolatentError(f"--rotations {self.rotations}: must be 4, 8 or 16")
        for name in ("epochs", "batch_size", "z_dim", "enc_channels", "gen_width",
                     "gen_layers", "enc_width", "hyper_width", "inr_width",
                     "gen_fourier_features", "inr_fourier_features", "kernel"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CryolatentError(f"--{name.replace('_', '-')} must be >= 1")
        if not (0.0 <= self.val_fraction < 1.0):
            raise CryolatentError("--val-fraction must be in [0, 1)")
        for name, lo, strict in (("converge_window", 1, False), ("converge_tol", 0, False),
                                 ("kl_warmup", 0, False), ("kl_free_bits", 0, False),
                                 ("gumbel_tau", 0, True), ("translation_prior_angst", 0, True),
                                 ("translation_range_angst", 0, True),
                                 ("particle_diameter", 0, True)):
            v = getattr(self, name)
            if v is not None and (v <= lo if strict else v < lo):
                raise CryolatentError(f"--{name.replace('_', '-')} {v}: must be "
                                      f"{'>' if strict else '>='} {lo}")
        if self.lr is not None and self.lr <= 0:
            raise CryolatentError("--lr must be > 0")
        if self.pixel_fraction is not None and not (0 < self.pixel_fraction <= 1):
            raise CryolatentError(f"--pixel-fraction {self.pixel_fraction}: must be in (0, 1]")
        for f in dataclasses.fields(self):      # the Literal choices of the classes
            allowed = literal_choices(type(self), f.name)
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise CryolatentError(
                    f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: choose from "
                    + ", ".join(map(str, allowed)))
        return self

    def resolve_defaults(self, box: int, has_ctf: bool, device_type: str = "cpu") -> list[str]:
        """:func:`resolve` in place, for a particle set of ``box`` px with or without CTF
        parameters (pixel values not known) on ``device_type``; returns its notes."""
        done, notes = resolve(self, box, DataFacts(has_ctf=has_ctf), device_type)
        self.__dict__.update(done.__dict__)
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


# ============================================================================ resolve
@dataclass(frozen=True)
class DataFacts:
    """What :func:`resolve` knows of the training images besides their box."""

    has_ctf: bool = False             # the set carries CTF parameters (a cryo-EM particle set)
    value_range: tuple[float, float] | None = None  # (min, max) pixel values of a sample
    apix: float | None = None         # Å per px (the median over optics groups)


def resolve(cfg: TrainConfig, box: int, data: DataFacts | None = None,
            device_type: str | None = None) -> tuple[TrainConfig, list[str]]:
    """The complete configuration for ``box``-px training images: every option left None
    (or ``likelihood "auto"``) chosen from the data and the machine, as
    :func:`default_text` states. Returns ``(a new TrainConfig, notes)``: one note per
    decision, for the run log. Options given are kept; resolving twice changes nothing.

    data: what is known of the images (None: nothing: no CTF, unknown pixel values, all
    pixels scored: the papers' model); device_type: "cpu" or "cuda" (None: not known: the
    papers' sizes). A CryolatentError names an option that contradicts the data or another.
    """
    from . import __version__

    c = TrainConfig.from_dict(cfg.to_dict())
    notes: list[str] = []
    cryo = data is not None and data.has_ctf
    tvae = c.model == "target-vae"
    _angstrom_to_px(c, data, notes)
    if c.ctf and data is not None and not data.has_ctf:
        raise CryolatentError(f"--ctf: {c.input or 'the particle set'} has no CTF parameters")
    if c.likelihood == "auto":       # Bernoulli only for images in [0, 1] without the CTF
        with_ctf = cryo if c.ctf is None else c.ctf
        vr = data.value_range if data is not None else None
        c.likelihood = ("bernoulli" if vr is not None and vr[0] >= 0.0 and vr[1] <= 1.0
                        and not with_ctf else "gaussian")
        if vr is not None:
            notes.append(f"likelihood {c.likelihood} (pixel values in [{vr[0]:.3g}, "
                         f"{vr[1]:.3g}])")
    if c.ctf is None:
        c.ctf = cryo and c.likelihood != "bernoulli"
        if c.ctf:
            notes.append("CTF in the likelihood: on (the set has CTF parameters)")
    gpu = device_type != "cpu"
    if tvae:
        _fill(c, PAPER_SIZES if gpu else CPU_SIZES, notes, lambda k, v: (
            "the paper's" if v == PAPER_SIZES[k]
            else f"CPU size; the paper's {PAPER_SIZES[k]} on a GPU"))
    else:
        irl = IRL_PAPER_SIZES if gpu else IRL_CPU
        chosen = _fill(c, irl)
        if chosen:
            notes.append(", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in chosen)
                         + (" (the paper's)" if gpu else " (IRL-INR CPU settings)"))
    cryo_tvae = tvae and cryo
    table = {**MODEL_OPTIM[c.model], **PLAIN, **(CRYO_TARGET_VAE if cryo_tvae else {})}
    chosen = _fill(c, table)
    if chosen:
        notes.append(("cryo-EM TARGET-VAE settings: " if cryo_tvae else "")
                     + ", ".join(f"{k} {v:g}" for k, v in chosen))
    if tvae:
        _resolve_tvae_grid(c, box, cryo, notes)
    elif c.mask is None:
        c.mask = False
    if c.pixel_fraction is None:
        c.pixel_fraction = (PIXEL_FRACTION if data is not None and box >= PIXEL_FRACTION_MIN_BOX
                            and not c.ctf else 1.0)
        if c.pixel_fraction < 1:
            notes.append(f"training steps score a random {c.pixel_fraction:g} of "
                         "the pixels (unbiased; validation uses all)")
    elif c.pixel_fraction < 1 and c.ctf:   # given, or resolved from the data above
        raise CryolatentError("--pixel-fraction below 1 needs a likelihood without CTF "
                              "(the CTF mixes every pixel; this run has the CTF on: "
                              "add --no-ctf)")
    if c.ctf and c.likelihood == "bernoulli":
        raise CryolatentError("--ctf needs --likelihood gaussian")
    if c.version is None:
        c.version = __version__
    return c, notes


def _fill(c: TrainConfig, table: dict, notes: list[str] | None = None, why=None
          ) -> list[tuple[str, Any]]:
    """Set the options of ``table`` that ``c`` leaves None; returns what was set (and, with
    ``notes``, adds one note per option: ``why(name, value)``)."""
    chosen = []
    for name, value in table.items():
        if getattr(c, name) is None:
            setattr(c, name, value)
            chosen.append((name, value))
            if notes is not None:
                notes.append(f"{name.replace('_', '-')} {value} ({why(name, value)})")
    return chosen


def _angstrom_to_px(c: TrainConfig, data: DataFacts | None, notes: list[str]) -> None:
    """The Å options onto the px options they replace, with the particles' pixel size (a px
    option already set, e.g. by a resumed run, is kept)."""
    todo = [(a, p) for a, p in (("translation_prior_angst", "translation_prior"),
                                ("translation_range_angst", "translation_range"),
                                ("particle_diameter", "mask_diameter"))
            if getattr(c, a) is not None and getattr(c, p) is None]
    if not todo:
        return
    apix = data.apix if data is not None else None
    if apix is None:
        raise CryolatentError(f"--{todo[0][0].replace('_', '-')}: the particles' pixel size is "
                              "not known (give the option in px of the training images)")
    for angst, px in todo:
        a = getattr(c, angst)
        if px == "translation_range":
            c.translation_range = max(1, math.ceil(a / apix - 1e-6))
            notes.append(f"--translation-range-angst {a:g} Å = {c.translation_range} px of the "
                         f"{apix:.4g} Å/px training images")
        else:
            setattr(c, px, a / apix)
            notes.append(f"--{angst.replace('_', '-')} {a:g} Å = {a / apix:.4g} px of the "
                         f"{apix:.4g} Å/px training images"
                         + (": the likelihood's disc" if px == "mask_diameter" else ""))
            if px == "mask_diameter":
                c.mask = True


def _resolve_tvae_grid(c: TrainConfig, box: int, cryo: bool, notes: list[str]) -> None:
    """TARGET-VAE's translation search, its prior, the kernel and the likelihood's disc."""
    if c.translation_range is None and cryo:
        c.translation_range = max(CRYO_MIN_RANGE, round(CRYO_TRANSLATION * box))
        notes.append(f"translation search +-{c.translation_range} px ({CRYO_TRANSLATION:g} box)")
    if c.translation_prior is None:
        c.translation_prior = (max(1.0, c.translation_range / 2) if cryo
                               else PLAIN_TRANSLATION_PRIOR)
    if c.translation_range is None:
        c.translation_range = default_translation_range(box, c.translation_prior)
    if c.kernel is None:
        c.kernel = default_kernel(box)
    elif c.kernel % 2 == 0:
        notes.append(f"kernel {c.kernel + 1} (odd: the kernel is centred on a pixel)")
        c.kernel += 1
    if c.mask is None:
        c.mask = cryo or c.mask_diameter is not None
    if c.mask_diameter is None:
        c.mask_diameter = float(box)
    elif not 0 < c.mask_diameter <= box:
        raise CryolatentError(
            f"--particle-diameter / --mask-diameter: {c.mask_diameter:.4g} px is "
            f"not inside the {box}-px training box")


def missing(cfg: TrainConfig) -> list[str]:
    """The options of a configuration that are not resolved: None (or ``likelihood
    "auto"``) among the run's options (but :data:`MAY_BE_NONE`) and its model's. Empty for
    what :func:`resolve` returns; the other model's options are no part of a run."""
    names = [f.name for f in dataclasses.fields(RunConfig) if f.name not in MAY_BE_NONE]
    names += [f.name for f in dataclasses.fields(MODEL_CONFIGS[cfg.model])]
    left = [n for n in dict.fromkeys(names) if getattr(cfg, n) is None]
    return left + (["likelihood"] if cfg.likelihood == "auto" else [])


# ============================================================================ old runs
#: What the models of cryolatent 0.1.0 took for an option that a run's config.json left None
#: (configurations then recorded no version, and the model completed them); with
#: :func:`_v0_1_box_rules`. Frozen: a later change of a default never changes such a run.
V0_1_FALLBACKS = {
    "target-vae": {"z_dim": 2, "enc_channels": 128, "gen_width": 512,
                   "gen_fourier_features": 256, "translation_prior": 5.0, "ctf": False,
                   "mask": False, "gumbel_tau": 1.0, "kl_warmup": 0.0, "kl_free_bits": 0.0,
                   "pixel_fraction": 1.0},
    "irl-inr": {"z_dim": 2, "ctf": False, "enc_width": 64, "hyper_width": 256, "hyper_layers": 3,
                "inr_width": 256, "inr_layers": 3, "inr_fourier_features": 256,
                "pixel_fraction": 1.0, "kl_warmup": 0.0}}


def _v0_1_box_rules(c: TrainConfig, box: int) -> None:
    """TARGET-VAE 0.1.0's kernel (smallest odd >= 0.6 box, at least 3; an even one given:
    one more), translation grid (min(box//2, ceil(4 sd)), at least 1) and disc (the box)."""
    if c.kernel is None:
        c.kernel = max(3, math.ceil(0.6 * box))
    if c.kernel % 2 == 0:
        c.kernel += 1
    if c.translation_range is None:
        c.translation_range = int(min(box // 2, max(1, math.ceil(4 * c.translation_prior))))
    if c.mask_diameter is None:
        c.mask_diameter = float(box)


def complete_v0_1(cfg: TrainConfig, box: int) -> TrainConfig:
    """A configuration written before versions were recorded (cryolatent 0.1.0), completed
    as its model completed it then (:data:`V0_1_FALLBACKS`); a new TrainConfig. A
    configuration that records a version is returned as it is."""
    if cfg.version is not None:
        return cfg
    c = TrainConfig.from_dict(cfg.to_dict())
    _fill(c, V0_1_FALLBACKS[c.model])
    if c.likelihood == "auto":
        c.likelihood = "gaussian"
    if c.model == "target-vae":
        _v0_1_box_rules(c, box)
    c.version = "0.1.0"
    return c


# ============================================================================ in words
def default_text(name: str) -> str:
    """What ``train --help`` shows as option ``name``'s default: the field's default, or the
    rule :func:`resolve` follows for it, in words built from the same tables."""
    o, c, t = MODEL_OPTIM["target-vae"], CRYO_TARGET_VAE, MODEL_OPTIM["irl-inr"]
    cryo = "on particle sets with CTF parameters"
    sizes = {k: f"{v} (the paper's) on a GPU, {CPU_SIZES[k]} on the CPU"
             for k, v in PAPER_SIZES.items()}
    sizes.update({k: f"{v} (the paper's) on a GPU, {IRL_CPU[k]} on the CPU"
                  for k, v in IRL_PAPER_SIZES.items()})
    rules = {
        "z_dim": f"{PLAIN['z_dim']}; TARGET-VAE {cryo} {c['z_dim']}",
        "batch_size": f"TARGET-VAE {o['batch_size']}, {cryo} {c['batch_size']}; IRL-INR "
                      f"{t['batch_size']}, on the CPU {IRL_CPU['batch_size']}",
        "lr": f"TARGET-VAE {o['lr']:g}, {cryo} {c['lr']:g}; IRL-INR {t['lr']:g}, on the CPU "
              f"{IRL_CPU['lr']:g}",
        "weight_decay": f"{o['weight_decay']:g}; IRL-INR {t['weight_decay']:g}",
        "kl_warmup": f"{PLAIN['kl_warmup']:g}; {cryo} {c['kl_warmup']:g}",
        "kl_free_bits": f"{PLAIN['kl_free_bits']:g}",
        "gumbel_tau": f"{PLAIN['gumbel_tau']:g}; {cryo} {c['gumbel_tau']:g}",
        "ctf": "on when the particle set has CTF parameters",
        "kernel": f"smallest odd >= {KERNEL_SHARE:g} box",
        "translation_prior": f"particle sets with CTF parameters: half the translation "
                             f"range; others {PLAIN_TRANSLATION_PRIOR:g}",
        "translation_range": f"particle sets with CTF parameters: {CRYO_TRANSLATION:g} x "
                             f"box, at least {CRYO_MIN_RANGE}; others min(box/2, 4 x prior "
                             "SD)",
        "mask": "on for particle sets with CTF parameters or a disc diameter, off otherwise",
        "mask_diameter": "the box",
        "pixel_fraction": f"{PIXEL_FRACTION:g} for boxes >= {PIXEL_FRACTION_MIN_BOX} px "
                          "without CTF, else 1",
        "fourier_features": "the model's",
        "translation_prior_angst": "--translation-prior px",
        "translation_range_angst": "--translation-range px",
        "particle_diameter": "the box",
        **sizes,
    }
    if name in rules:
        return rules[name]
    default = TrainConfig.__dataclass_fields__[name].default
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"{default:g}" if isinstance(default, float) else str(default)
