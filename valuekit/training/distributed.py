"""Process-group helpers for running the one training loop under `torchrun` (several processes, GPUs, nodes).

Model: every rank holds a full replica of the method's state (model, scorer/teacher, optimizers,
per-example accumulators) and the same seeded CPU generator. Each step all ranks draw the same
*global* batch of `batch_size x world_size` rows and each takes its own contiguous slice, so a
W-process run computes what a 1-process run with a W-times larger batch computes (for the
mean-reduced losses every method uses), up to floating-point summation order.

Gradients are averaged with explicit all-reduces (`sync_grads_`) rather than by wrapping the model in
`DistributedDataParallel`. DDP only reduces gradients produced by `.backward()` through its own
`forward()`, whereas the methods call `model.features`/`model.head`, differentiate with
`torch.autograd.grad` and run the model functionally (`torch.func.functional_call`) for virtual
steps, none of which go through DDP's reducer. An all-reduce (mean) of each parameter's `.grad`
after the backward is exactly DDP's averaging; what it gives up is DDP's overlap of communication
with the backward pass, which matters only for large models.

Where a method's objective couples examples of different ranks (a softmax over the batch, a batch-
mean normalisation, a virtual step on the whole batch's gradient), it uses `all_reduce_sum` below,
an all-reduce whose backward is again an all-reduce: with each rank differentiating its *share*
of the global objective (shares sum to the objective), rank r then holds the derivative of the
whole objective with respect to its own leaves, and replicated parameters' gradients are summed.

Everything here is a no-op (or the identity) for one process, so single-process runs are unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank (GPU index on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world size from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device) -> bool:
    """Start the process group (gloo on CPU, nccl on CUDA) unless the caller already did; True if we started it."""
    if not info.enabled or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def shutdown(started: bool) -> None:
    if started and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- collectives (no-ops for one process)


def _comm_device(like: torch.device) -> torch.device:
    """Where a collective's buffer must live: the current CUDA device for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if like.type == "cpu" else like


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    dev = _comm_device(tensors[0].device)
    return torch.cat([t.reshape(-1).to(device=dev, dtype=torch.float64) for t in tensors])


def _unflat_(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i: i + n].view_as(t).to(t.dtype))
        i += n


def all_reduce_(tensors: list[torch.Tensor], *, op: str = "sum", world_size: int) -> None:
    """In-place sum or mean over ranks of several tensors, in one collective (float64 on the wire, so
    float32 tensors are summed without extra rounding before they are written back)."""
    tensors = [t for t in tensors if t is not None]
    if world_size <= 1 or not tensors:
        return
    flat = _flat(tensors)
    dist.all_reduce(flat)
    if op == "mean":
        flat /= world_size
    _unflat_(flat, tensors)


def all_reduce_max(value: torch.Tensor, *, world_size: int) -> torch.Tensor:
    if world_size <= 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def gather(tensor: torch.Tensor, *, world_size: int) -> torch.Tensor:
    """Concatenation along dim 0 of every rank's tensor (same shape on every rank), rank 0's rows first."""
    if world_size <= 1:
        return tensor
    t = tensor.detach().contiguous().to(_comm_device(tensor.device))
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return torch.cat(parts).to(tensor.device)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward is the same sum of the incoming gradients (each rank's share of the
    objective depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(tensor: torch.Tensor, *, world_size: int) -> torch.Tensor:
    """Differentiable sum over ranks (identity for one process)."""
    if world_size <= 1:
        return tensor
    return _AllReduceSum.apply(tensor)


def all_reduce_sum_list(tensors: list[torch.Tensor], *, world_size: int) -> list[torch.Tensor]:
    """Differentiable sum over ranks of several tensors, in one collective."""
    if world_size <= 1:
        return list(tensors)
    flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]), world_size=world_size)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i: i + t.numel()].view_as(t))
        i += t.numel()
    return out


def broadcast_object(obj, *, world_size: int):
    """Rank 0's Python object on every rank."""
    if world_size <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_decides(decide, *, info: DistInfo, errors: dict[str, type] | None = None):
    """(local, shared): rank 0 alone runs `decide() -> (local, shared)` (e.g. take a lock, check a
    directory) and tells every rank `shared` (a small picklable object); the other ranks get local=None.
    When `decide` raises on rank 0, every rank raises the same kind of error (from `errors` by class
    name, RuntimeError otherwise) with the same message, so all processes stop together."""
    if not info.enabled:
        return decide()
    status: dict = {"error": None, "shared": None}
    local = None
    if info.is_main:
        try:
            local, status["shared"] = decide()
        except BaseException as exc:
            status["error"] = (type(exc).__name__, str(exc))
            broadcast_object(status, world_size=info.world_size)
            raise
    status = broadcast_object(status, world_size=info.world_size)
    if status["error"]:
        kind, msg = status["error"]
        raise (errors or {}).get(kind, RuntimeError)(msg)
    return local, status["shared"]


def agree(values: list[float], *, device: torch.device, world_size: int) -> list[float]:
    """Sums over ranks of a few numbers, in one float64 collective (the values themselves for one process):
    how a step's global loss/accuracy and any rank's divergence or stop request become everyone's."""
    if world_size <= 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce_([t], world_size=world_size)
    return t.tolist()


def replicas_agree(state, *, device: torch.device, world_size: int) -> bool:
    """True when every rank holds the same (nested) state, compared by `fingerprint` (True for one process)."""
    if world_size <= 1:
        return True
    every = gather(fingerprint(state)[None].to(device), world_size=world_size).cpu()
    return all(torch.equal(every[0], r) for r in every[1:])


def barrier(*, world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def fingerprint(state) -> torch.Tensor:
    """Two float64 numbers per tensor/number of a (nested) state dict: equal on every rank iff the replicas
    agree (up to an astronomically unlikely collision)."""
    out: list[torch.Tensor] = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            f = torch.nan_to_num(v.detach().double().reshape(-1).cpu(), nan=1e300, posinf=1e301, neginf=-1e301)
            k = torch.arange(1, len(f) + 1, dtype=torch.float64) % 101
            out.append(torch.stack([f.sum(), (f * k).sum()]) if len(f) else torch.zeros(2, dtype=torch.float64))
        elif isinstance(v, dict):
            for key in sorted(v, key=str):
                walk(v[key])
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, (bool, int, float)):
            out.append(torch.tensor([float(v), 0.0], dtype=torch.float64))

    walk(state)
    return torch.cat(out) if out else torch.zeros(2, dtype=torch.float64)
