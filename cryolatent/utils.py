"""Small shared helpers: atomic file writes, progress bars, seeding, device choice.

Everything that writes a user-visible file goes through :func:`atomic_path`, so an interrupted
or failing write never leaves a half-written file under the final name.

torch is imported inside the functions that use it: :mod:`cryolatent.io` (and so ``select``,
``evaluate`` and ``plot``) use this module without it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import random
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from .errors import CryolatentError


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
    disable = kw.pop("disable", None)
    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                dynamic_ncols=True, **kw)


def prefetch(it, depth: int = 2) -> Iterator:
    """The items of iterator ``it``, produced ``depth`` items ahead in a background thread (the
    reads and transforms of batch i+1 overlap the work on batch i); order kept, an exception
    raised in ``it`` is re-raised in the consumer, and leaving the loop early stops the
    thread. ``ParticleSet.iter_batches(prefetch=...)`` and ``embed``'s batch loop use it."""
    q: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="cryolatent-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
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
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def setup_logging(folder: str | os.PathLike | None = None, name: str = "run.log"):
    """Log the ``cryolatent`` logger to stderr (INFO) and, with ``folder``, to ``folder/name``.

    Returns the logger. Calling it again replaces the handlers it installed before, so a
    notebook user can call library entry points repeatedly.
    """
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


# ----------------------------------------------------------------------------- threads
#: the value of the last :func:`set_threads` call (None: never called)
_THREADS: int | None = None


