"""TARGET-VAE: equivariance of encoder and generator, exact KL, pose convention, fast paths."""

from __future__ import annotations

import math

import pytest
import torch

from cryolatent.config import TrainConfig, resolve
from cryolatent.models import build_model
from cryolatent.models.blocks import GroupConvP
from cryolatent.models.target_vae import TargetVAE, kl_divergence, pose_to_relion


def tiny(box=21, rotations=4, z_dim=3, **kw) -> TargetVAE:
    torch.manual_seed(0)
    cfg = TrainConfig(rotations=rotations, z_dim=z_dim, enc_channels=8, gen_width=32,
                      gen_layers=1, fourier_features=16, likelihood="bernoulli", **kw)
    return build_model(cfg, box)


def rot90_spatial(a: torch.Tensor, k: int = 1) -> torch.Tensor:
    """rot90 over the (row, col) axes 1, 2 of a (B, G, G, ...) map."""
    return torch.rot90(a, k, dims=(1, 2))


@pytest.mark.parametrize("rotations", [4, 8, 16])
def test_group_conv_quarter_turn_equivariance(rotations):
    """rot90 of the input == rot90 of the map with the rotation axis rolled by R/4 (exact)."""
    torch.manual_seed(1)
    gc = GroupConvP(5, 7, rotations).double()
    x = torch.randn(2, 1, 15, 15, dtype=torch.float64)
    pad = (3, 3, 3, 3)
    y = gc(x, pad)                                          # (B, H, W, R, C)
    y_rot = gc(torch.rot90(x, 1, dims=(-2, -1)), pad)
    expect = torch.roll(rot90_spatial(y), rotations // 4, dims=3)
    torch.testing.assert_close(y_rot, expect, rtol=0, atol=1e-12)


def test_filter_bank_rotation_direction():
    """Filter r is filter 0 turned so that its content moves by -r*360/R (W_r(x)=W_0(R x))."""
    gc = GroupConvP(1, 5, 4).double()
    with torch.no_grad():
        gc.weight.zero_()
        gc.weight[0, 2 * 5 + 4] = 1.0  # pixel at x=+2, y=0 (row 2, col 4)
    bank = gc.filter_bank().reshape(4, 5, 5)
    # W_1(x) = W_0(R(90) x): nonzero where R(90) x = (2, 0) -> x = (0, -2): row 0, col 2
    assert bank[1, 0, 2] == 1.0 and bank[1].abs().sum() == 1.0


@pytest.mark.parametrize("rotations", [4, 8])
def test_encoder_p4_equivariance(rotations):
    m = tiny(rotations=rotations, subpixel=True).double().eval()
    x = torch.rand(3, 21, 21, dtype=torch.float64)
    G = 2 * m.trange + 1
    R = rotations

    def maps(img):
        p = m.encode(img)
        b = img.shape[0]
        return {k: v.reshape(b, G, G, R, *v.shape[2:]) for k, v in p.items()}

    a, b = maps(x), maps(torch.rot90(x, 1, dims=(-2, -1)))
    assert "d_mu" in a  # the sub-pixel offsets (image-frame vectors) turn with the image too
    for k in a:
        want = torch.roll(rot90_spatial(a[k]), R // 4, dims=3)
        if k == "d_mu":  # a vector (dx, dy) -> (dy, -dx) under torch.rot90
            want = torch.stack([want[..., 1], -want[..., 0]], -1)
        torch.testing.assert_close(b[k], want, rtol=0, atol=1e-9, msg=k)
    # inferred pose: torch.rot90 turns the content by -90 deg in (x=col, y=row), so the
    # canonical stays and psi grows by +90 deg; the centre -t turns with the image.
    # (with and without recentring; its centre of mass comes from a float32 render)
    rot = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)  # R(-90)
    for recentre, atol in ((False, 1e-9), (True, 1e-5)):
        m.recentre = recentre
        i0, i1 = m.infer(x), m.infer(torch.rot90(x, 1, dims=(-2, -1)))
        dpsi = torch.remainder(i1.psi_deg - i0.psi_deg, 360.0)
        torch.testing.assert_close(dpsi, torch.full_like(dpsi, 90.0), rtol=0, atol=1e-4)
        torch.testing.assert_close(i1.shift_px, i0.shift_px @ rot.T, rtol=0, atol=atol)
        torch.testing.assert_close(i1.z_mean, i0.z_mean, rtol=0, atol=1e-9)


def test_encoder_translation_equivariance():
    """Shifting the object inside a zero border shifts the attention map by the same amount."""
    m = tiny(box=25, translation_range=6, rotations=8).double().eval()
    x = torch.zeros(2, 25, 25, dtype=torch.float64)
    x[:, 8:17, 8:17] = torch.rand(2, 9, 9, dtype=torch.float64)
    dy, dx = 2, -3
    xs = torch.roll(x, (dy, dx), dims=(1, 2))  # the object stays inside: a pure translation
    G, R = 13, 8
    a = m.encode(x)["log_q"].reshape(2, G, G, R)
    b = m.encode(xs)["log_q"].reshape(2, G, G, R)
    # compare logits up to the softmax normaliser, on cells whose shifted version is inside
    la = a[:, 3:10, 3:10] - a[:, 3:10, 3:10].logsumexp((1, 2, 3), keepdim=True)
    lb = b[:, 3 + dy:10 + dy, 3 + dx:10 + dx]
    lb = lb - lb.logsumexp((1, 2, 3), keepdim=True)
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-9)
    # the other posterior parameters move with the map too
    for k in ("z_mu", "th_mu"):
        pa = m.encode(x)[k].reshape(2, G, G, R, -1)[:, 3:10, 3:10]
        pb = m.encode(xs)[k].reshape(2, G, G, R, -1)[:, 3 + dy:10 + dy, 3 + dx:10 + dx]
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-9)


