"""IRL-INR (Kwon, Choi & Ryu, ICML 2023): invariant representations with a hypernetwork INR.

An encoder E maps an image J to (z, theta, tau); a hypernetwork H maps z to every weight and
bias of a small coordinate network (the INR), which renders the *canonical* image. The
particle is reconstructed by evaluating the INR at the transformed pixel coordinates::

    J(p) ~ I(S_{theta,tau}(p); H(z)),      S_{theta,tau}(p) = R(theta) (p + tau)

(the paper's S = R o T: translate, then rotate). Training minimises
``lambda_recon * L_recon + lambda_consistency * L_consistency + lambda_symmetry * L_symmetry``.

Frames and units (``docs/irl-inr-rotation.md`` has the maths)
-------------------------------------------------------------
* Internal coordinates ``p = (x, y) * 2 / N`` with RELION's pixel frame: ``x = col - N//2``,
  ``y = row - N//2`` (so the box spans about [-1, 1), y points down). ``R(theta)`` is
  ``[[cos, -sin], [sin, cos]]`` acting on (x, y), the same matrix as RELION's ``R(psi)``.
* Hence ``particle(x) = canonical(R(theta)(x + tau * N/2))`` in pixels, which is RELION's
  ``particle(x) = aligned(R(psi)(x + t))`` with ``psi = theta`` and ``t = tau * N / 2``
  (:func:`frame_to_relion`).
* The encoder predicts the rotation as an unnormalised 2-vector; ``u = (cos, sin)`` is its
  direction (no angle wrapping anywhere in the loss).

Symmetry breaking (``cfg.rotation_rule``)
-----------------------------------------
* ``"com"`` — the paper's rule: ``m = CoM(|J|)``, loss ``||m - ||tau|| (cos t, -sin t)||^2``.
  The angle it prescribes is the direction of the centre-of-mass offset, undefined (noise)
  for centred particles.
* ``"moments"`` — ours: ``tau* = -centroid`` and the canonical orientation puts the
  principal axis of the second central moments along +x, the 180° ambiguity resolved by the
  sign of a third moment along that axis, ``<(v.d)|d|^2>``. See :func:`moment_targets`.

Speed: everything in :meth:`IRLINR.loss` is batched (one ``bmm`` per INR layer for the whole
batch, on-device consistency views with ``grid_sample``, moments as batched reductions) and
never synchronises with the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IRLINRConfig
from ..ctf import apply_ctf
from ..masks import circular_mask
from .base import Inference, LatentModel
from .blocks import FourierFeatures, draw_pixels, pixel_coordinates

__all__ = [
    "IRLINR", "build", "frame_to_relion", "grid_coords", "warp_images", "moment_targets",
    "com_targets", "symmetry_targets", "render_inr", "ResNet18Small",
]

#: sd of the consistency views' random shifts, as a fraction of the box (cfg.extra override
#: "consistency_shift"); MNIST(U) at 50 px: 2.5 px on top of the data's own N(0, 5^2) shifts.
CONSISTENCY_SHIFT = 0.05

#: moments rule: Gaussian low-pass sd (fraction of the box) and threshold (in background sd)
#: applied before the moments, so that noise far from the centre does not swamp them
MOMENT_BLUR = 0.05
MOMENT_THRESHOLD = 2.0


# ----------------------------------------------------------------------------- frames

def grid_coords(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Internal coordinates of an n x n pixel grid: (n*n, 2) rows ``(x, y) * 2/n``.

    Row-major over (row, col): entry ``row * n + col`` is ``((col - n//2) * 2/n,
    (row - n//2) * 2/n)``, matching ``images.reshape(B, n*n)`` (the shared frame of
    :func:`cryolatent.models.blocks.pixel_coordinates`).
    """
    return pixel_coordinates(n, device=device, dtype=dtype)


