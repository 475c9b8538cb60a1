"""Per-example losses: the one cross-entropy every method, the loop and the gradient dots use (token
sequences: mean over the scored tokens of each row)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def per_example_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per example (the loop's, via trainers.api); logits (N, V, L): mean NLL of the targets != -100."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, y, reduction="none")
    tok = F.cross_entropy(logits, y, reduction="none", ignore_index=-100)  # (N, L), 0 where ignored
    return tok.sum(1) / (y != -100).sum(1).clamp_min(1)
