"""Models. Each is built as ``Model(box, cfg)`` from its configuration class
(:data:`cryolatent.config.MODEL_CONFIGS`, or a :class:`~cryolatent.config.TrainConfig`); its
module's ``build(cfg, box)`` does that for the registry. Training calls the model itself:
``model(images, ctf_params) -> (loss, parts)`` (:meth:`LatentModel.forward`)."""

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
