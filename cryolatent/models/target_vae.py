"""TARGET-VAE (Nasiri & Bepler, NeurIPS 2022), implemented from the paper.

Pose frame
----------
Pixel coordinates follow :mod:`cryolatent.models.blocks` (origin at RELION's centre
(N//2, N//2), x = column, y = row, one unit = N/2 pixels). The model's latent pose is an angle
``theta`` (radians) and an object location ``u`` (pixels, (x, y)) on the translation grid;
the generator renders

    image(x) = g_z( R(theta) (x - u) )                                         (eq. 2)

which is the paper's x' = R(theta) x + t with t = -R(theta) u (``u`` is what the attention map
locates, so the encoder is translation-equivariant in ``u``). In RELION's convention
particle(x) = canonical(R(psi)(x + t_relion)), hence (:func:`pose_to_relion`)

    psi = theta,   (rlnOriginX, rlnOriginY) = -u.

Encoder
-------
One lifting P_r group convolution (C = ``enc_channels`` filters of ``kernel`` x ``kernel``
px, each applied at R rotations; rotation r uses the filters turned so that rotating the
image by +2 pi/R moves the response from r to r - 1, i.e. theta -> theta - 2 pi/R), then
``enc_layers`` 1x1 group convolutions (a Linear over channels shared by all positions and
rotations), LeakyReLU between. The last one outputs, per grid position t and rotation r,
the attention logit a, mu_z, log sigma_z (D each), mu_theta, log sigma_theta and, with
``subpixel``, mu_delta (2) and log sigma_delta.

The translation grid has offsets -T..T px around the centre in x and y, T =
``translation_range``; the input is zero-padded so that the ``kernel`` centred on every grid
offset is evaluated. Their defaults, from the box, are :func:`cryolatent.config.resolve`'s
(T = min(box//2, ceil(4 sigma_t)) without CTF: the prior N(0, sigma_t^2) puts < 1e-4 of its
mass outside; the kernel the smallest odd size >= 0.6 box, 31 for 50-px MNIST, larger than
the 28-px digit: the paper's "kernel larger than the object").

Posterior and KL (eqs. 3-5), all exact:
q(t, r | y) = softmax over the (2T+1)^2 x R logits; q(z | t, r, y) = N(mu_z, sigma_z^2);
q(theta | t, r, y) = N(mu_theta + r 2 pi / R, sigma_theta^2);
p(t) = N(0, sigma_t^2) discretised on the grid, p(r) uniform or a discretised normal
(sd ``rotation_prior_sd`` degrees) over the offsets, p(theta | r) = N(r 2 pi / R, (pi/R)^2),
p(z) = N(0, I). KL = KL_tr + sum_{t,r} q(t,r) (KL_theta + KL_z), closed forms.

Sub-pixel translation (``subpixel``, the paper's suggested extension, built like the angle):
each cell also outputs an offset delta ~ N(mu_delta, sigma_delta^2 I) (pixels, 2-D) around its
grid position, with prior N(0, (1/2 px)^2 I) — half the grid spacing, as p(theta | r) has half
the rotation step. mu_delta is predicted in the frame of the cell's rotation and turned into
the image frame by R(-r 2 pi / R), so the encoder stays rotation-equivariant: the object's
location is u = grid(t) + R(-r 2 pi/R) mu_delta. Its KL joins the sum of eq. 5 like KL_theta.

Training draws a Gumbel-softmax soft one-hot over (t, r) (temperature ``gumbel_tau``); the
soft weights average mu_z, sigma_z, the location u, sigma_theta and — as a circular mean of
unit vectors, so that r = 0 and r = R-1 average to ~0 rather than ~pi — the angle means; then
z and theta are reparameterised samples. Inference takes the most probable (t, r) and means.

Recentring (``recentre``, on by default, inference only). Nothing in the objective fixes
where the object sits in the generator's canonical frame beyond the weak pull of p(t): a
model can learn its object a few pixels off the centre, and every reported shift then carries
that offset turned by the particle's angle (on the demo set this was most of the shift error).
As RELION centres its class averages, :meth:`TargetVAE.canonical_centre` finds the centre of
mass c(z) of the generated object (low-resolution render, positive part above the border's
level, sign-agnostic) and inference reports u' = u + R(-theta) c(z), the location of that
centre; :meth:`generate` renders the object with its centre of mass at the box centre.

Generator
---------
Random Fourier features (``fourier_features`` frequencies ~ N(0, sigma^2) with
sigma = ``gen_fourier_sigma`` cycles per pixel, i.e. sigma * box/2 cycles per unit) of x',
through Linear(2F, W); z through Linear(D, W); summed, LeakyReLU, then ``gen_layers`` hidden
Linear(W, W) + LeakyReLU, then Linear(W, 1) (Bernoulli logit or Gaussian mean) or
Linear(W, 2) (Gaussian mean and log sigma, ``learn_sigma``). All pixels of all images go
through the same matrices as one (B*P, W) product.

Likelihood: Bernoulli (images in [0, 1]) or Gaussian (sigma 1, or learned per pixel); with
``ctf`` the generated image is multiplied by the particle's CTF in Fourier space before the
Gaussian comparison; ``mask`` restricts the likelihood to the disc of diameter
``mask_diameter``.
With ``pixel_fraction`` < 1 (no CTF), a training step renders and scores only a fresh uniform
draw of m = fraction * P' of the P' scored pixels and multiplies their sum by P'/m: an unbiased
estimate of the reconstruction term (and of its gradient) for a fraction of the generator's
cost; evaluation and inference always use every pixel.

Cost (benchmarks/README.md, "Training cost per particle"): the generator's first layer is
:func:`blocks.fourier_linear` (the Fourier features are recomputed in the backward pass rather
than kept: most of the activation memory at 64 px), and :class:`blocks.GroupConvP` picks an
im2col product or a direct convolution by size; both are tested against the plain computation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Inference, LatentModel
from ..config import TargetVAEConfig
from ..ctf import apply_ctf
from ..masks import circular_mask
from .blocks import (FourierFeatures, GroupConvP, GroupLinear, MLP, draw_pixels,
                     fourier_linear, pixel_coordinates)

LOGSTD_MIN, LOGSTD_MAX = -9.0, 4.0
#: training renders the generator in blocks of at most this many activations per layer
#: (batch x pixels x width), recomputed in the backward pass (TargetVAE.render_for_training)
RENDER_BLOCK = 2 ** 23
_SLOPE = 0.01
_LOG2PI = math.log(2 * math.pi)


def pose_to_relion(theta: torch.Tensor, u_px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's pose -> RELION's.

    theta: (B,) radians, u_px: (B, 2) object location (x, y) in pixels from (N//2, N//2), as
    used by the generator image(x) = g(R(theta)(x - u)). RELION: particle(x) =
    canonical(R(psi)(x + t)). Returns psi_deg (B,) in [0, 360) and t = shift_px (B, 2) =
    (rlnOriginX, rlnOriginY) = -u.
    """
    psi = torch.remainder(torch.rad2deg(theta), 360.0)
    psi = torch.where(psi >= 360.0, psi - 360.0, psi)
    return psi, -u_px


