"""Building blocks shared by the models: pixel coordinates, random Fourier features, MLPs and
the P_r group convolution of TARGET-VAE.

Coordinate frame (used by every model of cryolatent)
----------------------------------------------------
Pixel (row i, column j) of an N x N image has the coordinate

    x = (j - N//2, i - N//2) / (N / 2)        (x = column, y = row)

i.e. the origin is RELION's rotation centre (N//2, N//2) and one unit is half a box. For even
N the coordinates run over [-1, 1 - 2/N]; for odd N over [-(N-1)/N, (N-1)/N]. A rotation
R(a) = [[cos a, -sin a], [sin a, cos a]] acts on (x, y) exactly as RELION's R(psi) does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import circular_mask


def pixel_coordinates(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n*n, 2) coordinates (x = column, y = row) of an n x n grid, row-major, in half-box units
    around the pixel (n//2, n//2). See the module docstring."""
    c = n // 2
    r = (torch.arange(n, device=device, dtype=torch.float64) - c) / (n / 2)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1).to(dtype)


class FourierFeatures(nn.Module):
    """Random Fourier features [cos 2 pi x B, sin 2 pi x B] of 2-D coordinates.

    ``B`` (2, F) ~ N(0, sigma^2) is a fixed buffer (saved in the state dict). Input (..., 2)
    in any float dtype; the phase is computed in float32 even under autocast (a bf16 phase
    of tens of radians would be off by tenths of a radian). Output (..., 2F) float32.
    """

    def __init__(self, n_features: int, sigma: float, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("freqs", torch.randn(2, n_features, generator=generator) * sigma)
        self.out_dim = 2 * n_features

    def phase(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Phase 2 pi (x B_0 + y B_1) for coordinates given as two (...,) tensors -> (..., F)."""
        dt = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64
        b = self.freqs.to(dt) * (2 * math.pi)
        return x.to(dt).unsqueeze(-1) * b[0] + y.to(dt).unsqueeze(-1) * b[1]

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        p = self.phase(xy[..., 0], xy[..., 1])
        return torch.cat([torch.cos(p), torch.sin(p)], -1)


def draw_pixels(n: int, fraction: float, device=None) -> torch.Tensor:
    """A uniform draw without replacement of m = max(1, round(fraction * n)) of n indices,
    (m,) long: the pixels a training step scores when ``pixel_fraction`` < 1 (both models)."""
    m = max(1, round(fraction * n))
    return torch.randperm(n, device=device)[:m]


def _fourier_rows(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, dt: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase x b_0 + y b_1 (n, F) float32 and its [cos, sin] features (n, 2F) in ``dt``."""
    p = torch.addmm(x.unsqueeze(1) * b[0], y.unsqueeze(1), b[1:2])
    return p, torch.cat([torch.cos(p), torch.sin(p)], 1).to(dt)


class _FourierLinear(torch.autograd.Function):
    """``Linear(2F, W)([cos p, sin p])`` with p = x b_0 + y b_1, evaluated ``rows`` coordinates
    at a time and recomputed in the backward pass: only x, y (n,) are kept, not the
    (n, F) phase and (n, 2F) features (4-5 float32 copies of n x 2F, most of the generator's
    activation memory at 64 px). Gradients for x, y (the pose's path), weight and bias."""

    @staticmethod
    def forward(ctx, x, y, b, weight, bias, rows):
        ctx.save_for_backward(x, y, b, weight)
        ctx.rows = rows
        out = x.new_empty((x.shape[0], weight.shape[0]), dtype=weight.dtype)
        for i in range(0, x.shape[0], rows):
            _, feat = _fourier_rows(x[i:i + rows], y[i:i + rows], b, weight.dtype)
            torch.addmm(bias, feat, weight.t(), out=out[i:i + rows])
        return out

    @staticmethod
    def backward(ctx, g):
        x, y, b, weight = ctx.saved_tensors
        rows, f = ctx.rows, b.shape[1]
        need_xy = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        gx = torch.empty_like(x) if need_xy else None
        gy = torch.empty_like(y) if need_xy else None
        acc = torch.promote_types(weight.dtype, torch.float32)      # bf16 sums in float32
        gw = torch.zeros_like(weight, dtype=acc)
        gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
        g = g.to(weight.dtype)
        for i in range(0, x.shape[0], rows):
            p, feat = _fourier_rows(x[i:i + rows], y[i:i + rows], b, weight.dtype)
            gi = g[i:i + rows]
            gw += (gi.t() @ feat).to(acc)
            gb += gi.to(acc).sum(0)
            if need_xy:
                gf = (gi @ weight).to(p.dtype)                           # (n, 2F)
                gp = gf[:, f:] * torch.cos(p) - gf[:, :f] * torch.sin(p)  # d/dp
                gx[i:i + rows] = gp @ b[0]
                gy[i:i + rows] = gp @ b[1]
        return gx, gy, None, gw.to(weight.dtype), gb.to(weight.dtype), None


def fourier_linear(ff: "FourierFeatures", lin: nn.Linear, x: torch.Tensor, y: torch.Tensor,
                   rows: int = 4096) -> torch.Tensor:
    """``lin(ff(xy))`` for coordinates given as two (...,) tensors -> (..., W), without
    keeping the Fourier features for the backward pass (:class:`_FourierLinear`; same values
    as the plain composition, tested). The phase is float32 (float64 for float64 inputs);
    the product runs in the autocast dtype where autocast is on, else in ``lin``'s."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else lin.weight.dtype
    pdt = torch.promote_types(x.dtype, torch.float32)
    b = ff.freqs.to(pdt) * (2 * math.pi)
    shape = x.shape
    with torch.autocast(dev, enabled=False):
        out = _FourierLinear.apply(x.reshape(-1).to(pdt), y.reshape(-1).to(pdt), b,
                                   lin.weight.to(dt), lin.bias.to(dt), rows)
    return out.reshape(*shape, -1)


class MLP(nn.Module):
    """``layers`` hidden Linear(width, width) + LeakyReLU blocks then Linear(width, out)."""

    def __init__(self, width: int, layers: int, out: int, slope: float = 0.01):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.out = nn.Linear(width, out)
        self.slope = slope

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for lin in self.hidden:
            h = F.leaky_relu(lin(h), self.slope, inplace=True)  # saves one copy
        return self.out(h)


def _rotation_gather(k: int, rotations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear-sampling tables that rotate a k x k filter by each of ``rotations`` angles.

    Filter r is W_r(x) = W_0(R(r 2 pi / rotations) x), x in pixels around the centre pixel
    (k//2, k//2), x = column, y = row. Returns ``idx`` (R, k*k, 4) long and ``w`` (R, k*k, 4)
    float64: W_r.flat[p] = sum_q W_0.flat[idx[r, p, q]] * w[r, p, q]. For angles that are
    multiples of 90 degrees the sampling points are snapped to the grid, so those filters are
    exact pixel permutations (exact P4 equivariance); other angles are interpolated, with
    samples falling outside the k x k support reading zero.
    """
    c = k // 2
    ar = torch.arange(k, dtype=torch.float64) - c
    yy, xx = torch.meshgrid(ar, ar, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    idx = torch.zeros(rotations, k * k, 4, dtype=torch.long)
    w = torch.zeros(rotations, k * k, 4, dtype=torch.float64)
    for r in range(rotations):
        if (4 * r) % rotations == 0:  # exact quarter turns
            q = (4 * r) // rotations
            cs, sn = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][q % 4]
        else:
            a = 2 * math.pi * r / rotations
            cs, sn = math.cos(a), math.sin(a)
        sx = cs * xx - sn * yy + c
        sy = sn * xx + cs * yy + c
        x0, y0 = torch.floor(sx), torch.floor(sy)
        fx, fy = sx - x0, sy - y0
        corners = [(x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                   (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)]
        for q, (cx, cy, cw) in enumerate(corners):
            inside = (cx >= 0) & (cx < k) & (cy >= 0) & (cy < k)
            idx[r, :, q] = (cy.clamp(0, k - 1) * k + cx.clamp(0, k - 1)).long()
            w[r, :, q] = torch.where(inside, cw, torch.zeros_like(cw))
    return idx, w


def _transpose_gather(idx: torch.Tensor, w: torch.Tensor, n_src: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The transpose of the sampling table ``out[d] = sum_q src[idx[d, q]] * w[d, q]``
    (idx, w (n_dst, Q)) as a gather table over the destinations: ``tidx`` (n_src, M) long and
    ``tw`` (n_src, M) float64 with ``grad_src[s] = sum_m grad_out[tidx[s, m]] * tw[s, m]``;
    rows are padded with index n_dst (a zero slot appended to grad_out) and weight 0. Entries
    with weight 0 are left out; M is the largest number of taps reading one source pixel."""
    n_dst, q = idx.shape
    dst = torch.arange(n_dst).repeat_interleave(q)
    src, wt = idx.reshape(-1), w.reshape(-1)
    keep = wt != 0
    dst, src, wt = dst[keep], src[keep], wt[keep]
    order = torch.argsort(src * n_dst + dst)           # by source, then destination: fixed
    dst, src, wt = dst[order], src[order], wt[order]
    counts = torch.bincount(src, minlength=n_src)
    m = max(1, int(counts.max())) if len(src) else 1
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(src)) - start[src]
    tidx = torch.full((n_src, m), n_dst, dtype=torch.long)
    tw = torch.zeros((n_src, m), dtype=torch.float64)
    tidx[src, slot] = dst
    tw[src, slot] = wt
    return tidx, tw


def _gather_sum(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (C, n_in), idx / w (n_out, Q) -> (C, n_out): out[:, d] = sum_q x[:, idx[d, q]] w[d, q],
    summed in the order q = 0, 1, ... (gathered (C, Q, n_out): the sum runs over a
    non-innermost axis, which vectorises)."""
    c, (n, q) = x.shape[0], idx.shape
    g = x.index_select(1, idx.t().reshape(-1)).view(c, q, n)
    return (g * w.t().to(x.dtype)).sum(1)


class _RotateBank(torch.autograd.Function):
    """weight (C, k*k) -> rotated bank (C, R*k*k): a weighted gather whose backward is a
    weighted gather too (the transposed table), not autograd's scatter-add. PyTorch's CPU
    ``index_put_(accumulate=True)`` (the backward of ``weight[:, idx]``) adds with atomics
    from several threads, so its float sums came out in a different order from run to run
    (non-reproducible training with >1 thread); this backward sums in a fixed order."""

    @staticmethod
    def forward(ctx, weight, idx, w, tidx, tw):
        ctx.save_for_backward(tidx, tw)
        return _gather_sum(weight, idx, w)                             # (C, R*k*k)

    @staticmethod
    def backward(ctx, grad):
        tidx, tw = ctx.saved_tensors
        g = F.pad(grad, (0, 1))                                        # zero slot for padding
        return _gather_sum(g, tidx, tw), None, None, None, None


#: GroupConvP on the CPU: largest im2col matrix (elements) for which the convolution runs as
#: one matrix product (measured faster up to this size, slower beyond it: the 64-px cryo-EM
#: shape at batch 100, 67 M elements, keeps oneDNN's direct convolution)
UNFOLD_MAX = 2 ** 25


class _LiftingCorrelation(torch.autograd.Function):
    """``F.conv2d(x, bank)`` (x (B, 1, H, W), bank (K, 1, k, k) -> (B, K, H-k+1, W-k+1)) whose
    filter gradient is computed as one more forward correlation, of the images (batch as
    input channels) with the output gradient (batch as input channels, an (H-k+1)-px kernel):

        dL/dbank[o, 0, p, q] = sum_b sum_(i, j) x[b, 0, i + p, j + q] * g[b, o, i, j]
                             = conv2d(x^T (1, B, H, W), g^T (K, B, h, w))[0, o, p, q]

    The same sum as autograd's; oneDNN runs this one-input-channel case's weight gradient
    slowly in bfloat16 on the CPU (5-10x the forward, benchmarks/README.md "Training cost per
    particle"), the forward-shaped one at about the forward's cost. Used for CPU bf16 / fp16
    only; float32 keeps autograd's (measured no faster this way)."""

    @staticmethod
    def forward(ctx, x, bank):
        ctx.save_for_backward(x, bank)
        return F.conv2d(x, bank)

    @staticmethod
    def backward(ctx, g):
        x, bank = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, bank, g)
        if ctx.needs_input_grad[1]:
            gw = F.conv2d(x.transpose(0, 1), g.transpose(0, 1)).transpose(0, 1)
        return gx, gw


class GroupConvP(nn.Module):
    """Lifting P_r group convolution: C learned k x k filters applied at r rotations.

    Input (B, 1, H, W). Output channels-last (B, H', W', R, C) — rotation r uses the filter
    bank rotated by r * 2 pi / R (see :func:`_rotation_gather`), so rotating the input by a
    multiple of 2 pi / R permutes the R axis (exactly for quarter turns). The bias is shared
    across rotations (needed for equivariance). Filters are masked to the inscribed disc so
    that rotated supports agree.

    The rotated bank (R*C, 1, k, k) is built with one gather per call (training; its backward
    is the transposed gather, deterministic, see :class:`_RotateBank`) or taken from a cache
    keyed on the weight's version (``cache=True``; inference).

    The correlation itself, by size (all exact, tested to agree): on the CPU, while the patch
    matrix (B * H' * W', k*k) has at most :data:`UNFOLD_MAX` elements, im2col and one matrix
    product with the bank, whose output is already channels-last; beyond that (and on CUDA)
    ``F.conv2d``, on the CPU in bf16 with :class:`_LiftingCorrelation`'s filter gradient.
    An FFT correlation was measured and not kept: 1.2x the direct forward at MNIST's shape in
    float32, slower than the im2col product (benchmarks/README.md).
    """

    def __init__(self, channels: int, kernel: int, rotations: int):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError("group-conv kernel must be odd (a centre pixel)")
        self.channels, self.kernel, self.rotations = channels, kernel, rotations
        self.weight = nn.Parameter(torch.empty(channels, kernel * kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        c = kernel // 2
        disc = circular_mask(kernel, c + 0.5)          # taps within half a pixel of the rim
        fan_in = int(disc.sum())
        nn.init.uniform_(self.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        idx, w = _rotation_gather(kernel, rotations)
        w = w * disc.reshape(-1)[idx]  # mask the source taps: rotate a disc-masked filter
        tidx, tw = _transpose_gather(idx.reshape(-1, 4), w.reshape(-1, 4), kernel * kernel)
        self.register_buffer("_idx", idx.reshape(-1, 4), persistent=False)   # (R*k*k, 4)
        self.register_buffer("_w", w.reshape(-1, 4).float(), persistent=False)
        self.register_buffer("_tidx", tidx, persistent=False)                # (k*k, M)
        self.register_buffer("_tw", tw.float(), persistent=False)
        self._cache: tuple | None = None

    def filter_bank(self) -> torch.Tensor:
        """(R*C, 1, k, k) rotated filters, rotation-major (channel r*C + c)."""
        bank = _RotateBank.apply(self.weight, self._idx, self._w, self._tidx, self._tw)
        k = self.kernel
        bank = bank.reshape(self.channels, self.rotations, k * k)        # (C, R, k*k)
        return bank.transpose(0, 1).reshape(self.rotations * self.channels, 1, k, k)

    def cached_bank(self) -> torch.Tensor:
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device,
               self.weight.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.filter_bank())
        return self._cache[1]

    def forward(self, x: torch.Tensor, pad: tuple[int, int, int, int], cache: bool = False
                ) -> torch.Tensor:
        """x (B, 1, H, W); pad (left, right, top, bottom) as F.pad (negative crops).
        Returns (B, H', W', R, C)."""
        bank = self.cached_bank() if (cache and not torch.is_grad_enabled()) else self.filter_bank()
        x = F.pad(x, pad)
        dev, (n, _, hh, ww), k = x.device.type, x.shape, self.kernel
        h, w, rc = hh - k + 1, ww - k + 1, self.rotations * self.channels
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if dev == "cpu" and n * h * w * k * k <= UNFOLD_MAX:
            # CPU: every k x k patch as a row (im2col), one matrix product with the bank; the
            # output comes out channels-last contiguous, as the 1x1 layers after it need
            # (benchmarks/README.md "Training cost per particle": 1.3-2x the direct
            # convolution plus its layout copy at MNIST's and the 32-px cryo-EM shapes)
            with torch.autocast(dev, enabled=False):
                u = F.unfold(x.to(dt), k).transpose(1, 2)                 # (B, h*w, k*k)
                y = torch.matmul(u, bank.to(dt).reshape(rc, k * k).t())  # (B, h*w, R*C)
                return y.view(n, h, w, self.rotations, self.channels) + self.bias.to(dt)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            bank = bank.contiguous(memory_format=torch.channels_last)
        if dev == "cpu" and dt in (torch.bfloat16, torch.float16):
            with torch.autocast(dev, enabled=False):
                y = _LiftingCorrelation.apply(x.to(dt), bank.to(dt))
        else:
            if not torch.is_autocast_enabled(dev):
                bank = bank.to(x.dtype)
            y = F.conv2d(x, bank)
        y = y.permute(0, 2, 3, 1).reshape(n, h, w, self.rotations, self.channels)
        return y + self.bias.to(y.dtype)


class GroupLinear(nn.Module):
    """1x1 group convolution: the same Linear(C_in, C_out) at every position and rotation
    (channels-last (..., C) input), which commutes with permutations of the rotation axis."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.lin = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)