def _read(path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except (OSError, ValueError):
        return None


def _own_cpu_max_files() -> list[Path]:
    """cgroup v2: the ``cpu.max`` of this process's cgroup (from /proc/self/cgroup) and of
    its parents up to the mount root (each level may set a quota)."""
    root = Path("/sys/fs/cgroup")
    out: list[Path] = []
    txt = _read("/proc/self/cgroup") or ""
    for line in txt.splitlines():
        if line.startswith("0::"):
            d = root / line[3:].strip().lstrip("/")
            while True:
                out.append(d / "cpu.max")
                if d == root or root not in d.parents:
                    break
                d = d.parent
    if root / "cpu.max" not in out:
        out.append(root / "cpu.max")
    return out


def cgroup_cpu_limit(cpu_max: str | os.PathLike | None = None,
                     cfs_dir: str | os.PathLike = "/sys/fs/cgroup/cpu") -> float | None:
    """The CPU quota of this process's cgroup in cores (e.g. 2.5), or None without one.

    cgroup v2: ``cpu.max`` holds "QUOTA PERIOD" ("max PERIOD" = no limit); with ``cpu_max``
    None, the files of the process's own cgroup and its parents are read and the smallest
    quota counts. cgroup v1 (no ``cpu.max``): ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    (quota -1 = no limit). The paths are parameters so that tests can point them at fake
    files.
    """
    if cpu_max is None:
        found = [f for f in _own_cpu_max_files() if _read(f)]
        if found:
            limits = [q for q in (cgroup_cpu_limit(f, cfs_dir) for f in found) if q]
            return min(limits) if limits else None
        cpu_max = "/sys/fs/cgroup/cpu.max"
    txt = _read(cpu_max)
    if txt:
        parts = txt.split()
        if len(parts) >= 2 and parts[0] != "max":
            try:
                q, p = float(parts[0]), float(parts[1])
                if q > 0 and p > 0:
                    return q / p
            except ValueError:
                pass
        return None
    q, p = _read(Path(cfs_dir) / "cpu.cfs_quota_us"), _read(Path(cfs_dir) / "cpu.cfs_period_us")
    try:
        if q is not None and p is not None and float(q) > 0 and float(p) > 0:
            return float(q) / float(p)
    except ValueError:
        pass
    return None


def available_cores(cpu_max: str | os.PathLike | None = None,
                    cfs_dir: str | os.PathLike = "/sys/fs/cgroup/cpu",
                    affinity=None) -> int:
    """The cores this process may use: the smallest of its CPU affinity
    (``os.sched_getaffinity``, where the platform has it, else ``os.cpu_count``) and its
    cgroup CPU quota (rounded down, see :func:`cgroup_cpu_limit`); at least 1. ``affinity``
    (a set of CPU ids) replaces ``os.sched_getaffinity(0)``, for tests."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = range(os.cpu_count() or 1)
    n = len(affinity) or (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(cpu_max, cfs_dir)
    if quota is not None:
        n = min(n, int(quota))
    return max(1, n)


def set_threads(n: int | None = None) -> int:
    """Use ``n`` CPU threads (None: :func:`available_cores`): torch's intra-op threads and
    the BLAS/OpenMP pools (threadpoolctl; OMP/MKL/OPENBLAS_NUM_THREADS for libraries loaded
    later and for child processes). Returns the number set; :func:`current_threads` gives
    it back later (e.g. to share the threads among worker threads)."""
    global _THREADS
    n = available_cores() if n is None else max(1, int(n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass
    try:
        from threadpoolctl import threadpool_limits  # not a declared dependency

        threadpool_limits(limits=n)
    except Exception:  # noqa: BLE001 - threadpoolctl missing or a library it cannot limit
        pass
    _THREADS = n
    return n


def current_threads() -> int:
    """The threads set by :func:`set_threads`, else :func:`available_cores`."""
    return _THREADS if _THREADS is not None else available_cores()


# ----------------------------------------------------------------------------- output folders
def remove_entries(folder: str | os.PathLike, names) -> None:
    """Remove the files and folders ``names`` of ``folder`` that exist (a link is removed,
    not followed): a command's own outputs, before ``--force`` writes them anew."""
    for name in names:
        p = Path(folder) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def check_outdir(path: str | os.PathLike, force: bool = False, extra: str = "") -> None:
    """Refuse an existing non-empty output folder unless ``force`` (or a file in its place).

    One message for every command: "PATH: folder exists and is not empty; use --force to
    overwrite its files[EXTRA] or choose another -o". ``extra`` adds alternatives, e.g.
    ", --resume to continue it" for ``train``.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CryolatentError(f"{p}: exists and is not a folder; choose another -o")
    if not force and p.is_dir() and any(p.iterdir()):
        raise CryolatentError(f"{p}: folder exists and is not empty; use --force to overwrite "
                              f"its files{extra} or choose another -o")


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, force: bool = False, extra: str = "",
                  keep=None) -> Iterator[Path]:
    """Check an output folder with :func:`check_outdir`, and undo what the block created if
    it fails (any exception, Ctrl-C included): a folder that did not exist is removed with
    everything in it (and the parents the block made for it); in a folder that existed, the
    entries that were not there before are removed (files the block overwrote stay as they
    are now: cryolatent writes every file atomically, so they are the complete old or new
    version).

    ``keep``: a callable ``keep(path) -> bool``, checked on failure; True keeps everything
    (e.g. a training run that already saved a checkpoint it can ``--resume`` from).
    """
    p = Path(path)
    check_outdir(p, force, extra)
    existed = p.is_dir()
    before = {q.name for q in p.iterdir()} if existed else set()
    top = p   # the outermost folder the block may create (-o new/deeper/out)
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        yield p
    except BaseException:
        keep_all = False
        if keep is not None and p.is_dir():
            with contextlib.suppress(Exception):
                keep_all = bool(keep(p))
        if keep_all:
            raise
        _close_logs_under(p)
        if not existed:
            shutil.rmtree(top, ignore_errors=True)
        elif p.is_dir():
            for q in p.iterdir():
                if q.name not in before:
                    if q.is_dir() and not q.is_symlink():
                        shutil.rmtree(q, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            q.unlink()
        raise


def summary_path_for(star: str | os.PathLike) -> Path:
    """``OUT_summary.json`` beside ``OUT.star``: the trust report of ``embed`` / ``refine``
    (:mod:`cryolatent.analysis.trust`; here so that ``select --auto`` finds it without
    importing torch)."""
    star = Path(star)
    return star.with_name(star.stem + "_summary.json")


def check_outfiles(paths, force: bool = False) -> None:
    """Refuse existing output files unless ``force``: the one message of every command that
    writes files (``embed -o OUT.star``, ``select -o``, ``refine -o``): "PATH: file exists;
    use --force to overwrite it or choose another -o", naming the first that exists. None
    entries are skipped; a folder in a file's place is refused even with ``force``."""
    for q in paths:
        if q is None:
            continue
        q = Path(q)
        if q.is_dir():
            raise CryolatentError(f"{q}: is a folder; choose another -o")
        if not force and (q.exists() or q.is_symlink()):
            raise CryolatentError(f"{q}: file exists; use --force to overwrite it or choose "
                                  "another -o")


@contextlib.contextmanager
def output_files(paths, force: bool = False, logs=()) -> Iterator[None]:
    """:func:`check_outfiles` on ``paths``, then undo what the block wrote if it fails (any
    exception, Ctrl-C included): each of ``paths`` and ``logs`` that did not exist before is
    removed, and a log that existed (``embed.log``: appended to) is cut back to its old
    length, so a failed command leaves no output of its own. Files the block overwrote stay
    as they are now (cryolatent writes them atomically: complete old or new). The log files'
    handlers are detached first. ``logs`` are not refused: commands append to them."""
    paths = [Path(q) for q in paths if q is not None]
    logs = [Path(q) for q in logs if q is not None]
    check_outfiles(paths, force)
    existed = {q: q.exists() for q in paths}
    sizes = {q: (q.stat().st_size if q.is_file() else None) for q in logs}
    try:
        yield
    except BaseException:
        for q in logs:
            _close_log(q)
            with contextlib.suppress(OSError):
                if sizes[q] is None:
                    q.unlink()
                else:
                    os.truncate(q, sizes[q])
        for q in paths:
            if not existed[q]:
                with contextlib.suppress(OSError):
                    q.unlink()
        raise


def _close_log(path: Path) -> None:
    """Detach the cryolatent log handler writing ``path``, if any."""
    logger = logging.getLogger("cryolatent")
    target = os.path.abspath(path)
    for h in list(logger.handlers):
        f = getattr(h, "baseFilename", None)
        if f and os.path.abspath(f) == target:
            logger.removeHandler(h)
            h.close()


def _close_logs_under(folder: Path) -> None:
    """Detach the cryolatent log files that live under ``folder`` (about to be removed)."""
    logger = logging.getLogger("cryolatent")
    root = os.path.abspath(folder)
    for h in list(logger.handlers):
        f = getattr(h, "baseFilename", None)
        if f and os.path.abspath(f).startswith(root + os.sep):
            logger.removeHandler(h)
            h.close()


# ----------------------------------------------------------------------------- image names
def relion_path(path: str | os.PathLike) -> str:
    """How a STAR file that cryolatent writes names a stack: relative to the current
    directory when the stack lies below it (RELION resolves image names from the project
    directory, the folder a job runs from), absolute otherwise. Symbolic links in the
    folders are resolved for the comparison; the file name is kept as it is. A relative
    path without ``..`` lies below the current directory as it is written (a symbolic link
    in it, e.g. a project's ``Extract -> /scratch/...``, stays)."""
    p = Path(path)
    if not p.is_absolute() and ".." not in p.parts and str(p) not in ("", "."):
        return os.path.normpath(p)
    folder = Path(os.path.realpath(p.parent if str(p.parent) else "."))
    cwd = Path(os.path.realpath(os.getcwd()))
    try:
        return str(folder.relative_to(cwd) / p.name)
    except ValueError:
        return str(folder / p.name)
