"""What the tensor stand-ins whose rows are built when indexed share (valuekit.data.images.ImageRows: encoded images,
valuekit.data.token_rows.TokenRows: packed token ids): reading an index and handing a batch to the device."""

from __future__ import annotations

import numpy as np


def row_index(key, n: int) -> np.ndarray:
    """Row numbers (int64, negatives wrapped) of a slice, an integer/bool array or tensor over `n` rows."""
    import torch

    if isinstance(key, slice):
        return np.arange(n)[key]
    if isinstance(key, torch.Tensor):
        key = key.detach().cpu().numpy()
    key = np.asarray(key)
    if key.dtype == bool:
        return np.flatnonzero(key)
    return np.where(key < 0, key + n, key)


def to_device(rows: np.ndarray, device):
    """A built batch as a tensor on `device` (through pinned memory, non-blocking, on CUDA)."""
    import torch

    out = torch.from_numpy(rows)
    if device.type == "cuda":
        return out.pin_memory().to(device, non_blocking=True)
    return out
