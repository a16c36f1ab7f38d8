"""Models. Each model module defines ``build(cfg: TrainConfig, box: int) -> LatentModel``."""

from __future__ import annotations

import importlib

from .base import Inference, LatentModel

#: ``--model`` name -> module implementing ``build``
MODELS: dict[str, str] = {
    "target-vae": "cryolatent.models.target_vae",
    "irl-inr": "cryolatent.models.irl_inr",
}


def build_model(cfg, box: int) -> LatentModel:
    """Instantiate the model named by ``cfg.model`` for ``box``-pixel images."""
    try:
        mod = importlib.import_module(MODELS[cfg.model])
    except KeyError:
        from ..errors import CryolatentError

        raise CryolatentError(f"unknown model {cfg.model!r}; choose from {', '.join(MODELS)}")
    return mod.build(cfg, box)


__all__ = ["Inference", "LatentModel", "MODELS", "build_model"]
