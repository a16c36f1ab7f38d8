"""Command-line interface: a thin click layer over the library.

Each command lives in ``cryolatent/commands/<name>.py`` and exposes a click command named
``command``; it parses options and calls library functions. Commands are imported lazily, so
``cryolatent --help`` does not import torch.

Errors: a :class:`cryolatent.errors.CryolatentError` is printed as one line
(``error: ...``) with exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from . import __version__
from .errors import CryolatentError

#: command name -> (module under cryolatent.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("preprocess", "Downsample, normalise, invert or phase-flip a particle set."),
    "simulate": ("simulate", "Make particles with known pose and class (MNIST(U)/(N), cryo-EM)."),
    "train": ("train", "Train TARGET-VAE or IRL-INR on a particle set."),
    "embed": ("embed", "Infer pose, shift, latent and class of every particle; write STAR/.cs."),
    "evaluate": ("evaluate", "Compare predicted poses/classes with the ground truth (JSON)."),
    "plot": ("plot", "Latent-space maps (UMAP/PCA) and pose histograms."),
    "classes": ("classes", "Aligned and denoised class averages."),
    "select": ("select", "Keep (or drop) the particles of chosen classes."),
    "demo": ("demo", "The whole chain on a small built-in example (CPU, minutes)."),
}


def _available() -> list[str]:
    return [n for n, (mod, _) in COMMANDS.items()
            if importlib.util.find_spec(f"cryolatent.commands.{mod}") is not None]


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return _available()

    def get_command(self, ctx, name):
        if name not in COMMANDS or name not in _available():
            return None
        mod = importlib.import_module(f"cryolatent.commands.{COMMANDS[name][0]}")
        return mod.command

    def format_commands(self, ctx, formatter):
        rows = [(n, COMMANDS[n][1]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cryolatent")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx, debug):
    """cryolatent: rotation- and translation-invariant latent representations of cryo-EM
    particles (TARGET-VAE, IRL-INR), with poses and classes written back for RELION and
    cryoSPARC.

    Units at the interface: Å and degrees; poses follow RELION's convention.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv=None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="cryolatent", standalone_mode=False)
    except CryolatentError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except OSError as e:  # disk full, permission denied, ...: one line, the file named
        if debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        click.echo(f"error: {e.strerror or e}{where}", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
