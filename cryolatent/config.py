"""The typed training configuration, saved as ``RUNDIR/config.json`` and inside checkpoints.

One flat dataclass holds every option of ``cryolatent train`` (common ones, then each model's),
so the CLI, ``config.json`` and checkpoints share one definition. Only plain types (str, int,
float, bool, None, lists) appear, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CryolatentError


@dataclass
class TrainConfig:
    # --- data and run -----------------------------------------------------------------
    input: str = ""                   # particle set (.star / .cs / .mrcs)
    outdir: str = ""                  # run folder
    datadir: str | None = None        # where relative stack paths are looked up
    model: str = "target-vae"         # "target-vae" | "irl-inr"
    seed: int = 0
    device: str = "auto"              # "auto" | "cpu" | "cuda" | "cuda:N"
    command: str = ""                 # the command line that made the run

    # --- optimisation (shared) ----------------------------------------------------------
    epochs: int = 100
    batch_size: int = 100
    lr: float = 2e-4
    weight_decay: float = 0.0
    val_fraction: float = 0.1         # held-out share for the validation loss
    lr_patience: int = 10             # ReduceLROnPlateau: epochs without improvement
    lr_factor: float = 0.5
    early_stop: int = 20              # stop after this many epochs without improvement (0: never)
    amp: str = "auto"                 # "auto" (bf16 on CUDA) | "bf16" | "off"
    compile: bool = False             # torch.compile the model's loss
    num_workers: int = 2              # data-loading worker processes (out-of-core sets)
    z_dim: int = 2
    ctf: bool = False                 # put each particle's CTF in the likelihood
    threads: int | None = None        # CPU threads (None: leave the process's setting; the
                                      #   CLI passes -j, default the cores it may use)

    # --- TARGET-VAE ---------------------------------------------------------------------
    rotations: int = 8                # P_r group: 4, 8 or 16
    enc_channels: int = 128           # kernels of the group convolution
    kernel: int | None = None         # group-conv kernel size (None: derived from the box)
    enc_layers: int = 3               # 1x1 group convolutions after the first layer
    gen_width: int = 512
    gen_layers: int = 2
    rotation_prior: str = "uniform"   # "uniform" | "normal"
    rotation_prior_sd: float = 45.0   # degrees, for rotation_prior == "normal"
    translation_prior: float = 5.0    # sigma_t of p(t), pixels
    likelihood: str = "auto"          # "auto" | "bernoulli" | "gaussian"
    learn_sigma: bool = False         # Gaussian likelihood: learned per-pixel scale
    mask: bool = False                # circular mask on the likelihood
    translation_range: int | None = None  # |t| px covered by the translation grid
                                      #   (None: min(box//2, ceil(4 * translation_prior)))
    gen_fourier_sigma: float = 0.05   # TARGET-VAE generator Fourier features, cycles/pixel
                                      #   (count: fourier_features)
    gumbel_tau: float = 1.0           # Gumbel-softmax temperature over (t, r)
    subpixel: bool = False            # TARGET-VAE sub-pixel offset within each translation cell
    recentre: bool = True             # report poses about the generated object's centre of mass

    # --- IRL-INR ------------------------------------------------------------------------
    enc_width: int = 64               # ResNet-18 base width
    hyper_width: int = 256
    hyper_layers: int = 3
    inr_width: int = 256
    inr_layers: int = 3
    fourier_features: int = 256       # random Fourier features of the coordinates
    fourier_sigma: float = 2.0
    lambda_recon: float = 1.0
    lambda_consistency: float = 1.0
    lambda_symmetry: float = 15.0
    consistency_loss: str = "mse"     # "mse" (paper, sec. 4.2) | "cosine" (paper, with SCAN)
    rotation_rule: str = "moments"    # "moments" (ours, defined for centred particles) | "com" (paper)

    extra: dict[str, Any] = field(default_factory=dict)  # forward-compatible free options

    # -------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise CryolatentError naming the first bad option."""
        from .models import MODELS

        if self.model not in MODELS:
            raise CryolatentError(f"--model {self.model!r}: choose from {', '.join(MODELS)}")
        if self.rotations not in (4, 8, 16):
            raise CryolatentError(f"--rotations {self.rotations}: must be 4, 8 or 16")
        for name in ("epochs", "batch_size", "z_dim", "enc_channels", "gen_width",
                     "gen_layers", "enc_width", "hyper_width", "inr_width",
                     "fourier_features"):
            if getattr(self, name) < 1:
                raise CryolatentError(f"--{name.replace('_', '-')} must be >= 1")
        if not (0.0 <= self.val_fraction < 1.0):
            raise CryolatentError("--val-fraction must be in [0, 1)")
        if self.lr <= 0:
            raise CryolatentError("--lr must be > 0")
        if self.kernel is not None and self.kernel < 1:
            raise CryolatentError("--kernel must be >= 1")
        choices = {"rotation_prior": ("uniform", "normal"), "amp": ("auto", "bf16", "off"),
                   "likelihood": ("auto", "bernoulli", "gaussian"),
                   "consistency_loss": ("cosine", "mse"), "rotation_rule": ("moments", "com")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CryolatentError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose from "
                    + ", ".join(allowed))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
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
