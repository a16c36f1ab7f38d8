"""cryolatent's training step side by side with the authors' reference code (CPU, one thread).

    # once: the reference code (not committed; IRL-INR has no licence), from bare git mirrors
    python benchmarks/reference_speed.py --mirror-tvae /path/TARGET-VAE.git \
        --mirror-irl /path/IRL-INR.git --install-deps --prepare-only
    python benchmarks/reference_speed.py --warmup 1 --reps 5 --out ref_speed.json   # ~25 min loaded

For each SPEC speed configuration the script builds the reference model (imported at run time
from ``--ref-dir``, default ``benchmarks/.refcode/``) and cryolatent's
(``build_model(TrainConfig(...), box)``), feeds both the same synthetic batch, and times one
whole training step of each (forward + loss + backward + optimiser step), alternating
ref/ours (the order flips every repetition so drifting machine load hits both sides alike)
after ``--warmup`` untimed steps. It prints median images/s of each side and the ratio
cryolatent / reference, and writes everything to ``--out`` (JSON).

The reference steps are the authors' own:

* TARGET-VAE (SMLC-NYSBC/TARGET-VAE, MIT): models from ``src/models.py`` built as
  ``train_mnist.py`` builds them (attention translation, attention+offsets rotation, encoder
  kernel 28 / padding 8 / 128 kernels, generator 2x512 with ``--fourier-expansion``, Adam
  2e-4), and the step is ``train_mnist.train_epoch`` itself run on a one-batch iterator.
* IRL-INR (sehyunkwon/IRL-INR, no licence: nothing of it is in this repository): its modules
  (``resnet_gray.resnet18``, ``RFF.FourierFeatures``, ``models.FunctionRepresentation`` /
  ``HyperNetwork``, ``make_coord``, ``utils.find_center`` / ``get_theta``) built from
  ``dataset_configuration/MNIST-U.json``; ``train.py`` is a script with no step function, so
  :func:`_irl_ref_step` below calls those modules in the order its loop body does (random
  rotation, symmetry-breaking loss, per-image INR rendering, rotated + cv2-translated second
  view, cosine consistency, two Adam optimisers). The loop's ``time.sleep(0.1)`` is left out.

The reference needs torchvision and cv2. ``--install-deps`` puts them (no dependencies) into
``REF_DIR/site``; PyPI's torchvision is a CUDA build whose compiled ops do not load beside a
CPU torch, so its pure-Python ``transforms`` are imported without the package's
``__init__`` (only ``transforms`` runs in a step).

cryolatent's step is :class:`cryolatent.train.StepRunner.train_step` with
:func:`cryolatent.train.make_optimizer` (AdamW), no compile: what ``train`` runs. The row
``cryolatent`` is float32 at SPEC's structure (the same work and precision as the reference);
rows ``cryolatent[bfloat16]``, ``[cpu]`` and ``[cpu,cryo-EM]`` add ``train``'s defaults on
this machine (bf16 autocast on CPUs with hardware bf16; CPU model sizes; cryo-EM translation
search, mask and CTF), different work from the reference's, for the record.
Whatever the working tree's ``TrainConfig`` defaults are is what is measured; fields of
``TrainConfig`` this script does not know yet (new speed options) are listed in the output
with their values, and ``--variant NAME:key=val,...`` adds cryolatent rows with overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryolatent.config import TrainConfig  # noqa: E402
from cryolatent.models import build_model  # noqa: E402

DEFAULT_REF_DIR = REPO / "benchmarks" / ".refcode"
TVAE_DIR, IRL_DIR = "TARGET-VAE", "IRL-INR"

# SPEC "Speed the training must reach": name -> settings of both sides. ``spec_batch`` is
# SPEC's batch; ``batch`` the reduced one a run uses unless --batch says (both sides alike).
# IRL-INR gets the larger one: its hypernetwork's output layer has 67 M parameters, and the
# optimiser step over them is a per-step cost that a small batch would inflate.
CONFIGS = {
    "tvae-p8-z2-50": dict(
        kind="tvae", box=50, spec_batch=100, batch=16, rotations=8, z_dim=2, gen_width=512,
        gen_layers=2, ref_fourier=True,
        ours=dict(model="target-vae", rotations=8, z_dim=2, enc_channels=128, gen_width=512,
                  gen_layers=2, fourier_features=256, likelihood="bernoulli")),
    "tvae-p16-z32-50": dict(
        kind="tvae", box=50, spec_batch=100, batch=16, rotations=16, z_dim=32, gen_width=512,
        gen_layers=2, ref_fourier=True,
        ours=dict(model="target-vae", rotations=16, z_dim=32, enc_channels=128,
                  gen_width=512, gen_layers=2, fourier_features=256, likelihood="bernoulli")),
    "irl-inr-50": dict(
        kind="irl", box=50, spec_batch=128, batch=32, z_dim=32, width=256, layers=3, freqs=256,
        ours=dict(model="irl-inr", z_dim=32, lr=1e-4, weight_decay=5e-4, inr_width=256,
                  inr_layers=3, hyper_width=256, hyper_layers=3, fourier_features=256)),
}

# TrainConfig fields as of this script's writing: anything else is a new option, reported.
KNOWN_FIELDS = {
    "input", "outdir", "datadir", "model", "seed", "device", "command", "epochs",
    "batch_size", "lr", "weight_decay", "val_fraction", "lr_patience", "lr_factor",
    "early_stop", "amp", "compile", "num_workers", "z_dim", "ctf", "rotations",
    "enc_channels", "kernel", "enc_layers", "gen_width", "gen_layers", "rotation_prior",
    "rotation_prior_sd", "translation_prior", "likelihood", "learn_sigma", "mask",
    "translation_range", "gen_fourier_sigma", "gumbel_tau", "subpixel", "recentre",
    "enc_width", "hyper_width", "hyper_layers", "inr_width", "inr_layers",
    "fourier_features", "fourier_sigma", "lambda_recon", "lambda_consistency",
    "gen_fourier_features", "inr_fourier_features", "inr_fourier_sigma",
    "lambda_symmetry", "consistency_loss", "rotation_rule", "extra", "pixel_fraction",
    # not step options: run settings and when to stop
    "threads", "converge_window", "converge_tol", "kl_warmup",
}
# the model's structure in CONFIGS[...]["ours"]; the "defaults" rows leave these to train
SIZE_FIELDS = ("enc_channels", "gen_width", "fourier_features", "gen_fourier_features",
               "translation_range",
               "translation_prior", "mask", "ctf")


# ----------------------------------------------------------------------------- reference code
def extract_mirror(git_dir: Path, dest: Path) -> None:
    """``git archive HEAD | tar -x`` of a bare mirror into ``dest``, leaving out blobs the
    mirror lacks (large files of a partial snapshot)."""
    dest.mkdir(parents=True, exist_ok=True)
    gd = f"--git-dir={git_dir}"
    tree = subprocess.run(["git", gd, "ls-tree", "-r", "-z", "HEAD"], check=True,
                          capture_output=True).stdout.decode().split("\0")
    paths = []
    for entry in filter(None, tree):
        meta, path = entry.split("\t", 1)
        sha = meta.split()[2]
        if subprocess.run(["git", gd, "cat-file", "-e", sha], capture_output=True).returncode == 0:
            paths.append(path)
    arch = subprocess.run(["git", gd, "archive", "HEAD", "--", *paths], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    head = subprocess.run(["git", gd, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    (dest / ".commit").write_text(head + "\n")


def install_deps(ref_dir: Path) -> None:
    """torchvision matching this torch, and cv2, into REF_DIR/site (no dependencies)."""
    tv = {"2.13": "0.28.0", "2.14": "0.29.1"}.get(".".join(torch.__version__.split(".")[:2]))
    pkgs = [f"torchvision=={tv}" if tv else "torchvision", "opencv-python-headless"]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                    str(ref_dir / "site"), *pkgs], check=True)


def _ref_import_path(ref_dir: Path) -> None:
    """Make ``torchvision`` (transforms etc.) and ``cv2`` importable for the reference code."""
    site = ref_dir / "site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # a CUDA build beside a CPU torch: its compiled ops fail to load
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
    for p in sys.path:
        d = Path(p) / "torchvision"
        if (d / "transforms").is_dir():
            shim = types.ModuleType("torchvision")
            shim.__path__ = [str(d)]  # subpackages load; the package __init__ does not run
            sys.modules["torchvision"] = shim
            return
    raise ImportError("torchvision not found: run with --install-deps (installs into "
                      f"{site})")


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _import_from(root: Path, names: list[str]) -> dict[str, types.ModuleType]:
    """Import the reference modules ``names`` with ``root`` first on sys.path, then take the
    generic top-level names (``models``, ``utils``, ``src``...) back out of sys.modules."""
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        import importlib

        with _quiet():
            mods = {n: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(str(root))
    for k in set(sys.modules) - before:
        f = getattr(sys.modules[k], "__file__", None) or ""
        if f.startswith(str(root)):
            del sys.modules[k]
    return mods


def ref_available(ref_dir: Path, kind: str) -> bool:
    return (ref_dir / (TVAE_DIR if kind == "tvae" else IRL_DIR)
            / ("train_mnist.py" if kind == "tvae" else "train.py")).is_file()


class TvaeRef:
    """The reference TARGET-VAE, stepped by its own ``train_mnist.train_epoch``."""

    def __init__(self, ref_dir: Path, box: int, rotations: int, z_dim: int, gen_width: int,
                 gen_layers: int, fourier: bool, kernels: int = 128, ksize: int = 28,
                 padding: int = 8):
        from torch import nn

        _ref_import_path(ref_dir)
        mods = _import_from(ref_dir / TVAE_DIR, ["train_mnist"])
        self.tm = tm = mods["train_mnist"]
        torch.manual_seed(0)
        with _quiet():  # train_mnist.main's choices for mnist-U
            self.gen = tm.models.SpatialGenerator(
                z_dim, gen_width, num_layers=gen_layers, activation=nn.LeakyReLU, resid=False,
                fourier_expansion=fourier, sigma=2.0 / (box - 1))
            self.enc = tm.models.InferenceNetwork_AttentionTranslation_AttentionRotation(
                box, 1, z_dim, kernels_num=kernels, kernels_size=ksize, padding=padding,
                activation=nn.LeakyReLU, groupconv=rotations, rot_refinement=True,
                theta_prior=np.pi, normal_prior_over_r=False)
        self.params = list(self.gen.parameters()) + list(self.enc.parameters())
        self.opt = torch.optim.Adam(self.params, lr=2e-4)
        g = np.linspace(-1, 1, box)
        x0, x1 = np.meshgrid(g, g[::-1])
        self.coords = torch.from_numpy(np.stack([x0.ravel(), x1.ravel()], 1)).float()
        self.rotations, self.box = rotations, box

    def step(self, x: torch.Tensor) -> None:
        y = x.reshape(-1, 1, self.box, self.box)
        with contextlib.redirect_stderr(io.StringIO()):  # its progress line
            self.tm.train_epoch([(y,)], self.coords, self.gen, self.enc, self.opt,
                                "attention", "attention+offsets", 0, 1, y.shape[0],
                                torch.device("cpu"), self.params, np.pi, self.rotations,
                                self.box)


class IrlRef:
    """The reference IRL-INR modules at ``dataset_configuration/MNIST-U.json``'s settings."""

    def __init__(self, ref_dir: Path, box: int, z_dim: int, width: int, layers: int,
                 freqs: int):
        _ref_import_path(ref_dir)
        os.environ.setdefault("MPLBACKEND", "Agg")
        m = _import_from(ref_dir / IRL_DIR, ["resnet_gray", "RFF", "models", "make_coord",
                                             "utils"])
        import cv2
        from torchvision import transforms

        cv2.setNumThreads(1)
        self.cv2, self.transforms, self.m = cv2, transforms, m
        torch.manual_seed(0)
        with _quiet():
            self.encoder = m["resnet_gray"].resnet18(1, 3, z_dim, "False")
            self.ff = m["RFF"].FourierFeatures(torch.normal(torch.zeros(freqs, 2), std=2.0))
            self.fr = m["models"].FunctionRepresentation(1, [width] * layers, freqs)
            self.hyper = m["models"].HyperNetwork(self.fr, z_dim, [width] * layers)
        self.opt_h = torch.optim.Adam(self.hyper.forward_layers.parameters(), lr=1e-4,
                                      betas=(0.5, 0.999))
        self.opt_e = torch.optim.Adam(self.encoder.parameters(), lr=1e-4, betas=(0.5, 0.999))
        self.box = box

    def step(self, x: torch.Tensor) -> None:
        _irl_ref_step(self, x.reshape(-1, 1, self.box, self.box))


