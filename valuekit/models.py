"""Small model builders chosen by name and sized from the data: linear, mlp, cnn.

Every classifier is `body` (feature extractor, its output is the model's internal state that
LRDI's teacher reads) followed by `head` (one Linear layer). Inputs are standardised inside the
model with statistics of the training table, so callers pass raw features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODELS = ("linear", "mlp", "cnn")


class Standardize(nn.Module):
    """(x - mean) / std with fixed buffers computed from the training table."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """x -> head(body(x)); `features(x)` gives the body output (the student's internal state)."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


class Reshape(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise Linear/Conv layers from `generator` (PyTorch's default scheme, no global RNG)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)


def build_model(
    name: str,
    *,
    in_features: int,
    num_classes: int,
    image_shape: tuple[int, ...] | None = None,
    hidden: int = 128,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Classifier:
    """Build `linear`, `mlp` (two hidden ReLU layers) or `cnn` (two 3x3 convs, needs image_shape)."""
    mean = torch.zeros(in_features) if mean is None else mean
    std = torch.ones(in_features) if std is None else std
    norm = Standardize(mean, std)
    if name == "linear":
        body, width = nn.Sequential(norm), in_features
    elif name == "mlp":
        body = nn.Sequential(norm, nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        width = hidden
    elif name == "cnn":
        if image_shape is None:
            raise ValueError("model 'cnn' needs image-shaped features (a list column with an image shape)")
        c = image_shape[0] if len(image_shape) == 3 else 1
        hw = image_shape[-2:]
        body = nn.Sequential(
            norm, Reshape((c, *hw)),
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2 if min(hw) >= 16 else 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * 16, hidden), nn.ReLU(),
        )
        width = hidden
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = Classifier(body, nn.Linear(width, num_classes))
    if generator is not None:
        _init_(model, generator)
    return model


def feature_stats(x: torch.Tensor, image_shape=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean/std of the training features (one scalar pair for images, so convs see one scale)."""
    if image_shape is not None:
        mean = x.mean().expand(x.shape[1]).clone()
        std = x.std().clamp_min(1e-6).expand(x.shape[1]).clone()
    else:
        mean = x.mean(0)
        std = x.std(0).nan_to_num(1.0).clamp_min(1e-6)
    return mean, std
