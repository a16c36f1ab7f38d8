"""Continuous motion: ``simulate cryoem --morph A B`` (atom matching, superposition, the truth
column cryolatentMorph, the particles' conformations) and ``evaluate``'s morph scores (the
held-out best latent direction and the PCA-of-aligned-particles baseline)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cryolatent.errors import InputError
from cryolatent.io import read_star, write_star
from cryolatent.metrics import heldout_direction_spearman
from cryolatent.simulate import simulate_cryoem
from cryolatent.simulate.cryoem import load_structure, render_projections
from cryolatent.simulate.morph import MorphPair, load_morph, match_atoms
from conftest import write_pdb_rows


#: a small two-domain "protein": chain A residues 1-8, one atom each (CA, C or S)
BASE = [("A", i + 1, "ALA" if i % 2 else "CYS", "CA" if i % 3 else "SG",
         "C" if i % 3 else "S", xyz) for i, xyz in enumerate(
    [(0, 0, 0), (4, 1, 0), (8, -1, 1), (12, 0, -1), (-4, 3, 2), (-8, 2, -2), (3, 7, 1),
     (-2, -8, 3)])]


def _rot(deg, axis):
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def test_match_atoms_by_chain_residue_and_name():
    ka = [("A", 1, " ", "CA"), ("A", 2, " ", "CA"), ("A", 2, " ", "CA"), ("B", 1, " ", "N"),
          ("A", 3, " ", "CB")]
    ra = ["GLY", "ALA", "ALA", "SER", "LYS"]
    kb = [("B", 1, " ", "N"), ("A", 1, " ", "CA"), ("A", 3, " ", "CB"), ("A", 9, " ", "O")]
    rb = ["SER", "GLY", "ARG", "HOH"]
    ia, ib, info = match_atoms(ka, ra, kb, rb)
    assert ia.tolist() == [0, 3] and ib.tolist() == [1, 0]      # A's order
    assert info == {"matched": 2, "a": 5, "b": 4, "duplicate_a": 1, "duplicate_b": 0,
                    "residue_differs": 1}


def test_load_morph_superposes_b_on_a_and_drops_unmatched(tmp_path, caplog):
    """B = A moved as a rigid body (turned and shifted, as another PDB entry's frame would
    be) with one atom displaced (the motion), one atom of A missing and one extra atom: the
    matched atoms are kept in A's order, B is superposed, the drops are logged."""
    a = write_pdb_rows(tmp_path / "a.pdb", BASE)
    R = _rot(40, "z") @ _rot(25, "x")
    moved = []
    for ch, num, rn, an, el, xyz in BASE:
        if num == 5:
            continue                                        # missing in B
        p = np.asarray(xyz, float) + ([0, 0, 6.0] if num == 7 else 0.0)   # the motion
        moved.append((ch, num, rn, an, el, tuple(R @ p + [30.0, -12.0, 5.0])))
    moved.append(("A", 20, "GLY", "CA", "C", (50.0, 50.0, 50.0)))
    b = write_pdb_rows(tmp_path / "b.pdb", moved)
    with caplog.at_level("INFO", logger="cryolatent"):
        m = load_morph(a, b)
    assert isinstance(m, MorphPair) and m.coords_a.shape == (7, 3)
    assert "7 atoms matched; dropped 1 of A and 1 of B" in caplog.text
    # both about the same (mass-weighted) centre; B superposed: only residue 7 moved much
    import gemmi

    mass = np.array([gemmi.Element("S" if k % 3 == 0 else "C").weight
                     for k in [0, 1, 2, 3, 5, 6, 7]])
    for c in (m.coords_a, m.coords_b):
        np.testing.assert_allclose((c * mass[:, None]).sum(0), 0, atol=1e-6)
    d = np.linalg.norm(m.coords_a - m.coords_b, axis=1)
    # (unsuperposed, the frames would be ~30 A apart; the least-squares fit spreads the
    # 6-A motion of one atom over all seven)
    assert np.argmax(d) == 5 and d[5] > 2.0 and d.max() < 6.0
    # the interpolation: lam 0 = A, 1 = B, 0.5 halfway
    np.testing.assert_allclose(m.coords(0.0), m.coords_a)
    np.testing.assert_allclose(m.coords(1.0), m.coords_b)
    np.testing.assert_allclose(m.coords(0.5), (m.coords_a + m.coords_b) / 2)
    assert m.radius >= float(np.linalg.norm(m.coords_a, axis=1).max())


