"""Mixed precision and device memory for the training loop.

`--precision bf16` / `fp16` runs every method's step under `torch.autocast` (matmuls and convolutions in
the low precision, reductions and losses in float32; parameters, optimizer state and per-example
statistics stay float32). fp16 can underflow gradients, so it also needs a gradient scaler
(`torch.amp.GradScaler`): the context's `scale(loss)` / `optimizer_step(opt)` apply it, and only methods
that declare `FP16 = True` (their step goes through those two calls) accept fp16; the others take bf16.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context of one step (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str):
    """A GradScaler for fp16, else None."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since the last reset (MiB); None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
