#!/usr/bin/env bash
# From a RELION project to classes and back (run inside the RELION project folder, so the
# relative stack paths in the STAR files resolve as RELION resolves them; the STARs cryolatent
# writes name the stacks from here too). No model-size options: train picks them from the
# data and the machine, and stops when the validation loss has converged.
set -euo pipefail
IN=${1:-Extract/job007/particles.star}

cryolatent preprocess "$IN" -o cryolatent/prep --box 64                    # bin + normalise
cryolatent train cryolatent/prep/particles.star -o cryolatent/run           # see run/summary.json
cryolatent embed cryolatent/run "$IN" -o cryolatent/embedded.star --clusters 20
cryolatent refine cryolatent/embedded.star -o cryolatent/refined.star       # 2D alignment EM
cryolatent plot cryolatent/refined.star -o cryolatent/plots --rundir cryolatent/run
cryolatent classes cryolatent/run cryolatent/refined.star -o cryolatent/classes

# keep the good classes (look at cryolatent/classes/gallery.png first), unbinned, with poses
cryolatent select cryolatent/refined.star --classes 1,2,5 -o cryolatent/good.star
relion_stack_create --i cryolatent/good.star --o cryolatent/good_aligned --apply_transformation
# cryolatent/good.star is an ordinary RELION 3.1 particle STAR: use it in Class2D/Refine3D.
