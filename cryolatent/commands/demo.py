"""``cryolatent demo``: the whole chain on a small built-in example."""

from __future__ import annotations

import click

from .common import force_option


@click.command("demo")
@click.option("-o", "--outdir", default="cryolatent_demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for everything the demo writes.")
@click.option("--quick", is_flag=True,
              help="A tiny variant (seconds; the test suite runs it): checks the chain, "
                   "learns little [default: the full demo].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs [default: 25; 2 with --quick].")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@force_option
def command(outdir, quick, device, epochs, seed, force):
    """simulate → preprocess → train → embed → plot → classes → evaluate on particles of a
    built-in two-conformation pseudo-protein; a few minutes on a laptop CPU.

    Prints where everything is and what the evaluation against the truth says.
    """
    from .. import utils
    from ..demo import DemoSettings, format_summary, run_demo

    s = DemoSettings.quick() if quick else DemoSettings()
    s.device, s.seed = device, seed
    if epochs is not None:
        s.epochs = epochs
    utils.setup_logging(None)
    import logging

    logging.getLogger("cryolatent").setLevel(logging.WARNING)  # the demo prints its own steps
    from ..utils import output_folder

    with output_folder(outdir, force):   # removed again if the demo fails
        summary = run_demo(outdir, s, echo=lambda m: click.echo(m, err=True), force=force)
    click.echo(format_summary(summary))
