"""The interface every cryolatent model implements.

Training (``cryolatent.train``), inference (``embed``) and analysis (``classes``) only talk to
models through this interface, so TARGET-VAE and IRL-INR are interchangeable.

Conventions
-----------
* Images are ``(B, D, D)`` float tensors, pixel (0, 0) top-left, ``x`` = column, ``y`` = row.
* Poses leave a model in RELION's convention (``cryolatent.pose``): ``psi_deg`` (B,) in degrees
  and ``shift_px`` (B, 2) = (rlnOriginX, rlnOriginY) in pixels of the image the model saw. The
  caller converts pixels to Å with the pixel size it carries. Each model converts from its
  internal frame with one documented function, tested against ``cryolatent.pose``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Inference:
    """Per-particle output of :meth:`LatentModel.infer` (all tensors on the model's device).

    psi_deg:    (B,)   in-plane angle, RELION convention, degrees (written to STAR in
                       (-180, 180], as RELION writes it)
    shift_px:   (B, 2) (rlnOriginX, rlnOriginY) in pixels of the model's input images
    z_mean:     (B, D) latent mean (the representation written to cryolatentZ*)
    z_std:      (B, D) latent standard deviation (ones where a model has none)
    confidence: (B,)   posterior probability of the chosen pose (1 where a model has none)
    """

    psi_deg: torch.Tensor
    shift_px: torch.Tensor
    z_mean: torch.Tensor
    z_std: torch.Tensor
    confidence: torch.Tensor


class LatentModel(nn.Module):
    """Base class. Subclasses set ``name`` and implement :meth:`loss`, :meth:`infer` and
    :meth:`generate`; training calls the module itself (:meth:`forward`)."""

    name: str = "base"

    def forward(self, images: torch.Tensor, ctf_params: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training objective for a batch: (loss, parts), as :meth:`loss`.

        images: (B, D, D); ctf_params: None, or the particles' CTF parameters (B, 6)
        (:func:`cryolatent.ctf.ctf_params_tensor`), from which the CTF is computed here, on
        the images' device (:func:`cryolatent.ctf.ctf_from_params`); a (B, D, D) CTF image
        (unshifted FFT layout) is accepted too. No host synchronisation.
        """
        ctf = ctf_params
        if ctf is not None and ctf.ndim == 2:
            from ..ctf import ctf_from_params

            ctf = ctf_from_params(ctf, images.shape[-1], half=True)
        return self.loss(images, ctf)

    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training objective for a batch.

        images: (B, D, D); ctf: optional (B, D, D) CTF (unshifted FFT layout) or its rfft2
        half (B, D, D//2 + 1), for models that put the CTF in the likelihood
        (:func:`cryolatent.ctf.apply_ctf`). Returns the scalar loss to minimise and a dict of
        detached scalar tensors (loss parts, for the log). Must not synchronise with the host
        (no ``.item()``, ``.cpu()``).
        """
        raise NotImplementedError

    @torch.no_grad()
    def infer(self, images: torch.Tensor) -> Inference:
        """Pose (RELION convention), latent and confidence for a batch of (B, D, D) images."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, z: torch.Tensor, size: int) -> torch.Tensor:
        """Images (B, size, size) from latents (B, D) in the canonical pose (psi 0, shift 0)."""
        raise NotImplementedError


def model_device(model) -> torch.device:
    """The device of a model's parameters (the CPU for a module without any)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
