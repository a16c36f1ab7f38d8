"""Small shared helpers: atomic file writes, progress bars, seeding, device choice.

Everything that writes a user-visible file goes through :func:`atomic_path`, so an interrupted
or failing write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None,
                fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same folder (same filesystem), so the final ``os.replace``
    is atomic: a reader (or a run killed at any moment, SIGKILL included) sees either the
    previous file or the complete new one, never a mixture. On any exception (a full disk,
    Ctrl-C) the temporary file is removed and ``path`` is left untouched. ``suffix`` defaults
    to the final file's suffix, so libraries that infer a format from the name (``.mrcs``,
    ``.npy``) still do. ``fsync``: flush the new file to the disk before the rename (so a
    power cut cannot leave an empty file under the final name). The new file gets the
    permissions ``open(path, "w")`` would give it (those of the file it replaces, else
    0o666 & ~umask), not mkstemp's private 0o600.

    An ``OSError`` raised inside the block without a file name (``write()`` on a full disk
    says only "No space left on device") is re-raised naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=(path.suffix if suffix is None else suffix) + ".tmp",
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            _default_mode(tmp_path, path)
            if fsync:
                _fsync(tmp_path)
            os.replace(tmp_path, path)
        except OSError as e:
            if getattr(e, "filename", None) in (None, str(tmp_path), tmp):
                raise OSError(e.errno, e.strerror or str(e), str(path)) from e
            raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    """The process umask: from /proc (Linux) when possible, since ``os.umask`` can only be
    read by setting it, which would race with other threads creating files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_mode(tmp: Path, final: Path) -> None:
    """Give the new file the permissions a plain ``open(final, "w")`` would, instead of
    mkstemp's 0o600: those of the file it replaces, else 0o666 & ~umask. Folders, links
    and special files are left alone."""
    import stat

    try:
        if not tmp.is_file() or tmp.is_symlink():
            return
        try:
            st = os.stat(final)
            mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
        except OSError:
            mode = None
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
    except OSError:
        pass


def _fsync(p: Path) -> None:
    """fsync a regular file (a no-op where it is not possible, e.g. a folder or a FIFO)."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno == errno.ENOSPC or e.errno == errno.EIO:
            raise
    finally:
        os.close(fd)


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", **kw):
    """A tqdm progress bar on a terminal, silent otherwise (CI logs, pipes)."""
    from tqdm.auto import tqdm

    disable = kw.pop("disable", None)
    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                dynamic_ncols=True, **kw)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device="auto"):
    """The ``torch.device`` for a ``--device`` value (a string, or a ``torch.device`` as is).

    ``"auto"`` (or None / "") -> ``cuda`` when a GPU is available, else ``cpu``; a CUDA
    device without CUDA, or a name torch does not know, is a one-line CryolatentError.
    """
    import torch

    from .errors import CryolatentError

    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise CryolatentError(f"--device {device!r}: use auto, cpu, cuda or cuda:N") \
                from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CryolatentError(f"--device {device}: no CUDA GPU is available here")
    return dev


def command_line() -> str:
    """The command line as typed (for config.json / run.log)."""
    import shlex

    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def setup_logging(folder: str | os.PathLike | None = None, name: str = "run.log"):
    """Log the ``cryolatent`` logger to stderr (INFO) and, with ``folder``, to ``folder/name``.

    Returns the logger. Calling it again replaces the handlers it installed before, so a
    notebook user can call library entry points repeatedly.
    """
    import logging

    logger = logging.getLogger("cryolatent")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_cryolatent", False):
            logger.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(message)s"))
    stream._cryolatent = True  # type: ignore[attr-defined]
    logger.addHandler(stream)
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(folder) / name)
        fh.setFormatter(fmt)
        fh._cryolatent = True  # type: ignore[attr-defined]
        logger.addHandler(fh)
    logger.propagate = False
    return logger


@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt.

    For writes that belong together (a checkpoint and its log row): an interrupt arriving in
    between would leave them out of step. Outside the main thread it does nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
