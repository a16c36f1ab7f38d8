"""``cryolatent evaluate PRED.star --truth TRUTH.star``: one JSON object on stdout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click


def _particles_table(path: Path, label: str):
    from ..errors import InputError
    from ..io import read_star

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    blocks = read_star(path)
    for name in ("particles", "images", ""):
        if name in blocks:
            return blocks[name]
    # RELION <= 3.0 files may name the block anything: take the one with rlnImageName
    for df in blocks.values():
        if "rlnImageName" in getattr(df, "columns", ()):
            return df
    raise InputError(f"{path}: no particle table (data_particles with rlnImageName) in {label}")


def evaluate_files(pred: str | Path, truth: str | Path,
                   class_column: str = "rlnClassNumber") -> dict:
    """Metrics of :func:`cryolatent.metrics.evaluate_tables` for two STAR files."""
    from ..metrics import evaluate_tables

    pred, truth = Path(pred), Path(truth)
    P = _particles_table(pred, "PRED")
    T = _particles_table(truth, "TRUTH")
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
