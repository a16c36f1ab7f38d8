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
@click.option("--datadir", type=click.Path(path_type=Path), default=None,
              help="Folder to look for PRED's particle stacks in first (the morph baseline "
                   "reads the images) [default: beside PRED, then the current directory].")
@click.option("--morph-pca/--no-morph-pca", default=True, show_default=True,
              help="With a cryolatentMorph truth: compute the classical baseline (PCA of "
                   "the particles aligned by PRED's poses), which reads every morph "
                   "particle's image.")
def command(pred: Path, truth: Path, truth_class_column: str, datadir: Path | None,
            morph_pca: bool):
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

    \b
    When TRUTH has cryolatentMorph (simulate cryoem --morph: the conformation
    lambda of each particle) it also gives, over PRED's morph particles (morph_n),
    grouped by true class (and view, where TRUTH has cryolatentViewNumber):
      morph_latent_spearman[_per_class]  Spearman rank correlation between lambda
          and the best single direction of PRED's latent vectors (cryolatentZ*):
          the ranks of lambda are regressed on z (least squares) on a random half
          of the group and the direction is scored on the other half, and the
          other way round (mean of the two), so that a large z cannot fit noise;
      morph_pca_spearman[_per_class]  the same for the classical baseline: PCA
          (as many components as latent dimensions, morph_dims) of the particle
          images phase-flipped with their CTF and aligned by PRED's poses.
    Values are means over groups; docs/conventions.md has the details.
    """
    from ..metrics import evaluate_files, morph_report_files   # torch: `--help` stays fast
    res = evaluate_files(pred, truth, truth_class_column)
    res.update(morph_report_files(pred, truth, truth_class_column, datadir=datadir,
                                  pca=morph_pca))
    def finite(v):
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v

    clean = {k: finite(v) for k, v in res.items()}
    click.echo(json.dumps(clean))
