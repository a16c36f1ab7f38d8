"""``cryolatent evaluate PRED.star --truth TRUTH.star``: one JSON object on stdout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click


#: columns the metrics read as numbers (checked only where present)
NUMERIC = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber")


def _particles_table(path: Path, extra: tuple[str, ...] = ()):
    """The particle table of ``path`` (PRED or TRUTH), checked by
    :func:`cryolatent.io.read_particle_table`: a missing file, no particles, a non-number in
    a pose / class column or a duplicate name is a one-line InputError naming the file."""
    from ..io import read_particle_table

    return read_particle_table(path, numeric=NUMERIC + tuple(extra))[0]


def evaluate_files(pred: str | Path, truth: str | Path,
                   class_column: str = "rlnClassNumber") -> dict:
    """Metrics of :func:`cryolatent.metrics.evaluate_tables` for two STAR files."""
    from ..metrics import evaluate_tables

    pred, truth = Path(pred), Path(truth)
    P = _particles_table(pred)
    T = _particles_table(truth, (class_column,))
    return evaluate_tables(P, T, class_column=class_column, pred_label=str(pred),
                           truth_label=str(truth))


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
    rlnImageOriginalName where a stack was rewritten), not by row order.
    """
    res = evaluate_files(pred, truth, truth_class_column)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in res.items()}
    click.echo(json.dumps(clean))
