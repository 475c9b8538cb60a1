"""The label-conditioned MLP that DDS (its `mlp` scorer) and HOST-CP (its selector) learn over examples.

s(x, y) = h(x) . E[y] + b[y]: a two-layer ReLU MLP over standardised inputs, read out by a label
embedding, so it can tell whether a label fits its example (what noisy-label detection needs). E and b
start at zero, so s is constant at step 0: uniform weights, i.e. the method starts as plain training.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from valuekit.models.builtin import Standardize


class LabelMLP(nn.Module):
    """s(x, y) = h(x) . E[y] + b[y] with h = ReLU MLP(standardise(x)); mean/std None = no standardisation."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, mean=None, std=None):
        super().__init__()
        mean = torch.zeros(in_features) if mean is None else mean
        std = torch.ones(in_features) if std is None else std
        self.body = nn.Sequential(Standardize(mean, std), nn.Linear(in_features, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.label = nn.Embedding(num_classes, hidden)
        self.label_bias = nn.Embedding(num_classes, 1)
        self._register_load_state_dict_pre_hook(_old_selector_keys)

    def forward(self, x, y):
        # the layers' functions, not their modules: seven module calls cost ~50 us a step, a third of this forward
        # on a small batch (HOST-CP and DDS score every batch); same parameters, same numbers
        std, lin1, lin2 = self.body[0], self.body[1], self.body[3]
        h = F.relu(F.linear(F.relu(F.linear((x - std.mean) / std.std, lin1.weight, lin1.bias)), lin2.weight, lin2.bias))
        return (h * F.embedding(y, self.label.weight)).sum(-1) + F.embedding(y, self.label_bias.weight).squeeze(-1)


def _old_selector_keys(state, prefix, *args):
    """Checkpoints of HOST-CP runs made before the two scorers were merged: mean/std at the top and the
    Linear layers at body.0/body.2 (now body.0 is the standardisation, the Linear layers body.1/body.3)."""
    if prefix + "mean" in state and prefix + "body.0.mean" not in state:
        moved = {}
        for key in [k for k in state if k.startswith(prefix)]:
            rest = key[len(prefix):]
            if rest in ("mean", "std"):
                moved[prefix + "body.0." + rest] = state.pop(key)
            elif rest.startswith(("body.0.", "body.2.")):
                i = int(rest.split(".")[1])
                moved[prefix + f"body.{i + 1}." + rest.split(".", 2)[2]] = state.pop(key)
        state.update(moved)


def label_mlp(in_features: int, num_classes: int, hidden: int, *, mean=None, std=None,
              generator: torch.Generator, device) -> LabelMLP:
    """A LabelMLP initialised from `generator` (PyTorch's default Linear init, drawn from the run's
    generator) with a zero label read-out: constant scores, uniform weights at step 0."""
    net = LabelMLP(in_features, num_classes, hidden, mean, std)
    for m in net.body:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(m.weight.shape[1])
            nn.init.uniform_(m.bias, -bound, bound, generator=generator)
    with torch.no_grad():
        net.label.weight.zero_()
        net.label_bias.weight.zero_()
    return net.to(device)


class TokenBagScorer(nn.Module):
    """DDS's scorer for causal-LM instruction rows: s(x) = MLP(bag(x)), bag(x) = the row's token-id frequencies
    hashed into `buckets` bins (padding ignored; prompt and response, which x holds both of). y is not read: the
    response is already in x. The read-out starts at zero (uniform p at step 0)."""

    def __init__(self, buckets: int, hidden: int):
        super().__init__()
        self.buckets = buckets
        self.net = nn.Sequential(nn.Linear(buckets, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def bag(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        real = ids >= 0  # PAD_INPUT after each row's end is negative
        counts = torch.zeros(len(x), self.buckets, device=x.device).scatter_add_(
            1, ids.clamp_min(0) % self.buckets, real.float())
        return counts / real.sum(1, keepdim=True).clamp_min(1)

    def forward(self, x, y=None):
        return self.net(self.bag(x)).squeeze(1)


def token_bag_scorer(
    vocab: int, hidden: int, *, generator: torch.Generator, device, buckets: int = 512
) -> TokenBagScorer:
    """A TokenBagScorer with min(vocab, buckets) bins, initialised from `generator`, zero read-out."""
    net = TokenBagScorer(min(vocab, buckets), hidden)
    first, last = net.net[0], net.net[2]
    nn.init.kaiming_uniform_(first.weight, a=math.sqrt(5), generator=generator)
    nn.init.uniform_(first.bias, -1 / math.sqrt(first.weight.shape[1]), 1 / math.sqrt(first.weight.shape[1]),
                     generator=generator)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return net.to(device)
