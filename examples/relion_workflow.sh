#!/usr/bin/env bash
# From a RELION project to classes and back (run inside the RELION project folder, so the
# relative stack paths in the STAR files resolve as RELION resolves them).
set -euo pipefail
IN=${1:-Extract/job007/particles.star}

cryolatent preprocess "$IN" -o cryolatent/prep --box 64                    # bin + normalise
cryolatent train cryolatent/prep/particles.star -o cryolatent/run \
    --model target-vae --rotations 8 --z-dim 8 --gen-layers 6 --epochs 100
cryolatent embed cryolatent/run "$IN" -o cryolatent/embedded.star --clusters 20
cryolatent plot cryolatent/embedded.star -o cryolatent/plots --rundir cryolatent/run
cryolatent classes cryolatent/run cryolatent/embedded.star -o cryolatent/classes

# keep the good classes (look at cryolatent/classes/gallery.png first), unbinned, with poses
cryolatent select cryolatent/embedded.star --classes 1,2,5 -o cryolatent/good.star
relion_stack_create --i cryolatent/good.star --o cryolatent/good_aligned --apply_transformation
# cryolatent/good.star is an ordinary RELION 3.1 particle STAR: use it in Class2D/Refine3D.
