"""Data-parallel training under PyTorch's own launcher (``torchrun``), nothing home-made.

    torchrun --nproc_per_node 4 --no-python cryolatent train particles.star -o run1 ...

``torchrun`` starts one process per GPU and sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``
(and ``MASTER_ADDR`` / ``MASTER_PORT`` or its rendezvous). :func:`setup` reads them,
initialises NCCL on GPUs and gloo on the CPU, and returns a :class:`DistContext` that the
training loop (:mod:`cryolatent.train`) uses for the few collective operations it needs:

* :meth:`DistContext.wrap` — ``DistributedDataParallel`` around the model (DDP wraps
  ``forward``, which is the model's training objective; ``infer`` / ``generate`` stay on the
  unwrapped model). Buffers are broadcast only when the model has running statistics
  (BatchNorm: IRL-INR); TARGET-VAE's buffers are constants and cost no collective.
* :meth:`DistContext.agree` — one ``all_gather`` of every rank's status and fingerprint
  (configuration without the per-rank fields, particle count, box, pixel size, a hash of the
  particle names and of a few images): a rank that failed during set-up or that disagrees
  makes every rank raise the same one-line :class:`~cryolatent.errors.CryolatentError`
  instead of hanging in the first collective.
* :meth:`DistContext.all_reduce_sum` — loss sums once per epoch; the per-step non-finite
  flag (so that every rank skips the same Adam update).

``WORLD_SIZE`` 1 (or unset) means a plain single process: no process group and no DDP, so a
one-GPU ``torchrun`` costs nothing (``CRYOLATENT_FORCE_DDP=1`` wraps anyway, to measure
DDP's own overhead on one GPU).
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import logging
import os
import socket
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import CryolatentError

log = logging.getLogger("cryolatent")

#: TrainConfig fields that may differ between ranks (per node or per process)
RANK_LOCAL_FIELDS = ("device", "num_workers", "command", "input", "datadir", "compile")
TIMEOUT_MIN = float(os.environ.get("CRYOLATENT_DIST_TIMEOUT_MIN", "30"))


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    try:
        return int(v) if v != "" else default
    except ValueError:
        raise CryolatentError(f"environment variable {name}={v!r} is not an integer")


@dataclass
class DistContext:
    """Where this process stands. ``enabled`` is False for a plain single process."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = False
    _owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (no-op single-process); returns ``t``. Asynchronous on
        NCCL (queued on the stream, no host synchronisation)."""
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t

    def gather_objects(self, obj) -> list:
        """``obj`` of every rank (picklable), on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (e.g. BatchNorm running statistics) to every rank."""
        if not self.enabled:
            return
        for b in module.buffers():
            torch.distributed.broadcast(b.data, src=0)

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module) -> nn.Module:
        """The model in DDP when distributed (its ``forward(images, ctf_params)`` is the
        training objective, :meth:`cryolatent.models.LatentModel.forward`), else the model."""
        mod = model
        if not self.enabled:
            return mod
        from torch.nn.parallel import DistributedDataParallel as DDP

        has_stats = any(isinstance(m, nn.modules.batchnorm._NormBase)
                        and m.track_running_stats for m in model.modules())
        ids = [self.device.index] if self.device.type == "cuda" else None
        kw = {"broadcast_buffers": has_stats}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            kw = {"forward_sync_buffers": has_stats}  # newer name; init sync kept either way
        return DDP(mod, device_ids=ids, output_device=ids[0] if ids else None,
                   find_unused_parameters=False, gradient_as_bucket_view=True, **kw)

    # ------------------------------------------------------------------ agreement
    def agree(self, error: str | None, fingerprint: dict | None) -> None:
        """Raise one line on every rank if any rank failed or the fingerprints differ.

        ``error``: this rank's set-up error message (None when fine); ``fingerprint``: a
        dict of plain values that must be equal on every rank (see :func:`fingerprint`).
        """
        if not self.enabled:
            if error:
                raise CryolatentError(error)
            return
        mine = {"rank": self.rank, "host": socket.gethostname(), "error": error,
                "fp": fingerprint}
        allr = self.gather_objects(mine)
        if error:
            raise CryolatentError(error)
        for r in allr:
            if r["error"]:
                raise CryolatentError(f"rank {r['rank']} ({r['host']}) failed: {r['error']}")
        ref = allr[0]
        for r in allr[1:]:
            diff = _first_difference(ref["fp"], r["fp"])
            if diff:
                raise CryolatentError(
                    f"ranks disagree: rank {r['rank']} ({r['host']}) has {diff[0]}={diff[2]!r} "
                    f"but rank 0 ({ref['host']}) has {diff[1]!r}; launch every process with "
                    "the same command and the same particle set")

    def close(self) -> None:
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._owns_group = False


_DATA_KEYS = ("particles", "box", "apix", "names_sha256", "images_sha256")


def _first_difference(a: dict, b: dict):
    """(key, a's value, b's value) of the first difference: the particle set first."""
    keys = [k for k in _DATA_KEYS if k in a or k in b]
    keys += sorted((set(a) | set(b)) - set(keys))
    for k in keys:
        if a.get(k) != b.get(k):
            return k, a.get(k), b.get(k)
    return None


def env_world() -> tuple[int, int, int, int]:
    """(world_size, rank, local_rank, local_world_size) from torchrun's variables."""
    ws = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    lr = _env_int("LOCAL_RANK", rank if ws > 1 else 0)
    lws = _env_int("LOCAL_WORLD_SIZE", ws)
    if ws < 1 or not (0 <= rank < ws):
        raise CryolatentError(f"RANK={rank} is not in [0, WORLD_SIZE={ws})")
    return ws, rank, lr, lws


