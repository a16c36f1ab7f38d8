"""Fast renderers for ``simulate cryoem``: projections of Gaussian atoms and the CTF, in batches.

The model image is the analytic one of :func:`cryolatent.simulate.cryoem.render_projections`:
pixel ``[row, col]`` = Σ_a w_a/(2π s²) exp(-((col - c - x_a)² + (row - c - y_a)²)/(2 s²)), the
Gaussian of each atom evaluated at the pixel centres (s = blur/apix px, truncated at
``TRUNCATE`` s). Evaluating it atom by atom costs ~10^6 operations per particle at 128 px (the
old path: 7–30 particles/s). Three renderers replace it here:

* :func:`render_exact` — the same analytic image, as a separable matrix product
  ``Gy^T diag(w) Gx`` (Gx, Gy: each atom's 1-D Gaussians along x and y); used for the
  canonical images below (and as a check).
* :class:`ViewCache` — fixed views (``--views K``): each (structure, view)'s canonical
  projection (psi = 0, t = 0) is rendered once, exactly, on a grid ``OVERSAMPLE`` times finer
  than the pixels; a particle is then ``canonical(R(psi)(x + t))`` (RELION's convention,
  :func:`cryolatent.pose.transform_to_particle`) sampled from that fine grid by bilinear
  interpolation. The canonical is rendered with the Gaussian variance s² - h²/6 (h = 1 /
  OVERSAMPLE px), which compensates on average the smoothing of linear interpolation (the
  variance of a triangle of width h).
* :func:`render_splat` — any pose and any coordinates (random views, ``--morph``): each atom is
  spread over the 4 nodes of a grid ``OVERSAMPLE`` times finer than the pixels (bilinear
  weights), and the Gaussian (variance s² - h²/6 again) is applied as two matrix products
  from the fine nodes to the pixel centres, ``Hy S Hx^T``.

Both approximations differ from the analytic image by about 1e-3 of its norm for
protein-like models (correlation > 0.99999) and by < 1e-2 (correlation > 0.9999) for
isolated point atoms of sd 1 px, the worst case (``tests/test_simulate_speed_equivalence.py``).

The CTF (:func:`ctf_half`, :func:`ctf_filter`) is multiplied in Fourier space on a canvas of
``pad`` × the box (no wrap-around), with half-spectrum (``rfft``) transforms and the zero rows
skipped. Every particle's image depends on its own parameters only: not on the batch it is
made in, the chunk size or the number of threads (matrix products run on one thread; batched
FFTs are at least two images long, because MKL's single-image FFT rounds differently).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..ctf import CTFParams, ctf_params_tensor

#: the fine grid of the interpolating renderers has this many nodes per pixel
OVERSAMPLE = 4
#: each atom's Gaussian is evaluated out to TRUNCATE standard deviations (exp(-8) = 3e-4)
TRUNCATE = 4.0
#: render_exact sums the atoms in blocks of this many (memory: 2 x block x size floats)
ATOM_BLOCK = 8192


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch (and MKL) on one thread inside the block: a matrix product's rounding may
    depend on how many threads share it, and the simulator's results must not."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def projected_xy(coords: np.ndarray, A: np.ndarray, shift_px: np.ndarray, apix: float,
                 box: int) -> np.ndarray:
    """Pixel-index positions (col, row) of atoms: ``(A r)[:2] / apix - t + box//2``.

    coords: (n_atoms, 3) Å; A: (3, 3) RELION Euler matrix; shift_px: (2,). Returns
    (n_atoms, 2) float64."""
    return coords @ (A[:2].T / apix) - np.asarray(shift_px, np.float64) + box // 2


def _sigma_px(blur: float, apix: float) -> float:
    return float(blur) / float(apix)


def _reach(s: float) -> int:
    return int(math.ceil(TRUNCATE * s))


def _gaussian_1d(pos: torch.Tensor, size: int, s: float, K: int) -> torch.Tensor:
    """(n, size) float32: row i holds exp(-(j - pos_i)² / (2 s²)) at j = round(pos_i) - K ..
    round(pos_i) + K (inside [0, size)), 0 elsewhere (the analytic renderer's truncation)."""
    offs = torch.arange(-K, K + 1, device=pos.device)
    c = torch.round(pos)
    idx = c.long()[:, None] + offs                                    # (n, 2K+1)
    d = (c - pos)[:, None] + offs
    g = torch.exp((-0.5 / (s * s)) * d * d).to(torch.float32)
    g = torch.where((idx >= 0) & (idx < size), g, torch.zeros((), device=pos.device))
    out = torch.zeros((pos.shape[0], size), dtype=torch.float32, device=pos.device)
    return out.scatter_add_(1, idx.clamp_(0, size - 1), g)


def render_exact(coords: np.ndarray, weights: np.ndarray, A: np.ndarray, shift_px, box: int,
                 apix: float, blur: float, device=None, sigma_px: float | None = None
                 ) -> torch.Tensor:
    """One analytic projection (box, box) float32, as ``Gy^T diag(w) Gx`` (one thread).

    Equal to :func:`cryolatent.simulate.cryoem.render_projections` up to float32 rounding
    (it sums the same truncated Gaussians). coords (n_atoms, 3) Å, weights (n_atoms,), A
    (3, 3) Euler matrix, shift_px (2,) (rlnOriginX, rlnOriginY) px. ``sigma_px`` overrides
    the Gaussian sd in px (default blur / apix); the weights are normalised by it.
    """
    s = _sigma_px(blur, apix) if sigma_px is None else float(sigma_px)
    K = _reach(_sigma_px(blur, apix))        # the nominal Gaussian's reach in any case
    pos = torch.as_tensor(projected_xy(coords, A, shift_px, apix, box), device=device)
    w = torch.as_tensor(np.asarray(weights, np.float64) / (2.0 * math.pi * s * s),
                        dtype=torch.float32, device=device)
    out = torch.zeros((box, box), dtype=torch.float32, device=device)
    with one_thread():
        for a in range(0, len(w), ATOM_BLOCK):      # bounded memory for large models
            gx = _gaussian_1d(pos[a:a + ATOM_BLOCK, 0], box, s, K) * w[a:a + ATOM_BLOCK, None]
            gy = _gaussian_1d(pos[a:a + ATOM_BLOCK, 1], box, s, K)
            out.addmm_(gy.T, gx)
    return out


class FineBlur:
    """The matrices that take a fine grid (``OVERSAMPLE`` nodes per pixel) to the pixel
    centres of a (box, box) image through a Gaussian of sd ``s`` px: node n of the grid sits
    at pixel coordinate ``-K + n / OVERSAMPLE`` (K = the Gaussian's reach), nodes 0 .. nodes-1
    cover [-K, box - 1 + K]. ``H[j, n] = exp(-(j - node_n)² / (2 s'²)) / (sqrt(2π) s')`` for
    |j - node_n| ≤ K + 1/2, s'² = s² - h²/6 (h = 1/OVERSAMPLE: the splat's own smoothing)."""

    def __init__(self, box: int, s: float, device=None, osf: int = OVERSAMPLE):
        self.box, self.osf = int(box), int(osf)
        self.K = _reach(s)
        self.s = s
        h = 1.0 / self.osf
        self.s_eff = math.sqrt(max(s * s - h * h / 6.0, 0.25 * s * s))
        self.nodes = self.osf * (self.box - 1 + 2 * self.K) + 1
        node = -self.K + np.arange(self.nodes) / self.osf
        d = np.arange(self.box)[:, None] - node[None, :]
        H = np.where(np.abs(d) <= self.K + 0.5,
                     np.exp(-d * d / (2.0 * self.s_eff ** 2)), 0.0) / (math.sqrt(2 * math.pi)
                                                                      * self.s_eff)
        self.H = torch.as_tensor(H, dtype=torch.float32, device=device)       # (box, nodes)
        self.HT = self.H.T.contiguous()                                        # (nodes, box)


def render_splat(coords: np.ndarray, weights: np.ndarray, A: np.ndarray, shift_px,
                 blur: FineBlur, apix: float) -> torch.Tensor:
    """One projection (box, box) float32 by splatting atoms on the fine grid of ``blur`` and
    blurring to the pixel centres (module docstring). Atoms whose fine cell lies outside the
    grid (further than the Gaussian's reach from the box) are left out, as the analytic
    renderer leaves out their (truncated) contributions. Runs on one thread."""
    o, K, box = blur.osf, blur.K, blur.box
    t = np.asarray(shift_px, np.float64).reshape(2)
    P = A[:2].T * (o / apix)                                  # (3, 2): Å -> fine nodes
    q = coords @ P
    off = (box // 2 + K) * o - t * o
    qx = q[:, 0] + off[0]
    qy = q[:, 1] + off[1]
    ix = np.floor(qx)
    iy = np.floor(qy)
    fx = qx - ix
    fy = qy - iy
    w = np.asarray(weights, np.float64)
    last = blur.nodes - 1
    ok = (ix >= 0) & (ix < last) & (iy >= 0) & (iy < last)
    if not ok.all():
        if not ok.any():
            return torch.zeros((box, box), dtype=torch.float32, device=blur.H.device)
        ix, iy, fx, fy, w = ix[ok], iy[ok], fx[ok], fy[ok], w[ok]
    lox, loy = int(ix.min()), int(iy.min())
    nx, ny = int(ix.max()) - lox + 2, int(iy.max()) - loy + 2
    base = (iy - loy).astype(np.int64) * nx + (ix - lox).astype(np.int64)
    w1 = w * fy
    w0 = w - w1
    flat = np.concatenate([base, base + 1, base + nx, base + (nx + 1)])
    vals = np.concatenate([w0 - w0 * fx, w0 * fx, w1 - w1 * fx, w1 * fx])
    S = np.bincount(flat, vals, minlength=nx * ny).reshape(ny, nx)
    St = torch.as_tensor(S, dtype=torch.float32, device=blur.H.device)
    with one_thread():
        return blur.H[:, loy:loy + ny] @ (St @ blur.HT[lox:lox + nx])


class ViewCache:
    """Canonical projections (psi = 0, t = 0) of fixed views on a fine grid, rendered once;
    particles are sampled from them in RELION's convention (module docstring).

    ``key``: any hashable naming a (structure, view); ``render(key)`` is asked for
    ``(coords, weights, A)`` of a key the first time it is used.
    """

    def __init__(self, box: int, apix: float, blur: float, radius_px: float, device=None,
                 osf: int = OVERSAMPLE):
        self.box, self.apix, self.osf = int(box), float(apix), int(osf)
        self.device = device
        s = _sigma_px(blur, apix)
        self.s = s
        h = 1.0 / self.osf
        # the canonical's sd in fine px, compensating the interpolation's smoothing
        self.s_fine = math.sqrt(max(s * s - h * h / 6.0, 0.25 * s * s)) * self.osf
        self.K_fine = _reach(s * self.osf)
        # the fine grid covers the structure with its Gaussians (nothing is cut), or at
        # most what any pixel of the box can sample for shifts up to a box
        half_px = min(radius_px + TRUNCATE * s + 2.0, 1.5 * self.box)
        self.half = int(math.ceil(half_px * self.osf))
        self.size = 2 * self.half + 1
        self._images: dict = {}

    def nbytes_per_view(self) -> int:
        return 4 * self.size * self.size

    def canonical(self, key, coords: np.ndarray, weights: np.ndarray, A: np.ndarray
                  ) -> torch.Tensor:
        img = self._images.get(key)
        if img is None:
            # rendered at apix/osf so that its pixel is a fine node; the integral of each
            # atom stays its weight, so a fine pixel's value is a pixel's value
            img = render_exact(coords, weights, A, (0.0, 0.0), self.size,
                               self.apix / self.osf, self.s * self.apix,
                               device=self.device, sigma_px=self.s_fine)
            img = img * float(self.osf * self.osf)
            self._images[key] = img
        return img

    def particles(self, canonical: torch.Tensor, psi_deg: np.ndarray, shift_px: np.ndarray
                  ) -> torch.Tensor:
        """(b, box, box): ``canonical(R(psi)(x + t))`` for b poses of one canonical."""
        D = self.box
        psi = np.radians(np.asarray(psi_deg, np.float64).reshape(-1))
        t = np.asarray(shift_px, np.float64).reshape(-1, 2)
        b = len(psi)
        r = np.arange(D, dtype=np.float64) - D // 2
        c, s = np.cos(psi)[:, None, None], np.sin(psi)[:, None, None]
        u = r[None, None, :] + t[:, 0, None, None]                   # x + t_x  (b, 1, D)
        v = r[None, :, None] + t[:, 1, None, None]                   # y + t_y  (b, D, 1)
        sx = c * u - s * v                                           # R(psi)(x + t)
        sy = s * u + c * v
        k = self.osf * 2.0 / (self.size - 1)
        grid = np.empty((b, D, D, 2), dtype=np.float32)             # align_corners=True
        grid[..., 0] = sx * k
        grid[..., 1] = sy * k
        g = torch.as_tensor(grid.reshape(1, b * D, D, 2), device=canonical.device)
        out = F.grid_sample(canonical[None, None], g, mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        return out.reshape(b, D, D)


# ----------------------------------------------------------------------------- the CTF
def ctf_half(params: CTFParams, P: int, apix: float, device=None) -> torch.Tensor:
    """(n, P//2 + 1, P) float32: RELION's CTF (:func:`cryolatent.ctf.compute_ctf`) on the
    ``rfft`` half of a P × P grid, TRANSPOSED: element [i, a, b] is at frequency
    (X, Y) = (rfftfreq(P)[a], fftfreq(P)[b]) / apix (the layout :func:`ctf_filter`
    transforms in). The phase is formed in float32 from float64 coefficients."""
    coef = ctf_params_tensor(params, apix, device=device)[:, :5].to(torch.float32)
    n = coef.shape[0]
    H = P // 2 + 1
    kx = torch.fft.rfftfreq(P, d=float(apix), dtype=torch.float64, device=device)
    ky = torch.fft.fftfreq(P, d=float(apix), dtype=torch.float64, device=device)
    X, Y = torch.meshgrid(kx, ky, indexing="ij")                  # (H, P)
    s2 = X * X + Y * Y
    basis = [b.to(torch.float32) for b in (X * X, X * Y, Y * Y, s2 * s2)]
    gam = torch.empty((n, H, P), dtype=torch.float32, device=device)
    torch.mul(basis[0], coef[:, 0].view(n, 1, 1), out=gam)
    for j in range(1, 4):
        gam.addcmul_(coef[:, j].view(n, 1, 1), basis[j])
    gam.add_(coef[:, 4].view(n, 1, 1))
    return torch.sin_(gam)


def _pad_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """At least two images per FFT call (MKL's one-image transform rounds differently)."""
    n = x.shape[0]
    if n == 1:
        x = torch.cat([x, torch.zeros_like(x)])
    return x, n


def ctf_filter(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """(b, D, D) images multiplied by their CTF in Fourier space on a P × P zero-padded canvas
    (``ctf``: (b, P//2 + 1, P) from :func:`ctf_half`), cropped back to D × D.

    The image sits in the canvas's corner; with P ≥ 2D the cropped circular convolution is
    the same as with the image centred (every output pixel sees each input pixel once, at
    the same offset). The transforms skip the canvas's zero rows, and run along contiguous
    memory (the half spectrum is transposed between the two 1-D passes)."""
    b, D, _ = images.shape
    P = ctf.shape[-1]
    x, n = _pad_batch(images.to(torch.float32))
    c, _ = _pad_batch(ctf)
    f = torch.fft.rfft(x, n=P, dim=-1).transpose(1, 2).contiguous()     # (b, H, D) [kx, y]
    f = torch.fft.fft(f, n=P, dim=-1)                                   # (b, H, P) [kx, ky]
    torch.view_as_real(f).mul_(c[..., None])
    f = torch.fft.ifft(f, dim=-1)[..., :D].transpose(1, 2).contiguous()  # (b, D, H) [y, kx]
    return torch.fft.irfft(f, n=P, dim=-1)[:n, :, :D].contiguous()


def ctf_filter_canvas(canvas: torch.Tensor, ctf: torch.Tensor, D: int) -> torch.Tensor:
    """(b, P, P) objects that fill the canvas (ice, carbon) through their CTF (as from
    :func:`ctf_half`), then the central D × D (the box about the canvas centre P//2)."""
    P = canvas.shape[-1]
    x, n = _pad_batch(canvas.to(torch.float32))
    c, _ = _pad_batch(ctf)
    f = torch.fft.rfft2(x)                                              # (b, P, H)
    torch.view_as_real(f).mul_(c.transpose(1, 2)[..., None])
    out = torch.fft.irfft2(f, s=(P, P))[:n]
    off = P // 2 - D // 2
    return out[:, off:off + D, off:off + D].contiguous()


def group_rows(keys: Sequence) -> dict:
    """{key: array of positions} of a sequence of hashable keys, in first-seen order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return {k: np.asarray(v, np.int64) for k, v in out.items()}
