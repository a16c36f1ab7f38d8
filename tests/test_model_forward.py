"""The models' training entry ``model(images, ctf_params) -> (loss, parts)``: the CTF computed
per batch on the device from its parameters equals the precomputed CTF, the loss equals the
old training loss (``model.loss`` with the precomputed CTF image), one CTF helper, one mask
helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryolatent.config import TrainConfig
from cryolatent.ctf import (CTFParams, apply_ctf, compute_ctf, ctf_from_params,
                            ctf_params_tensor)
from cryolatent.data import Batches, ParticleData
from cryolatent.masks import circular_mask, circular_mask_np
from cryolatent.models import build_model


pytestmark = pytest.mark.usefixtures("one_thread")


def ctf_set(n=9, seed=0) -> CTFParams:
    rng = np.random.default_rng(seed)
    return CTFParams(defocus_u=rng.uniform(8e3, 3e4, n), defocus_v=rng.uniform(8e3, 3e4, n),
                     astigmatism=rng.uniform(-180, 180, n), voltage=300.0, cs=2.7,
                     amplitude_contrast=0.07, phase_shift=rng.uniform(0, 90, n))


@pytest.mark.parametrize("box,apix", [(16, 1.7), (21, 3.0), (64, 1.06)])
def test_per_batch_ctf_equals_precomputed(box, apix):
    p = ctf_set()
    idx = np.array([4, 0, 7, 7, 2])
    t = ctf_params_tensor(p, apix, idx=idx)
    assert t.shape == (5, 6) and t.dtype == torch.float64
    full64 = compute_ctf(p, box, apix, idx=idx, dtype=torch.float64)
    torch.testing.assert_close(ctf_from_params(t, box, dtype=torch.float64), full64,
                               rtol=0, atol=1e-9)
    # compute_ctf evaluates the phase in float32: the same to its rounding
    torch.testing.assert_close(ctf_from_params(t, box), compute_ctf(p, box, apix, idx=idx),
                               rtol=0, atol=2e-4)
    half = ctf_from_params(t, box, dtype=torch.float64, half=True)
    assert half.shape == (5, box, box // 2 + 1)
    torch.testing.assert_close(half, full64[..., : box // 2 + 1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("box,astigmatic", [(21, True), (20, False)])
def test_apply_ctf_is_the_full_fourier_product(box, astigmatic):
    """The one helper (rfft2, TARGET-VAE's) equals the full-FFT product IRL-INR used, for the
    full CTF and for its rfft2 half, wherever the CTF grid is even (odd boxes; even boxes
    without astigmatism: an astigmatic CTF differs between (-N/2, k) and (-N/2, -k), so on
    the Nyquist row and column the full product keeps the mean of the two, rfft2 one)."""
    torch.manual_seed(0)
    p = ctf_set(4)
    if not astigmatic:
        p.defocus_v = p.defocus_u.copy()
    ctf = compute_ctf(p, box, 2.0, dtype=torch.float64)
    x = torch.randn(4, box, box, dtype=torch.float64)
    ref = torch.fft.ifft2(torch.fft.fft2(x) * ctf).real
    torch.testing.assert_close(apply_ctf(x, ctf), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_ctf(x, ctf[..., : box // 2 + 1]), ref, rtol=0, atol=1e-12)


def _tvae_cfg(**kw):
    return TrainConfig(likelihood="gaussian", z_dim=2, enc_channels=6, gen_width=16,
                       gen_layers=1, fourier_features=8, translation_range=2, ctf=True,
                       mask=True, kernel=5, **kw)


def _irl_cfg(**kw):
    return TrainConfig(model="irl-inr", z_dim=3, enc_width=4, hyper_width=16, hyper_layers=1,
                       inr_width=8, inr_layers=1, fourier_features=8, ctf=True, **kw)


@pytest.mark.parametrize("make", [_tvae_cfg, _irl_cfg])
def test_forward_equals_the_old_training_loss(make):
    """model(x, ctf_params) on the same batch and seed equals model.loss(x, ctf) with the CTF
    image the resident data used to hold (compute_ctf, float32), to that CTF's rounding; and
    exactly model.loss with the per-batch CTF."""
    box, apix = 16, 2.5
    torch.manual_seed(0)
    m = build_model(make(), box)
    m.train()
    x = torch.randn(6, box, box)
    p = ctf_set(6, seed=1)
    params = ctf_params_tensor(p, apix)

    def run(f, *args):
        torch.manual_seed(5)
        loss, parts = f(*args)
        return loss.detach(), parts

    new, parts_new = run(m, x, params)
    old, parts_old = run(m.loss, x, compute_ctf(p, box, apix))
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-4)
    assert parts_new.keys() == parts_old.keys()
    exact, _ = run(m.loss, x, ctf_from_params(params, box))
    assert torch.equal(new, exact)
    if m.name == "irl-inr":  # no CTF: forward is the loss
        torch.testing.assert_close(run(m, x)[0], run(m.loss, x)[0], rtol=0, atol=0)


def test_batches_carry_ctf_parameters_not_images():
    n, box, apix = 40, 12, 2.0
    p = ctf_set(n, seed=3)
    imgs = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
    data = ParticleData(array=imgs, ctf_params=p, apix=apix)
    tr, va = np.arange(8, n), np.arange(8)
    kw = dict(batch_size=10, device=torch.device("cpu"), seed=1, with_ctf=True, num_workers=0)
    res = Batches(data, tr, va, resident=True, **kw)
    assert res.c.shape == (n, 6)                 # 48 bytes per particle, no (n, D, D) CTF
    st = Batches(data, tr, va, resident=False, **kw)
    for (xa, ca), (xb, cb), idx in zip(res.train(2), st.train(2), res.train_indices(2)):
        order = np.argsort(np.argsort(idx))      # streamed batches read sorted indices
        srt = np.sort(idx)
        torch.testing.assert_close(ca, ctf_params_tensor(p, apix, idx=idx), rtol=0, atol=0)
        torch.testing.assert_close(cb, ctf_params_tensor(p, apix, idx=srt), rtol=0, atol=0)
        torch.testing.assert_close(ctf_from_params(ca, box), compute_ctf(p, box, apix, idx=idx),
                                   rtol=0, atol=2e-4)
        torch.testing.assert_close(xa, xb[torch.from_numpy(order)], rtol=0, atol=0)


def test_circular_mask_helper_matches_the_old_definitions():
    for n in (5, 12, 21, 24, 50, 64):
        c = torch.arange(n) - n // 2
        r2 = c[:, None] ** 2 + c[None, :] ** 2
        assert torch.equal(circular_mask(n), r2 <= (n / 2) ** 2)
        assert np.array_equal(circular_mask_np(n, 0.375 * n, outside=True),
                              (r2 > (0.375 * n) ** 2).numpy())
        soft = circular_mask(n, 0.3 * n, edge=3.0)
        rr = torch.sqrt(r2.double())
        ref = 0.5 * (1 + torch.cos(np.pi * ((rr - 0.3 * n) / 3.0).clamp(0, 1)))
        # a few ulps of float64 cos (values in [0, 1]): libm's vector cos differs by CPU
        # (1.4e-15 seen on AMD EPYC); an error in the mask's formula is >= 1e-3
        torch.testing.assert_close(soft, ref, rtol=0, atol=64 * torch.finfo(torch.float64).eps)
