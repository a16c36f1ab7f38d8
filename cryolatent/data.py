"""Training data: one view of a particle set (file, ParticleSet or in-memory array), the seeded
train/validation split and the per-epoch batches, resident on the device when they fit.

Two ways of feeding the model:

* **resident** — every image is one tensor on the training device (GPU memory, or RAM for
  the CPU), with, when the CTF is used, each particle's CTF parameters ((n, 6) float64,
  :func:`cryolatent.ctf.ctf_params_tensor`): the model computes the CTF of each batch on the
  device (:meth:`cryolatent.models.LatentModel.forward`), so the CTF costs no (n, D, D) copy. Batches are index_select-ed on the device from a per-epoch
  permutation that is copied there once per epoch: no host round trip per step.
* **streamed** — a ``torch.utils.data.DataLoader`` whose items are whole batches (sorted
  indices, so memory-mapped stacks are read in order), read by worker processes and handed
  over in pinned memory (non-blocking copies to the GPU).

The order of the training particles in epoch ``e`` is a pure function of (seed, e), so a
resumed run sees exactly the batches an uninterrupted run would have seen.

Distributed (``torchrun``, :mod:`cryolatent.distributed`): ``--batch-size`` is the *global*
batch. Every rank computes the same epoch order and cuts it into the same global batches as
a single process would; global batch ``k`` of size ``g`` is split into ``world_size``
contiguous pieces of ``g // W`` or ``g // W + 1`` images (the first ``g % W`` ranks take one
more, :func:`shard_bounds`). So every rank runs the same number of steps (DDP needs that;
no ``Join``), each particle of an epoch is seen exactly once across ranks, and the global
batches are those of the one-process run (the tail of ``n % B`` particles is dropped in
both, a different tail every epoch). The trainer weights each rank's mean loss by
``W * b_rank / g`` so that DDP's gradient average is the mean over the global batch.
Validation batches are sharded the same way (a rank may get an empty piece and skips it).
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np
import torch

from .errors import CryolatentError, InputError
from .utils import resolve_device  # re-exported (the one --device resolver)

log = logging.getLogger("cryolatent")


class ParticleData:
    """Uniform access to particle images and CTFs.

    ``ParticleData.from_source(x)`` with x a path (.star/.cs/.mrcs, read with
    :func:`cryolatent.io.load_particles`), a ParticleSet, a numpy array or a torch tensor
    (n, box, box). ``images(idx)`` -> float32 (n, box, box) numpy; ``ctf(idx)`` -> float32
    (n, box, box) torch tensor (unshifted FFT layout) or None when the set has no CTF;
    ``ctf_param_tensor(idx)`` -> (n, 6) float64 CTF parameters (what training batches carry).
    """

    def __init__(self, array: np.ndarray | None = None, particles=None, path=None,
                 datadir=None, ctf_params=None, apix: float | None = None):
        self._array = array
        self._ps = particles
        self._path, self._datadir = path, datadir
        if array is not None:
            self.n, self.box = int(array.shape[0]), int(array.shape[-1])
        else:
            self.n, self.box = len(particles), int(particles.box)
        self.apix = apix
        self.ctf_params = ctf_params

    @classmethod
    def from_source(cls, source, datadir=None) -> "ParticleData":
        if isinstance(source, ParticleData):
            return source
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        if isinstance(source, np.ndarray):
            if source.ndim != 3 or source.shape[1] != source.shape[2]:
                raise InputError(f"images must be (n, box, box), got {source.shape}")
            return cls(array=np.ascontiguousarray(source, dtype=np.float32))
        if isinstance(source, (str, os.PathLike)):
            from .io import load_particles

            if not str(source):
                raise InputError("no particle file given")
            ps = load_particles(source, datadir=datadir)
            return cls._from_ps(ps, path=source, datadir=datadir)
        if hasattr(source, "images") and hasattr(source, "box"):
            return cls._from_ps(source)
        raise InputError(f"cannot read particles from {type(source).__name__}")

    @classmethod
    def _from_ps(cls, ps, path=None, datadir=None) -> "ParticleData":
        try:
            params = (ps.ctf_params if hasattr(ps, "ctf_params") else ps.ctf)()
        except Exception as e:  # a malformed CTF column is only an error if the CTF is used
            log.warning("CTF parameters unusable (%s); training without the CTF is possible", e)
            params = None
        apix = None
        try:
            apix = float(ps.apix)
        except Exception:
            pass
        return cls(particles=ps, path=path, datadir=datadir, ctf_params=params, apix=apix)

    # -- pickling for DataLoader workers: reopen the file instead of copying the set
    def __getstate__(self):
        d = dict(self.__dict__)
        if d["_path"] is not None:
            d["_ps"] = None
        return d

    def _particles(self):
        if self._ps is None:
            from .io import load_particles

            self._ps = load_particles(self._path, datadir=self._datadir)
        return self._ps

    def __len__(self) -> int:
        return self.n

    @property
    def particle_set(self):
        """The ParticleSet read (opened on first use), or None for an in-memory array."""
        return None if self._array is not None else self._particles()

    @property
    def names(self):
        """(n,) particle names, or None for an in-memory array."""
        if self._array is not None:
            return None
        return self._particles().names

    @property
    def has_ctf(self) -> bool:
        return self.ctf_params is not None and self.apix is not None

    @property
    def nbytes(self) -> int:
        return self.n * self.box * self.box * 4

    def images(self, idx) -> np.ndarray:
        """float32 (n, box, box) for an int array of indices (any order)."""
        if self._array is not None:
            return self._array[idx]
        return np.asarray(self._particles().images(np.asarray(idx)), dtype=np.float32)

    def read_into(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Images of sorted ``idx`` written into ``out`` (n, box, box) float32 C-contiguous.

        A ParticleSet fills ``out`` itself (:meth:`cryolatent.io.ParticleSet.images` with
        ``out=``: a single native float32 stack is gathered straight from its memory map,
        one copy, no temporary; NaN/Inf pixels raise an InputError naming the particle).
        """
        if self._array is not None:
            np.take(self._array, idx, axis=0, out=out)
            return out
        from .io import ParticleSet

        ps = self._particles()
        if isinstance(ps, ParticleSet):
            return ps.images(np.asarray(idx), out=out)
        out[...] = self.images(idx)    # another object with images(idx): one more copy
        return out

    def ctf(self, idx, device=None) -> torch.Tensor | None:
        if not self.has_ctf:
            return None
        from .ctf import compute_ctf

        return compute_ctf(self.ctf_params, self.box, self.apix, idx=np.asarray(idx),
                           device=device, dtype=torch.float32)

    def ctf_param_tensor(self, idx, device=None) -> torch.Tensor | None:
        """(n, 6) float64 CTF parameters of particles ``idx``
        (:func:`cryolatent.ctf.ctf_params_tensor`), or None when the set has no CTF."""
        if not self.has_ctf:
            return None
        from .ctf import ctf_params_tensor

        return ctf_params_tensor(self.ctf_params, self.apix, idx=np.asarray(idx), device=device)

    def value_range(self, sample: int = 1000, seed: int = 0) -> tuple[float, float]:
        """(min, max) over up to ``sample`` random images."""
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(self.n, size=min(sample, self.n), replace=False))
        x = self.images(idx)
        return float(x.min()), float(x.max())


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split: (train_idx, val_idx), each sorted int64."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def shard_bounds(g: int, world_size: int) -> np.ndarray:
    """(W + 1,) offsets splitting a global batch of ``g`` images over ``W`` ranks: rank r
    takes ``[bounds[r], bounds[r + 1])``; sizes ``g // W`` or one more (first ``g % W``)."""
    w = int(world_size)
    sizes = np.full(w, g // w, dtype=np.int64)
    sizes[: g % w] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


class _ChunkSampler:
    """Yields the index arrays of the current pass; set by the main process before each
    ``iter(loader)``, so one persistent pool of workers serves every epoch."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self):
        return len(self.chunks)


class _BatchDataset(torch.utils.data.Dataset):
    """Items are whole batches: index array -> (images (b, D, D), CTF parameters (b, 6) or
    an empty tensor)."""

    def __init__(self, data: ParticleData, with_ctf: bool):
        self.data, self.with_ctf = data, with_ctf

    def __len__(self):  # pragma: no cover - sampler-driven
        return self.data.n

    def __getitem__(self, idx):
        idx = np.sort(np.asarray(idx))
        b = self.data.box
        x = torch.empty((len(idx), b, b), dtype=torch.float32)
        if torch.utils.data.get_worker_info() is not None:
            x.share_memory_()  # read straight into shared memory: no copy on the way back
        try:
            self.data.read_into(idx, x.numpy())
            c = self.data.ctf_param_tensor(idx) if self.with_ctf else torch.empty(0)
        except CryolatentError as e:
            # handed back as a value: DataLoader would re-raise it with the worker's
            # traceback folded into the message; Batches raises it as it was
            return _WorkerError(type(e), str(e))
        return x, c


class _WorkerError:
    """A user error (CryolatentError) met while reading a batch, carried back from a
    DataLoader worker as a value (its class and one-line message)."""

    def __init__(self, cls: type, message: str):
        self.cls, self.message = cls, message

    def raise_(self):
        raise self.cls(self.message)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30


class Batches:
    """Per-epoch batches for training and validation on ``device``.

    ``resident``: None decides from the size (images up to 40 % of the free GPU
    memory, or 50 % of the free RAM for the CPU shared by the ``local_world_size`` processes
    of the node). ``rank`` / ``world_size``: this process's piece of every global batch
    (module docstring); ``batch_size`` is the global batch. Batches are ``(images (b, D, D),
    ctf_params (b, 6) float64 or None)``, what :meth:`cryolatent.models.LatentModel.forward`
    takes.
    """

    def __init__(self, data: ParticleData, train_idx: np.ndarray, val_idx: np.ndarray,
                 batch_size: int, device: torch.device, seed: int, with_ctf: bool = False,
                 num_workers: int = 2, resident: bool | None = None, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1, local_world_size: int = 1):
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self._loader = None
        self.data, self.device, self.seed = data, device, seed
        self.train_idx, self.val_idx = np.asarray(train_idx), np.asarray(val_idx)
        self.batch_size, self.with_ctf, self.num_workers = batch_size, with_ctf, num_workers
        self.drop_last = drop_last and len(self.train_idx) >= batch_size
        need = data.nbytes + (data.n * 48 if with_ctf else 0)
        if resident is None:
            frac = 0.4 if device.type == "cuda" else 0.5 / max(1, local_world_size)
            resident = need <= frac * _free_memory(device)
        self.resident = resident
        if resident:
            self._load_resident()
        log.info("data: %d particles of %d px, %s", data.n, data.box,
                 f"resident on {device}" if resident else
                 f"streamed ({num_workers} workers)")

    def _load_resident(self) -> None:
        d = self.data
        self.x = torch.empty((d.n, d.box, d.box), dtype=torch.float32, device=self.device)
        self.c = d.ctf_param_tensor(np.arange(d.n), device=self.device) if self.with_ctf else None
        step = max(1, (64 << 20) // max(1, d.box * d.box * 4))
        for i in range(0, d.n, step):
            idx = np.arange(i, min(d.n, i + step))
            self.x[i:i + len(idx)] = torch.from_numpy(d.images(idx)).to(self.device)

    # ------------------------------------------------------------------ orders
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Training indices in the order of epoch ``epoch`` (a function of seed and epoch;
        the same on every rank)."""
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(len(self.train_idx), generator=g).numpy()
        return self.train_idx[perm]

    def n_train_batches(self) -> int:
        n, b = len(self.train_idx), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _chunks(self, order: np.ndarray, drop_last: bool) -> list[np.ndarray]:
        b = self.batch_size
        stop = (len(order) // b) * b if drop_last else len(order)
        return [order[i:i + b] for i in range(0, stop, b)]

    def _local(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        if self.world_size == 1:
            return chunks
        out = []
        for c in chunks:
            b = shard_bounds(len(c), self.world_size)
            out.append(c[b[self.rank]:b[self.rank + 1]])
        return out

    def global_sizes(self, epoch: int) -> list[int]:
        """Size of every global training batch of ``epoch`` (all ranks together)."""
        return [len(c) for c in self._chunks(self.epoch_order(epoch), self.drop_last)]

    def train_indices(self, epoch: int) -> list[np.ndarray]:
        """This rank's index array for every step of ``epoch``."""
        return self._local(self._chunks(self.epoch_order(epoch), self.drop_last))

    def val_indices(self) -> list[np.ndarray]:
        """This rank's validation index arrays (possibly empty ones: skip them)."""
        return self._local(self._chunks(self.val_idx, False))

    def train(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """This rank's batches of ``epoch`` (one per global batch)."""
        return self._iterate(self.train_indices(epoch))

    def val(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """This rank's validation batches (empty pieces left out)."""
        return self._iterate([c for c in self.val_indices() if len(c)])

    def _iterate(self, chunks: list[np.ndarray]):
        if not chunks:
            return
        if self.resident:
            lens = [len(c) for c in chunks]
            flat = torch.from_numpy(np.concatenate(chunks)).to(self.device, non_blocking=True)
            for part in torch.split(flat, lens):  # device-side slices: no host sync
                x = self.x.index_select(0, part)
                c = self.c.index_select(0, part) if self.c is not None else None
                yield x, c
            return
        loader = self._streamed_loader()
        loader.sampler.chunks = chunks
        for item in loader:
            if isinstance(item, _WorkerError):
                item.raise_()
            x, c = item
            x = x.to(self.device, non_blocking=True)
            c = c.to(self.device, non_blocking=True) if self.with_ctf else None
            yield x, c


    def _streamed_loader(self):
        """One DataLoader for the whole run: persistent workers (each re-opens the stacks
        once, memory-mapped), ``prefetch_factor`` 4 batches each, pinned memory on CUDA."""
        if self._loader is None:
            cuda = self.device.type == "cuda"
            nw = max(0, int(self.num_workers))
            self._loader = torch.utils.data.DataLoader(
                _BatchDataset(self.data, self.with_ctf), batch_size=None,
                sampler=_ChunkSampler(), num_workers=nw, pin_memory=cuda,
                persistent_workers=nw > 0, prefetch_factor=4 if nw > 0 else None)
        return self._loader

__all__ = ["ParticleData", "Batches", "split_indices", "shard_bounds", "resolve_device"]