def frame_to_relion(rot: torch.Tensor, tau: torch.Tensor, box: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Internal pose -> RELION pose (the one place the conversion lives).

    rot: (B, 2) rotation as a (not necessarily unit) vector ``(cos theta, sin theta)``;
    tau: (B, 2) internal translation (units of half a box); box: image size N in pixels.
    Returns ``psi_deg`` (B,) in [0, 360) and ``shift_px`` (B, 2) = (rlnOriginX, rlnOriginY).

    The model reconstructs ``J(p) = I(R(theta)(p + tau))`` with ``p = x * 2/N``, i.e.
    ``particle(x) = canonical(R(theta)(x + tau N/2))`` in pixels: RELION's
    ``particle(x) = aligned(R(psi)(x + t))`` with ``psi = theta``, ``t = tau * N/2``.
    """
    psi = torch.rad2deg(torch.atan2(rot[..., 1], rot[..., 0]))
    psi = torch.remainder(psi, 360.0)
    psi = torch.where(psi >= 360.0, psi - 360.0, psi)
    return psi, tau * (box / 2.0)


def _unit(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(..., 2) -> unit vectors (a zero vector maps to ~0, without NaN)."""
    return v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps * eps)


def warp_images(images: torch.Tensor, rot: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """out(x) = images(R(theta)(x + s)) (RELION's transform_to_particle), bilinear, zeros outside.

    images: (B, N, N); rot: (B, 2) unit (cos theta, sin theta); shift_px: (B, 2) pixels.
    Returns (B, N, N) float. Pure tensor ops (grid_sample), no host synchronisation.
    """
    B, N, _ = images.shape
    r = torch.arange(N, device=images.device, dtype=torch.float32) - (N // 2)
    y, x = torch.meshgrid(r, r, indexing="ij")
    c, s = rot[:, 0, None, None].float(), rot[:, 1, None, None].float()
    u = x[None] + shift_px[:, 0, None, None].float()
    v = y[None] + shift_px[:, 1, None, None].float()
    sx = c * u - s * v + (N // 2)      # source column index
    sy = s * u + c * v + (N // 2)      # source row index
    scale = 2.0 / max(N - 1, 1)
    grid = torch.stack([sx * scale - 1.0, sy * scale - 1.0], -1)
    out = F.grid_sample(images.float().unsqueeze(1), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out.squeeze(1)


# ----------------------------------------------------------------------------- symmetry rules

def com_targets(images: torch.Tensor) -> torch.Tensor:
    """The paper's centre of mass ``m = sum p |J(p)| / sum |J(p)|`` (internal units).

    images: (B, N, N) -> (B, 2). Its target pose is ``tau = -m`` and ``theta`` with
    ``m = ||m|| (cos theta, -sin theta)`` (undefined when ``m = 0``).
    """
    B, N, _ = images.shape
    w = images.float().abs().reshape(B, -1)
    p = grid_coords(N, images.device)
    mass = w.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.stack([(w * p[:, 0]).sum(-1), (w * p[:, 1]).sum(-1)], -1) / mass


_MASK_CACHE: dict = {}


def _masks(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, outer): (n*n,) float mask of the inscribed disc; (K,) long indices of the
    background ring outside the circle of diameter 0.75 n (RELION's normalisation area)."""
    key = (n, str(device))
    if key not in _MASK_CACHE:
        inside = circular_mask(n, device=device, dtype=torch.float32).reshape(-1)
        outer = torch.nonzero(circular_mask(n, 0.375 * n, outside=True, device=device)
                              .reshape(-1)).squeeze(1)
        _MASK_CACHE[key] = (inside, outer)
    return _MASK_CACHE[key]


def moment_targets(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Moments symmetry-breaking targets of a batch (internal units), defined for centred particles.

    images: (B, N, N). The image is low-passed with an isotropic Gaussian (sd ``MOMENT_BLUR *
    N``; this adds ``sd^2`` to both principal second moments and leaves the anisotropic part
    and the third central moments unchanged) and weighted by ``w = max(J - b - k s, 0)`` inside
    the inscribed disc, ``b`` the median and ``s`` the robust sd (1.4826 MAD) of the background
    ring (outside the 0.75 N circle), ``k = MOMENT_THRESHOLD``: without the threshold, noise
    all over the disc dominates the r^3-weighted third moment. With centroid ``m`` and
    ``d = p - m``:

    * ``tau``:    (B, 2) ``-m``: the translation that centres the mass.
    * ``c2``:     (B, 2) ``(<dx^2 - dy^2>, <2 dx dy>)``; the principal axis is at angle
      ``alpha = atan2(c2_y, c2_x) / 2`` (defined mod 180°).
    * ``skew``:   (B,) third moment along the axis ``v = (cos alpha, sin alpha)``,
      ``<(v.d) |d|^2>`` (= mu30 + mu12 in the axis frame) in units of ``<|d|^2>^{3/2}``;
      the axis is flipped (``v -> -v``) where it is negative.
    * ``e1``:     (B, 2) ``(cos theta*, sin theta*)``, ``theta* = -angle(v)``: rotating by
      ``theta*`` puts the (oriented) axis on +x (full 360° target).
    * ``e2``:     (B, 2) ``(cos 2theta*, sin 2theta*) = (c2_x, -c2_y)/|c2|`` (axis only).
    * ``weight``: (B,) ``|c2|``, the anisotropy (a squared length, 0 for isotropic mass).
    * ``aniso``:  (B,) ``|c2| / <|d|^2>`` in [0, 1].
    """
    B, N, _ = images.shape
    inside, outer = _masks(N, images.device)
    x = images.float()
    if MOMENT_BLUR > 0:   # isotropic Gaussian low-pass (rotation-equivariant), via FFT
        k = torch.fft.fftfreq(N, device=x.device)
        k2 = k[:, None] ** 2 + k[None, :] ** 2
        sig = MOMENT_BLUR * N
        x = torch.fft.ifft2(torch.fft.fft2(x) * torch.exp(-2 * math.pi ** 2 * sig ** 2 * k2)).real
    flat = x.reshape(B, -1)
    ring = flat[:, outer]
    bg = ring.median(dim=1).values
    noise = 1.4826 * (ring - bg[:, None]).abs().median(dim=1).values   # robust sd (MAD)
    w = torch.relu(flat - (bg + MOMENT_THRESHOLD * noise)[:, None]) * inside
    W = w.sum(-1).clamp_min(1e-12)
    p = grid_coords(N, images.device)
    m = torch.stack([(w * p[:, 0]).sum(-1), (w * p[:, 1]).sum(-1)], -1) / W[:, None]
    dx = p[None, :, 0] - m[:, 0, None]
    dy = p[None, :, 1] - m[:, 1, None]
    i2 = (w * (dx * dx + dy * dy)).sum(-1) / W
    c2 = torch.stack([(w * (dx * dx - dy * dy)).sum(-1), (w * 2 * dx * dy).sum(-1)], -1) / W[:, None]
    mag = torch.sqrt((c2 * c2).sum(-1) + 1e-24)
    # axis v = (cos a, sin a), a = arg(c2)/2, via half-angle formulas (no atan2 branch issue)
    ca = torch.sqrt(((1 + c2[:, 0] / mag) / 2).clamp_min(0))
    sa = torch.sqrt(((1 - c2[:, 0] / mag) / 2).clamp_min(0)) * torch.where(c2[:, 1] < 0, -1.0, 1.0)
    proj = dx * ca[:, None] + dy * sa[:, None]
    # third moment along the axis, <(v.d) |d|^2> = mu30 + mu12 in the axis frame (the axis
    # projection of the 1-fold moment <zeta |zeta|^2>): measured 0.83/0.70/0.49 rotation corr.
    # at SNR 100/10/1 (benchmarks/studies/irl_inr_centred.py, 6 objects) vs 0.76/0.48/0.39 for mu30 alone
    skew = (w * proj * (dx * dx + dy * dy)).sum(-1) / W / i2.clamp_min(1e-12) ** 1.5
    sign = torch.where(skew < 0, -1.0, 1.0)
    vx, vy = ca * sign, sa * sign
    return {
        "tau": -m,
        "c2": c2,
        "skew": skew * sign,
        "e1": torch.stack([vx, -vy], -1),
        "e2": torch.stack([c2[:, 0], -c2[:, 1]], -1) / mag[:, None],
        "weight": mag,
        "aniso": mag / i2.clamp_min(1e-12),
    }


def symmetry_targets(images: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pose a rule prescribes: (rot (B, 2) unit (cos theta, sin theta), tau (B, 2) internal).

    ``"moments"``: :func:`moment_targets` ``e1`` and ``tau``. ``"com"``: ``tau = -m``,
    ``(cos theta, sin theta) = (m_x, -m_y)/||m||`` (direction undefined for ``m = 0``).
    """
    if rule == "moments":
        t = moment_targets(images)
        return t["e1"], t["tau"]
    if rule == "com":
        m = com_targets(images)
        return _unit(torch.stack([m[:, 0], -m[:, 1]], -1), 1e-12), -m
    raise ValueError(f"unknown rotation rule {rule!r}")


# ----------------------------------------------------------------------------- networks

class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn2.weight)  # residual branch starts at 0 (Goyal et al.)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNet18Small(nn.Module):
    """ResNet-18 for small images: 3x3 stride-1 stem, no max-pool, stages (w, 2w, 4w, 8w).

    (B, 1, N, N) -> (B, 8w) after global average pooling.
    """

    def __init__(self, width: int = 64, in_ch: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if i == 0 else 2
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.layers(self.stem(x)).mean(dim=(-2, -1))


def _mlp(dims: list[int], act: nn.Module) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            mods.append(act)
    return nn.Sequential(*mods)


def render_inr(coords: torch.Tensor, ff: FourierFeatures,
               params: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Evaluate a batch of INRs, one ``baddbmm`` per layer.

    coords: (B, P, 2) internal coordinates (already transformed); ff: the random Fourier
    features ``[cos(2 pi p B), sin(2 pi p B)]`` (B, P, 2F), phases in float32 (float64 for
    float64 coordinates) even under bf16 autocast; params: per layer (W (B, in, out),
    b (B, out)). ReLU between layers. Returns (B, P).
    """
    h = ff(coords)
    n = len(params)
    for i, (W, b) in enumerate(params):
        h = torch.baddbmm(b.unsqueeze(1), h, W)   # autocast: bf16 tensor cores on CUDA
        if i < n - 1:
            h = F.relu(h)
    return h.squeeze(-1)


class HyperINR(nn.Module):
    """Hypernetwork z -> all weights and biases of the INR ``[2F, h x L, 1]`` (ReLU).

    The last hypernetwork layer's bias *is* a shared base INR (Kaiming-initialised); its
    weight starts small so that z modulates the base (same function class as the paper's
    plain MLP, better conditioned at initialisation).
    """

    def __init__(self, z_dim: int, hyper_width: int, hyper_layers: int, inr_width: int,
                 inr_layers: int, fourier_features: int, fourier_sigma: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        dims = [2 * fourier_features] + [inr_width] * inr_layers + [1]
        self.shapes = [(dims[i], dims[i + 1]) for i in range(len(dims) - 1)]
        self.n_params = sum(i * o + o for i, o in self.shapes)
        self.ff = FourierFeatures(fourier_features, fourier_sigma, generator=generator)
        self.body = _mlp([z_dim] + [hyper_width] * hyper_layers, nn.LeakyReLU(0.1))
        self.body.append(nn.LeakyReLU(0.1))
        self.head = nn.Linear(hyper_width, self.n_params)
        with torch.no_grad():
            base, wstd = [], []
            for i, o in self.shapes:
                std = math.sqrt(2.0 / i)
                base += [torch.randn(i * o, generator=generator) * std, torch.zeros(o)]
                wstd += [torch.full((i * o + o,), std)]
            self.head.bias.copy_(torch.cat(base))
            scale = torch.cat(wstd) * (0.5 / math.sqrt(hyper_width))
            self.head.weight.copy_(torch.randn(self.n_params, hyper_width, generator=generator)
                                   * scale[:, None])

    def forward(self, z: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """z (B, d) -> per INR layer (W (B, in, out), b (B, out))."""
        flat = self.head(self.body(z))
        out, k = [], 0
        for i, o in self.shapes:
            W = flat[:, k:k + i * o].reshape(-1, i, o)
            k += i * o
            b = flat[:, k:k + o]
            k += o
            out.append((W, b))
        return out


# ----------------------------------------------------------------------------- model

class IRLINR(LatentModel):
    """IRL-INR as a :class:`LatentModel` for ``box``-pixel images."""

    name = "irl-inr"

    def __init__(self, box: int, cfg: IRLINRConfig | None = None, *,
                 consistency_shift: float | None = None, seed: int | None = None, **options):
        """IRL-INR for ``box``-pixel images. ``cfg``: a complete :class:`IRLINRConfig` or any
        configuration with its fields (a resolved :class:`cryolatent.config.TrainConfig`);
        keyword ``options`` override its fields (old names accepted, ``IRLINRConfig.ALIASES``).
        An option left None is a ValueError (:func:`cryolatent.config.resolve` chooses them).
        ``consistency_shift`` (default ``cfg.extra["consistency_shift"]``, else
        :data:`CONSISTENCY_SHIFT`) and ``seed`` (default ``cfg.seed``, else 0)."""
        super().__init__()
        extra = getattr(cfg, "extra", None) or {}
        if consistency_shift is None:
            consistency_shift = float(extra.get("consistency_shift", CONSISTENCY_SHIFT))
        seed = int(getattr(cfg, "seed", 0)) if seed is None else seed
        c = IRLINRConfig.of(cfg, **options)
        c.require_complete(self.name)
        self.cfg = c
        z_dim, enc_width, consistency_loss, rotation_rule = (
            c.z_dim, c.enc_width, c.consistency_loss, c.rotation_rule)
        lambda_recon, lambda_consistency, lambda_symmetry = (
            c.lambda_recon, c.lambda_consistency, c.lambda_symmetry)
        if consistency_loss not in ("cosine", "mse"):
            raise ValueError(f"consistency_loss {consistency_loss!r}")
        if rotation_rule not in ("moments", "com"):
            raise ValueError(f"rotation_rule {rotation_rule!r}")
        g = torch.Generator().manual_seed(seed)
        self.box, self.z_dim = box, z_dim
        self.lambdas = (lambda_recon, lambda_consistency, lambda_symmetry)
        self.consistency_loss, self.rotation_rule = consistency_loss, rotation_rule
        self.consistency_shift = consistency_shift
        self.encoder = ResNet18Small(enc_width)
        hw = 8 * enc_width  # 512 at the paper's width: head [512, 512, d + 4]
        self.head = _mlp([self.encoder.out_dim, hw, hw, z_dim + 4], nn.ReLU())
        with torch.no_grad():  # start near tau = 0
            self.head[-1].weight[z_dim + 2:].mul_(0.01)
            self.head[-1].bias[z_dim + 2:].zero_()
        self.hyper = HyperINR(z_dim, c.hyper_width, c.hyper_layers, c.inr_width, c.inr_layers,
                              c.inr_fourier_features, c.inr_fourier_sigma, generator=g)
        self._channels_last = False
        self.pixel_fraction = float(c.pixel_fraction)
        if not 0 < self.pixel_fraction <= 1:
            raise ValueError(f"pixel_fraction {self.pixel_fraction}: must be in (0, 1]")

    # -- pieces ---------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, N) -> z (B, d), rot (B, 2) unit (cos, sin), tau (B, 2) internal units."""
        x = images.unsqueeze(1)
        if x.is_cuda:
            # NHWC convolutions (tensor cores); parameters are converted in place, once, outside
            # inference mode (inference tensors could not be trained afterwards)
            if not self._channels_last and not torch.is_inference_mode_enabled():
                self.encoder.to(memory_format=torch.channels_last)
                self._channels_last = True
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.head(self.encoder(x)).float()
        d = self.z_dim
        return out[:, :d], _unit(out[:, d:d + 2]), out[:, d + 2:d + 4]

    def render(self, z: torch.Tensor, rot: torch.Tensor | None, tau: torch.Tensor | None,
               size: int, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """INR images (B, size, size) at coordinates ``S_{theta,tau}(p) = R(theta)(p + tau)``.

        rot: (B, 2) unit (cos, sin) or None (identity); tau: (B, 2) or None (zero).
        pixels: optional flat pixel indices (m,): then only those, (B, m).
        """
        work = torch.float64 if z.dtype == torch.float64 else torch.float32
        p = grid_coords(size, z.device, work)                          # (P, 2)
        p = (p if pixels is None else p[pixels])[None]                 # (1, P | m, 2)
        if tau is not None:
            p = p + tau[:, None, :].to(work)
        if rot is not None:
            c, s = rot[:, None, 0:1].to(work), rot[:, None, 1:2].to(work)
            p = torch.cat([c * p[..., 0:1] - s * p[..., 1:2], s * p[..., 0:1] + c * p[..., 1:2]], -1)
        p = p.expand(z.shape[0], -1, -1)
        out = render_inr(p, self.hyper.ff, self.hyper(z))
        return out if pixels is not None else out.reshape(-1, size, size)

    def consistency_views(self, images: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two independently rotated and shifted copies of every image, made on the device.

        images: (B, N, N). Each of the 2B views gets its own angle ~ U(0, 2 pi) and shift
        ~ N(0, (consistency_shift * N)^2) px: ``views[k*B + i](x) = images[i](R(a)(x + s))``.
        Returns views (2B, N, N), rot (2B, 2) (cos a, sin a), shift (2B, 2) px.
        """
        B, N, _ = images.shape
        dev = images.device
        ang = torch.rand(2 * B, device=dev) * (2 * math.pi)
        rot = torch.stack([torch.cos(ang), torch.sin(ang)], -1)
        shift = torch.randn(2 * B, 2, device=dev) * (self.consistency_shift * N)
        return warp_images(images.repeat(2, 1, 1), rot, shift), rot, shift

    def symmetry_loss(self, images: torch.Tensor, rot: torch.Tensor, tau: torch.Tensor
                      ) -> torch.Tensor:
        """Per-image symmetry-breaking loss (B,) for predicted rot (B, 2) unit, tau (B, 2)."""
        if self.rotation_rule == "com":
            m = com_targets(images)
            r = torch.sqrt((tau * tau).sum(-1) + 1e-12)
            pred = r[:, None] * torch.stack([rot[:, 0], -rot[:, 1]], -1)
            return ((m - pred) ** 2).sum(-1)
        t = moment_targets(images)
        cos1 = (rot * t["e1"]).sum(-1)           # cos(theta - theta*)
        # mass-weighted mean squared displacement: |c2| * dtheta^2 / 2 for small errors. No
        # axis-only (2 theta) term: where the 180-degree bit of theta* is right for a share
        # p < 1 of a class, E[loss](d) = 1 - (2p - 1) cos d + b (1 - cos 2d) has a local
        # minimum at the flipped pose d = 180 degrees whenever 4b > 2p - 1 (the former
        # b = 1/4: always), which trapped whole classes upside down (docs/irl-inr-rotation.md)
        rot_term = t["weight"] * (1 - cos1)
        return ((tau - t["tau"]) ** 2).sum(-1) + rot_term

    # -- LatentModel ----------------------------------------------------------------
    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, N, N); ctf optional (B, N, N) unshifted-FFT CTF applied to the rendering."""
        B, N, _ = images.shape
        views, _, _ = self.consistency_views(images)                   # (2B, N, N)
        allx = torch.cat([images.float(), views], 0)                   # (3B, N, N)
        z, u, tau = self.encode(allx)
        if self.training and self.pixel_fraction < 1 and ctf is None:
            # a fresh uniform draw of m pixels: their mean squared error is an unbiased
            # estimate of the whole image's (the CTF mixes all pixels, so not with it)
            px = draw_pixels(N * N, self.pixel_fraction, images.device)
            pred = self.render(z[:B], u[:B], tau[:B], N, pixels=px).float()
            l_rec = ((pred - images.reshape(B, -1)[:, px].float()) ** 2).mean()
        else:
            pred = self.render(z[:B], u[:B], tau[:B], N).float()
            if ctf is not None:
                pred = apply_ctf(pred, ctf)
            l_rec = ((pred - images.float()) ** 2).mean()
        z1, z2 = z[B:2 * B], z[2 * B:]
        if self.consistency_loss == "cosine":
            l_con = (1 - F.cosine_similarity(z1, z2, dim=-1, eps=1e-8)).mean()
        else:
            l_con = ((z1 - z2) ** 2).mean()
        l_sym = self.symmetry_loss(allx, u, tau).mean()
        lr_, lc_, ls_ = self.lambdas
        total = lr_ * l_rec + lc_ * l_con + ls_ * l_sym
        parts = {"loss": total.detach(), "recon": l_rec.detach(),
                 "consistency": l_con.detach(), "symmetry": l_sym.detach()}
        return total, parts

    @torch.no_grad()
    def infer(self, images: torch.Tensor) -> Inference:
        """RELION pose, latent and confidence for (B, N, N) images (call ``.eval()`` first)."""
        z, u, tau = self.encode(images.float())
        psi, shift = frame_to_relion(u, tau, images.shape[-1])
        one = torch.ones(z.shape[0], device=z.device)
        return Inference(psi_deg=psi, shift_px=shift, z_mean=z, z_std=torch.ones_like(z),
                         confidence=one)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, size: int) -> torch.Tensor:
        """Canonical images (B, size, size) (psi 0, shift 0); ``size`` resamples the same field
        of view as the training box (internal coordinates span [-1, 1) at any size)."""
        return self.render(z, None, None, size).float()


def build(cfg, box: int) -> IRLINR:
    """``IRLINR(box, cfg)`` (the model registry's entry, :func:`cryolatent.models.build_model`)."""
    return IRLINR(box, cfg)