def _irl_ref_step(r: IrlRef, images: torch.Tensor) -> None:
    """One step of IRL-INR's ``train.py`` (MNIST-U branch, cosine consistency, coefficient
    1), expressed through its modules."""
    F, T, m, n = torch.nn.functional, r.transforms, r.m, r.box
    b = images.shape[0]
    images = T.RandomRotation(180)(images)
    out = r.encoder(images)
    centre, z1 = out[:, :2], out[:, 2:]
    loss_sym = F.mse_loss(centre, m["utils"].find_center(images))
    theta = m["utils"].get_theta(centre)
    feats = r.ff(m["make_coord"].make_coord(b, n, -theta, centre))
    weights, biases = r.hyper(z1)
    recon = torch.empty(b, n * n, 1)
    for j in range(b):  # one INR evaluation per image, as the reference does
        recon[j] = r.fr(feats[j], weights[j], biases[j]).view(n * n, 1)
    loss_rec = F.mse_loss(images.view(b, -1), recon.view(b, -1))
    second = T.RandomRotation(180)(images.view(-1, 1, n, n))
    shifted = torch.empty(second.shape)
    for k in range(b):  # random translation of each image with cv2, sd 5 px
        mat = np.float32([[1, 0, 5 * torch.randn(1).item()], [0, 1, 5 * torch.randn(1).item()]])
        img = r.cv2.warpAffine(second[k].numpy().reshape(n, n, 1), mat, (0, 0))
        shifted[k] = T.ToTensor()(img)
    z2 = r.encoder(shifted)[:, 2:]
    loss_con = 1 - F.cosine_similarity(z1, z2, dim=1)
    loss = 15 * loss_sym + loss_rec + loss_con.mean()
    loss.backward()
    r.opt_h.step()
    r.opt_e.step()
    r.opt_h.zero_grad()
    r.opt_e.zero_grad()