def test_morph_of_models_that_do_not_match_is_a_one_line_error(tmp_path):
    a = write_pdb_rows(tmp_path / "a.pdb", BASE)
    b = write_pdb_rows(tmp_path / "b.pdb", [(ch, num + 100, rn, an, el, xyz)   # renumbered residues
                                  for ch, num, rn, an, el, xyz in BASE])
    with pytest.raises(InputError) as e:
        load_morph(a, b)
    msg = str(e.value)
    assert "\n" not in msg and "--morph a.pdb b.pdb" in msg and "only 0 of 8 / 8" in msg
    from cryolatent.cli import main

    rc = main(["simulate", "cryoem", "-o", str(tmp_path / "out"), "--n", "4", "--box", "16",
               "--morph", str(a), str(b)])
    assert rc == 1 and not (tmp_path / "out").exists()


def test_shared_morph_pairs(shared_data):
    """Adenylate kinase open/closed match atom for atom; the chaperonin pair does not (3J03
    numbers its residues on through the 16 chains, 3IYF from 7 in every chain)."""
    s = shared_data / "structures"
    adk = load_morph(s / "adk_open_4AKE_MDA.pdb", s / "adk_closed_1AKE_MDA.pdb")
    assert len(adk.weights) == 2952 == len(load_structure(s / "adk_open_4AKE_MDA.pdb").weights)
    assert 3.0 < adk.rmsd < 12.0                              # open vs closed, superposed
    with pytest.raises(InputError, match="only 264 of 58624 / 58640 atoms match"):
        load_morph(s / "3IYF_lidless_MmCpn_open_cryoEM.pdb",
                   s / "3J03_lidless_MmCpn_closed_cryoEM.pdb")


def _corr(a, b):
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def test_simulated_morph_particles_and_truth(tmp_path, write_pdb):
    """--morph with a discrete distractor: class 1 is the morph (lambda in [0, 1], uniform),
    class 2 the structure (lambda -1); each morph particle is the projection of its own
    interpolated conformation at its truth pose."""
    import mrcfile

    a = write_pdb_rows(tmp_path / "a.pdb", BASE)
    b = write_pdb_rows(tmp_path / "b.pdb", [(ch, num, rn, an, el,
                                   tuple(np.asarray(xyz, float) * (1.6 if num in (4, 6) else 1)))
                                  for ch, num, rn, an, el, xyz in BASE])
    c = write_pdb(tmp_path / "c.pdb")
    out = tmp_path / "sim"
    simulate_cryoem(out, [c], morph=(a, b), n=60, box=48, apix=1.0, snr=None, seed=1,
                    views=2, ctf=False, blur=1.5, shift_sd=2.0)
    tab = read_star(out / "particles.star")["particles"]
    imgs = np.asarray(mrcfile.read(out / "particles.mrcs"), np.float64)
    lam = tab["cryolatentMorph"].to_numpy()
    cls = tab["rlnClassNumber"].to_numpy()
    assert set(cls) == {1, 2}
    assert (lam[cls == 2] == -1).all()
    assert ((lam[cls == 1] >= 0) & (lam[cls == 1] <= 1)).all() and np.ptp(lam[cls == 1]) > 0.5
    m = load_morph(a, b)
    t = np.c_[tab.rlnOriginXAngst, tab.rlnOriginYAngst]
    for i in np.nonzero(cls == 1)[0][:10]:
        ref = render_projections(m.coords(lam[i]), m.weights, tab.rlnAngleRot[i:i + 1],
                                 tab.rlnAngleTilt[i:i + 1], tab.rlnAnglePsi[i:i + 1],
                                 t[i:i + 1], 48, 1.0, 1.5)[0].double().numpy()
        assert _corr(imgs[i], ref) > 0.999
        # ... and not that of the other end (the motion shows)
        other = render_projections(m.coords(1 - round(lam[i])), m.weights,
                                   tab.rlnAngleRot[i:i + 1], tab.rlnAngleTilt[i:i + 1],
                                   tab.rlnAnglePsi[i:i + 1], t[i:i + 1], 48, 1.0,
                                   1.5)[0].double().numpy()
        if abs(lam[i] - 0.5) > 0.3:
            assert _corr(imgs[i], other) < 0.99
    # the CLI: --morph is cryoem only
    from cryolatent.cli import main

    rc = main(["simulate", "mnist-u", "-o", str(tmp_path / "mn"), "--n", "3",
               "--morph", str(a), str(b)])
    assert rc == 1


