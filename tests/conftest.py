"""Shared fixtures: the read-only data folder beside the repo, RELION's binaries, a test PDB."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    for cand in (os.environ.get("CRYOLATENT_SHARED_DATA"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (read-only): MNIST, atomic models, real particles, interop corpus."""
    p = _shared_data()
    if p is None:
        pytest.skip("../shared/data not present")
    return p


def _relion_bin() -> Path | None:
    """Folder holding relion_star_handler: $RELION_BIN, PATH, or .ci's unpacked copy."""
    cands = [os.environ.get("RELION_BIN"), REPO / ".relion" / "usr" / "bin"]
    w = shutil.which("relion_star_handler")
    if w:
        cands.insert(0, str(Path(w).parent))
    for c in cands:
        if c and (Path(c) / "relion_star_handler").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def relion():
    """A callable running a RELION 3.1 program: ``relion("relion_star_handler", "--i", ...)``.

    Skips when the binaries are absent (``.ci/run`` installs them).
    """
    import subprocess

    b = _relion_bin()
    if b is None:
        pytest.skip("RELION binaries not installed")
    env = dict(os.environ)
    lib = b.parent / "lib" / "x86_64-linux-gnu"
    if lib.is_dir():
        env["LD_LIBRARY_PATH"] = f"{lib}:{b.parent / 'lib'}:" + env.get("LD_LIBRARY_PATH", "")
    env.setdefault("OMPI_MCA_plm", "isolated")

    def run(prog: str, *args: str, cwd=None, check: bool = True):
        res = subprocess.run([str(b / prog), *map(str, args)], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300)
        if check and res.returncode != 0:
            raise AssertionError(f"{prog} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    return run


#: a small asymmetric object: five atoms of different elements (Å)
TEST_ATOMS = [("C", (0, 0, 0)), ("S", (8, 2, 0)), ("O", (-4, 6, 3)), ("N", (2, -9, -2)),
              ("P", (-7, -5, 4))]


def write_pdb_rows(path, rows) -> Path:
    """Write atoms [(chain, residue number, residue name, atom name, element, (x, y, z) Å)]
    as a PDB file (chains in order of first appearance); returns ``path``."""
    import gemmi

    st = gemmi.Structure()
    model = gemmi.Model("1")
    chains: dict = {}
    for ch, num, rname, aname, el, xyz in rows:
        c = chains.setdefault(ch, gemmi.Chain(ch))
        res = gemmi.Residue()
        res.name = rname
        res.seqid = gemmi.SeqId(num, " ")
        at = gemmi.Atom()
        at.name = aname
        at.element = gemmi.Element(el)
        at.pos = gemmi.Position(*map(float, xyz))
        at.occ = 1.0
        res.add_atom(at)
        c.add_residue(res)
    for c in chains.values():
        model.add_chain(c)
    st.add_model(model)
    st.setup_entities()
    st.write_pdb(str(path))
    return Path(path)


def write_test_pdb(path, atoms=None) -> Path:
    """Write ``atoms`` [(element, (x, y, z) Å), ...] (default :data:`TEST_ATOMS`) as a PDB
    file, one UNK residue per atom in chain A; returns ``path``."""
    return write_pdb_rows(path, [("A", i + 1, "UNK", el, el, xyz)
                                 for i, (el, xyz) in enumerate(atoms or TEST_ATOMS)])


@pytest.fixture
def write_pdb():
    """:func:`write_test_pdb`: ``write_pdb(path, atoms=None) -> path``."""
    return write_test_pdb


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny convolutions run ~10x faster on one thread
    than oversubscribed on a busy box); the previous count is restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
