"""Several processes, one training run: torchrun + DistributedDataParallel.

Outside torchrun nothing here does anything: one process, rank 0 of a world of 1, and the
engine behaves exactly as in the notebooks. Under ``torchrun --nproc_per_node N`` each
process joins the group (nccl on CUDA, gloo on CPU), :func:`fit` wraps the model in DDP,
:func:`make_loader` gives training a ``DistributedSampler`` (a disjoint share of every epoch)
and evaluation a :class:`ShardedBatchSampler` (whole batches, dealt round-robin), and
:func:`gather_predictions` puts every rank's predictions back in dataset order, so the
reported figures equal a single-process evaluation of the same model. Only rank 0 writes.

Batch size is per process: a global batch is ``world_size x batch_size``; the learning rate
is never rescaled behind the user's back.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from .setup import select_device


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Processes in the group (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def init_distributed(device: str = "auto", timeout_s: float = 600) -> torch.device:
    """Join the process group torchrun describes, or return the single-process device.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
    without them this only selects the device.

    Args:
        device: ``"auto"`` (CUDA, else CPU under torchrun; CUDA > MPS > CPU alone) or a device type.
        timeout_s: how long a collective may wait for a missing rank before it raises,
            so a dead peer ends the run instead of hanging it.

    Returns:
        This process's device: ``cuda:LOCAL_RANK`` on CUDA.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return select_device(device)
    if dist.is_initialized():
        raise RuntimeError("the process group is already initialised")
    if device == "auto":  # MPS has no distributed backend: CUDA, else CPU
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "mps":
        raise ValueError("torch.distributed has no MPS backend: train on CPU (gloo) or CUDA (nccl)")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s): "
                               "--nproc_per_node must not exceed the GPUs per node")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Evaluation batches dealt round-robin to the ranks, without padding or reordering.

    The batches are exactly those of a single-process ``DataLoader(shuffle=False)``, so a
    model whose output depends on the batch (GReFEL's attention over the batch) gives the
    same predictions; :func:`gather_predictions` restores the order. Unlike
    ``DistributedSampler`` no sample is duplicated to even out the shares.

    Args:
        length: dataset size. batch_size: samples per batch.
        rank, world_size: this process's share (default: from the process group).
    """

    def __init__(self, length: int, batch_size: int, rank: int | None = None, world_size: int | None = None):
        self.length, self.batch_size = length, batch_size
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self):
        for start in range(self.rank * self.batch_size, self.length, self.world_size * self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.length)))

    def __len__(self) -> int:
        batches = -(-self.length // self.batch_size)
        return len(range(self.rank, batches, self.world_size))

    def indices(self) -> np.ndarray:
        """The dataset positions this rank evaluates, in the order it sees them."""
        return np.fromiter((i for batch in self for i in batch), dtype=np.int64)


def gather_predictions(indices: np.ndarray, y_true: np.ndarray, probs: np.ndarray, loss_sum: float,
                       length: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Every rank's ``(y_true, probs)`` in dataset order, and the summed loss, on all ranks.

    Args:
        indices: dataset positions of this rank's rows (from :class:`ShardedBatchSampler`).
        y_true: N_rank labels. probs: N_rank x C probabilities. loss_sum: this rank's summed loss.
        length: dataset size; every position must be covered exactly once.
    """
    parts = [None] * get_world_size()
    dist.all_gather_object(parts, (indices, y_true, probs, loss_sum))
    idx = np.concatenate([p[0] for p in parts])
    if len(idx) != length or len(np.unique(idx)) != length:
        raise RuntimeError(f"ranks evaluated {len(idx)} rows ({len(np.unique(idx))} distinct) of {length}")
    order = np.argsort(idx, kind="stable")
    filled = [part for part in parts if len(part[0])]  # a rank may have had no batch at all
    y = np.concatenate([part[1] for part in filled])[order]
    p = np.concatenate([part[2] for part in filled])[order]
    return y, p, float(sum(part[3] for part in parts))


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), as saved in checkpoints.

    During training each rank updates its running statistics with its own batches; before
    an evaluation they must be rank 0's, or the ranks would evaluate different models.
    """
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)


def broadcast_int(value: int, device) -> int:
    """Rank 0's ``value`` on every rank (itself in one process): a decision all ranks must share."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)  # nccl broadcasts CUDA tensors only
    dist.broadcast(t, src=0)
    return int(t.item())


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; a no-op in one process)."""
    if not is_distributed():
        return list(values)
    # nccl reduces CUDA tensors only; gloo CPU ones
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