def build_ref(name: str, ref_dir: Path, box: int | None = None, tiny: bool = False):
    c = CONFIGS[name]
    box = box or c["box"]
    if c["kind"] == "tvae":
        kw = dict(kernels=8, ksize=9, padding=2) if tiny else {}
        return TvaeRef(ref_dir, box, c["rotations"], c["z_dim"], 32 if tiny else c["gen_width"],
                       1 if tiny else c["gen_layers"], c["ref_fourier"], **kw)
    return IrlRef(ref_dir, box, c["z_dim"], 16 if tiny else c["width"],
                  1 if tiny else c["layers"], 8 if tiny else c["freqs"])


# ----------------------------------------------------------------------------- cryolatent
TINY = dict(enc_channels=8, gen_width=32, gen_layers=1, fourier_features=16, enc_width=8,
            hyper_width=32, inr_width=32, inr_layers=1)


class Ours:
    """cryolatent's training step: StepRunner.train_step with make_optimizer (AdamW)."""

    def __init__(self, name: str, box: int | None = None, tiny: bool = False,
                 overrides: dict | None = None, defaults: str | None = None,
                 amp: str = "off"):
        """defaults: None (SPEC's structure), or "plain" / "cryoem": leave the sizes, the
        translation search, the mask and the CTF to ``TrainConfig.resolve_defaults`` as
        ``train`` does on the CPU for a set without / with CTF parameters. amp: "off"
        (float32, as the reference) or train's "auto" (bf16 autocast where
        ``cryolatent.train.amp_dtype`` picks it on this CPU)."""
        from cryolatent.train import StepRunner, amp_dtype, make_optimizer

        c = CONFIGS[name]
        over = dict(c["ours"])
        if tiny:
            over.update(TINY)
        if defaults:
            for k in SIZE_FIELDS:
                over.pop(k, None)
            if defaults == "cryoem" and over.get("likelihood") == "bernoulli":
                over["likelihood"] = "gaussian"
        over.update(overrides or {})
        amp = over.pop("amp", amp)       # a --variant may set the precision too
        tiny_sizes = {k: v for k, v in TINY.items() if k in SIZE_FIELDS} if tiny else {}
        self.cfg = TrainConfig(**over, amp=amp, compile=False, device="cpu")
        self.box = box or c["box"]
        self.notes = (self.cfg.resolve_defaults(self.box, defaults == "cryoem", "cpu")
                      if defaults else [])
        for k, v in tiny_sizes.items():  # tests: keep the models tiny
            setattr(self.cfg, k, v)
        torch.manual_seed(0)
        self.model = build_model(self.cfg, self.box)
        opt, _ = make_optimizer(self.model, self.cfg)
        self.amp = amp_dtype(amp, torch.device("cpu"))
        self.runner = StepRunner(self.model, opt, torch.device("cpu"), self.amp, False)
        self.ctf = None
        if self.cfg.ctf:  # train passes each particle's CTF; here one CTF-like modulation
            f = torch.fft.fftfreq(self.box)
            r2 = f[:, None] ** 2 + f[None, :] ** 2
            self.ctf = -torch.sin(2e3 * r2 + 0.1).expand(1, self.box, self.box)

    def step(self, x: torch.Tensor) -> None:
        if self.ctf is None:
            self.runner.train_step(x)
        else:
            self.runner.train_step(x, self.ctf.expand(x.shape[0], -1, -1).contiguous())