def test_heldout_direction_spearman():
    rng = np.random.default_rng(0)
    n = 400
    lam = rng.uniform(0, 1, n)
    # lambda hidden in a rotated 2-D subspace of a 6-D latent, monotone but not linear
    z = rng.normal(0, 0.5, (n, 6))
    z[:, 0] += 4 * lam ** 2
    z[:, 1] -= 3 * lam
    good = heldout_direction_spearman(z @ np.linalg.qr(rng.normal(size=(6, 6)))[0], lam)
    assert good > 0.85
    assert abs(heldout_direction_spearman(rng.normal(size=(n, 6)), lam)) < 0.2
    # a latent as large as half the particles cannot fit noise into a high score
    assert heldout_direction_spearman(rng.normal(size=(60, 29)), lam[:60]) < 0.5
    assert heldout_direction_spearman(z[:5], lam[:5]) is None
    assert heldout_direction_spearman(z, np.ones(n)) is None


def test_evaluate_reports_latent_and_pca_scores(tmp_path, capsys):
    """A morph set (the built-in hinge, open <-> closed, one view) with a distractor, CTF
    and moderate noise; PRED = the truth poses plus a latent that knows lambda (z1) and
    one that does not (z2). evaluate: the latent's held-out score is high, the PCA baseline
    of the aligned, phase-flipped images tracks lambda too, per true class and view."""
    from cryolatent.cli import main
    from cryolatent.simulate.synthetic import hinge_pair

    closed, opened = hinge_pair(atoms=800)
    morph = MorphPair("hinge", closed.coords, opened.coords, closed.weights)
    out = tmp_path / "sim"
    simulate_cryoem(out, [hinge_pair(angle=-40.0, atoms=800)[1]], morph=morph, n=240,
                    box=32, snr=2.0, seed=2, views=1, shift_sd=1.0)
    truth = read_star(out / "particles.star")
    T = truth["particles"]
    lam = T["cryolatentMorph"].to_numpy()
    rng = np.random.default_rng(0)
    pred = T.copy()
    pred["cryolatentZ1"] = np.where(lam >= 0, lam, 0) + rng.normal(0, 0.05, len(T))
    pred["cryolatentZ2"] = rng.normal(0, 1, len(T))
    write_star(tmp_path / "pred.star", pred, truth["optics"])
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "pred.star"), "--truth",
                 str(out / "particles.star")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["morph_n"] == int((lam >= 0).sum()) and r["morph_dims"] == 2
    assert list(r["morph_latent_spearman_per_class"]) == ["1/view 1"]
    assert r["morph_latent_spearman"] > 0.95
    assert r["morph_pca_spearman"] > 0.5, r
    assert r["cluster_accuracy"] == 1.0                       # the usual keys are there
    assert main(["evaluate", str(tmp_path / "pred.star"), "--truth",
                 str(out / "particles.star"), "--no-morph-pca"]) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert r2["morph_pca_spearman"] is None
    assert r2["morph_latent_spearman"] == r["morph_latent_spearman"]
    # a truth without cryolatentMorph: no morph keys
    write_star(tmp_path / "plain.star", T.drop(columns="cryolatentMorph"), truth["optics"])
    assert main(["evaluate", str(tmp_path / "pred.star"), "--truth",
                 str(tmp_path / "plain.star")]) == 0
    assert "morph_n" not in json.loads(capsys.readouterr().out)