def _turn_back(cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor, y: torch.Tensor
               ) -> torch.Tensor:
    """R(-a)(x, y) for cos a, sin a (broadcast together): (..., 2)."""
    return torch.stack([cos * x + sin * y, -sin * x + cos * y], -1)


def kl_divergence(log_q: torch.Tensor, log_p_tr: torch.Tensor, z_mu: torch.Tensor,
                  z_logstd: torch.Tensor, th_mu: torch.Tensor, th_logstd: torch.Tensor,
                  th_prior_sd: float, d_mu: torch.Tensor | None = None,
                  d_logstd: torch.Tensor | None = None, d_prior_sd: float = 0.5
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact KL of eq. 5 per image.

    log_q: (B, N) log q(t, r | y) over the N = (2T+1)^2 R cells; log_p_tr: (N,) log p(t) p(r);
    z_mu, z_logstd: (B, N, D); th_mu: (B, N) mean of q(theta|t,r) minus the offset r 2pi/R
    (the prior p(theta | r) has mean the offset, so only the difference matters);
    th_logstd: (B, N); th_prior_sd: sd of p(theta | r); optional sub-pixel offsets
    d_mu (B, N, 2), d_logstd (B, N) (isotropic) with prior N(0, d_prior_sd^2 I), whose KL is
    added to the angle's (both are the within-cell pose).
    Returns (kl_tr, E_q[KL_theta (+ KL_delta)], E_q[KL_z]), each (B,).
    """
    q = log_q.exp()
    kl_tr = (q * (log_q - log_p_tr)).sum(-1)
    s2 = th_prior_sd ** 2
    kl_th = (math.log(th_prior_sd) - th_logstd
             + ((2 * th_logstd).exp() + th_mu ** 2) / (2 * s2) - 0.5)
    kl_z = (-z_logstd + 0.5 * ((2 * z_logstd).exp() + z_mu ** 2) - 0.5).sum(-1)
    if d_mu is not None:
        s2 = d_prior_sd ** 2
        kl_th = kl_th + (2 * (math.log(d_prior_sd) - d_logstd - 0.5)
                         + (2 * (2 * d_logstd).exp() + (d_mu ** 2).sum(-1)) / (2 * s2))
    return kl_tr, (q * kl_th).sum(-1), (q * kl_z).sum(-1)


class TargetVAE(LatentModel):
    name = "target-vae"

    def __init__(self, box: int, cfg: TargetVAEConfig | None = None, *,
                 seed: int | None = None, **options):
        """TARGET-VAE for ``box``-pixel images. ``cfg``: a complete :class:`TargetVAEConfig`
        or any configuration with its fields (a resolved
        :class:`cryolatent.config.TrainConfig`); keyword ``options`` override its fields (old
        names accepted, ``TargetVAEConfig.ALIASES``). An option left None is a ValueError
        (:func:`cryolatent.config.resolve` chooses them). ``seed`` (default ``cfg.seed``,
        else 0) draws the generator's Fourier features."""
        super().__init__()
        seed = int(getattr(cfg, "seed", 0)) if seed is None else seed
        c = TargetVAEConfig.of(cfg, **options)
        c.require_complete(self.name)
        self.cfg = c
        z_dim, rotations, enc_layers, likelihood = c.z_dim, c.rotations, c.enc_layers, \
            c.likelihood
        enc_channels, gen_width, gen_layers = c.enc_channels, c.gen_width, c.gen_layers
        learn_sigma, mask, ctf = c.learn_sigma, c.mask, c.ctf
        self.pixel_fraction = float(c.pixel_fraction)
        if not 0 < self.pixel_fraction <= 1:
            raise ValueError(f"pixel_fraction {self.pixel_fraction}: must be in (0, 1]")
        if self.pixel_fraction < 1 and ctf:
            raise ValueError("pixel_fraction < 1 needs a likelihood without CTF")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood {likelihood!r}")
        if ctf and likelihood != "gaussian":
            raise ValueError("the CTF likelihood needs --likelihood gaussian")
        if enc_layers < 1:
            raise ValueError("enc_layers must be >= 1")
        if c.kernel % 2 == 0:
            raise ValueError(f"kernel {c.kernel}: must be odd (centred on a pixel)")
        self.box, self.z_dim, self.rotations = box, z_dim, rotations
        self.kernel, self.trange = c.kernel, c.translation_range
        self.likelihood, self.learn_sigma, self.use_mask = likelihood, learn_sigma, mask
        self.use_ctf, self.gumbel_tau = ctf, c.gumbel_tau
        self.th_prior_sd = math.pi / rotations
        self.subpixel, self.recentre = c.subpixel, c.recentre
        self.delta_prior_sd = 0.5  # px: half the translation grid's spacing
        self.kl_z_weight = 1.0     # weight of KL_z in training steps (set by the trainer)
        self.kl_free_bits = c.kl_free_bits
        self.scale = box / 2.0  # pixels per coordinate unit

        # --- encoder
        self.gconv = GroupConvP(enc_channels, self.kernel, rotations)
        self.n_out = 1 + 2 * z_dim + 2 + (3 if c.subpixel else 0)
        layers = [GroupLinear(enc_channels, enc_channels) for _ in range(enc_layers - 1)]
        layers.append(GroupLinear(enc_channels, self.n_out))
        self.enc = nn.ModuleList(layers)

        # --- generator
        g = torch.Generator().manual_seed(seed + 7919)
        self.ff = FourierFeatures(c.gen_fourier_features, c.gen_fourier_sigma * self.scale,
                                  generator=g)
        self.coord_in = nn.Linear(self.ff.out_dim, gen_width)
        self.z_in = nn.Linear(z_dim, gen_width, bias=False)
        self.gen = MLP(gen_width, gen_layers, 2 if (learn_sigma and likelihood == "gaussian")
                       else 1, slope=_SLOPE)

        # --- fixed tables
        T, R = self.trange, rotations
        off = torch.arange(-T, T + 1, dtype=torch.float64)
        uy, ux = torch.meshgrid(off, off, indexing="ij")
        grid = torch.stack([ux, uy], -1).reshape(-1, 2)               # (G*G, 2) px, (x, y)
        self.register_buffer("grid_px", grid.float(), persistent=False)
        log_pt = torch.log_softmax(-(grid ** 2).sum(-1) / (2 * c.translation_prior ** 2), 0)
        offsets = torch.arange(R, dtype=torch.float64) * (2 * math.pi / R)
        if c.rotation_prior == "uniform":
            log_pr = torch.full((R,), -math.log(R), dtype=torch.float64)
        else:
            sd = math.radians(c.rotation_prior_sd)
            wrapped = torch.remainder(offsets + math.pi, 2 * math.pi) - math.pi
            log_pr = torch.log_softmax(-wrapped ** 2 / (2 * sd ** 2), 0)
        # cells are ordered (row, col, r): index = (i * G + j) * R + r
        self.register_buffer("log_p_tr", (log_pt[:, None] + log_pr[None, :]).reshape(-1).float(),
                             persistent=False)
        self.register_buffer("offsets", offsets.float(), persistent=False)
        # per cell (N_c,): cos / sin of the rotation offset, from float64 (cos 90 deg = 0 exactly)
        self.register_buffer("cell_cos", torch.cos(offsets).repeat(grid.shape[0]).float(), persistent=False)
        self.register_buffer("cell_sin", torch.sin(offsets).repeat(grid.shape[0]).float(), persistent=False)
        self.register_buffer("coords", pixel_coordinates(box), persistent=False)
        self.register_buffer("mask2d", circular_mask(box, c.mask_diameter / 2,
                                                     dtype=torch.float32), persistent=False)
        # the pixels the likelihood scores (flat indices): the mask's disc, or all
        scored = (torch.nonzero(self.mask2d.reshape(-1) > 0).reshape(-1) if mask
                  else torch.arange(box * box))
        self.register_buffer("scored_px", scored, persistent=False)

    # ------------------------------------------------------------------ encoder
    def _padding(self, n: int) -> tuple[int, int, int, int]:
        """F.pad amounts so that output cell o is the kernel centred at n//2 + (o - T)."""
        T, k = self.trange, self.kernel // 2
        lo = T + k - n // 2
        hi = 2 * T + self.kernel - n - lo
        return (lo, hi, lo, hi)

    def encode(self, images: torch.Tensor, cache: bool = False) -> dict[str, torch.Tensor]:
        """images (B, N, N) -> posterior parameters over the N_c = (2T+1)^2 R cells (float32):
        log_q (B, N_c), z_mu / z_logstd (B, N_c, D), th_mu (B, N_c) (offset-relative),
        th_logstd (B, N_c); with ``subpixel`` also d_mu (B, N_c, 2) px (image frame) and
        d_logstd (B, N_c)."""
        b, n = images.shape[0], images.shape[-1]
        h = self.gconv(images.unsqueeze(1), self._padding(n), cache=cache)   # (B,G,G,R,C)
        for lin in self.enc:
            h = lin(F.leaky_relu(h, _SLOPE, inplace=True))
        if h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()
        h = h.reshape(b, -1, self.n_out)                                       # (B, N_c, n_out)
        d = self.z_dim
        # one split, not one slice per output: each slice's backward would write a zero
        # gradient the size of h (a large share of a step at 41 x 41 x 16 cells)
        parts = torch.split(h, [1, d, d, 1, 1] + ([1, 1, 1] if self.subpixel else []), -1)
        post = {
            "log_q": torch.log_softmax(parts[0].squeeze(-1), -1),
            "z_mu": parts[1],
            "z_logstd": parts[2].clamp(LOGSTD_MIN, LOGSTD_MAX),
            "th_mu": parts[3].squeeze(-1),
            "th_logstd": parts[4].squeeze(-1).clamp(LOGSTD_MIN, LOGSTD_MAX),
        }
        if self.subpixel:
            c, s = self.cell_cos, self.cell_sin                                # (N_c,)
            lx, ly = parts[5].squeeze(-1), parts[6].squeeze(-1)                 # rotation frame
            post["d_mu"] = _turn_back(c, s, lx, ly)                            # (B, N_c, 2)
            post["d_logstd"] = parts[7].squeeze(-1).clamp(LOGSTD_MIN, LOGSTD_MAX)
        return post

    def _cell_pose(self):
        """(N_c, 2) location px and (N_c,) angle offset of every cell."""
        R = self.rotations
        loc = self.grid_px.repeat_interleave(R, 0)
        off = self.offsets.repeat(self.grid_px.shape[0])
        return loc, off

    # ------------------------------------------------------------------ generator
    def render(self, z: torch.Tensor, theta: torch.Tensor, u_px: torch.Tensor,
               coords: torch.Tensor | None = None) -> torch.Tensor:
        """Generator output at x' = R(theta)(x - u) for every pixel coordinate x.

        z (B, D), theta (B,) rad, u_px (B, 2) px; coords (P, 2) units (default: the box's).
        Returns (B, P, 1 or 2) (logit / mean [, log sigma]) in the autocast dtype.
        """
        coords = self.coords if coords is None else coords
        dt = torch.promote_types(coords.dtype, torch.float32)   # never bf16 for coordinates
        u = u_px.to(dt) / self.scale
        dx = coords[None, :, 0].to(dt) - u[:, None, 0]              # (B, P)
        dy = coords[None, :, 1].to(dt) - u[:, None, 1]
        th = theta.to(dt)
        c, s = torch.cos(th)[:, None], torch.sin(th)[:, None]
        # coord_in(FF(x')) without keeping the (B, P, 2F) features (blocks.fourier_linear)
        h = fourier_linear(self.ff, self.coord_in, c * dx - s * dy, s * dx + c * dy)
        h = h + self.z_in(z).unsqueeze(1)                            # (B, P, W)
        return self.gen(F.leaky_relu(h, _SLOPE, inplace=True))

    def render_for_training(self, z: torch.Tensor, theta: torch.Tensor, u_px: torch.Tensor,
                            coords: torch.Tensor) -> torch.Tensor:
        """:meth:`render` (same arguments, same values), in blocks of pixels whose activations
        are recomputed in the backward pass when B * P * width exceeds :data:`RENDER_BLOCK`:
        only the (B, P, 1|2) output is kept between the passes, so the generator's memory no
        longer grows with the batch times the box (64 px at batch 100: 1.49 -> 1.04 GB peak,
        and no slower, benchmarks/README.md)."""
        b, p, width = z.shape[0], coords.shape[0], self.coord_in.out_features
        if not torch.is_grad_enabled() or b * p * width <= RENDER_BLOCK:
            return self.render(z, theta, u_px, coords)
        rows = max(1, RENDER_BLOCK // (b * width))
        return torch.cat([checkpoint(self.render, z, theta, u_px, coords[i:i + rows],
                                     use_reentrant=False) for i in range(0, p, rows)], 1)

    # ------------------------------------------------------------------ objective
    def _draw_pixels(self) -> torch.Tensor | None:
        """Training steps with ``pixel_fraction`` < 1: a uniform draw without replacement of
        m = round(fraction * P') of the P' scored pixels (flat indices (m,)); else None."""
        if not self.training or self.pixel_fraction >= 1:
            return None
        return self.scored_px[draw_pixels(self.scored_px.shape[0], self.pixel_fraction,
                                          self.scored_px.device)]

    def _nll(self, out: torch.Tensor, images: torch.Tensor, ctf: torch.Tensor | None,
             pixels: torch.Tensor | None = None):
        """Negative log-likelihood per image (B,). ``out`` (B, P, 1|2) rendered at every pixel,
        or, with ``pixels`` (m,) flat indices drawn by :meth:`_draw_pixels`, at those only:
        then the sum over them is scaled by P'/m, an unbiased estimate of the sum over the P'
        scored pixels (the whole box, or the mask's disc)."""
        b, n = images.shape[0], images.shape[-1]
        out = out.float()
        y = images.reshape(b, -1).float()
        if pixels is not None:
            y = y[:, pixels]
        if self.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(out[..., 0], y, reduction="none")
        else:
            mean = out[..., 0]
            if self.use_ctf:
                if ctf is None:
                    raise ValueError("this model puts the CTF in the likelihood: pass ctf")
                mean = apply_ctf(mean.reshape(b, n, n), ctf).reshape(b, -1)
            if out.shape[-1] > 1:
                ls = out[..., 1].clamp(LOGSTD_MIN, LOGSTD_MAX)
                nll = 0.5 * ((y - mean) * torch.exp(-ls)) ** 2 + ls + 0.5 * _LOG2PI
            else:
                nll = 0.5 * (y - mean) ** 2 + 0.5 * _LOG2PI
        if pixels is not None:            # drawn inside the scored set: no mask to apply
            return nll.sum(-1) * (self.scored_px.shape[0] / pixels.shape[0])
        if self.use_mask:
            nll = nll * self.mask2d.reshape(1, -1)
        return nll.sum(-1)

    def loss(self, images: torch.Tensor, ctf: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Negative ELBO averaged over the batch (images (B, N, N); ctf (B, N, N) unshifted
        FFT layout or None). Parts: recon, kl, kl_tr, kl_theta, kl_z (detached (), float32)."""
        post = self.encode(images)
        log_q = post["log_q"]
        kl_tr, kl_th, kl_z = kl_divergence(log_q, self.log_p_tr, post["z_mu"], post["z_logstd"],
                                           post["th_mu"], post["th_logstd"], self.th_prior_sd,
                                           post.get("d_mu"), post.get("d_logstd"),
                                           self.delta_prior_sd)
        # Gumbel-softmax soft one-hot over the cells
        e = -torch.log(torch.rand_like(log_q).clamp_(1e-20, 1.0))     # Exp(1)
        g = -torch.log(e.clamp_min(1e-20))                                      # Gumbel(0, 1)
        w = torch.softmax((log_q + g) / self.gumbel_tau, -1)                  # (B, N_c)
        loc, off = self._cell_pose()
        z_mu = torch.einsum("bn,bnd->bd", w, post["z_mu"])
        z_sd = torch.einsum("bn,bnd->bd", w, post["z_logstd"].exp())
        th = post["th_mu"] + off
        th_mu = torch.atan2((w * torch.sin(th)).sum(-1), (w * torch.cos(th)).sum(-1))
        th_sd = (w * post["th_logstd"].exp()).sum(-1)
        u = w @ loc                                                           # (B, 2) px
        if self.subpixel:
            d_sd = (w * post["d_logstd"].exp()).sum(-1, keepdim=True)          # (B, 1)
            u = u + torch.einsum("bn,bnk->bk", w, post["d_mu"]) + d_sd * torch.randn_like(u)
        z = z_mu + z_sd * torch.randn_like(z_mu)
        theta = th_mu + th_sd * torch.randn_like(th_mu)
        pixels = self._draw_pixels()
        out = self.render_for_training(z, theta, u,
                                       self.coords if pixels is None else self.coords[pixels])
        recon = self._nll(out, images, ctf, pixels)
        kl = kl_tr + kl_th + kl_z
        # Training steps only (evaluation is always the ELBO): KL warm-up (--kl-warmup, the z
        # term weighted < 1) and free bits (--kl-free-bits: each latent dimension's batch-mean
        # E_q[KL] counts as at least that many nats, so no gradient pushes a dimension below it:
        # Kingma et al. 2016, against a latent the generator learns to ignore)
        if not self.training or (self.kl_z_weight == 1.0 and self.kl_free_bits <= 0):
            loss = (recon + kl).mean()
        else:
            if self.kl_free_bits > 0:
                zl = post["z_logstd"]
                kl_d = (-zl + 0.5 * ((2 * zl).exp() + post["z_mu"] ** 2) - 0.5)   # (B, N_c, D)
                kl_d = torch.einsum("bn,bnd->d", log_q.exp(), kl_d) / kl_d.shape[0]   # (D,)
                z_term = kl_d.clamp_min(self.kl_free_bits).sum()
            else:
                z_term = kl_z.mean()
            loss = (recon + kl_tr + kl_th).mean() + self.kl_z_weight * z_term
        parts = {"recon": recon.mean(), "kl": kl.mean(), "kl_tr": kl_tr.mean(),
                 "kl_theta": kl_th.mean(), "kl_z": kl_z.mean()}
        return loss, {k: v.detach() for k, v in parts.items()}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def infer_internal(self, images: torch.Tensor, recentre: bool | None = None
                       ) -> dict[str, torch.Tensor]:
        """Most probable cell and its means: theta (B,) rad, u_px (B, 2), z_mu, z_std (B, D),
        confidence (B,), cell (B,) index. With ``recentre`` (default: the model's setting)
        u_px is the location of the generated object's centre of mass (module docstring)."""
        post = self.encode(images, cache=True)
        conf, cell = post["log_q"].max(-1)
        loc, off = self._cell_pose()
        bi = torch.arange(images.shape[0], device=images.device)
        theta, u = post["th_mu"][bi, cell] + off[cell], loc[cell]
        if self.subpixel:
            u = u + post["d_mu"][bi, cell]
        z_mu = post["z_mu"][bi, cell]
        if self.recentre if recentre is None else recentre:
            c = self.canonical_centre(z_mu)
            u = u + _turn_back(torch.cos(theta), torch.sin(theta), c[:, 0], c[:, 1])
        return {"theta": theta, "u_px": u, "z_mu": z_mu,
                "z_std": post["z_logstd"][bi, cell].exp(), "confidence": conf.exp(),
                "cell": cell}

    @torch.no_grad()
    def infer(self, images: torch.Tensor) -> Inference:
        r = self.infer_internal(images)
        psi, shift = pose_to_relion(r["theta"], r["u_px"])
        return Inference(psi_deg=psi, shift_px=shift, z_mean=r["z_mu"], z_std=r["z_std"],
                         confidence=r["confidence"])

    def _render_canonical(self, z: torch.Tensor, size: int, u_px: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """(B, size, size) image of z at theta 0, location u_px (B, 2) (default 0), over the
        training box's field of view (probabilities for Bernoulli, means for Gaussian)."""
        b, dt = z.shape[0], self.coords.dtype
        coords = pixel_coordinates(size, device=z.device, dtype=dt)  # same field of view
        u = torch.zeros(b, 2, device=z.device, dtype=dt) if u_px is None else u_px.to(dt)
        out = self.render(z.to(dt), torch.zeros(b, device=z.device, dtype=dt), u, coords)
        img = out[..., 0].to(torch.promote_types(out.dtype, torch.float32))
        if self.likelihood == "bernoulli":
            img = torch.sigmoid(img)
        return img.reshape(b, size, size)

    @torch.no_grad()
    def canonical_centre(self, z: torch.Tensor, size: int = 32) -> torch.Tensor:
        """Centre of mass c (B, 2) px (x, y) of the object generated from z (B, D) in the
        canonical frame, relative to the box centre.

        Rendered at min(box, size) px over the same field of view. The weights are the part
        of the image above the level of its border (pixels outside the inscribed disc), with
        the sign chosen so that the larger excursion counts as the object (so dark-on-light
        and light-on-dark images both work). An empty image gives c = 0.
        """
        n = min(self.box, size)
        img = self._render_canonical(z, n)                                 # (B, n, n)
        r = torch.arange(n, device=z.device, dtype=img.dtype) - n // 2
        yy, xx = torch.meshgrid(r, r, indexing="ij")
        outside = (xx ** 2 + yy ** 2) > (n / 2) ** 2
        flat = img.reshape(img.shape[0], -1)
        bg = (flat[:, outside.reshape(-1)].mean(-1) if outside.any()
              else flat.mean(-1)).reshape(-1, 1, 1)
        dev = img - bg
        up = dev.amax((1, 2)) >= -dev.amin((1, 2))
        w = torch.where(up[:, None, None], dev, -dev).clamp_min(0)
        tot = w.sum((1, 2))
        safe = tot.clamp_min(1e-12)
        c = torch.stack([(w * xx).sum((1, 2)) / safe, (w * yy).sum((1, 2)) / safe], -1)
        c = torch.where((tot > 0)[:, None], c, torch.zeros_like(c))
        return c * (self.box / n)                                        # px of the box

    @torch.no_grad()
    def generate(self, z: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Canonical images (B, size, size) (Bernoulli: probabilities; Gaussian: means) with
        the same field of view as the training box (size != box resamples); with
        ``recentre`` the object's centre of mass sits at the box centre."""
        size = size or self.box
        u = -self.canonical_centre(z) if self.recentre else None
        return self._render_canonical(z, size, u)


def build(cfg, box: int) -> TargetVAE:
    """``TargetVAE(box, cfg)`` (the model registry's entry, :func:`cryolatent.models.build_model`)."""
    return TargetVAE(box, cfg)
