"""Trainers: one module per method, all driven by the loop in `valuekit.trainers.base`.

Names are loaded lazily so that looking up which methods exist does not import torch.
"""

_BASE = ("METHODS", "Batch", "StepRecord", "TrainConfig", "TrainContext", "Trainer", "train", "make_trainer")


def __getattr__(name):
    if name in _BASE:
        from valuekit.trainers import base

        return getattr(base, name)
    raise AttributeError(f"module 'valuekit.trainers' has no attribute {name!r}")


__all__ = list(_BASE)
