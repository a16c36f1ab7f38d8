"""One configuration class per model: the CLI agrees with the classes (defaults, choices),
old flat config.json files and checkpoints load, configurations round-trip through
config.json and checkpoints, the models are built as ``Model(box, cfg)``."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from cryolatent.config import (IRLINRConfig, MODEL_CONFIGS, RunConfig, TargetVAEConfig,
                               TrainConfig, literal_choices)
from cryolatent.errors import CryolatentError
from cryolatent.models import build_model
from cryolatent.models.irl_inr import IRLINR
from cryolatent.models.target_vae import TargetVAE

#: TrainConfig fields that are no `train` option of their own (set from the arguments, -j,
#: by train itself; fourier_sigma: an alias of --inr-fourier-sigma)
NOT_OPTIONS = {"input", "outdir", "datadir", "command", "preprocessing", "extra", "threads",
               "version", "fourier_sigma"}


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _train_params():
    from cryolatent.commands.train import command

    return {p.name: p for p in command.params if isinstance(p, __import__("click").Option)}


def _help_defaults() -> dict[str, str]:
    """Option name -> the default `train --help` shows (its help's last [brackets])."""
    import click

    from cryolatent.commands.train import command

    ctx = click.Context(command, info_name="train")
    out = {}
    for name, p in _train_params().items():
        m = re.search(r"\[([^\[\]]*)\]\.?$", p.get_help_record(ctx)[1])
        if m:
            out[name] = m.group(1)
    return out


def test_cli_help_shows_the_defaults_of_the_config():
    """Every field of every configuration class is an option; its choices are the field's
    Literal; the default its `train --help` shows is the configuration's: the field's value,
    or for an option chosen from the data and the machine, config.default_text's rule."""
    import click

    from cryolatent.config import default_text

    params = _train_params()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for cls in (RunConfig, TargetVAEConfig, IRLINRConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if f.name not in NOT_OPTIONS:
                assert f.name in params, f"{cls.__name__}.{f.name} has no train option"
    shown = _help_defaults()
    checked = 0
    for name in params:
        if name not in fields or name in NOT_OPTIONS:
            continue
        allowed = literal_choices(TrainConfig, name)
        if allowed is not None:
            assert isinstance(params[name].type, click.Choice), name
            assert list(params[name].type.choices) == [str(a) for a in allowed], name
        else:
            assert not isinstance(params[name].type, click.Choice), name
        assert name in shown, f"--{name}: its help shows no [default]"
        default = fields[name].default
        want = default_text(name) if default is None else _fmt(default)
        assert shown[name] == want, (
            f"--{name.replace('_', '-')}: help says [{shown[name]}], the config {want!r}")
        checked += 1
    assert checked > 50


def test_the_agreement_check_notices_a_wrong_default(monkeypatch):
    """The test above fails when a class default and the help disagree."""
    monkeypatch.setattr(TrainConfig.__dataclass_fields__["gen_layers"], "default", 3)
    with pytest.raises(AssertionError, match="gen-layers"):
        test_cli_help_shows_the_defaults_of_the_config()


def test_the_rules_in_the_help_follow_the_tables(monkeypatch):
    """An option chosen from the data shows the rule of config.resolve's tables: changing a
    table changes the words (and nothing else has to)."""
    from cryolatent import config

    assert "64 on the CPU" in config.default_text("enc_channels")
    monkeypatch.setitem(config.CPU_SIZES, "enc_channels", 48)
    assert "48 on the CPU" in config.default_text("enc_channels")
    assert config.default_text("pixel_fraction").startswith(f"{config.PIXEL_FRACTION:g} ")


def test_cli_old_fourier_flags_are_aliases(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cryolatent.commands import train as cmd

    seen = {}
    import cryolatent.launch

    monkeypatch.setattr(cryolatent.launch, "train",
                        lambda cfg, resume=False: seen.setdefault("cfg", cfg) and tmp_path)

    def run(*args):
        seen.clear()
        r = CliRunner().invoke(cmd.command, ["in.star", "-o", str(tmp_path / "r"), *args])
        assert r.exit_code == 0, r.output
        return seen["cfg"]

    c = run("--model", "irl-inr", "--fourier-features", "12", "--fourier-sigma", "0.7")
    assert (c.inr_fourier_features, c.inr_fourier_sigma, c.gen_fourier_features) == (12, 0.7, 12)
    assert c.model_config() == IRLINRConfig.of(c) and c.model_config().inr_fourier_features == 12
    c = run("--fourier-features", "12", "--gen-fourier-features", "20")
    assert (c.gen_fourier_features, c.inr_fourier_features) == (20, 12)
    c = run("--inr-fourier-sigma", "1.5")
    assert c.inr_fourier_sigma == 1.5 and c.gen_fourier_sigma == 0.05


#: a config.json as train wrote it before the per-model classes (flat, old names)
OLD_TVAE = {
    "input": "p.star", "outdir": "run", "datadir": None, "model": "target-vae", "seed": 3,
    "device": "auto", "command": "cryolatent train p.star -o run", "preprocessing": None,
    "epochs": 7, "batch_size": 32, "lr": 0.001, "weight_decay": 0.0, "val_fraction": 0.1,
    "lr_patience": 10, "lr_factor": 0.5, "early_stop": 20, "kl_warmup": 5.0,
    "kl_free_bits": 0.0, "converge_window": 5, "converge_tol": 0.01, "amp": "auto",
    "compile": False, "num_workers": 2, "z_dim": 8, "ctf": True, "threads": None,
    "rotations": 8, "enc_channels": 16, "kernel": 7, "enc_layers": 3, "gen_width": 32,
    "gen_layers": 2, "rotation_prior": "uniform", "rotation_prior_sd": 45.0,
    "translation_prior": 2.0, "likelihood": "gaussian", "learn_sigma": False, "mask": True,
    "translation_range": 4, "gen_fourier_sigma": 0.03, "gumbel_tau": 0.5, "subpixel": False,
    "recentre": True, "enc_width": 64, "hyper_width": 256, "hyper_layers": 3,
    "inr_width": 256, "inr_layers": 3, "fourier_features": 24, "fourier_sigma": 2.0,
    "lambda_recon": 1.0, "lambda_consistency": 1.0, "lambda_symmetry": 15.0,
    "consistency_loss": "mse", "rotation_rule": "moments", "extra": {"cwd": "/x"},
}


def test_old_flat_config_json_loads(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(OLD_TVAE, indent=2))
    c = TrainConfig.load(p)
    assert c.gen_fourier_features == 24 and c.gen_fourier_sigma == 0.03
    assert c.inr_fourier_features is None and c.inr_fourier_sigma == 2.0   # IRL-INR size: auto
    assert c.fourier_features is None and c.fourier_sigma is None      # input-only names
    assert c.extra == {"cwd": "/x"}                                      # nothing left over
    for k, v in OLD_TVAE.items():
        if k not in ("fourier_features", "fourier_sigma"):
            assert getattr(c, k) == v, k
    m = build_model(c, 20)
    assert m.ff.freqs.shape[1] == 24 and m.gconv.channels == 16 and m.use_ctf and m.use_mask
    old_irl = dict(OLD_TVAE, model="irl-inr", fourier_features=32, fourier_sigma=1.25)
    p.write_text(json.dumps(old_irl))
    c = TrainConfig.load(p).validate()
    assert (c.inr_fourier_features, c.inr_fourier_sigma, c.gen_fourier_features) == \
        (32, 1.25, None)
    m = build_model(c, 16)
    assert m.hyper.ff.freqs.shape[1] == 32


def test_config_round_trip_through_config_json_and_checkpoint(tmp_path):
    c = TrainConfig(model="irl-inr", input="a.star", z_dim=5, inr_fourier_sigma=0.5,
                    gen_fourier_features=9, rotations=16, consistency_loss="cosine",
                    preprocessing={"box": 24, "steps": ["crop"]}, extra={"k": [1, 2]})
    c.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == c
    torch.save({"config": c.to_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert TrainConfig.from_dict(ck["config"]) == c
    assert ck["config"]["fourier_features"] is None and ck["config"]["fourier_sigma"] is None
    # the old names as keywords: onto the new fields not given
    c = TrainConfig(fourier_features=7, fourier_sigma=0.3, inr_fourier_features=11)
    assert (c.gen_fourier_features, c.inr_fourier_features, c.inr_fourier_sigma) == (7, 11, 0.3)
    c.fourier_features = 5            # as old scripts set it: validate() applies it
    assert c.validate().gen_fourier_features == 7 and c.inr_fourier_features == 11
    c = TrainConfig()
    c.fourier_features = 5
    assert (c.validate().gen_fourier_features, c.inr_fourier_features) == (5, 5)


def test_models_are_built_from_their_config():
    from cryolatent.config import resolve

    tv = resolve(TrainConfig(z_dim=3, enc_channels=4, gen_width=8, gen_layers=1,
                             gen_fourier_features=6, translation_range=1, kernel=5),
                 12)[0].model_config()
    torch.manual_seed(0)
    a = TargetVAE(12, tv)
    torch.manual_seed(0)
    b = build_model(TrainConfig(**dataclasses.asdict(tv)), 12)
    assert a.cfg == b.cfg == tv
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # keyword options override the configuration; the old names are accepted
    m = TargetVAE(12, tv, fourier_features=10, fourier_sigma=0.1)
    assert m.cfg.gen_fourier_features == 10 and m.cfg.gen_fourier_sigma == 0.1
    ir_cfg = resolve(TrainConfig(model="irl-inr", z_dim=2, enc_width=4, hyper_width=8,
                                 hyper_layers=1, inr_width=8, inr_layers=1), 12)[0]
    ir = IRLINR(12, ir_cfg.model_config(), fourier_features=5)
    assert ir.hyper.ff.freqs.shape[1] == 5 and ir.cfg.inr_fourier_features == 5
    with pytest.raises(TypeError, match="unknown option"):
        IRLINR(12, ir_cfg, rotations=8)
    assert set(MODEL_CONFIGS) == {"target-vae", "irl-inr"}


def test_models_take_only_complete_configurations():
    """A model is given values, never None or "auto": what is left names itself; resolve()
    (or build_model, which calls it) chooses them."""
    with pytest.raises(ValueError, match="z_dim, ctf, mask, mask_diameter, enc_channels, "
                                         "kernel.*likelihood not given"):
        TargetVAE(12, TargetVAEConfig())
    with pytest.raises(ValueError, match="pixel_fraction not given"):
        IRLINR(12, IRLINRConfig(z_dim=2, ctf=False, enc_width=4, hyper_width=8,
                                hyper_layers=1, inr_width=8, inr_layers=1,
                                inr_fourier_features=4))
    assert build_model(TrainConfig(), 12).cfg.kernel == 9


def test_literal_choices_are_validated():
    for name, bad in (("rotation_prior", "cauchy"), ("amp", "fp8"), ("likelihood", "poisson"),
                      ("consistency_loss", "l1"), ("rotation_rule", "pca")):
        with pytest.raises(CryolatentError, match=f"--{name.replace('_', '-')} .*choose from"):
            TrainConfig(**{name: bad}).validate()
    with pytest.raises(CryolatentError, match="must be 4, 8 or 16"):
        TrainConfig(rotations=6).validate()
    with pytest.raises(CryolatentError, match="--inr-fourier-features must be >= 1"):
        TrainConfig(inr_fourier_features=0).validate()
