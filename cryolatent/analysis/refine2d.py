"""Class refinement by 2D alignment: the model's classes and poses polished against their own
class averages (expectation–maximisation with a CTF and a Gaussian noise model).

Why
    A TARGET-VAE's latent space separates the kinds of particle that change its reconstruction
    most; at cryo-EM signal-to-noise ratios (~0.1) two views of related assemblies can share one
    cluster of z. The model's clusters and poses are a good starting point for the classical
    last step of 2D classification: compare every particle with every class average at every
    in-plane angle and shift, keep the best, re-average, repeat. This module is that step,
    started from the model's answer (``cryolatent embed --clusters K --refine N``). It is a
    separate, labelled step: its output columns replace the model's, the model's are kept in
    the run's ``embedded`` files.

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
                   psi_deg=None, shift_px=None) -> Refine2DResult:
    """Refine classes and poses of particles by 2D alignment to their class averages.

    images: (N, D, D) float array/tensor, protein of either contrast, normalised (background
    noise ~1); ctf: None, or a callable ``ctf(idx (n,) int64 array, extra_psi (n,) degrees or
    None) -> (n, D, D//2+1) float32`` CTF of those particles in ``rfft2`` layout, rotated by
    ``extra_psi`` (the aligned frame's CTF, astigmatism angle + ψ) — see
    :func:`ctf_function`. labels: (N,) int 0-based starting classes (K = max + 1), e.g. the
    model's clusters. psi_deg / shift_px: the starting poses (N,), (N, 2) pixels (RELION's
    convention) used for the first averages; zeros when None.
    iterations: maximum number of E/M rounds (stops earlier when fewer than ``tol_changed`` of
    the particles change class); psi_step: degrees between the angles searched; max_shift:
    pixels, the radius of the shift search; mask_radius: pixels of the class averages' soft
    mask (default 0.45·D).
    Returns :class:`Refine2DResult`.
    """
    dev = torch.device(device)
    x = torch.as_tensor(np.asarray(images, dtype=np.float32), device=dev)
    N, D, _ = x.shape
    H = D // 2 + 1
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if lab.shape[0] != N or lab.min(initial=0) < 0:
        raise ValueError("labels must be (N,) non-negative integers")
    K = int(lab.max()) + 1
    psi = np.zeros(N) if psi_deg is None else np.asarray(psi_deg, dtype=np.float64).reshape(-1)
    t = np.zeros((N, 2)) if shift_px is None else np.asarray(shift_px, dtype=np.float64)
    angles = torch.arange(0.0, 360.0 - 1e-9, psi_step, dtype=torch.float64)
    R = angles.numel()
    mask = circular_mask(D, 0.45 * D if mask_radius is None else mask_radius, edge=3.0,
                         device=dev, dtype=torch.float32)   # RELION's soft mask
    shells, wts = shell_index(D, dev), rfft_weights(D, dev)
    flat, svec = _shift_window(D, max_shift, dev)
    xf_all = torch.fft.rfft2(x)                                       # (N, D, H) complex64
    if chunk is None:
        chunk = max(1, int(8e6 // (K * R * D * D * 4)))

    def ctf_of(idx, extra_psi=None):
        if ctf is None:
            return torch.ones((len(idx), D, H), dtype=torch.float32, device=dev)
        return ctf(idx, extra_psi).to(dev)

    # starting noise spectrum: the particles' power (signal included: at SNR ~0.1 a small bias)
    sigma2_shell = shell_mean(xf_all.real ** 2 + xf_all.imag ** 2, shells, wts)
    post = np.zeros((N, K))
    post[np.arange(N), lab] = 1.0
    psi_k = np.repeat(psi[:, None], K, 1)                              # (N, K) best ψ per class
    t_k = np.repeat(t[:, None, :], K, 1)                               # (N, K, 2)
    tau2 = None
    shift_sd = max(float(np.sqrt((t ** 2).mean())) if shift_px is not None else 2.0, 1.0)
    history = []
    reseeds = 0
    all_idx = np.arange(N)
    averages = None
    for it in range(iterations):
        # ---------------------------------------------------------------- M step
        inv_s2 = (1.0 / sigma2_shell.clamp(min=1e-12))[shells]        # (D, H) float64
        num = torch.zeros((K, D, H), dtype=torch.complex128, device=dev)
        den = torch.zeros((K, D, H), dtype=torch.float64, device=dev)
        for k in range(K):
            use = np.flatnonzero(post[:, k] > 1e-3)
            for s0 in range(0, len(use), 1024):
                idx = use[s0:s0 + 1024]
                al = align_particles(x[idx], torch.as_tensor(psi_k[idx, k]),
                                     torch.as_tensor(t_k[idx, k]), method="fourier")
                c = ctf_of(idx, psi_k[idx, k]).to(torch.float64)
                w = torch.as_tensor(post[idx, k], device=dev)[:, None, None]
                num[k] += (torch.fft.rfft2(al.to(torch.float64)) * (c * w)).sum(0) * inv_s2
                den[k] += (c * c * w).sum(0) * inv_s2
        if tau2 is None:
            reg = torch.zeros((K, D, H), dtype=torch.float64, device=dev)
        else:
            reg = (1.0 / tau2.clamp(min=1e-12))[:, shells]
        avg_f = num / (den + reg + 1e-12)
        # the class's signal power per shell: |A|² less the noise the average still holds
        power = torch.stack([shell_mean((avg_f[k].abs() ** 2)[None], shells, wts)
                             for k in range(K)])
        noise = torch.stack([shell_mean((1.0 / (den[k] + 1e-12))[None], shells, wts)
                             for k in range(K)])
        tau2 = tau2_fudge * (power - noise).clamp(min=0) + 1e-12
        averages = torch.fft.irfft2(avg_f, s=(D, D)).float() * mask
        # ---------------------------------------------------------------- E step
        refs = rotated_references(averages, angles)                    # (K, R, D, D)
        refs_f = torch.fft.rfft2(refs.reshape(K * R, D, D))            # (J, D, H)
        inv_s2f = inv_s2.float()
        if it < len(coarse_start):   # coarse to fine: the first rounds compare low frequencies
            inv_s2f = inv_s2f * (shells <= coarse_start[it] * (D // 2)).float()
        log_prior_s = (-0.5 * (svec ** 2).sum(-1) / shift_sd ** 2).float()   # (S,)
        log_pi = torch.log(torch.as_tensor(post.mean(0) + 1e-6, dtype=torch.float32))
        new_post = np.zeros((N, K))
        loglik = 0.0
        res_pow = torch.zeros(H * D, dtype=torch.float64, device=dev)
        bar = progress(total=N, desc=f"refine {it + 1}/{iterations}", unit="particle",
                       disable=None if show_progress else True)
        for s0 in range(0, N, chunk):
            idx = all_idx[s0:s0 + chunk]
            n = len(idx)
            c = ctf_of(idx)
            maps = score_maps(xf_all[idx], c, refs_f, inv_s2f, wts.float())   # (n, J, D, D)
            flat_maps = maps.reshape(n, K, R, D * D)
            win = flat_maps[..., flat] + log_prior_s                    # (n, K, R, S)
            per_class = torch.logsumexp(win.reshape(n, K, -1), -1) + log_pi   # (n, K)
            lse = torch.logsumexp(per_class, -1, keepdim=True)
            loglik += float(lse.sum())
            p = torch.exp(per_class - lse)
            new_post[idx] = p.double().cpu().numpy()
            best = win.reshape(n, K, -1).argmax(-1)                     # (n, K)
            r_best, s_best = best // flat.numel(), best % flat.numel()
            sv = svec[s_best].clone()                                    # (n, K, 2) (sx, sy)
            # sub-pixel: a parabola through the peak and its neighbours along x and y
            ii = torch.arange(n)[:, None].expand(n, K)
            kk = torch.arange(K)[None, :].expand(n, K)
            mp = flat_maps.reshape(n, K, R, D, D)[ii, kk, r_best]       # (n, K, D, D)
            sx, sy = sv[..., 0].long() % D, sv[..., 1].long() % D
            mid = _at(mp, sy, sx)
            sv[..., 0] += _parabola_offset(_at(mp, sy, sx - 1), mid, _at(mp, sy, sx + 1)).double()
            sv[..., 1] += _parabola_offset(_at(mp, sy - 1, sx), mid, _at(mp, sy + 1, sx)).double()
            psi_k[idx] = angles[r_best].numpy()
            t_k[idx] = -sv.cpu().numpy()                                 # t = -s
            # residual power at the best pose of the most probable class (noise spectrum)
            kb = p.argmax(-1)
            jb = kb * R + r_best[torch.arange(n), kb]
            sb = sv[torch.arange(n), kb]                                 # (n, 2)
            model = c.double() * refs_f[jb].to(torch.complex128) * shift_ramp(D, sb)
            res = xf_all[idx].to(torch.complex128) - model
            res_pow += (res.real ** 2 + res.imag ** 2).sum(0).reshape(-1)
            bar.update(n)
        bar.close()
        sigma2_shell = shell_mean((res_pow / N).reshape(1, D, H), shells, wts)
        new_lab = new_post.argmax(1)
        changed = float((new_lab != post.argmax(1)).mean())
        post = new_post
        # a class that emptied out while another holds two kinds of particle: split the
        # largest class in two and give one half to the empty one
        frac = np.bincount(new_lab, minlength=K) / N
        reseeded = []
        for k in np.flatnonzero(frac < reseed_below / K):
            if reseeds >= max_reseeds or it + 1 >= iterations - 1:
                break
            big = int(np.argmax(np.bincount(post.argmax(1), minlength=K)))
            members = np.flatnonzero(post.argmax(1) == big)
            move = split_in_two(x[members], psi_k[members, big], t_k[members, big],
                                ctf_of(members, psi_k[members, big]), mask)
            # the halves refined against each other alone (two classes, a few rounds)
            sub = refine_classes(
                x[members], None if ctf is None else (lambda i, e=None: ctf_of(members[i], e)),
                move.astype(np.int64), iterations=6, psi_step=psi_step, max_shift=max_shift,
                mask_radius=mask_radius, tau2_fudge=tau2_fudge, max_reseeds=0,
                coarse_start=coarse_start, device=dev, show_progress=False, verbose=False,
                psi_deg=psi_k[members, big], shift_px=t_k[members, big])
            move = sub.labels == 1
            moved = members[move]
            post[moved] = 0.0
            post[moved, k] = 1.0
            psi_k[:, k], t_k[:, k] = psi_k[:, big], t_k[:, big]
            tau2[k] = tau2[big]       # the emptied class's signal power was ~0: start afresh
            psi_k[members, k] = sub.psi_deg
            t_k[members, k] = sub.shift_px
            psi_k[members, big] = np.where(move, psi_k[members, big], sub.psi_deg)
            t_k[members, big] = np.where(move[:, None], t_k[members, big], sub.shift_px)
            reseeds += 1
            reseeded.append((int(k), big, int(move.sum())))
            changed = max(changed, tol_changed)  # keep iterating
            log.info("refine: class %d held %.2f%% of the particles; split class %d (%d "
                     "particles) and gave it %d of them", k + 1, 100 * frac[k], big + 1,
                     len(members), int(move.sum()))
        tk = t_k[np.arange(N), new_lab]
        shift_sd = max(float(np.sqrt((tk ** 2).sum(1).mean() / 2)), 0.5)
        history.append({"iteration": it + 1, "changed": changed, "loglik": loglik / N,
                        "shift_sd_px": shift_sd,
                        "class_fractions": np.round(post.mean(0), 4).tolist(),
                        "reseeded": reseeded})
        log.log(logging.INFO if verbose else logging.DEBUG,
                "refine %d: %.1f%% of the particles changed class, log-likelihood %.2f, "
                "shift sd %.2f px", it + 1, 100 * changed, loglik / N, shift_sd)
        if changed < tol_changed and it > 0:
            break
    final = post.argmax(1)
    return Refine2DResult(labels=final, psi_deg=psi_k[np.arange(N), final] % 360.0,
                          shift_px=t_k[np.arange(N), final], posterior=post,
                          averages=averages.cpu().numpy(), history=history)


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
    D = images.shape[-1]
    al = align_particles(images, torch.as_tensor(psi_deg), torch.as_tensor(shift_px),
                         method="fourier").to(torch.float64)
    f = torch.fft.rfft2(al) * ctf.to(torch.float64)
    keep = shell_index(D, images.device) <= lowpass * (D // 2)
    a = torch.fft.irfft2(f * keep, s=(D, D)) * mask.to(torch.float64)
    a = a.reshape(len(a), -1)
    a = a - a.mean(0)
    _, _, v = torch.linalg.svd(a, full_matrices=False)
    y = (a @ v[:n_components].T).cpu().numpy()
    from sklearn.cluster import KMeans

    lab = KMeans(2, n_init=4, random_state=seed).fit_predict(y)
    small = int(np.argmin(np.bincount(lab, minlength=2)))
    return lab == small


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
                batch_size: int = 512, show_progress: bool = True) -> dict:
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
                         shift_px=t0_px, show_progress=show_progress)
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
    summary = {"input": str(star), "n": len(ps), "box": D,
               "apix": apix, "search_box": d, "search_apix": apix_d,
               "resolution_A": resolution_A, "psi_step_deg": psi_step,
               "offset_range_A": rng_A, "ctf": ctf_fn is not None, "centre": centre,
               "iterations_run": len(res.history), "history": res.history,
               "class_counts": counts.tolist(),
               "changed_from_input": float((res.labels != labels).mean())}
    import json

    write_mrcs(classes_path, avgs, apix_d)
    with atomic_path(json_path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1) + "\n")
    write_star(out, table, ps.optics)
    log.info("refine: %d iterations; %.1f%% of the particles changed class; class sizes %s",
             len(res.history), 100 * summary["changed_from_input"], counts.tolist())
    summary["files"] = [str(out), str(classes_path), str(json_path)]
    return summary
