"""Circular masks of a square box, the one definition (models, preprocessing, analysis).

Every mask is centred on pixel ``(box//2, box//2)`` (RELION's image centre, the origin of
:func:`cryolatent.models.blocks.pixel_coordinates`); distances are in pixels. Hard masks
compare squared integer distances with ``radius**2`` in float64, so they are exact (no
pixel on the circle flips with the arithmetic). Computed with numpy (``cryolatent
preprocess`` does not import torch); :func:`circular_mask` hands it over as a tensor.
"""

from __future__ import annotations

import numpy as np

__all__ = ["squared_radius", "circular_mask_np", "circular_mask"]


def squared_radius(box: int) -> np.ndarray:
    """(box, box) float64: squared distance in px of every pixel from (box//2, box//2)."""
    c = np.arange(box, dtype=np.float64) - box // 2
    return c[:, None] ** 2 + c[None, :] ** 2


def circular_mask_np(box: int, radius: float | None = None, *, edge: float = 0.0,
                     outside: bool = False) -> np.ndarray:
    """The disc of ``radius`` px (default ``box / 2``, the inscribed circle) about pixel
    (box//2, box//2).

    ``edge == 0``: (box, box) bool, True where the distance is ``<= radius`` (with
    ``outside``: True where it is ``> radius``, e.g. RELION's background ring).
    ``edge > 0``: (box, box) float64 soft mask, 1 inside ``radius``, a raised-cosine fall-off
    to 0 at ``radius + edge`` (RELION's soft mask; ``outside`` gives ``1 -`` that).
    """
    radius = box / 2.0 if radius is None else float(radius)
    r2 = squared_radius(box)
    if edge <= 0:
        return r2 > radius * radius if outside else r2 <= radius * radius
    m = 0.5 * (1 + np.cos(np.pi * np.clip((np.sqrt(r2) - radius) / edge, 0, 1)))
    return 1 - m if outside else m


def circular_mask(box: int, radius: float | None = None, *, edge: float = 0.0,
                  outside: bool = False, device=None, dtype=None):
    """:func:`circular_mask_np` as a torch tensor on ``device`` (bool, or float64 for a
    soft mask; ``dtype`` converts)."""
    import torch

    m = torch.from_numpy(np.ascontiguousarray(
        circular_mask_np(box, radius, edge=edge, outside=outside)))
    return m.to(device=device, dtype=dtype or m.dtype)