def test_generator_rotation_equivariance():
    """Rendering at theta = 90 deg is the rot90 of the canonical image; any angle turns the
    coordinates (checked against an analytic rotation of the evaluation points)."""
    m = tiny(box=21).double()
    z = torch.randn(2, 3, dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    u0 = torch.zeros(2, 2, dtype=torch.float64)
    g0 = m.render(z, zero, u0)[..., 0].reshape(2, 21, 21)
    g90 = m.render(z, zero + math.pi / 2, u0)[..., 0].reshape(2, 21, 21)
    # image(x) = g0(R(90) x) -> content turned by -90 deg = torch.rot90(k=1)
    torch.testing.assert_close(g90, torch.rot90(g0, 1, dims=(1, 2)), rtol=0, atol=1e-9)
    # arbitrary angle and location: evaluate the canonical generator at explicitly transformed
    # float64 coordinates
    th, u = torch.tensor([0.3, -2.0], dtype=torch.float64), torch.tensor(
        [[1.5, -2.0], [0.0, 3.0]], dtype=torch.float64)
    g = m.render(z, th, u)[..., 0]
    n = 21
    r = torch.arange(n, dtype=torch.float64) - n // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    for b in range(2):
        c, s = math.cos(th[b]), math.sin(th[b])
        dx, dy = xx.reshape(-1) - u[b, 0], yy.reshape(-1) - u[b, 1]
        pts = torch.stack([c * dx - s * dy, s * dx + c * dy], -1) / (n / 2)
        ref = m.render(z[b:b + 1], zero[:1], u0[:1], coords=pts)[0, :, 0]
        torch.testing.assert_close(g[b], ref, rtol=0, atol=1e-6)  # float32 coordinate table


def test_pose_conversion_matches_relion_convention():
    """G rendered at (theta, u) == pose.transform_to_particle(G at identity, psi, shift)."""
    from cryolatent.pose import transform_to_particle

    n = 33
    torch.manual_seed(0)
    cfg = TrainConfig(z_dim=2, enc_channels=4, gen_width=64, gen_layers=1,
                      fourier_features=32, gen_fourier_sigma=0.02, likelihood="bernoulli")
    m = build_model(cfg, n).double()
    z = torch.randn(3, 2, dtype=torch.float64)
    theta = torch.tensor([0.0, 0.7, -2.2], dtype=torch.float64)
    u = torch.tensor([[0.0, 0.0], [2.0, -1.0], [-1.5, 2.5]], dtype=torch.float64)
    g = m.render(z, theta, u)[..., 0].reshape(3, n, n)
    canon = m.render(z, torch.zeros(3, dtype=torch.float64),
                     torch.zeros(3, 2, dtype=torch.float64))[..., 0].reshape(3, n, n)
    psi, shift = pose_to_relion(theta, u)
    assert ((psi >= 0) & (psi < 360)).all()
    ref = transform_to_particle(canon, psi, shift)
    inner = slice(8, n - 8)  # away from the border (zero fill / interpolation ring)
    err = (g - ref)[:, inner, inner].abs().max()
    scale = g.abs().max()
    assert err < 0.03 * scale, (err, scale)
    # and it is not trivially satisfied: the wrong sign of the shift fails
    bad = transform_to_particle(canon, psi, -shift)[:, inner, inner]
    assert (g[1:, inner, inner] - bad[1:]).abs().max() > 10 * err


@pytest.mark.parametrize("subpixel", [False, True])
def test_kl_matches_monte_carlo(subpixel):
    """Closed-form eq. 5 (with the sub-pixel offsets' term) against a float64 Monte-Carlo
    estimate of E_q[log q - log p]."""
    g = torch.Generator().manual_seed(3)
    B, N, D, R = 2, 12, 3, 4
    logits = torch.randn(B, N, generator=g, dtype=torch.float64)
    log_q = torch.log_softmax(logits, -1)
    log_pt = torch.log_softmax(torch.randn(N // R, generator=g, dtype=torch.float64), 0)
    log_pr = torch.log_softmax(torch.randn(R, generator=g, dtype=torch.float64), 0)
    log_p = (log_pt[:, None] + log_pr[None]).reshape(-1)
    off = torch.arange(R, dtype=torch.float64).repeat(N // R) * 2 * math.pi / R
    z_mu = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    z_ls = 0.3 * torch.randn(B, N, D, generator=g, dtype=torch.float64)
    th_mu = 0.5 * torch.randn(B, N, generator=g, dtype=torch.float64)
    th_ls = 0.3 * torch.randn(B, N, generator=g, dtype=torch.float64) - 1
    d_mu = 0.4 * torch.randn(B, N, 2, generator=g, dtype=torch.float64)
    d_ls = 0.3 * torch.randn(B, N, generator=g, dtype=torch.float64) - 1.5
    sd0, dsd = math.pi / R, 0.5
    extra = (d_mu, d_ls, dsd) if subpixel else ()
    kl_tr, kl_th, kl_z = kl_divergence(log_q, log_p, z_mu, z_ls, th_mu, th_ls, sd0, *extra)
    exact = kl_tr + kl_th + kl_z

    S = 400_000
    Nd = torch.distributions.Normal
    for b in range(B):
        cell = torch.multinomial(log_q[b].exp(), S, replacement=True, generator=g)
        zs = z_mu[b, cell] + z_ls[b, cell].exp() * torch.randn(S, D, generator=g,
                                                                dtype=torch.float64)
        th = th_mu[b, cell] + off[cell] + th_ls[b, cell].exp() * torch.randn(
            S, generator=g, dtype=torch.float64)
        log_qs = (log_q[b, cell] + Nd(z_mu[b, cell], z_ls[b, cell].exp()).log_prob(zs).sum(-1)
                  + Nd(th_mu[b, cell] + off[cell], th_ls[b, cell].exp()).log_prob(th))
        log_ps = (log_p[cell] + Nd(0.0, 1.0).log_prob(zs).sum(-1)
                  + Nd(off[cell], sd0).log_prob(th))
        if subpixel:
            dsig = d_ls[b, cell].exp()[:, None]
            ds = d_mu[b, cell] + dsig * torch.randn(S, 2, generator=g, dtype=torch.float64)
            log_qs = log_qs + Nd(d_mu[b, cell], dsig).log_prob(ds).sum(-1)
            log_ps = log_ps + Nd(0.0, dsd).log_prob(ds).sum(-1)
        d = log_qs - log_ps
        mc, se = d.mean(), d.std() / math.sqrt(S)
        assert abs(mc - exact[b]) < 5 * se, (float(mc), float(exact[b]), float(se))


class _BlobVAE(TargetVAE):
    """TARGET-VAE whose generator is an analytic Gaussian blob centred at c0 px (x, y) in the
    canonical frame: image(x) = exp(-|R(theta)(x - u) - c0|^2 / (2 s^2)), s = 1.5 px."""

    c0 = (2.5, -1.75)

    def render(self, z, theta, u_px, coords=None):
        coords = (self.coords if coords is None else coords).double() * self.scale  # px
        u = u_px.double()
        dx = coords[None, :, 0] - u[:, None, 0]
        dy = coords[None, :, 1] - u[:, None, 1]
        c, s = torch.cos(theta.double())[:, None], torch.sin(theta.double())[:, None]
        xr, yr = c * dx - s * dy - self.c0[0], s * dx + c * dy - self.c0[1]
        return torch.exp(-(xr ** 2 + yr ** 2) / (2 * 1.5 ** 2))[..., None] + 0 * z.sum()


def _com(img: torch.Tensor) -> torch.Tensor:
    """(B, n, n) -> (B, 2) brute-force centre of mass (x, y) px about (n//2, n//2)."""
    n = img.shape[-1]
    out = []
    for im in img:
        tot = sx = sy = 0.0
        for r in range(n):
            for c in range(n):
                v = float(im[r, c])
                tot, sx, sy = tot + v, sx + v * (c - n // 2), sy + v * (r - n // 2)
        out.append((sx / tot, sy / tot))
    return torch.tensor(out, dtype=torch.float64)


def test_recentring_reports_the_object_centre():
    """With a generator whose object sits at c0 off the canonical centre, canonical_centre
    finds c0, generate() centres it, and the recentred pose points at the object's centre of
    mass in the image rendered at the raw pose (measured by brute force)."""
    torch.manual_seed(0)
    cfg = resolve(TrainConfig(z_dim=2, rotations=8, enc_channels=8, gen_width=16,
                              gen_layers=1, fourier_features=8, likelihood="gaussian",
                              translation_range=3), 29)[0]
    m = _BlobVAE(29, cfg).double().eval()
    z = torch.zeros(3, 2, dtype=torch.float64)
    torch.testing.assert_close(m.canonical_centre(z), torch.tensor([m.c0] * 3,
                               dtype=torch.float64), rtol=0, atol=0.02)
    torch.testing.assert_close(_com(m.generate(z)), torch.zeros(3, 2, dtype=torch.float64),
                               rtol=0, atol=0.02)
    x = torch.rand(3, 29, 29, dtype=torch.float64)
    raw = m.infer_internal(x, recentre=False)
    rec = m.infer_internal(x, recentre=True)
    torch.testing.assert_close(rec["theta"], raw["theta"])
    img = m.render(raw["z_mu"], raw["theta"], raw["u_px"])[..., 0].reshape(3, 29, 29)
    torch.testing.assert_close(rec["u_px"].double(), _com(img), rtol=0, atol=0.02)
    psi, shift = pose_to_relion(rec["theta"], rec["u_px"])
    torch.testing.assert_close(m.infer(x).shift_px, shift)


def test_rotation_priors():
    m = tiny(rotations=8, rotation_prior="normal", rotation_prior_sd=45.0)
    p = m.log_p_tr.reshape(-1, 8).exp()
    pr = p.sum(0)
    torch.testing.assert_close(pr.sum(), torch.tensor(1.0))
    assert pr[0] > pr[1] > pr[2] > pr[4] and torch.isclose(pr[1], pr[7])
    pt = p.sum(1).reshape(2 * m.trange + 1, -1)
    c = m.trange
    assert pt[c, c] == pt.max() and torch.isclose(pt[c, c + 1], pt[c + 1, c])


def test_cached_filters_equal_plain_path():
    m = tiny(rotations=8).eval()
    x = torch.rand(4, 21, 21)
    with torch.no_grad():
        a = m.encode(x, cache=False)
        b = m.encode(x, cache=True)
        c = m.encode(x, cache=True)  # from the cache
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=0)
    with torch.no_grad():  # the cache follows weight updates
        m.gconv.weight.add_(0.1)
        d = m.encode(x, cache=True)
    assert not torch.equal(d["log_q"], a["log_q"])
    torch.testing.assert_close(d["log_q"], m.encode(x)["log_q"], rtol=0, atol=0)


@pytest.mark.parametrize("subpixel", [False, True])
def test_loss_ctf_mask_learn_sigma_and_generate(subpixel):
    torch.manual_seed(0)
    cfg = TrainConfig(z_dim=2, enc_channels=4, gen_width=16, gen_layers=1, fourier_features=8,
                      likelihood="gaussian", learn_sigma=True, ctf=True, mask=True,
                      subpixel=subpixel)
    m = build_model(cfg, 16)
    x = torch.randn(3, 16, 16)
    ctf = torch.ones(3, 16, 16)
    loss, parts = m.loss(x, ctf)
    loss.backward()
    assert torch.isfinite(loss) and set(parts) >= {"recon", "kl"}
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    with pytest.raises(ValueError):
        m.loss(x)
    img = m.generate(torch.zeros(2, 2), 16)
    assert img.shape == (2, 16, 16)
    inf = m.infer(x)
    assert inf.psi_deg.shape == (3,) and inf.shift_px.shape == (3, 2)
    assert ((inf.confidence > 0) & (inf.confidence <= 1)).all()


def test_lifting_correlation_gradients_equal_autograd():
    """The lifting convolution's own backward (filter gradient as a forward correlation of
    the images with the output gradient) equals autograd's conv2d backward, float64."""
    from cryolatent.models.blocks import _LiftingCorrelation

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 17, 17, generator=g, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(6, 1, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 6, 9, 9, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad((torch.nn.functional.conv2d(x, bank) * up).sum(), (x, bank))
    y = _LiftingCorrelation.apply(x, bank)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, bank), rtol=0, atol=0)
    hx, hw = torch.autograd.grad((y * up).sum(), (x, bank))
    torch.testing.assert_close(hw, gw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hx, gx, rtol=1e-12, atol=1e-12)
    # an explicit sum over images and positions, for one filter tap
    o, p, q = 4, 2, 7
    brute = sum(float((x[b, 0, p:p + 9, q:q + 9] * up[b, o]).detach().sum()) for b in range(5))
    assert abs(float(hw[o, 0, p, q]) - brute) < 1e-10


def test_group_conv_bf16_filter_gradient_matches_float32():
    """Under CPU bf16 autocast (train's default on AMX CPUs) the filter gradient, computed by
    the fast path, agrees with the float32 one to bf16 precision."""
    torch.manual_seed(0)
    gc = GroupConvP(4, 9, 8)
    x = torch.randn(6, 1, 21, 21)
    pad = (0, 0, 0, 0)
    up = torch.randn(6, 13, 13, 8, 4)
    g32, = torch.autograd.grad((gc(x, pad) * up).sum(), gc.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gc(x, pad)
    assert y.dtype == torch.bfloat16
    g16, = torch.autograd.grad((y.float() * up).sum(), gc.weight)
    rel = (g16 - g32).norm() / g32.norm()
    assert rel < 2e-2, float(rel)


def test_fourier_linear_equals_plain_composition():
    """blocks.fourier_linear (features recomputed in the backward pass, rows in chunks)
    gives the values and gradients of Linear(FourierFeatures(x, y)), float64."""
    from cryolatent.models.blocks import FourierFeatures, fourier_linear

    g = torch.Generator().manual_seed(5)
    ff = FourierFeatures(6, 1.5, generator=g).double()
    lin = torch.nn.Linear(12, 7).double()
    x = torch.randn(3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 11, 7, generator=g, dtype=torch.float64)
    params = (x, y, lin.weight, lin.bias)
    ref = lin(ff(torch.stack([x, y], -1)))
    want = torch.autograd.grad((ref * up).sum(), params)
    for rows in (5, 33, 4096):          # chunks that split the 33 rows, one chunk, larger
        out = fourier_linear(ff, lin, x, y, rows=rows)
        assert out.shape == (3, 11, 7)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad((out * up).sum(), params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)



@pytest.mark.parametrize("mask", [False, True])
def test_pixel_subsampled_likelihood_is_unbiased(mask):
    """Training steps with pixel_fraction < 1 score m drawn pixels of the P' scored ones
    (all, or the mask's disc) scaled by P'/m: each draw equals that scaled brute-force sum,
    and the mean over draws converges to the full likelihood; evaluation uses every pixel."""
    torch.manual_seed(0)
    m = build_model(TrainConfig(rotations=4, z_dim=2, enc_channels=4, gen_width=16,
                                gen_layers=1, fourier_features=8, likelihood="gaussian",
                                mask=mask, pixel_fraction=0.25), 20)
    x = torch.randn(3, 20, 20)
    z, th, u = torch.randn(3, 2), torch.rand(3) * 6, torch.randn(3, 2)
    with torch.no_grad():
        full_out = m.render(z, th, u)
        m.eval()
        assert m._draw_pixels() is None
        full = m._nll(full_out, x, None)
        m.train()
        inside = m.mask2d.reshape(-1) > 0
        n_scored = int(inside.sum()) if mask else 400
        assert m.scored_px.numel() == n_scored
        mean = full_out[..., 0]
        per_px = 0.5 * (x.reshape(3, -1) - mean) ** 2 + 0.5 * math.log(2 * math.pi)
        draws = []
        for _ in range(3000):
            px = m._draw_pixels()
            assert px.numel() == round(0.25 * n_scored) and px.unique().numel() == px.numel()
            assert bool(inside[px].all()) or not mask
            est = m._nll(m.render(z, th, u, m.coords[px]), x, None, px)
            if len(draws) < 3:   # the scaled sum over the drawn pixels, by hand
                brute = per_px[:, px].sum(-1) * n_scored / px.numel()
                torch.testing.assert_close(est, brute, rtol=1e-5, atol=1e-4)
            draws.append(est)
        draws = torch.stack(draws)
        se = draws.std(0) / math.sqrt(len(draws))
        assert bool(((draws.mean(0) - full).abs() < 4 * se + 1e-3).all()), (draws.mean(0), full)
    # a training step with the fraction runs and its eval loss is the full ELBO
    loss, parts = m(x)
    loss.backward()
    assert torch.isfinite(loss) and m.coord_in.weight.grad is not None


def test_group_conv_paths_agree(monkeypatch):
    """The CPU im2col product (small inputs) and the direct convolution (beyond UNFOLD_MAX)
    give the same maps and gradients (float64), channels-last (B, H', W', R, C)."""
    from cryolatent.models import blocks

    torch.manual_seed(1)
    gc = GroupConvP(3, 7, 8).double()
    x = torch.randn(4, 1, 15, 15, dtype=torch.float64)
    pad = (1, 2, 1, 2)
    up = torch.randn(4, 12, 12, 8, 3, dtype=torch.float64)
    outs = []
    for limit in (blocks.UNFOLD_MAX, 0):
        monkeypatch.setattr(blocks, "UNFOLD_MAX", limit)
        gc.zero_grad()
        y = gc(x, pad)
        assert y.shape == (4, 12, 12, 8, 3)
        (y * up).sum().backward()
        outs.append((y.detach(), gc.weight.grad.clone(), gc.bias.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and against F.conv2d with the rotated bank, by hand
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, pad), gc.filter_bank().detach())
    ref = ref.permute(0, 2, 3, 1).reshape(4, 12, 12, 8, 3) + gc.bias.detach()
    torch.testing.assert_close(outs[0][0], ref, rtol=1e-12, atol=1e-12)


def test_blockwise_training_render_equals_render(monkeypatch):
    """render_for_training (pixel blocks recomputed in the backward pass) gives render's
    values and the same gradients for every parameter and for z, theta, u (float64)."""
    from cryolatent.models import target_vae as tvm

    torch.manual_seed(2)
    m = tiny(box=13).double()
    z = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    th = torch.rand(3, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 169, 1, dtype=torch.float64)
    inputs = [z, th, u, *m.parameters()]
    ref = m.render(z, th, u)
    want = torch.autograd.grad((ref * up).sum(), inputs, allow_unused=True)
    monkeypatch.setattr(tvm, "RENDER_BLOCK", 3 * 40 * m.coord_in.out_features)   # 5 blocks
    out = m.render_for_training(z, th, u, m.coords)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    got = torch.autograd.grad((out * up).sum(), inputs, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
