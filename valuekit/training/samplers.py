"""Samplers: which rows each step trains on (uniform passes, length buckets for token rows); their state is
checkpointed with the run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from valuekit.training.context import TrainContext


@runtime_checkable
class Sampler(Protocol):
    """Draws the row numbers of each (global) batch; its state is checkpointed with the run."""

    def next(self, size: int) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def default_sampler(ctx: TrainContext):
    """RandomSampler; for causal-LM token tables, length-bucketed batches
    (valuekit.training.samplers.LengthBucketSampler)."""
    from valuekit.models.lm import is_lm, token_lengths
    from valuekit.training.samplers import LengthBucketSampler

    if is_lm(ctx.config.model):
        return LengthBucketSampler(token_lengths(ctx.x), ctx.generator)
    return RandomSampler(ctx.n, ctx.generator)


def draw_from_passes(sampler, size: int, new_pass) -> torch.Tensor:
    """`size` row indices read from `sampler.perm` at `sampler.cursor`; when a pass runs out (or none was drawn
    yet, perm None) `new_pass()` gives the next one, so a batch may straddle two passes."""
    out = []
    while size > 0:
        if sampler.perm is None or sampler.cursor >= len(sampler.perm):
            sampler.perm, sampler.cursor = new_pass(), 0
        take = sampler.perm[sampler.cursor: sampler.cursor + size]
        sampler.cursor += len(take)
        size -= len(take)
        out.append(take)
    return torch.cat(out)


class RandomSampler:
    """Endless shuffled passes over the rows; a batch may straddle two passes."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.cursor = 0

    def next(self, size: int) -> torch.Tensor:
        return draw_from_passes(self, size, lambda: torch.randperm(self.n, generator=self.g))

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.cursor = state["perm"], int(state["cursor"])


class LengthBucketSampler:
    """Length bucketing for token tables, so padding does not dominate a batch: each pass shuffles the rows,
    sorts windows of `window` batches by length, cuts them into batches and shuffles the batches. Every row is
    drawn once per pass, as with the loop's RandomSampler; batches may straddle two passes."""

    def __init__(self, lengths: torch.Tensor, generator: torch.Generator, *, window: int = 50):
        self.lengths, self.g, self.window = lengths.cpu(), generator, window
        self.perm, self.cursor = None, 0

    def _new_pass(self, size: int) -> torch.Tensor:
        n = len(self.lengths)
        perm = torch.randperm(n, generator=self.g)
        span = size * self.window
        parts = []
        for i in range(0, n, span):
            chunk = perm[i: i + span]
            parts.append(chunk[torch.argsort(self.lengths[chunk], stable=True)])
        order = torch.cat(parts)
        batches = list(torch.split(order, size))
        pick = torch.randperm(len(batches), generator=self.g).tolist()
        return torch.cat([batches[j] for j in pick])

    def next(self, size: int) -> torch.Tensor:
        return draw_from_passes(self, size, lambda: self._new_pass(size))

    def state_dict(self) -> dict:
        return {"perm": torch.empty(0, dtype=torch.int64) if self.perm is None else self.perm.clone(),
                "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.perm = state["perm"] if len(state["perm"]) else None
        self.cursor = int(state["cursor"])
