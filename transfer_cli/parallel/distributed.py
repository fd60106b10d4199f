"""Data-parallel training under torchrun: one process per device, one run, rank 0 writes.

`torchrun --standalone --nproc_per_node=N -m transfer_cli train ...` starts N copies of the
command; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without
them (or with WORLD_SIZE=1) every function here is a no-op and a run is the plain
single-process one, unchanged. The choices, in one place:

- One run directory: the process group is set up before Hydra composes, and a Hydra
  callback (`config.callbacks.AgreeOnRunDir`, named in conf/train.yaml) makes `${now:...}` return rank 0's
  time on every rank, so `outputs/runs/${now:...}` (or any pattern, or a sweep dir) is one
  directory. Files, train.log and checkpoints come from rank 0; the other ranks print
  nothing to stdout and log warnings only (in a single run they write no `.hydra/` either).
- The batch: `trainer.batch_size` is the global batch; each of N processes loads
  batch_size / N. Steps per epoch, schedules and lrs are those of a single-process run.
- Sampling: the train EpochSampler keeps its (seed, epoch) permutation, drops its tail to a
  multiple of N and gives rank r the positions r, r+N, ...; step i of the N processes
  together covers exactly the samples of step i of a single process, and a resume
  mid-epoch skips step * batch_size / N samples on each rank. Validation gives rank r the
  indices r, r+N, ... (each image once); loss * n, top-k hits and counts are summed with
  all_reduce, so val metrics do not depend on N.
- Frozen parameters: the model is wrapped in DistributedDataParallel at every stage
  boundary, after the stage has set requires_grad. DDP registers and all-reduces only the
  parameters that require grad when it is built, so frozen groups cost no communication and
  find_unused_parameters stays False (no extra graph traversal per step). Re-wrapping
  re-broadcasts rank 0's weights, which the ranks share anyway. Head-only stages on cached
  features (trainer.cache_features) wrap the head alone; each rank computes the features.
- BatchNorm: DDP broadcasts rank 0's buffers before each forward; before validation the
  buffers are broadcast once more, so every rank validates (and rank 0 checkpoints) the
  same model. Statistics are per-process (batch_size / N images), not synchronized.
- Imports: torch loads only where a process group is wanted (WORLD_SIZE > 1) or already up,
  so a single process that does no training (a sweep job that finds its run finished,
  `transfer train --help`) never pays for it.
- Randomness: augmentation is seeded per sample from (seed, epoch, index), so ranks differ
  because they draw different samples, and it does not depend on N; after the model is built
  each rank reseeds with seed + rank, so dropout and MixUp differ between ranks; checkpoints
  keep every rank's RNG state, so a resume with the same N is exact.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _export_submitit_env() -> None:
    """A submitit job (hydra/launcher=submitit_slurm|submitit_local) with several tasks: the torchrun variables."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local"):
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export()


def init_from_env() -> bool:
    """Join the process group torchrun describes (idempotent); False when this is a single process."""
    _export_submitit_env()
    if _env_int("WORLD_SIZE", 1) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    backend = os.environ.get("TRANSFER_DIST_BACKEND")
    if torch.cuda.is_available():
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
        backend = backend or "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend or "gloo")
    atexit.register(shutdown)
    if not is_main():
        _quiet_stdout()
    return True


def _group() -> Any:
    """torch.distributed with a process group up, else None (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def shutdown() -> None:
    dist = _group()
    if dist is not None:
        dist.destroy_process_group()


def active() -> bool:
    """True in a process group of more than one process."""
    dist = _group()
    return dist is not None and dist.get_world_size() > 1


def rank() -> int:
    return _group().get_rank() if active() else 0


def world_size() -> int:
    return _group().get_world_size() if active() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        _group().barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads, caches); the others run it once it is done, or has failed."""
    if not active():
        yield
        return
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not active():
        return value
    holder = [value]
    _group().broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    _group().all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (and return it)."""
    if active():
        dist = _group()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (a collective: every rank must call it)."""
    if not active():
        return flag
    import torch

    value = torch.tensor([1 if flag else 0], device=device, dtype=torch.int64)
    return bool(all_reduce_sum(value).item())


def device_for(device: torch.device) -> torch.device:
    """Under torchrun each process drives the GPU of its local rank."""
    if not active() or device.type != "cuda":
        return device
    import torch

    index = local_rank() % torch.cuda.device_count()
    if device.index is not None and device.index != index:
        log.warning("trainer.device=%s under torchrun: rank %d uses cuda:%d (its LOCAL_RANK)", device, rank(), index)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def per_process_batch(batch_size: int, what: str = "trainer.batch_size") -> int:
    """This process's share of a global batch."""
    n = world_size()
    if batch_size % n:
        from transfer_cli.core.errors import TransferError

        raise TransferError(f"{what}={batch_size} is the global batch and must divide among the {n} processes "
                            f"(use a multiple of {n})")
    return batch_size // n


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in DistributedDataParallel over the parameters that require grad now (call after freezing)."""
    if not active() or not any(p.requires_grad for p in module.parameters()):
        return module
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # buffers: rank 0's, broadcast before each forward
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (compiled or not); any other module unchanged."""
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(module, "_orig_mod", None)
    if isinstance(inner, DistributedDataParallel):
        return inner.module
    return module.module if isinstance(module, DistributedDataParallel) else module


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if not active():
        return
    import torch

    dist = _group()
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


# --------------------------------------------------------------------------- output of ranks > 0


def _quiet_stdout() -> None:
    """Ranks > 0 print nothing to stdout (their stderr stays: errors show from every rank)."""
    original = builtins.print

    def print_main_only(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("file") not in (None, sys.stdout):
            original(*args, **kwargs)

    builtins.print = print_main_only


def quiet_logging() -> None:
    """Ranks > 0: no log file, warnings and errors only on the console."""
    if is_main():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)
