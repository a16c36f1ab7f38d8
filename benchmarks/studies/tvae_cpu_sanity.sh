#!/usr/bin/env bash
# TARGET-VAE sanity check on the CPU: 1,000 noiseless two-conformation particles of 24 px,
# 15 short epochs (270 steps), then embed + evaluate. Run in an empty folder.
set -e
export OMP_NUM_THREADS=2
PY=${PYTHON:-python}; CL=${CRYOLATENT:-cryolatent}
rm -rf sim run emb.star
$PY -c "
from cryolatent.simulate.cryoem import simulate_cryoem
from cryolatent.simulate.synthetic import hinge_pair
simulate_cryoem('sim', hinge_pair(atoms=1000), n=1000, box=24, apix=5.0, snr=None, seed=1, views=1, shift_sd=1.0, ctf=False, device='cpu')
"
$CL train sim/particles.star -o run --model target-vae --rotations 8 --z-dim 2 --epochs 15 --batch-size 50 --enc-channels 16 --kernel 11 --gen-width 64 --gen-layers 2 --fourier-features 32 --translation-prior 2 --device cpu --likelihood gaussian
$CL embed run sim/particles.star -o emb.star --clusters 2 --device cpu
$CL evaluate emb.star --truth sim/particles.star