def new_options() -> dict:
    """TrainConfig fields this script does not know (speed options added since), defaults."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else "<factory>")
            for f in dataclasses.fields(TrainConfig) if f.name not in KNOWN_FIELDS}


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=val,key=val`` -> (NAME, {key: val}) with val parsed as JSON where it can be."""
    name, _, rest = text.partition(":")
    over = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        try:
            over[k.strip()] = json.loads(v)
        except ValueError:
            over[k.strip()] = v
    return name, over


# ----------------------------------------------------------------------------- timing
def make_batch(batch: int, box: int, seed: int = 0) -> torch.Tensor:
    """Synthetic particles in [0, 1] (off-centre Gaussian blobs + noise), the same for both."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(box, dtype=torch.float32),
                            torch.arange(box, dtype=torch.float32), indexing="ij")
    c = box / 2 + (torch.rand(batch, 2, generator=g) - 0.5) * box / 4
    s = box / 10 * (1 + torch.rand(batch, 2, generator=g))
    img = torch.exp(-((xx - c[:, :1, None]) ** 2 / (2 * s[:, :1, None] ** 2)
                      + (yy - c[:, 1:, None]) ** 2 / (2 * s[:, 1:, None] ** 2)))
    img = img + 0.1 * torch.rand(batch, box, box, generator=g)
    return (img / img.amax(dim=(1, 2), keepdim=True)).contiguous()


def time_alternating(sides: dict, x: torch.Tensor, warmup: int, reps: int) -> dict:
    """Warm every side up, then ``reps`` rounds of one timed step per side, the order
    rotating each round (ref/ours, ours/ref, ...). Returns per-side lists of step seconds."""
    threads = torch.get_num_threads()
    for fn in sides.values():
        for _ in range(warmup):
            fn(x)
    names = list(sides)
    times = {k: [] for k in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t = time.perf_counter()
            sides[k](x)
            times[k].append(time.perf_counter() - t)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"a step changed the thread count {threads} -> "
                           f"{torch.get_num_threads()}")
    return times


def summarise(times: dict, batch: int, ref_key: str = "reference") -> dict:
    """Median images/s per side and ratios side / reference (of medians, and median of the
    per-round ratios)."""
    rows = {}
    for k, ts in times.items():
        rows[k] = {"images_per_s": batch / statistics.median(ts),
                   "ms_per_step": 1000 * statistics.median(ts),
                   "step_s": [round(t, 4) for t in ts]}
    if ref_key in times:
        ref = rows[ref_key]["images_per_s"]
        for k, ts in times.items():
            if k == ref_key:
                continue
            rows[k]["ratio"] = rows[k]["images_per_s"] / ref
            rows[k]["ratio_paired"] = statistics.median(
                tr / t for t, tr in zip(ts, times[ref_key]))
    return rows


def format_table(results: list[dict]) -> str:
    """ratio: median images/s over the reference's; paired: median over rounds of the
    ratio of the two steps timed next to each other (steadier under changing load)."""
    hdr = (f"{'configuration':<18} {'side':<30} {'img/s':>8} {'ms/step':>9} {'GFLOP/img':>9} "
           f"{'ratio':>7} {'paired':>7}")
    lines = [hdr, "-" * len(hdr)]
    for res in results:
        for side, row in res["sides"].items():
            ref = side == "reference"
            ratio = f"{row['ratio']:.2f}x" if "ratio" in row else ("1.00x" if ref else "-")
            paired = (f"{row['ratio_paired']:.2f}x" if "ratio_paired" in row
                      else ("1.00x" if ref else "-"))
            gf = row.get("gflop_per_image")
            gf = f"{gf:.1f}" if gf is not None else "-"
            lines.append(f"{res['config']:<18} {side:<30} {row['images_per_s']:>8.2f} "
                         f"{row['ms_per_step']:>9.0f} {gf:>9} {ratio:>7} {paired:>7}")
    return "\n".join(lines)


def flops_per_image(fn, x: torch.Tensor) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            fn(x)
        return fc.get_total_flops() / x.shape[0] / 1e9
    except Exception:  # noqa: BLE001 - a counting failure must not stop the timing
        return None


def profile_top(fn, x: torch.Tensor, n: int = 8) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def run_config(name: str, args, ref_dir: Path) -> dict:
    c = CONFIGS[name]
    box = args.box or c["box"]
    batch = args.batch or c["batch"]
    x = make_batch(batch, box)
    sides = {}
    info = {}
    if not args.no_ref:
        if ref_available(ref_dir, c["kind"]):
            sides["reference"] = build_ref(name, ref_dir, box, args.tiny).step
        else:
            print(f"{name}: reference code not under {ref_dir}; cryolatent only",
                  file=sys.stderr)
    ours = Ours(name, box, args.tiny)
    sides["cryolatent"] = ours.step
    info["cryolatent_config"] = {k: v for k, v in ours.cfg.to_dict().items()
                                 if k not in ("input", "outdir", "command", "extra")}
    if args.defaults:  # train's default precision on this CPU, if not float32
        o = Ours(name, box, args.tiny, amp="auto")
        if o.amp is not None:
            sides["cryolatent[" + str(o.amp).replace("torch.", "") + "]"] = o.step
    if args.defaults and hasattr(TrainConfig, "resolve_defaults"):
        for d in ("plain", "cryoem") if c["kind"] == "tvae" else ("cryoem",):
            o = Ours(name, box, args.tiny, defaults=d, amp="auto")
            if o.cfg.to_dict() != ours.cfg.to_dict():
                sides["cryolatent[cpu,cryo-EM]" if d == "cryoem" else "cryolatent[cpu]"] = o.step
                info[f"defaults_{d}"] = {k: getattr(o.cfg, k) for k in SIZE_FIELDS
                                         if hasattr(o.cfg, k)}
                info[f"defaults_{d}"]["amp"] = str(o.amp) if o.amp else "off"
    for vname, over in args.variant:
        if TrainConfig(**{**c["ours"], **over}).model != c["ours"]["model"]:
            continue
        sides[f"cryolatent[{vname}]"] = Ours(name, box, args.tiny, over).step
    flops = {}
    if args.flops:
        for k, fn in sides.items():
            flops[k] = flops_per_image(fn, x)
    if args.profile:
        for k, fn in sides.items():
            print(f"\n--- {name} / {k}: top ops by self CPU time, one step", file=sys.stderr)
            print(profile_top(fn, x), file=sys.stderr)
    times = time_alternating(sides, x, args.warmup, args.reps)
    rows = summarise(times, batch)
    for k, v in flops.items():
        rows[k]["gflop_per_image"] = v
    return {"config": name, "box": box, "batch": batch, "spec_batch": c["spec_batch"],
            "sides": rows, **info}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref-dir", type=Path, default=DEFAULT_REF_DIR)
    p.add_argument("--mirror-tvae", type=Path, help="bare git dir of SMLC-NYSBC/TARGET-VAE")
    p.add_argument("--mirror-irl", type=Path, help="bare git dir of sehyunkwon/IRL-INR")
    p.add_argument("--install-deps", action="store_true",
                   help="pip install torchvision + opencv (no deps) into REF_DIR/site")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--batch", type=int,
                   help="images per step, both sides (default: 16 TARGET-VAE, 32 IRL-INR)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7, help="timed steps per side")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--box", type=int, help="override the image size (tests)")
    p.add_argument("--tiny", action="store_true", help="tiny widths (tests)")
    p.add_argument("--no-ref", action="store_true", help="cryolatent only")
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip the FLOP count (one extra step per side)")
    p.add_argument("--profile", action="store_true", help="print top ops of one step per side")
    p.add_argument("--no-defaults", dest="defaults", action="store_false",
                   help="no rows for train's defaults: its precision on this CPU (bf16 where "
                   "the CPU has AMX/AVX512-BF16) and its CPU model sizes / cryo-EM search "
                   "(TrainConfig.resolve_defaults)")
    p.add_argument("--variant", action="append", type=parse_variant, default=[],
                   metavar="NAME:key=val,...", help="extra cryolatent row with TrainConfig "
                   "overrides (rows only for configurations of the same model)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv) -> int:
    if args.mirror_tvae:
        extract_mirror(args.mirror_tvae, args.ref_dir / TVAE_DIR)
    if args.mirror_irl:
        extract_mirror(args.mirror_irl, args.ref_dir / IRL_DIR)
    if args.install_deps:
        install_deps(args.ref_dir)
    if args.prepare_only:
        return 0

    results = []
    for name in args.configs:
        t0 = time.perf_counter()
        res = run_config(name, args, args.ref_dir)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(format_table([res]).split("\n", 2)[-1], file=sys.stderr, flush=True)
    news = new_options()
    print(f"\n{args.threads} thread(s), batch " + " / ".join(str(r["batch"]) for r in results)
          + f" (SPEC: 100 / 100 / 128), {args.warmup} warm-up steps, {args.reps} alternating "
          "timed steps per side, medians")
    print(format_table(results))
    if news:
        print("TrainConfig options newer than this script (in effect at these values): "
              + ", ".join(f"{k}={v!r}" for k, v in news.items()))
    if args.out:
        commits = {}
        for d in (TVAE_DIR, IRL_DIR):
            f = args.ref_dir / d / ".commit"
            if f.is_file():
                commits[d] = f.read_text().strip()
        try:
            ours_commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always",
                                          "--dirty"], capture_output=True,
                                         text=True).stdout.strip()
        except OSError:
            ours_commit = ""
        meta = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                "threads": args.threads, "torch": torch.__version__,
                "machine": platform.machine(), "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(), "cryolatent_commit": ours_commit,
                "reference_commits": commits, "new_trainconfig_options": news,
                "warmup": args.warmup, "reps": args.reps}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                       default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
