"""Models of the kind users bring, given to valuekit as `usermodels:FACTORY` (tests put this folder on the path)."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    """conv-BN-ReLU stem, one residual block, global average pool, BatchNorm1d, linear head."""

    def __init__(self, num_classes: int, channels: int = 1, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block = Residual(width)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(width))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.stem(x))))


def resnet(num_classes, input_shape):
    return TinyResNet(num_classes, channels=input_shape[0])


class TextClassifier(nn.Module):
    """Embedding + LayerNorm + one self-attention layer + mean pooling + linear head (token ids in, logits out)."""

    def __init__(self, num_classes: int, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):
        ids = ids.long()
        h = self.norm(self.emb(ids))
        a, _ = self.attn(h, h, h, key_padding_mask=ids == 0, need_weights=False)
        mask = (ids != 0).unsqueeze(-1).to(h.dtype)
        return self.head(((h + a) * mask).sum(1) / mask.sum(1).clamp_min(1))


def text(num_classes, input_shape):
    return TextClassifier(num_classes)


def raises(num_classes, input_shape):
    raise RuntimeError("no GPU here")


def not_a_module(num_classes, input_shape):
    return "resnet18"


def wrong_output(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes + 1))
