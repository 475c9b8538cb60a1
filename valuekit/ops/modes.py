"""Module modes for the methods: the one eval-mode switch (`eval_mode`, every submodule's flag restored as
found) and `no_running_stats_update`, under which the forwards a method runs besides its model step leave
BatchNorm's running statistics alone. Imports only torch (used by gradients, models and the trainers)."""

from __future__ import annotations

import torch
from torch import nn


class eval_mode:
    """Context manager: the given modules (None skipped) and all their submodules in eval mode for the block;
    on exit every submodule's train/eval flag is restored exactly as found (a submodule that was in eval mode
    inside a training model stays in eval mode). ``no_grad=True`` also turns autograd off for the block.
    The one mode switch of valuekit (scoring, evaluation, frozen batch norm, Taylor dots)."""

    def __init__(self, *modules: nn.Module | None, no_grad: bool = False):
        self.modules = [m for m in modules if m is not None]
        self.no_grad = torch.no_grad() if no_grad else None

    def __enter__(self):
        self.was = [(sub, sub.training) for m in self.modules for sub in m.modules()]
        for m in self.modules:
            m.eval()
        if self.no_grad is not None:
            self.no_grad.__enter__()
        return self

    def __exit__(self, *exc):
        if self.no_grad is not None:
            self.no_grad.__exit__(*exc)
        for sub, training in self.was:
            sub.training = training
        return False


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


class no_running_stats_update:
    """Context manager for the forwards a method runs besides its model step (dev batches, look-ahead / virtual
    steps, reward probes): every batch-norm layer of ``modules`` normalises exactly as it would without it
    (training mode: the batch's own mean and biased variance, so forward values and every gradient through
    them, first and second order, are unchanged), but its running statistics (``running_mean``,
    ``running_var``, ``num_batches_tracked``) end the block as they began, so the evaluated and exported model
    has seen only its training batches.  How: each layer's running buffers are swapped for copies for the
    block (a training-mode forward, direct or through ``torch.func.functional_call`` without buffer
    overrides, updates the copies) and the original tensors are put back on exit, untouched; a graph built
    in the block keeps the copies it saved, so a later backward is unaffected.

    Why batch statistics and not eval mode (running statistics) for these forwards: the dev gradient of DDS
    (Wang et al. 2020, Alg. 1 line 9) and the look-ahead meta-gradients of L2RW, MW-Net, LRDI and HOST-CP
    differentiate the training-mode forward; in this block they equal that computation bit for bit (with
    the buffers restored), while eval-mode statistics change the dev loss and its gradient (measured on a
    tiny BatchNorm model: tests/test_bn_leak.py)."""

    def __init__(self, *modules: nn.Module | None):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.saved = []
        for m in self.modules:
            for sub in m.modules():
                if not isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    continue
                for name in _RUNNING:
                    buf = sub._buffers.get(name)
                    if buf is not None:
                        self.saved.append((sub, name, buf))
                        sub._buffers[name] = buf.clone()
        return self

    def __exit__(self, *exc):
        for sub, name, buf in reversed(self.saved):
            sub._buffers[name] = buf
        return False
