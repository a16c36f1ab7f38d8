"""Class refinement by 2D alignment: the model's classes and poses polished against their own
class averages (expectation–maximisation with a CTF and a Gaussian noise model).

Why
    A TARGET-VAE's latent space separates the kinds of particle that change its reconstruction
    most; at cryo-EM signal-to-noise ratios (~0.1) two views of related assemblies can share one
    cluster of z. The model's clusters and poses are a good starting point for the classical
    last step of 2D classification: compare every particle with every class average at every
    in-plane angle and shift, keep the best, re-average, repeat. This module is that step,
    started from the model's answer (``cryolatent refine embedded.star``). It is a separate,
    labelled step: its output columns replace the model's, the model's are kept in the
    ``embedded`` files. EM keeps the mistakes of its start (two views in one class, one view
    in two classes or two frames); once it converges, split-and-merge moves and a two-frame
    check (:func:`_try_moves`) are tried, each kept only when the likelihood rises.

Model (per particle i, class k, angle ψ, shift s; Fourier transforms unnormalised, ``rfft2``)
    X̂_i(f) = c_i(f) · T_{ψ,s}[A_k](f) + n_i(f),   E|n_i(f)|² = σ²(|f|)

    c_i the particle's CTF (in its own frame), T_{ψ,s}[A] the class average rotated by ψ and
    shifted by s (RELION's convention: particle(x) = A(R(ψ)(x + t)) with t = -s), σ² a
    radial noise power spectrum estimated from the residuals. The log-likelihood, up to terms
    that do not depend on (k, ψ, s), is

        L_i(k, ψ, s) = Σ_f Re[X̂_i c_i conj(R̂_kψ) e^{2πi f·s}] / σ²  -  ½ Σ_f c_i² |R̂_kψ|² / σ²

    summed over the full Fourier plane (R̂_kψ = FFT of A_k rotated by ψ). The first term for
    every shift at once is one inverse FFT per (i, k, ψ); the second a matrix product.

E step
    log p(k | X_i) = log π_k + logsumexp over (ψ, s) of [L_i(k, ψ, s) + log N(s; 0, σ_s²)]
    (the class posterior marginalises the pose, as RELION's does); the pose within each class
    is the maximum (sub-pixel shift from a parabola through the peak).

M step
    Each class average is the Wiener-filtered, CTF-corrected mean of its particles aligned by
    their best pose in that class, weighted by the class posterior:

        A_k(f) = Σ_i w_ik c̃_i F̃_i / σ²  /  (Σ_i w_ik c̃_i² / σ² + 1 / τ_k²(|f|))

    (F̃_i, c̃_i the aligned particle and its CTF in the aligned frame), τ_k² the class's
    signal power per resolution shell estimated from the previous average (its power less the
    noise the average still holds, × ``tau2_fudge`` as RELION's ``--tau2_fudge``), then a soft
    circular mask. π_k is the mean posterior, σ_s the RMS shift.

Cost per iteration: N·K·n_ψ inverse FFTs of D×D (6,000 particles, 6 classes, 72 angles at 32 px:
~30 s on one CPU core). Memory: the particles and their CTFs, (N, D, D//2+1) each.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..masks import circular_mask
from ..pose import align_particles, rotate_images, shift_ramp
from ..preprocess import fourier_crop
from ..utils import progress
from .trust import ring_index

log = logging.getLogger("cryolatent")


@dataclass
class Refine2DResult:
    """Output of :func:`refine_classes`.

    labels: (N,) int64 0-based classes; psi_deg: (N,) degrees (rlnAnglePsi); shift_px: (N, 2)
    pixels (rlnOriginX, rlnOriginY, RELION's convention); posterior: (N, K) class
    probabilities; averages: (K, D, D) float32 class averages (CTF-corrected, masked);
    history: one dict per iteration (changed: fraction of particles whose class changed,
    loglik: mean of log p(X_i) up to a constant, shift_sd_px).
    """

    labels: np.ndarray
    psi_deg: np.ndarray
    shift_px: np.ndarray
    posterior: np.ndarray
    averages: np.ndarray
    history: list = field(default_factory=list)
    psi_k: np.ndarray | None = None       # (N, K) best ψ of every particle in every class
    shift_k: np.ndarray | None = None     # (N, K, 2) best shift (px) in every class
    sigma2: np.ndarray | None = None      # (D//2+1,) the noise power per shell
    moves: list = field(default_factory=list)   # the split/merge/frame moves applied
    converged: bool = True                # False: the last EM run hit its round cap


# ------------------------------------------------------------------------- small helpers
def rfft_weights(D: int, device=None) -> torch.Tensor:
    """(D//2+1,) weights that turn a sum over an ``rfft2`` half-plane into the full-plane sum
    of a Hermitian quantity: 1 for the columns that have no mirror (0 and, for even D, D/2), 2
    for the others."""
    w = torch.full((D // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    w[0] = 1.0
    if D % 2 == 0:
        w[-1] = 1.0
    return w


def shell_index(D: int, device=None) -> torch.Tensor:
    """(D, D//2+1) int64 radial shell of every ``rfft2`` frequency (round(|f|·D)), clamped to
    D//2 (the corners share the last shell)."""
    ring = ring_index(D)[:, : D // 2 + 1]      # the rfft2 half of the FRC's rings
    return torch.from_numpy(ring).to(device).clamp(max=D // 2)


def shell_mean(values: torch.Tensor, shells: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(D//2+1,) weighted mean of ``values`` (..., D, D//2+1) over all leading axes and over
    each shell (``weights`` (D//2+1,) as :func:`rfft_weights`), float64."""
    v = values.to(torch.float64).reshape(-1, *shells.shape)
    w = weights[None, :].expand(shells.shape)
    tot = torch.zeros(int(shells.max()) + 1, dtype=torch.float64, device=v.device)
    cnt = torch.zeros_like(tot)
    tot.index_add_(0, shells.reshape(-1), (v.sum(0) * w).reshape(-1))
    cnt.index_add_(0, shells.reshape(-1), (w * v.shape[0]).reshape(-1))
    return tot / cnt.clamp(min=1e-12)


def rotated_references(averages: torch.Tensor, psi_deg: torch.Tensor,
                       oversample: int = 2) -> torch.Tensor:
    """Every class average at every angle, for the comparison: out[k, r] = A_k rotated to
    ψ_r as a particle would be (``particle(x) = A(R(ψ) x)``).

    averages: (K, D, D); psi_deg: (R,). Returns (K, R, D, D) in averages' dtype. The rotation
    is bilinear on a Fourier-upsampled copy (``oversample``×), then Fourier-cropped back, which
    keeps the high frequencies that plain bilinear interpolation damps (and would make the
    multiples of 90°, which need no interpolation, look sharper than the other angles).
    """
    K, D, _ = averages.shape
    R = psi_deg.numel()
    a = averages.to(torch.float64)
    if oversample > 1:
        a = fourier_pad(a, D * oversample)
    rot = rotate_images(a.repeat_interleave(R, 0), psi_deg.to(torch.float64).repeat(K))
    if oversample > 1:
        rot = fourier_crop(rot, D)
    return rot.reshape(K, R, D, D).to(averages.dtype)


def fourier_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, D, D) -> (B, size, size), size >= D even, by zero-padding the centred spectrum:
    the band-limited interpolant on a finer grid, content kept about (D//2, D//2), pixel values
    kept (the inverse of :func:`cryolatent.preprocess.fourier_crop` for even boxes)."""
    B, D, _ = images.shape
    if size == D:
        return images
    if D % 2 or size % 2 or size < D:
        raise ValueError(f"fourier_pad needs even boxes, {D} -> {size} >= {D}")
    f = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1))
    f[:, 0, :] *= 0.5      # the Nyquist row/column holds +D/2 and -D/2 together: split them
    f[:, :, 0] *= 0.5
    out = torch.zeros((B, size, size), dtype=f.dtype, device=f.device)
    o = size // 2 - D // 2
    out[:, o:o + D, o:o + D] = f
    out[:, o + D, o:o + D] = f[:, 0, :]
    out[:, o:o + D + 1, o + D] = out[:, o:o + D + 1, o]
    img = torch.fft.ifft2(torch.fft.ifftshift(out, dim=(-2, -1))).real
    return img * (size * size) / (D * D)


def _parabola_offset(lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Sub-sample position of a peak from three equally spaced values, in [-0.5, 0.5]."""
    den = lo - 2 * mid + hi
    off = torch.where(den < 0, 0.5 * (lo - hi) / den.clamp(max=-1e-12), torch.zeros_like(mid))
    return off.clamp(-0.5, 0.5)


def _at(maps: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """maps (n, K, D, D) read at (yy, xx) (n, K) (indices modulo D) -> (n, K)."""
    D = maps.shape[-1]
    flat = ((yy % D) * D + (xx % D))[..., None]
    return torch.gather(maps.reshape(*maps.shape[:2], -1), 2, flat)[..., 0]


# ------------------------------------------------------------------------------ E step
def score_maps(xf: torch.Tensor, ctf: torch.Tensor, refs_f: torch.Tensor,
               inv_sigma2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L(j, s) of module docstring for a chunk of particles, every template j, every shift.

    xf: (n, D, D//2+1) complex ``rfft2`` of the particles; ctf: (n, D, D//2+1) real CTF;
    refs_f: (J, D, D//2+1) complex ``rfft2`` of the templates; inv_sigma2: (D, D//2+1) 1/σ²;
    weights: (D//2+1,) :func:`rfft_weights`. Returns (n, J, D, D): entry [i, j, sy, sx] is the
    log-likelihood (up to a constant of particle i) of template j shifted by
    (sx, sy) (indices modulo D: index D-1 is a shift of -1).
    """
    D = xf.shape[-2]
    y = xf * (ctf * inv_sigma2)                                        # (n, D, H)
    g = y[:, None] * refs_f.conj()[None]                               # (n, J, D, H)
    cross = torch.fft.irfft2(g, s=(D, D)) * float(D * D)               # (n, J, D, D)
    a = (ctf * ctf * inv_sigma2 * weights).reshape(ctf.shape[0], -1)   # (n, D*H)
    b = (refs_f.real ** 2 + refs_f.imag ** 2).reshape(refs_f.shape[0], -1)
    norm = 0.5 * (a @ b.T.to(a.dtype))                                 # (n, J)
    return cross - norm[:, :, None, None]


def _shift_window(D: int, max_shift: float, device=None):
    """Integer shifts within ``max_shift`` px: (S,) flat map indices, (S, 2) shifts (sx, sy)."""
    m = int(math.floor(max_shift))
    r = torch.arange(-m, m + 1, device=device)
    sy, sx = torch.meshgrid(r, r, indexing="ij")
    keep = (sx ** 2 + sy ** 2) <= max_shift ** 2 + 1e-9
    sx, sy = sx[keep], sy[keep]
    flat = (sy % D) * D + (sx % D)
    return flat, torch.stack([sx, sy], -1).to(torch.float64)


# ------------------------------------------------------------------------------ driver
def refine_classes(images, ctf, labels, *, iterations: int = 10, psi_step: float = 5.0,
                   max_shift: float = 5.0, mask_radius: float | None = None,
                   tau2_fudge: float = 2.0, chunk: int | None = None, reseed_below: float = 1 / 3,
                   max_reseeds: int = 3, coarse_start=(0.25, 0.5), verbose: bool = True,
                   tol_changed: float = 0.002, device: str | torch.device = "cpu",
                   show_progress: bool = True, ctf_aligned_fn=None,
                   psi_deg=None, shift_px=None, moves: bool = True, max_moves: int | None = None,
                   averages0=None, sigma2=None) -> Refine2DResult:
    """Refine classes and poses of particles by 2D alignment to their class averages.

    images: (N, D, D) float array/tensor, protein of either contrast, normalised (background
    noise ~1); ctf: None, or a callable ``ctf(idx (n,) int64 array, extra_psi (n,) degrees or
    None) -> (n, D, D//2+1) float32`` CTF of those particles in ``rfft2`` layout, rotated by
    ``extra_psi`` (the aligned frame's CTF, astigmatism angle + ψ) — see
    :func:`ctf_function`. labels: (N,) int 0-based starting classes (K = max + 1), e.g. the
    model's clusters. psi_deg / shift_px: the starting poses (N,), (N, 2) pixels (RELION's
    convention) used for the first averages; zeros when None.
    iterations: maximum number of E/M rounds of each EM run (stops earlier when fewer than
    ``tol_changed`` of the particles change class); psi_step: degrees between the angles
    searched; max_shift: pixels, the radius of the shift search; mask_radius: pixels of the
    class averages' soft mask (default 0.45·D).
    moves: after EM converges, try split-and-merge moves and frame checks
    (:func:`_try_moves`), each kept only when it raises the likelihood, then EM again; at most
    ``max_moves`` accepted (default K). averages0: (K, D, D) start from these class averages
    (the first round skips the M step); sigma2: (D//2+1,) float64 a fixed noise power per
    shell (not re-estimated; the moves compare likelihoods under one noise model).
    Returns :class:`Refine2DResult`; ``history`` has one entry per round, and
    ``moves``/``converged`` say what the moves did and whether the last EM run stopped
    before its round cap.
    """
    g = _Grid.build(images, ctf, psi_step, max_shift, mask_radius, chunk, labels, device)
    N, K = g.N, g.K
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    psi = np.zeros(N) if psi_deg is None else np.asarray(psi_deg, dtype=np.float64).reshape(-1)
    t = np.zeros((N, 2)) if shift_px is None else np.asarray(shift_px, dtype=np.float64)
    st = _State(post=np.eye(K)[lab], psi_k=np.repeat(psi[:, None], K, 1),
                t_k=np.repeat(t[:, None, :], K, 1), tau2=None,
                sigma2=(shell_mean(g.xf.real ** 2 + g.xf.imag ** 2, g.shells, g.wts)
                        if sigma2 is None else torch.as_tensor(sigma2, dtype=torch.float64)),
                shift_sd=max(float(np.sqrt((t ** 2).mean())) if shift_px is not None else 2.0,
                             1.0))
    opts = dict(iterations=iterations, tau2_fudge=tau2_fudge, reseed_below=reseed_below,
                max_reseeds=max_reseeds, coarse_start=coarse_start, verbose=verbose,
                tol_changed=tol_changed, show_progress=show_progress,
                fixed_sigma2=sigma2 is not None)
    history: list = []
    averages = None if averages0 is None else torch.as_tensor(
        np.asarray(averages0, dtype=np.float32), device=g.dev)
    averages, converged = _em(g, st, history, averages=averages, **opts)
    move_log: list = []
    if moves and K >= 1 and N >= 4 * K:
        budget = K if max_moves is None else max_moves
        while len(move_log) < budget:
            before = (copy.deepcopy(st), averages, converged, len(history),
                      history[-1]["loglik"])
            done = _try_moves(g, st, averages)
            if done is None:
                break
            o = dict(opts, coarse_start=())
            averages, converged = _em(g, st, history, **o)
            if not history[-1]["loglik"] > before[4]:
                # kept only when the whole set's likelihood rises after EM: undo, stop
                st, averages, converged = before[0], before[1], before[2]
                del history[before[3]:]
                log.log(logging.INFO if verbose else logging.DEBUG,
                        "refine: undone (the whole set's log-likelihood did not rise): %s",
                        done["what"])
                break
            done["loglik_after"] = history[-1]["loglik"]
            move_log.append(done)
            log.log(logging.INFO if verbose else logging.DEBUG, "refine: %s", done["what"])
    final = st.post.argmax(1)
    return Refine2DResult(labels=final, psi_deg=st.psi_k[np.arange(N), final] % 360.0,
                          shift_px=st.t_k[np.arange(N), final], posterior=st.post,
                          averages=averages.cpu().numpy(), history=history,
                          psi_k=st.psi_k, shift_k=st.t_k, sigma2=st.sigma2.cpu().numpy(),
                          moves=move_log, converged=converged)


@dataclass
class _Grid:
    """What one refinement searches (fixed for the run): the particles (N, D, D), their
    ``rfft2`` (N, D, H), the CTF callable, the angles (R,), the shift window, masks, shells."""

    x: torch.Tensor
    xf: torch.Tensor
    ctf: object
    angles: torch.Tensor
    flat: torch.Tensor
    svec: torch.Tensor
    mask: torch.Tensor
    shells: torch.Tensor
    wts: torch.Tensor
    chunk: int
    psi_step: float
    max_shift: float
    mask_radius: float | None
    dev: torch.device
    K: int

    @property
    def N(self) -> int:
        return self.x.shape[0]

    @property
    def D(self) -> int:
        return self.x.shape[-1]

    @classmethod
    def build(cls, images, ctf, psi_step, max_shift, mask_radius, chunk, labels, device):
        dev = torch.device(device)
        x = torch.as_tensor(np.asarray(images, dtype=np.float32), device=dev)
        N, D, _ = x.shape
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        if lab.shape[0] != N or lab.min(initial=0) < 0:
            raise ValueError("labels must be (N,) non-negative integers")
        K = int(lab.max(initial=0)) + 1
        angles = torch.arange(0.0, 360.0 - 1e-9, psi_step, dtype=torch.float64)
        R = angles.numel()
        flat, svec = _shift_window(D, max_shift, dev)
        if chunk is None:
            chunk = max(1, int(8e6 // (K * R * D * D * 4)))
        mask = circular_mask(D, 0.45 * D if mask_radius is None else mask_radius, edge=3.0,
                             device=dev, dtype=torch.float32)   # RELION's soft mask
        return cls(x=x, xf=torch.fft.rfft2(x), ctf=ctf, angles=angles, flat=flat, svec=svec,
                   mask=mask, shells=shell_index(D, dev), wts=rfft_weights(D, dev),
                   chunk=chunk, psi_step=psi_step, max_shift=max_shift,
                   mask_radius=mask_radius, dev=dev, K=K)

    def ctf_of(self, idx, extra_psi=None) -> torch.Tensor:
        """(n, D, H) float32 CTF of particles ``idx`` (ones without a CTF)."""
        if self.ctf is None:
            return torch.ones((len(idx), self.D, self.D // 2 + 1), dtype=torch.float32,
                              device=self.dev)
        return self.ctf(idx, extra_psi).to(self.dev)

    def subset_ctf(self, members: np.ndarray):
        """The CTF callable of a subset (indices into the subset -> the parent's)."""
        if self.ctf is None:
            return None
        return lambda i, e=None: self.ctf_of(members[np.asarray(i)], e)


@dataclass
class _State:
    """EM state: post (N, K) class posterior; psi_k (N, K) degrees and t_k (N, K, 2) px, the
    best pose of every particle in every class; tau2 (K, shells) signal power or None;
    sigma2 (shells,) noise power; shift_sd the prior's px."""

    post: np.ndarray
    psi_k: np.ndarray
    t_k: np.ndarray
    tau2: torch.Tensor | None
    sigma2: torch.Tensor
    shift_sd: float
    frame_checked: dict = field(default_factory=dict)   # class -> its size when checked


def m_step(g: _Grid, st: _State, tau2_fudge: float = 2.0):
    """Class averages from the posterior and poses (module docstring, M step).

    Returns (averages (K, D, D) float32, masked; tau2 (K, D//2+1) float64, the classes'
    signal power per shell for the next M step)."""
    D, H, K = g.D, g.D // 2 + 1, st.post.shape[1]
    inv_s2 = (1.0 / st.sigma2.clamp(min=1e-12))[g.shells]
    num = torch.zeros((K, D, H), dtype=torch.complex128, device=g.dev)
    den = torch.zeros((K, D, H), dtype=torch.float64, device=g.dev)
    for k in range(K):
        use = np.flatnonzero(st.post[:, k] > 1e-3)
        for s0 in range(0, len(use), 1024):
            idx = use[s0:s0 + 1024]
            al = align_particles(g.x[idx], torch.as_tensor(st.psi_k[idx, k]),
                                 torch.as_tensor(st.t_k[idx, k]), method="fourier")
            c = g.ctf_of(idx, st.psi_k[idx, k]).to(torch.float64)
            w = torch.as_tensor(st.post[idx, k], device=g.dev)[:, None, None]
            num[k] += (torch.fft.rfft2(al.to(torch.float64)) * (c * w)).sum(0) * inv_s2
            den[k] += (c * c * w).sum(0) * inv_s2
    reg = (torch.zeros((K, D, H), dtype=torch.float64, device=g.dev) if st.tau2 is None
           else (1.0 / st.tau2.clamp(min=1e-12))[:, g.shells])
    avg_f = num / (den + reg + 1e-12)
    # the class's signal power per shell: |A|² less the noise the average still holds
    power = torch.stack([shell_mean((avg_f[k].abs() ** 2)[None], g.shells, g.wts)
                         for k in range(K)])
    noise = torch.stack([shell_mean((1.0 / (den[k] + 1e-12))[None], g.shells, g.wts)
                         for k in range(K)])
    tau2 = tau2_fudge * (power - noise).clamp(min=0) + 1e-12
    return torch.fft.irfft2(avg_f, s=(D, D)).float() * g.mask, tau2


def e_step(g: _Grid, st: _State, averages: torch.Tensor, band: float | None = None,
           desc: str = "refine", show_progress: bool = True):
    """Every particle against every class average at every angle and shift (module
    docstring, E step).

    averages: (K, D, D); band: compare only shells <= band × Nyquist (coarse rounds). Returns
    (post (N, K), psi_k (N, K), t_k (N, K, 2), loglik: Σ_i log p(X_i) up to a constant,
    res_pow (D·H,) residual power summed over particles at their best pose)."""
    D, H, N = g.D, g.D // 2 + 1, g.N
    K, R = averages.shape[0], g.angles.numel()
    refs = rotated_references(averages, g.angles)                      # (K, R, D, D)
    refs_f = torch.fft.rfft2(refs.reshape(K * R, D, D))                # (J, D, H)
    inv_s2f = (1.0 / st.sigma2.clamp(min=1e-12))[g.shells].float()
    if band is not None:
        inv_s2f = inv_s2f * (g.shells <= band * (D // 2)).float()
    log_prior_s = (-0.5 * (g.svec ** 2).sum(-1) / st.shift_sd ** 2).float()   # (S,)
    log_pi = torch.log(torch.as_tensor(st.post.mean(0) + 1e-6, dtype=torch.float32))
    post, psi_k, t_k = np.zeros((N, K)), st.psi_k.copy(), st.t_k.copy()
    loglik = 0.0
    res_pow = torch.zeros(H * D, dtype=torch.float64, device=g.dev)
    flat = g.flat
    bar = progress(total=N, desc=desc, unit="particle", disable=None if show_progress else True)
    for s0 in range(0, N, g.chunk):
        idx = np.arange(s0, min(N, s0 + g.chunk))
        n = len(idx)
        c = g.ctf_of(idx)
        maps = score_maps(g.xf[idx], c, refs_f, inv_s2f, g.wts.float())   # (n, J, D, D)
        flat_maps = maps.reshape(n, K, R, D * D)
        win = flat_maps[..., flat] + log_prior_s                        # (n, K, R, S)
        per_class = torch.logsumexp(win.reshape(n, K, -1), -1) + log_pi   # (n, K)
        lse = torch.logsumexp(per_class, -1, keepdim=True)
        loglik += float(lse.sum())
        p = torch.exp(per_class - lse)
        post[idx] = p.double().cpu().numpy()
        best = win.reshape(n, K, -1).argmax(-1)                         # (n, K)
        r_best, s_best = best // flat.numel(), best % flat.numel()
        sv = g.svec[s_best].clone()                                      # (n, K, 2) (sx, sy)
        # sub-pixel: a parabola through the peak and its neighbours along x and y
        ii = torch.arange(n)[:, None].expand(n, K)
        kk = torch.arange(K)[None, :].expand(n, K)
        mp = flat_maps.reshape(n, K, R, D, D)[ii, kk, r_best]           # (n, K, D, D)
        sx, sy = sv[..., 0].long() % D, sv[..., 1].long() % D
        mid = _at(mp, sy, sx)
        sv[..., 0] += _parabola_offset(_at(mp, sy, sx - 1), mid, _at(mp, sy, sx + 1)).double()
        sv[..., 1] += _parabola_offset(_at(mp, sy - 1, sx), mid, _at(mp, sy + 1, sx)).double()
        psi_k[idx] = g.angles[r_best].numpy()
        t_k[idx] = -sv.cpu().numpy()                                     # t = -s
        # residual power at the best pose of the most probable class (noise spectrum)
        kb = p.argmax(-1)
        jb = kb * R + r_best[torch.arange(n), kb]
        sb = sv[torch.arange(n), kb]                                     # (n, 2)
        model = c.double() * refs_f[jb].to(torch.complex128) * shift_ramp(D, sb)
        res = g.xf[idx].to(torch.complex128) - model
        res_pow += (res.real ** 2 + res.imag ** 2).sum(0).reshape(-1)
        bar.update(n)
    bar.close()
    return post, psi_k, t_k, loglik, res_pow


def noise_update(g: _Grid, res_pow: torch.Tensor) -> torch.Tensor:
    """(shells,) noise power per shell from :func:`e_step`'s summed residual power."""
    D = g.D
    return shell_mean((res_pow / g.N).reshape(1, D, D // 2 + 1), g.shells, g.wts)


def _em(g: _Grid, st: _State, history: list, *, iterations, tau2_fudge, reseed_below,
        max_reseeds, coarse_start, verbose, tol_changed, show_progress, fixed_sigma2,
        averages=None):
    """EM rounds on ``st`` (in place) until fewer than ``tol_changed`` of the particles change
    class or ``iterations`` rounds; a class that empties out is re-seeded (:func:`_reseed`).
    ``averages`` given: the first round skips the M step. Returns (the last averages,
    converged: stopped before the cap)."""
    N, K = g.N, st.post.shape[1]
    reseeds = 0
    converged = False
    for it in range(iterations):
        if averages is None or it > 0:
            averages, st.tau2 = m_step(g, st, tau2_fudge)
        band = coarse_start[it] if it < len(coarse_start) else None
        post, psi_k, t_k, loglik, res_pow = e_step(
            g, st, averages, band, desc=f"refine {len(history) + 1}", show_progress=show_progress)
        if not fixed_sigma2:
            st.sigma2 = noise_update(g, res_pow)
        new_lab = post.argmax(1)
        changed = float((new_lab != st.post.argmax(1)).mean())
        st.post, st.psi_k, st.t_k = post, psi_k, t_k
        # a class that emptied out while another holds two kinds of particle: split the
        # largest class in two and give one half to the empty one
        frac = np.bincount(new_lab, minlength=K) / N
        reseeded = []
        for k in np.flatnonzero(frac < reseed_below / K):
            if reseeds >= max_reseeds or it + 1 >= iterations - 1:
                break
            reseeded.append(_reseed(g, st, int(k), tau2_fudge, coarse_start))
            reseeds += 1
            changed = max(changed, tol_changed)  # keep iterating
            log.info("refine: class %d held %.2f%% of the particles; split class %d (%d "
                     "particles) and gave it %d of them", k + 1, 100 * frac[k],
                     reseeded[-1][1] + 1, reseeded[-1][3], reseeded[-1][2])
        tk = st.t_k[np.arange(N), st.post.argmax(1)]
        st.shift_sd = max(float(np.sqrt((tk ** 2).sum(1).mean() / 2)), 0.5)
        history.append({"iteration": len(history) + 1, "changed": changed, "loglik": loglik / N,
                        "shift_sd_px": st.shift_sd,
                        "class_fractions": np.round(st.post.mean(0), 4).tolist(),
                        "reseeded": [r[:3] for r in reseeded]})
        log.log(logging.INFO if verbose else logging.DEBUG,
                "refine %d: %.1f%% of the particles changed class, log-likelihood %.2f, "
                "shift sd %.2f px", len(history), 100 * changed, loglik / N, st.shift_sd)
        if changed < tol_changed and it > 0:
            converged = True
            break
    return averages, converged


def _reseed(g: _Grid, st: _State, k: int, tau2_fudge: float, coarse_start) -> tuple:
    """Give the (near-)empty class ``k`` one half of the largest class, split by
    :func:`split_in_two` and refined as two classes alone. Returns (k, big, moved, size)."""
    K = st.post.shape[1]
    big = int(np.argmax(np.bincount(st.post.argmax(1), minlength=K)))
    members = np.flatnonzero(st.post.argmax(1) == big)
    move = split_in_two(g.x[members], st.psi_k[members, big], st.t_k[members, big],
                        g.ctf_of(members, st.psi_k[members, big]), g.mask)
    sub = _sub_refine(g, st, members, move.astype(np.int64), st.psi_k[members, big],
                      st.t_k[members, big], iterations=6, coarse_start=coarse_start,
                      fixed=False)
    move = sub.labels == 1
    moved = members[move]
    st.post[moved] = 0.0
    st.post[moved, k] = 1.0
    st.psi_k[:, k], st.t_k[:, k] = st.psi_k[:, big], st.t_k[:, big]
    if st.tau2 is not None:
        st.tau2[k] = st.tau2[big]       # the emptied class's signal power was ~0: start afresh
    st.psi_k[members, k] = sub.psi_deg
    st.t_k[members, k] = sub.shift_px
    st.psi_k[members, big] = np.where(move, st.psi_k[members, big], sub.psi_deg)
    st.t_k[members, big] = np.where(move[:, None], st.t_k[members, big], sub.shift_px)
    return int(k), big, int(move.sum()), len(members)


def _sub_refine(g: _Grid, st: _State, members: np.ndarray, labels, psi, t, *, iterations,
                coarse_start=(), fixed: bool = True, averages0=None) -> "Refine2DResult":
    """:func:`refine_classes` on a subset of the particles, with the parent's search grid,
    without moves; ``fixed``: under the parent's noise spectrum, held fixed (likelihoods
    comparable between candidates)."""
    return refine_classes(
        g.x[members], g.subset_ctf(members), np.asarray(labels, dtype=np.int64),
        iterations=iterations, psi_step=g.psi_step, max_shift=g.max_shift,
        mask_radius=g.mask_radius, max_reseeds=0, coarse_start=coarse_start, device=g.dev,
        show_progress=False, verbose=False, psi_deg=psi, shift_px=t, moves=False,
        averages0=averages0, sigma2=st.sigma2 if fixed else None, tol_changed=0.0)


#: rounds of EM that score a candidate move (and its baseline) on the particles it touches
MOVE_ROUNDS = 3


def _try_moves(g: _Grid, st: _State, averages: torch.Tensor) -> dict | None:
    """Propose moves that EM cannot make by itself, score each by the log-likelihood of the
    particles it touches after :data:`MOVE_ROUNDS` EM rounds (the same rounds from the
    present classes are the baseline; noise spectrum held fixed), apply the first that
    improves it. Moves, in order:

    * **split** into a (nearly) empty class: one of the two largest classes split in two
      (:func:`split_in_two`);
    * **merge + split** (SMEM, Ueda et al. 2000): the two classes whose rotationally aligned
      averages agree best are merged (one re-aligned to the other) and one of the two
      largest classes split in two, keeping K;
    * **frame**: a class whose average looks like itself turned by 180° may hold one view in
      two frames (part of its particles 180° off, the average symmetrised); the particles of
      the smaller frame (:func:`frame_bits`) are turned by 180° (the data decide the frame,
      as RELION's do).

    Returns a description of the move applied, or None when none improves the likelihood.
    """
    K = st.post.shape[1]
    lab = st.post.argmax(1)
    counts = np.bincount(lab, minlength=K)
    psi_b, t_b = st.psi_k[np.arange(g.N), lab], st.t_k[np.arange(g.N), lab]
    avg = averages.cpu().numpy()
    small = max(10, int(0.1 * g.N / K))
    live = [k for k in range(K) if counts[k] >= small]
    splits = [int(k) for k in np.argsort(-counts)[:2] if counts[k] >= 2 * small]
    # ------------------------------------------------------------------ split into an empty class
    for e in [k for k in range(K) if counts[k] < small]:
        for s in splits:
            res = _merge_split(g, st, s, e, s, lab, psi_b, t_b, avg, merge=False)
            if res is not None:
                return res
    if len(live) >= 3 or (len(live) == 2 and K == 2):
        # ------------------------------------------------------------------ merge + split
        sim = aligned_similarity(avg[live])
        pairs = sorted(((sim[a, b], live[a], live[b]) for a in range(len(live))
                        for b in range(a + 1, len(live))), reverse=True)[:2]
        tried = set()
        for _, i, j in pairs:
            keep, drop = (i, j) if counts[i] >= counts[j] else (j, i)
            for s in splits:
                s = keep if s in (i, j) else int(s)
                if (keep, drop, s) in tried:
                    continue
                tried.add((keep, drop, s))
                res = _merge_split(g, st, keep, drop, s, lab, psi_b, t_b, avg)
                if res is not None:
                    return res
    # ------------------------------------------------------------------ frame moves
    self180 = _self_similarity_180(avg)
    for k in np.argsort(-self180):
        if self180[k] < FRAME_CHECK_CC or counts[k] < 20:
            break
        seen = st.frame_checked.get(int(k))
        if seen is not None and abs(counts[k] - seen) <= 0.1 * seen:
            continue            # checked already, and the class has hardly changed since
        st.frame_checked[int(k)] = int(counts[k])
        members = np.flatnonzero(lab == k)
        base = _sub_refine(g, st, members, np.zeros(len(members)), psi_b[members],
                           t_b[members], iterations=MOVE_ROUNDS)
        bits = frame_bits(g.x[members], psi_b[members], t_b[members],
                          g.ctf_of(members, psi_b[members]), g.mask)
        # the particles of one frame turned by 180° into the other's, then scored from those
        # poses by the same rounds as the baseline
        cand = _sub_refine(g, st, members, np.zeros(len(members)),
                           psi_b[members] + 180.0 * bits, t_b[members], iterations=MOVE_ROUNDS)
        gain = (cand.history[-1]["loglik"] - base.history[-1]["loglik"]) * len(members)
        if gain > MOVE_MARGIN * len(members):
            st.psi_k[members, k] = cand.psi_k[:, 0]
            st.t_k[members, k] = cand.shift_k[:, 0]
            return {"move": "frame", "class": int(k) + 1, "particles": len(members),
                    "loglik_gain": gain,
                    "what": f"class {k + 1}'s particles re-aligned to one frame (log-likelihood "
                            f"+{gain:.1f})"}
    return None


#: a class is checked for two frames when its average correlates this well with itself
#: turned by 180° (a view in one frame rarely does; a symmetrised one always does)
FRAME_CHECK_CC = 0.8
#: nats per particle touched that a move must gain to be kept (the scoring rounds of two
#: equally good answers differ by ~0.01; a right move gains > 1)
MOVE_MARGIN = 0.1


def _merge_split(g, st, keep, drop, s, lab, psi_b, t_b, avg, merge: bool = True
                 ) -> dict | None:
    """Score and, if it pays, apply: classes ``keep`` and ``drop`` merged into ``keep``,
    class ``s`` (``keep`` itself: the merged class) split in two between ``s`` and
    ``drop``. ``merge=False``: ``drop`` is (nearly) empty; ``s`` = ``keep`` is split into it."""
    old = [keep, drop] + ([s] if s != keep else [])
    members = np.flatnonzero(np.isin(lab, old))
    if len(members) < 20:
        return None
    remap = {c: n for n, c in enumerate(old)}
    base = _sub_refine(g, st, members, np.array([remap[c] for c in lab[members]]),
                       psi_b[members], t_b[members], iterations=MOVE_ROUNDS)
    union = np.isin(lab[members], [keep, drop])
    to_split = union if s == keep else (lab[members] == s)
    if union.sum() < 10 or to_split.sum() < 10:
        return None
    psi_m, t_m = psi_b[members].copy(), t_b[members].copy()
    if merge:   # the union aligned to the kept class's average, then averaged
        merged = _sub_refine(g, st, members[union], np.zeros(int(union.sum())), None, None,
                             iterations=1, averages0=avg[keep][None])
        psi_m[union], t_m[union] = merged.psi_deg, merged.shift_px
    labels = np.zeros(len(members), dtype=np.int64)     # 0: the merged class
    halves = split_in_two(g.x[members[to_split]], psi_m[to_split], t_m[to_split],
                          g.ctf_of(members[to_split], psi_m[to_split]), g.mask)
    if s == keep:
        labels[to_split] = halves.astype(np.int64)      # 0 / 1: the merged class split
    else:
        labels[to_split] = np.where(halves, 1, 2)
    cand = _sub_refine(g, st, members, labels, psi_m, t_m, iterations=MOVE_ROUNDS)
    n = len(members)
    gain = (cand.history[-1]["loglik"] - base.history[-1]["loglik"]) * n
    if not gain > MOVE_MARGIN * n:
        return None
    new = [keep, drop] + ([s] if s != keep else [])
    st.post[members] = 0.0
    st.post[np.ix_(members, new)] = cand.posterior
    st.psi_k[np.ix_(members, new)] = cand.psi_k
    st.t_k[np.ix_(members, new)] = cand.shift_k
    if st.tau2 is not None:     # the new classes' signal power: the strongest of the old
        st.tau2[new] = st.tau2[new].max(0).values
    if not merge:
        what = (f"class {s + 1} split in two, into the empty class {drop + 1} "
                f"(log-likelihood +{gain:.1f} over {n} particles)")
        return {"move": "split", "split": int(s) + 1, "into": int(drop) + 1,
                "particles": n, "loglik_gain": gain, "what": what}
    what = (f"classes {keep + 1} and {drop + 1} merged, " +
            (f"then split in two ({keep + 1}, {drop + 1})" if s == keep else
             f"class {s + 1} split in two ({s + 1}, {drop + 1})") +
            f" (log-likelihood +{gain:.1f} over {n} particles)")
    return {"move": "merge+split", "merged": [keep + 1, drop + 1], "split": int(s) + 1,
            "particles": n, "loglik_gain": gain, "what": what}


def _self_similarity_180(avg: np.ndarray) -> np.ndarray:
    """(K,) normalised correlation of each average with itself turned by 180° (best
    shift): 1 for a 2-fold symmetric image."""
    from .trust import _prepare_for_alignment

    a = _prepare_for_alignment(avg, None)
    r = torch.flip(a, dims=(-2, -1))     # 180° about the corner pixel; the shift search
    fa, fr = torch.fft.rfft2(a), torch.fft.rfft2(r)   # takes up the centre's offset
    d = a.shape[-1]
    cc = torch.fft.irfft2(fa * fr.conj(), s=(d, d)).flatten(1).max(1).values
    return cc.numpy()


def aligned_similarity(averages: np.ndarray, step_deg: float = 5.0) -> np.ndarray:
    """(K, K) normalised correlation of every pair of class averages after the best in-plane
    rotation and shift (:func:`cryolatent.analysis.trust.align_images`); 1 on the diagonal."""
    from .trust import _prepare_for_alignment, align_images

    K = len(averages)
    a = _prepare_for_alignment(np.asarray(averages), None)
    pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
    sim = np.eye(K)
    for (i, j), r in zip(pairs, align_images(a, a, pairs, step_deg=step_deg)):
        sim[i, j] = sim[j, i] = r["cc"]
    return sim


def same_view_groups(pairs) -> list[list[int]]:
    """Groups (of >= 2) of classes joined by ``pairs`` (single linkage): from the trust
    report's indistinguishable pairs (aligned averages that agree as well as the halves of one
    class do), the over-clustered classes that hold one view. Class numbers as given."""
    parent: dict = {}

    def root(i):
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict = {}
    for i in list(parent):
        groups.setdefault(root(i), []).append(i)
    return sorted(sorted(v) for v in groups.values() if len(v) > 1)


def _aligned_filtered(images, psi_deg, shift_px, ctf, mask, lowpass: float) -> torch.Tensor:
    """(n, D, D) float64: the particles aligned by their poses, multiplied by their CTF (one
    contrast, as a phase flip gives), low-passed at ``lowpass`` × Nyquist and masked."""
    D = images.shape[-1]
    al = align_particles(images, torch.as_tensor(psi_deg), torch.as_tensor(shift_px),
                         method="fourier").to(torch.float64)
    f = torch.fft.rfft2(al) * ctf.to(torch.float64)
    keep = shell_index(D, images.device) <= lowpass * (D // 2)
    return torch.fft.irfft2(f * keep, s=(D, D)) * mask.to(torch.float64)


def split_in_two(images: torch.Tensor, psi_deg, shift_px, ctf: torch.Tensor,
                 mask: torch.Tensor, n_components: int = 6, lowpass: float = 0.25,
                 seed: int = 0) -> np.ndarray:
    """Split one class's particles in two: (n,) bool, True for the smaller half.

    images: (n, D, D) particles; psi_deg (n,), shift_px (n, 2): their poses in the class;
    ctf: (n, D, D//2+1) their CTFs in the aligned frame; mask: (D, D). The aligned particles
    are multiplied by their CTF (all in one contrast, as a phase flip does), low-passed at
    ``lowpass`` × Nyquist, masked, projected on their first principal components and split by
    2-means (k-means++ start, ``seed``).
    """
    a = _aligned_filtered(images, psi_deg, shift_px, ctf, mask, lowpass)
    a = a.reshape(len(a), -1)
    a = a - a.mean(0)
    _, _, v = torch.linalg.svd(a, full_matrices=False)
    y = (a @ v[:n_components].T).cpu().numpy()
    from sklearn.cluster import KMeans

    lab = KMeans(2, n_init=4, random_state=seed).fit_predict(y)
    small = int(np.argmin(np.bincount(lab, minlength=2)))
    return lab == small


def frame_bits(images: torch.Tensor, psi_deg, shift_px, ctf: torch.Tensor,
               mask: torch.Tensor, lowpass: float = 0.5, iterations: int = 20) -> np.ndarray:
    """Which particles of a class sit in the frame turned by 180°: (n,) bool.

    images (n, D, D), psi_deg (n,), shift_px (n, 2): the class's particles and poses; ctf
    (n, D, D//2+1) their CTFs in the aligned frame; mask (D, D). If a fraction of the
    particles are 180° off, the aligned particle x_i is S or S turned by 180° (plus noise), so
    its antisymmetric part d_i = x_i - rot180(x_i) is +v or -v (v = S - rot180 S): the sign of
    d_i's projection on v, v estimated from all of them (sign-corrected power iterations from
    the first principal component), is the frame, a matched filter on every pixel.
    The aligned particles are multiplied by their CTF (one contrast) and low-passed at
    ``lowpass`` × Nyquist before the comparison."""
    D = images.shape[-1]
    a = _aligned_filtered(images, psi_deg, shift_px, ctf, mask, lowpass)
    # 180° about the centre pixel (D//2, D//2): index i -> 2·(D//2) - i (mod D)
    r = torch.roll(torch.flip(a, dims=(-2, -1)), shifts=(1 - D % 2, 1 - D % 2), dims=(-2, -1))
    d = (a - r).reshape(len(a), -1)
    _, _, vt = torch.linalg.svd(d - d.mean(0), full_matrices=False)
    v = vt[0]
    sign = torch.sign(d @ v)
    for _ in range(iterations):
        v = (sign[:, None] * d).mean(0)
        new = torch.sign(d @ v)
        if torch.equal(new, sign):
            break
        sign = new
    bits = (sign < 0).cpu().numpy()
    return bits if bits.mean() <= 0.5 else ~bits     # turn the smaller part


def refine_null(images, ctf, averages, sigma2, apix: float, *, psi_step: float = 5.0,
                max_shift: float = 5.0, class_fractions=None, per_half: int = 500,
                seed: int = 0) -> dict:
    """FRC of half-averages of pure noise aligned by refine's own search: the null that a
    refined class average must beat (:func:`cryolatent.analysis.trust.beats_null`).

    Aligning noise to class averages over every angle and shift makes averages that look like
    the references ("Einstein from noise"), so two halves of it correlate; a class is evidence
    of signal only where its FRC is above theirs. images (N, D, D) at the search box, ctf as
    :func:`refine_classes` takes (the noise images pretend to be those particles), averages
    (K, D, D), sigma2 (D//2+1,) the noise spectrum; apix: of the search box. 2·``per_half``
    particles' pixels are shuffled (white noise with their pixel values), searched against
    the averages exactly as the particles were, and the ones that chose the most popular
    class aligned and averaged in two halves. Returns :func:`aligned_noise_null`'s dict."""
    from .trust import _masked, frc, frc_resolution

    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    N, D, _ = x.shape
    K = len(averages)
    rng = np.random.default_rng(seed + 5)
    m = int(min(N, 2 * per_half * max(1, K)))
    idx = np.sort(rng.choice(N, m, replace=False))
    g_ = torch.Generator().manual_seed(seed + 17)
    flat = x[idx].reshape(m, -1)
    perm = torch.argsort(torch.rand(flat.shape, generator=g_), dim=1)
    noise = torch.gather(flat, 1, perm).reshape(m, D, D)
    noise = noise - noise.mean((-2, -1), keepdim=True)
    sub_ctf = None if ctf is None else (lambda i, e=None: ctf(idx[np.asarray(i)], e))
    g = _Grid.build(noise, sub_ctf, psi_step, max_shift, None, None, np.zeros(m), "cpu")
    frac = (np.full(K, 1.0 / K) if class_fractions is None
            else np.asarray(class_fractions, np.float64))
    st = _State(post=np.tile(frac, (m, 1)), psi_k=np.zeros((m, K)), t_k=np.zeros((m, K, 2)),
                tau2=None, sigma2=torch.as_tensor(sigma2, dtype=torch.float64), shift_sd=2.0)
    post, psi_k, t_k, _, _ = e_step(g, st, torch.as_tensor(np.asarray(averages, np.float32)),
                                    show_progress=False)
    lab = post.argmax(1)
    k = int(np.argmax(np.bincount(lab, minlength=K)))
    use = np.flatnonzero(lab == k)      # >= m / K >= 1
    al = align_particles(noise[use].double(), torch.as_tensor(psi_k[use, k]),
                         torch.as_tensor(t_k[use, k]), method="fourier").numpy()
    order = rng.permutation(len(use))
    h = len(use) // 2
    sizes = sorted({int(v) for v in np.geomspace(2, max(h, 2), 8).round()} | {max(h, 1)})
    curves = {}
    for n in sizes:
        a, b = al[order[:n]].mean(0), al[order[h:h + n]].mean(0)
        curves[str(n)] = [round(float(v), 4) for v in frc(_masked(a), _masked(b))]
    res = frc_resolution(np.asarray(curves[str(max(h, 1))]), D, apix)
    return {"particles": int(2 * h), "frc_by_half_size": curves, "frc": curves[str(max(h, 1))],
            "resolution_A": res["resolution_A"], "apix": float(apix),
            "aligned_by": "refine's search against its class averages"}


def ctf_function(params, box: int, apix: float, base_psi=None, device=None):
    """The ``ctf`` callable :func:`refine_classes` takes, from :class:`cryolatent.ctf.CTFParams`.

    ``f(idx, extra_psi)`` returns (n, box, box//2+1) float32 CTFs of particles ``idx`` with
    their astigmatism angle turned by ``extra_psi`` degrees (the aligned frame: rotating a
    particle by R(ψ) turns its CTF by +ψ).
    """
    from ..ctf import compute_ctf

    def f(idx, extra_psi=None):
        p = params.subset(np.asarray(idx))
        if extra_psi is not None:
            p.astigmatism = p.astigmatism + np.asarray(extra_psi, dtype=np.float64)
        return compute_ctf(p, box, apix, device=device, dtype=torch.float32)[..., : box // 2 + 1]

    return f


# ------------------------------------------------------------------ files in, files out
#: Nyquist resolution (Å) of the search by default: 2D classes of cryo-EM particles rarely go
#: beyond it, and cropping to it makes the search as cheap as the particles allow
DEFAULT_RESOLUTION_A = 12.0


def search_box(box: int, apix: float, resolution_A: float) -> int:
    """The even box (<= ``box``, >= min(box, 32)) whose Nyquist is ~``resolution_A`` Å after a
    Fourier crop of ``box`` px of ``apix`` Å: round(box · 2·apix / resolution) rounded up to
    even."""
    d = int(math.ceil(box * 2.0 * apix / resolution_A))
    d += d % 2
    return int(min(box, max(d, min(box, 32))))


def refine_star(star, out, *, datadir=None, iterations: int = 10,
                resolution_A: float = DEFAULT_RESOLUTION_A, psi_step: float = 5.0,
                offset_range_A: float | None = None, use_ctf: bool = True,
                mask_diameter_A: float | None = None, centre: bool = True,
                batch_size: int = 512, show_progress: bool = True, moves: bool = True) -> dict:
    """``cryolatent refine``: :func:`refine_classes` on the particles of ``star`` (an
    ``embed --clusters K`` output), written as OUT.star + OUT_classes.mrcs + OUT_refine.json.

    star: STAR with rlnClassNumber (1..K), rlnAnglePsi (°), rlnOriginXAngst/YAngst (Å), the
    starting point; datadir: where its relative stack paths are looked up first. ``refine``
    reads the particles it names, normalises each (RELION's background mean/sd), Fourier-crops them to :func:`search_box`
    (``resolution_A`` Nyquist) and searches every ``psi_step``° and every shift within
    ``offset_range_A`` Å (default 0.15 × the particle box, as ``train``'s search). The CTF is
    modelled when the particles have CTF parameters (``use_ctf``); phase-flipped particles
    are modelled with |CTF|. With ``centre`` each class's frame is centred afterwards (as
    ``embed`` does, :func:`cryolatent.pose.centre_class_frames`) and its average moved with it.

    OUT.star: the input's blocks, columns and rows, with rlnClassNumber, rlnAnglePsi,
    rlnOriginXAngst/YAngst replaced and rlnMaxValueProbDistribution (the class posterior of
    the chosen class) set; OUT_classes.mrcs: the K class averages (slice k = class k + 1,
    CTF-corrected, at the search box, its pixel size in the header); OUT_refine.json: settings,
    per-iteration history, class sizes. Returns that JSON's dict.
    """
    from pathlib import Path

    from ..analysis.class_averages import class_labels
    from ..errors import InputError
    from ..io import load_particles, write_star
    from ..io.mrc import write_mrcs
    from ..pose import centre_class_frames, fourier_shift
    from ..preprocess import normalize
    from ..utils import atomic_path

    star, out = Path(star), Path(out)
    src = star
    ps = load_particles(src, datadir=datadir)
    table = ps.table
    labels = class_labels(table, str(star)) - 1
    if labels.min() < 0:
        raise InputError(f"{star}: rlnClassNumber must be >= 1 for every particle")
    for col in ("rlnAnglePsi",):
        if col not in table:
            raise InputError(f"{star}: no {col} column; run `cryolatent embed` first")
    D, apix = int(ps.box), float(ps.apix)
    d = search_box(D, apix, resolution_A)
    apix_d = apix * D / d
    psi0 = table["rlnAnglePsi"].to_numpy(np.float64)
    t0_px = ps.shifts_angst() / apix_d
    rng_A = 0.15 * D * apix if offset_range_A is None else float(offset_range_A)
    max_shift = rng_A / apix_d
    mask_r = (0.45 * d) if mask_diameter_A is None else min(0.5 * mask_diameter_A / apix_d,
                                                            0.5 * d - 1)
    params = ps.ctf_params() if use_ctf else None
    ctf_fn = None
    if params is not None:
        if ps.optics_flag("rlnCtfDataAreCtfPremultiplied").any():
            raise InputError(f"{src}: CTF-premultiplied particles (rlnCtfDataAreCtfPremultiplied"
                             f" = 1) are not supported by refine; use --no-ctf")
        flipped = ps.optics_flag("rlnCtfDataArePhaseFlipped")
        base = ctf_function(params, d, apix_d)

        def ctf_fn(idx, extra_psi=None):
            c = base(idx, extra_psi)
            fl = torch.as_tensor(flipped[np.asarray(idx)])[:, None, None]
            return torch.where(fl, c.abs(), c)

    imgs = np.empty((len(ps), d, d), dtype=np.float32)
    for idx, x in progress(ps.iter_batches(batch_size), total=-(-len(ps) // batch_size),
                           desc="read", unit="batch", disable=None if show_progress else True):
        imgs[idx] = fourier_crop(normalize(x), d)
    log.info("refine %s: %d particles, %d classes, searched at %d px (%.2f Å/px, Nyquist "
             "%.1f Å), psi every %g°, shifts within %.1f Å, CTF %s", src, len(ps),
             int(labels.max()) + 1, d, apix_d, 2 * apix_d, psi_step, rng_A,
             "on" if ctf_fn is not None else "off")
    res = refine_classes(imgs, ctf_fn, labels, iterations=iterations, psi_step=psi_step,
                         max_shift=max_shift, mask_radius=mask_r, psi_deg=psi0,
                         shift_px=t0_px, show_progress=show_progress, moves=moves)
    t_A = res.shift_px * apix_d
    avgs = res.averages
    if centre:
        t_A, offs = centre_class_frames(res.psi_deg, t_A, res.labels)
        present = np.unique(res.labels)
        a = torch.as_tensor(avgs, dtype=torch.float64)
        for row, k in enumerate(present):   # A0(y) = A(y + c): the average moves by -c
            a[k] = fourier_shift(a[k][None], -torch.as_tensor(offs[row] / apix_d))[0]
        avgs = a.float().numpy()
    table = table.copy()
    table["rlnClassNumber"] = res.labels + 1
    table["rlnAnglePsi"] = res.psi_deg
    table["rlnOriginXAngst"] = t_A[:, 0]
    table["rlnOriginYAngst"] = t_A[:, 1]
    table["rlnMaxValueProbDistribution"] = res.posterior[np.arange(len(ps)), res.labels]
    stem = out.with_suffix("")
    classes_path = Path(str(stem) + "_classes.mrcs")
    json_path = Path(str(stem) + "_refine.json")
    counts = np.bincount(res.labels, minlength=res.averages.shape[0])
    warnings = []
    if not res.converged:
        warnings.append(f"refine stopped at its {iterations}-round cap with "
                        f"{100 * res.history[-1]['changed']:.1f}% of the particles still "
                        "changing class: not converged (raise --iterations)")
    for w in warnings:
        log.warning("WARNING: %s", w)
    summary = {"input": str(star), "n": len(ps), "box": D,
               "apix": apix, "search_box": d, "search_apix": apix_d,
               "resolution_A": resolution_A, "psi_step_deg": psi_step,
               "offset_range_A": rng_A, "ctf": ctf_fn is not None, "centre": centre,
               "iterations_run": len(res.history), "history": res.history,
               "converged": res.converged, "moves": res.moves,
               "warnings": warnings,
               "class_counts": counts.tolist(),
               "changed_from_input": float((res.labels != labels).mean())}
    import json

    write_mrcs(classes_path, avgs, apix_d)
    write_star(out, table, ps.optics)
    # the trust report of the refined classes (OUT_summary.json, read by `classes` on OUT.star):
    # half-set resolutions, distinguishability, each class against noise aligned by this search
    from .trust import _write_report, summary_path_for, trust_summary

    null = refine_null(imgs, ctf_fn, res.averages, res.sigma2, apix_d, psi_step=psi_step,
                       max_shift=max_shift, class_fractions=res.posterior.mean(0))
    rep = trust_summary(ps, table, res.labels + 1, int(res.averages.shape[0]), null=null,
                        batch_size=batch_size)
    rep["kind"] = "refine"      # (trust_summary logged its own warnings)
    groups = same_view_groups(p["classes"] for p in rep.get("indistinguishable_pairs", []))
    rep["same_view_groups"] = summary["same_view_groups"] = groups
    if groups:
        log.info("refine: classes that hold one view (select them together): %s",
                 "; ".join("+".join(map(str, g)) for g in groups))
    rep["warnings"] = warnings + rep["warnings"]
    summary["warnings"] = rep["warnings"]
    _write_report(summary_path_for(out), rep)
    with atomic_path(json_path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1) + "\n")
    log.info("refine: %d iterations; %.1f%% of the particles changed class; class sizes %s",
             len(res.history), 100 * summary["changed_from_input"], counts.tolist())
    summary["files"] = [str(out), str(classes_path), str(json_path),
                        str(summary_path_for(out))]
    return summary
