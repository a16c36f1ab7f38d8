"""cryolatent from Python (a notebook, a script): the library calls behind the CLI.

Run from the repository root:  python examples/notebook_api.py  (CPU, about a minute)
"""

from pathlib import Path

from cryolatent.config import TrainConfig
from cryolatent.inference import embed
from cryolatent.io import load_particles
from cryolatent.metrics import evaluate_files
from cryolatent.preprocess import preprocess
from cryolatent.simulate.cryoem import simulate_cryoem
from cryolatent.simulate.synthetic import hinge_pair
from cryolatent.run import load_run
from cryolatent.train import train

out = Path("example_out")

# 1. particles with known pose and class (two conformations of a built-in pseudo-protein)
sim = simulate_cryoem(out / "sim", hinge_pair(atoms=1000), n=300, box=48, snr=3.0,
                      views=1, shift_sd=1.5)

# 2. a lazily read particle set: metadata table, pixel size, box; images read on demand
ps = load_particles(sim)
print(len(ps), "particles,", ps.box, "px at", ps.apix, "Å/px")
print(ps.table[["rlnImageName", "rlnAnglePsi", "rlnDefocusU"]].head(3))
batch = ps.images(slice(0, 8))                    # (8, 48, 48) float32
print("first batch", batch.shape, batch.dtype)

# 3. bin to 24 px, phase-flip, normalise (streamed, written as STAR + .mrcs)
preprocess(sim, out / "prep", box=24, phase_flip=True)

# 4. train a small TARGET-VAE
cfg = TrainConfig(input=str(out / "prep" / "particles.star"), outdir=str(out / "run"),
                  model="target-vae", epochs=3, batch_size=50, lr=1e-3, device="cpu",
                  rotations=8, z_dim=2, enc_channels=16, kernel=11, gen_width=64,
                  gen_layers=2, fourier_features=32, translation_prior=2.0,
                  likelihood="gaussian").validate()
rundir = train(cfg)

# 5. the trained model, directly: poses in RELION's convention, latents
model, cfg = load_run(rundir, device="cpu")
import torch  # noqa: E402

res = model.infer(torch.as_tensor(load_particles(out / "prep" / "particles.star").images(
    slice(0, 4))))
print("psi (deg)", res.psi_deg.tolist(), "shift (px)", res.shift_px.tolist())

# 6. embed the original particles and compare with the truth
emb = embed(rundir, sim, out / "embedded.star", clusters=2, device="cpu")
print(evaluate_files(emb, sim))
