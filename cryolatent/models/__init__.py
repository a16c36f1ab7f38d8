"""Models. Each is built as ``Model(box, cfg)`` from a complete configuration (its class in
:data:`cryolatent.config.MODEL_CONFIGS`, or a resolved :class:`~cryolatent.config.TrainConfig`);
its module's ``build(cfg, box)`` does that for the registry. Training calls the model itself:
``model(images, ctf_params) -> (loss, parts)`` (:meth:`LatentModel.forward`)."""

from __future__ import annotations

import importlib

from .base import Inference, LatentModel, model_device

#: ``--model`` name -> module implementing ``build``
MODELS: dict[str, str] = {
    "target-vae": "cryolatent.models.target_vae",
    "irl-inr": "cryolatent.models.irl_inr",
}


def build_model(cfg, box: int, resolve: bool = True) -> LatentModel:
    """Instantiate the model named by ``cfg.model`` for ``box``-pixel images.

    ``resolve``: first complete ``cfg`` with :func:`cryolatent.config.resolve` for the box,
    nothing known of the data or the machine (what is not given: the papers' model); a
    complete configuration passes unchanged. False: ``cfg`` must be complete already (a
    run's recorded configuration: nothing is chosen again)."""
    try:
        mod = importlib.import_module(MODELS[cfg.model])
    except KeyError:
        from ..errors import CryolatentError

        raise CryolatentError(f"unknown model {cfg.model!r}; choose from {', '.join(MODELS)}")
    if resolve:
        from ..config import resolve as resolve_config

        cfg = resolve_config(cfg, box)[0]
    return mod.build(cfg, box)


__all__ = ["Inference", "LatentModel", "MODELS", "build_model", "model_device"]
