"""Trainers: one module per method, all driven by the loop in `valuekit.trainers.base`."""

from valuekit.trainers.base import METHODS, Batch, StepRecord, TrainConfig, TrainContext, Trainer, train

__all__ = ["METHODS", "Batch", "StepRecord", "TrainConfig", "TrainContext", "Trainer", "train"]
