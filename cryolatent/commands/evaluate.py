"""``cryolatent evaluate PRED.star --truth TRUTH.star``: one JSON object on stdout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click


@click.command("evaluate")
@click.argument("pred", type=click.Path(path_type=Path))
@click.option("--truth", "truth", required=True, type=click.Path(path_type=Path),
              help="STAR file with the true poses and classes (e.g. from `cryolatent simulate`).")
@click.option("--truth-class-column", default="rlnClassNumber", show_default=True,
              help="Truth column holding the true class (e.g. cryolatentViewNumber).")
def command(pred: Path, truth: Path, truth_class_column: str):
    """Compare PRED.star's poses and classes with the ground truth; print one JSON object.

    Keys: rotation_corr (circular, Jammalamadaka-SenGupta), rotation_corr_per_class,
    translation_corr_x/y (Pearson), cluster_accuracy (Hungarian), nmi, ari, n. A metric whose
    columns are missing is null. Particles are matched by name (rlnImageName, or
    rlnImageOriginalName where a stack was rewritten), not by row order; PRED may be a
    subset of TRUTH (e.g. the output of select).

    When TRUTH holds junk (rlnClassNumber 0, from simulate cryoem --junk) it also gives
    junk_kept (truth junk present in PRED) and junk_kept_fraction, good_lost (truth particles
    absent from PRED) and good_lost_fraction, junk_kept_by_kind, n_pred; the metrics above
    are then computed on PRED's real particles only (n of them).
    """
    from ..metrics import evaluate_files   # here: it imports torch (`--help` stays fast)

    res = evaluate_files(pred, truth, truth_class_column)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in res.items()}
    click.echo(json.dumps(clean))
