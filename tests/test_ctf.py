"""cryolatent.ctf against an independent float64 evaluation of RELION's formula (ctf.h) and
analytic facts (wavelength, value at the origin, zeros, rotation of the astigmatism)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cryolatent.ctf import CTFParams, compute_ctf, electron_wavelength


def relion_ctf_reference(u, v, ang_deg, kv, cs_mm, q, ps_deg, box, apix):
    """RELION 3.0 ctf.h, written out literally: getDeltaF with atan2, negative defocus,
    gamma = K1*deltaf*u2 + K2*u4 - K5 - K3, CTF = -sin(gamma). (box, box) float64, [row, col],
    X = column frequency, unshifted (fftfreq) layout."""
    local_kv = kv * 1e3
    lam = 12.2643247 / math.sqrt(local_kv * (1.0 + local_kv * 0.978466e-6))
    k1 = math.pi / 2 * 2 * lam
    k2 = math.pi / 2 * (cs_mm * 1e7) * lam ** 3
    k3 = math.atan(q / math.sqrt(1 - q * q))
    k5 = math.radians(ps_deg)
    defocus_average = -(u + v) * 0.5
    defocus_deviation = -(u - v) * 0.5
    f = np.fft.fftfreq(box) / apix
    out = np.empty((box, box))
    for i in range(box):          # row -> Y
        for j in range(box):      # col -> X
            X, Y = f[j], f[i]
            u2 = X * X + Y * Y
            if abs(X) < 1e-12 and abs(Y) < 1e-12:
                deltaf = 0.0
            else:
                deltaf = defocus_average + defocus_deviation * math.cos(
                    2 * (math.atan2(Y, X) - math.radians(ang_deg)))
            gamma = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
            out[i, j] = -math.sin(gamma)
    return out


PARAMS = [  # u, v, angle, kV, Cs, Q, phase shift
    (15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, 0.0),
    (8000.0, 9500.0, -117.0, 200.0, 2.0, 0.07, 0.0),
    (21000.0, 20000.0, 75.0, 300.0, 0.01, 0.1, 90.0),
    (5000.0, 5000.0, 0.0, 120.0, 1.4, 0.15, 35.0),
]


def _params(rows):
    a = np.array(rows, dtype=np.float64)
    return CTFParams(*[a[:, k] for k in range(7)])


@pytest.mark.parametrize("box,apix", [(32, 1.3), (33, 2.1), (64, 0.9)])
def test_matches_relion_formula_float64(box, apix):
    p = _params(PARAMS)
    got = compute_ctf(p, box, apix, dtype=torch.float64).numpy()
    assert got.shape == (len(PARAMS), box, box)
    for k, row in enumerate(PARAMS):
        ref = relion_ctf_reference(*row, box, apix)
        np.testing.assert_allclose(got[k], ref, atol=1e-9)
    # float32 output: same values to single precision (phases up to ~100 rad here)
    got32 = compute_ctf(p, box, apix).numpy()
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, got, atol=2e-4)
    # centered layout is the fftshift of the unshifted one
    cen = compute_ctf(p, box, apix, dtype=torch.float64, centered=True).numpy()
    np.testing.assert_array_equal(cen, np.fft.fftshift(got, axes=(-2, -1)))


def test_idx_selects_particles():
    p = _params(PARAMS)
    full = compute_ctf(p, 16, 1.5, dtype=torch.float64)
    sub = compute_ctf(p, 16, 1.5, idx=np.array([3, 1]), dtype=torch.float64)
    torch.testing.assert_close(sub, full[[3, 1]])
    assert len(p.subset(slice(1, 3))) == 2


def test_wavelength():
    # h / sqrt(2 m e V (1 + e V / (2 m c^2))) from CODATA constants, independently
    h, m, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    for kv in (100.0, 200.0, 300.0):
        V = kv * 1e3
        lam = h / math.sqrt(2 * m * e * V * (1 + e * V / (2 * m * c * c))) * 1e10
        assert electron_wavelength(kv) == pytest.approx(lam, rel=1e-5)  # RELION rounds its constants
    assert electron_wavelength(300.0) == pytest.approx(0.019687, abs=1e-6)


def test_value_at_origin_is_plus_q():
    """RELION: gamma(0) = -K5 - K3, CTF(0) = -sin(gamma) = sin(K3 + K5) -> +Q without a phase
    shift, sqrt(1 - Q^2) with a 90 degree phase plate."""
    q = 0.1
    p = CTFParams(12000.0, 11000.0, 10.0, 300.0, 2.7, q, 0.0)
    assert compute_ctf(p, 8, 1.0, dtype=torch.float64)[0, 0, 0].item() == pytest.approx(q, abs=1e-12)
    p90 = CTFParams(12000.0, 11000.0, 10.0, 300.0, 2.7, q, 90.0)
    c = compute_ctf(p90, 8, 1.0, dtype=torch.float64, centered=True)
    assert c[0, 4, 4].item() == pytest.approx(math.sqrt(1 - q * q), abs=1e-12)


def test_zeros_at_predicted_radii():
    """Cs = 0, no astigmatism, no phase shift: CTF = sin(pi*lambda*df*s^2 + K3), zeros at
    s_n = sqrt((n*pi - K3) / (pi*lambda*df))."""
    box, apix, q, kv = 256, 1.0, 0.1, 300.0
    lam = electron_wavelength(kv)
    k3 = math.atan(q / math.sqrt(1 - q * q))
    # choose the defocus so that the first zero sits exactly on grid frequency k0 along X
    k0 = 20
    s1 = k0 / (box * apix)
    df = (math.pi - k3) / (math.pi * lam * s1 ** 2)
    p = CTFParams(df, df, 0.0, kv, 0.0, q, 0.0)
    c = compute_ctf(p, box, apix, dtype=torch.float64)[0].numpy()
    assert abs(c[0, k0]) < 1e-10 and abs(c[k0, 0]) < 1e-10  # on both axes
    # every further zero falls between the two grid points that bracket its predicted radius
    line = c[0, : box // 2]
    s = np.arange(box // 2) / (box * apix)
    n = 2
    while True:
        sn = math.sqrt((n * math.pi - k3) / (math.pi * lam * df))
        if sn >= s[-1]:
            break
        j = int(np.searchsorted(s, sn))  # s[j-1] < sn <= s[j]
        assert line[j - 1] * line[j] <= 0, (n, sn)
        n += 1
    assert n > 4
    # and no other zeros along the axis: zeros 1 .. n-1 each give one sign change (zero 1 sits
    # on the grid point k0, whose value is ~1e-16 of either sign: leave that point out)
    rest = np.delete(line, k0)
    changes = np.count_nonzero(np.sign(rest[1:]) * np.sign(rest[:-1]) < 0)
    assert changes == n - 1


def test_astigmatism_rotates_with_angle():
    box, apix = 64, 1.2
    base = dict(defocus_u=20000.0, defocus_v=12000.0, voltage=300.0, cs=2.7,
                amplitude_contrast=0.1, phase_shift=0.0)
    c0 = compute_ctf(CTFParams(astigmatism=0.0, **base), box, apix, dtype=torch.float64)[0]
    c90 = compute_ctf(CTFParams(astigmatism=90.0, **base), box, apix, dtype=torch.float64)[0]
    c180 = compute_ctf(CTFParams(astigmatism=180.0, **base), box, apix, dtype=torch.float64)[0]
    # rotating the angle by 90 deg swaps X and Y (transpose in the unshifted layout)
    torch.testing.assert_close(c90, c0.T)
    torch.testing.assert_close(c180, c0)
    # angle 0: U (larger defocus) lies along X = columns, so the CTF oscillates faster there
    x_line, y_line = c0[0, : box // 2].numpy(), c0[: box // 2, 0].numpy()
    nx = np.count_nonzero(np.diff(np.sign(x_line)) != 0)
    ny = np.count_nonzero(np.diff(np.sign(y_line)) != 0)
    assert nx > ny
    # angle theta vs -theta: mirror Y (row frequency -> -row frequency)
    ct = compute_ctf(CTFParams(astigmatism=25.0, **base), box, apix, dtype=torch.float64)[0]
    cm = compute_ctf(CTFParams(astigmatism=-25.0, **base), box, apix, dtype=torch.float64)[0]
    mirror_rows = (-torch.arange(box)) % box
    keep = torch.arange(box) != box // 2  # the Nyquist row has no mirror on the grid
    torch.testing.assert_close(cm[keep], ct[mirror_rows][keep])


def test_from_relion_and_columns_round_trip():
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0, 200.0],
                           "rlnSphericalAberration": [2.7, 2.0],
                           "rlnAmplitudeContrast": [0.1, 0.07]})
    parts = pd.DataFrame({"rlnDefocusU": [1e4, 2e4, 1.5e4], "rlnDefocusV": [9e3, 1.9e4, 1.5e4],
                          "rlnDefocusAngle": [10.0, 20.0, 30.0], "rlnOpticsGroup": [2, 1, 2]})
    p = CTFParams.from_relion(parts, optics)
    assert len(p) == 3
    np.testing.assert_array_equal(p.voltage, [200.0, 300.0, 200.0])
    np.testing.assert_array_equal(p.amplitude_contrast, [0.07, 0.1, 0.07])
    np.testing.assert_array_equal(p.phase_shift, [0.0, 0.0, 0.0])
    cols = p.to_relion_columns()
    assert list(cols) == ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
                          "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnPhaseShift"]
    q = CTFParams.from_relion(cols)
    for a, b in zip(cols.values(), q.to_relion_columns().values()):
        np.testing.assert_array_equal(a, b)
    from cryolatent.errors import InputError
    with pytest.raises(InputError, match="rlnVoltage"):
        CTFParams.from_relion(parts)


def test_from_cryosparc_converts_radians():
    dt = [("uid", "<u8"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
          ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
          ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")]
    a = np.zeros(2, dtype=dt)
    a["ctf/accel_kv"] = 300
    a["ctf/cs_mm"] = 2.7
    a["ctf/amp_contrast"] = 0.1
    a["ctf/df1_A"] = [12000, 13000]
    a["ctf/df2_A"] = [11000, 12500]
    a["ctf/df_angle_rad"] = [np.pi / 4, -np.pi / 2]
    a["ctf/phase_shift_rad"] = [0, np.pi / 2]
    p = CTFParams.from_cryosparc(a)
    np.testing.assert_allclose(p.astigmatism, [45.0, -90.0], rtol=1e-6)
    np.testing.assert_allclose(p.phase_shift, [0.0, 90.0], rtol=1e-6)
    np.testing.assert_allclose(p.defocus_v, [11000, 12500])