def setup(device_name: str = "auto") -> DistContext:
    """Read torchrun's environment and initialise the process group (if not already done).

    Device: under DDP ``auto``/``cuda`` become ``cuda:LOCAL_RANK``; ``cpu`` uses gloo.
    """
    from .utils import resolve_device

    ws, rank, lrank, lws = env_world()
    force = os.environ.get("CRYOLATENT_FORCE_DDP", "") not in ("", "0")
    if ws == 1 and not force:
        return DistContext(device=resolve_device(device_name))
    want = resolve_device(device_name)
    if want.type == "cuda":
        n = torch.cuda.device_count()
        if lrank >= n:
            raise CryolatentError(f"LOCAL_RANK={lrank} but only {n} GPU(s) are visible on "
                                  f"{socket.gethostname()}; use --nproc_per_node <= {n}")
        if want.index is not None and want.index != lrank and ws > 1:
            log.warning("--device %s ignored under torchrun: rank %d uses cuda:%d", want,
                        rank, lrank)
        device = torch.device("cuda", lrank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    ctx = DistContext(world_size=ws, rank=rank, local_rank=lrank, local_world_size=lws,
                      backend=backend, device=device, enabled=True)
    if not torch.distributed.is_initialized():
        for v in ("MASTER_ADDR", "MASTER_PORT"):
            if v not in os.environ:
                raise CryolatentError(f"WORLD_SIZE={ws} but {v} is not set: launch with "
                                      "torchrun (see docs/distributed.md)")
        kw = {"device_id": device} if backend == "nccl" else {}
        try:
            torch.distributed.init_process_group(
                backend, timeout=datetime.timedelta(minutes=TIMEOUT_MIN), **kw)
        except Exception as e:  # noqa: BLE001 - rendezvous failures: one line
            raise CryolatentError(f"cannot join the process group ({backend}, "
                                  f"{os.environ.get('MASTER_ADDR')}:"
                                  f"{os.environ.get('MASTER_PORT')}): {e}".splitlines()[0])
        ctx._owns_group = True
    elif torch.distributed.get_world_size() != ws:
        raise CryolatentError("an initialised process group does not match WORLD_SIZE")
    return ctx


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s sampling RNG (Gumbel noise, views): distinct per rank."""
    return (int(seed) * 1_000_003 + 7919 * (int(rank) + 1)) % (2 ** 63)


def fingerprint(cfg_dict: dict, data) -> dict:
    """What every rank must agree on: the configuration without :data:`RANK_LOCAL_FIELDS`
    (one hash, plus the values for naming the first difference) and the particle set
    (count, box, pixel size, hash of the names, hash of up to 8 images spread over the set).
    """
    conf = {k: v for k, v in cfg_dict.items() if k not in RANK_LOCAL_FIELDS and k != "extra"}
    conf["extra"] = json.dumps(cfg_dict.get("extra", {}), sort_keys=True, default=str)
    fp = {f"config.{k}": v for k, v in conf.items()}
    fp["particles"] = int(data.n)
    fp["box"] = int(data.box)
    fp["apix"] = None if data.apix is None else round(float(data.apix), 6)
    names = getattr(data, "names", None)
    h = hashlib.sha256()
    if names is not None:
        for nm in np.asarray(names).astype(str):
            h.update(nm.encode())
            h.update(b"\0")
        fp["names_sha256"] = h.hexdigest()[:16]
    idx = np.unique(np.linspace(0, data.n - 1, num=min(8, data.n)).round().astype(np.int64))
    fp["images_sha256"] = hashlib.sha256(
        np.ascontiguousarray(data.images(idx), dtype=np.float32).tobytes()).hexdigest()[:16]
    return fp


__all__ = ["DistContext", "setup", "fingerprint", "rank_seed", "env_world",
           "RANK_LOCAL_FIELDS"]
