"""Command-line interface: a thin click layer over the library.

Each command lives in ``cryolatent/commands/<name>.py`` and exposes a click command named
``command``; it parses options and calls library functions. Commands are imported lazily, so
``cryolatent --help`` does not import torch.

Errors: a :class:`cryolatent.errors.CryolatentError`, an ``OSError`` (disk full, permission
denied) or any unexpected exception is printed as one line (``error: ...``, see
docs/errors.md) with exit status 1; Ctrl-C exits with 130; ``--debug`` shows the traceback
instead.
"""

from __future__ import annotations

import contextlib
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
    "refine": ("refine", "Refine embed's classes and poses by 2D alignment to class averages."),
    "classes": ("classes", "Aligned and denoised class averages."),
    "select": ("select", "Keep (or drop) the particles of chosen classes or a selection file."),
    "report": ("report", "One HTML page: latent map, classes, traversals; select particles."),
    "demo": ("demo", "The whole chain on a small built-in example (CPU, minutes)."),
    "relion-external": ("relion_external", "The chain as a RELION 4/5 External job."),
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


def _log_to_files(message: str) -> None:
    """Record a final error in the run's log files (run.log, preprocess.log, ...) only: the
    terminal gets the one ``error:`` line from :func:`main`, not a second copy."""
    import logging

    logger = logging.getLogger("cryolatent")
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler):
            with contextlib.suppress(Exception):
                h.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message,
                                           None, None))


def _fail(message: str, code: int) -> int:
    message = " ".join(str(message).split())  # always one line
    _log_to_files(message)
    click.echo(f"error: {message}", err=True)
    return code


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted).

    Every failure is one line on stderr, ``error: <what and where>``, and no traceback unless
    ``--debug`` is given: user errors (:class:`CryolatentError`), OS errors (disk full,
    permission denied: the file is named) and, as a last resort, unexpected exceptions
    (reported as internal errors with a hint to rerun with ``--debug``).
    """
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="cryolatent", standalone_mode=False)
    except CryolatentError as e:
        if debug:
            raise
        return _fail(str(e), e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        cmd = next((a for a in args if not a.startswith("-")), "")
        msg = ("interrupted (Ctrl-C): files already written are complete and unfinished "
               "ones were removed" + ("; continue with the same command and --resume"
                                      if cmd == "train" else "; run the command again"))
        _log_to_files(msg)
        click.echo(msg, err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except OSError as e:  # disk full, permission denied, ...: one line, the file named
        if debug:
            raise
        what = e.strerror or str(e)
        where = getattr(e, "filename", None)
        return _fail(f"{where}: {what}" if where else what, 1)
    except MemoryError:
        if debug:
            raise
        return _fail("out of memory (try a smaller --batch-size or --chunk-size)", 1)
    except Exception as e:  # noqa: BLE001 - a bug, not the user's fault: still one line
        if debug:
            raise
        return _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the "
                     "traceback and please report it)", 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
