"""Streamed training rows: each step's rows are decoded from the encoded table (`valuekit.data.images.ImageRows`)
by a pool of worker processes while the previous step trains, then copied to the device (pinned memory and
a non-blocking copy on CUDA).

Why not `torch.utils.data.DataLoader`: its prefetching draws the batch indices of later steps ahead of time,
from the run's one generator, which the methods also draw from (dev batches, noise); that would change the
run's random stream and what a checkpoint has to hold. Here the loop draws every step's rows itself, exactly
as on the in-memory path, and the prefetch is speculative: the next step's rows are predicted from a copy of
the sampler and generator, decoded in the background, and used only if the real draw is identical
(otherwise they are decoded on the spot). Runs are therefore identical with and without workers, and on
the in-memory path, and resume needs nothing extra.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

_ROWS = None  # the ImageRows of a worker process (set once by the pool initializer)


def _init_worker(rows) -> None:
    global _ROWS  # decoding uses numpy and PIL only
    _ROWS = rows


def _decode(index: np.ndarray) -> np.ndarray:
    return _ROWS.rows(index)


class RowStream:
    """x[idx] for streamed rows, with `workers` background processes decoding the predicted next batch.

    `get(idx)` returns the rows of `idx` (a CPU int64 tensor) on `device`;
    `predict(sampler, size)` starts decoding the rows the next `sampler.next(size)` will most likely return
    (`part`: this rank's slice of them under torchrun)."""

    def __init__(self, rows, device: torch.device, workers: int = 0):
        self.rows, self.device, self.workers = rows.to("cpu"), torch.device(device), int(workers)
        self.pool = None
        if self.workers > 0:
            # not "fork": the run's writer threads are running by now, and forking a process with threads
            # can leave the child holding a lock no thread will release; the forkserver forks from a clean
            # single-threaded server (the encoded rows are pickled to each worker once)
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(self.rows,))
        self.pending: tuple[np.ndarray, list] | None = None
        self.hits = self.misses = 0

    def _submit(self, index: np.ndarray) -> list:
        parts = np.array_split(index, min(self.workers, len(index)))
        return [self.pool.submit(_decode, p) for p in parts if len(p)]

    def predict(self, sampler, size: int, part: slice | None = None) -> None:
        """Guess the next batch with copies of the sampler and generator, and decode it in the background."""
        if self.pool is None:
            return
        guess = copy.copy(sampler)  # a sampler's state is its state_dict (the checkpoint contract) ...
        guess.load_state_dict(copy.deepcopy(sampler.state_dict()))
        for k, v in vars(sampler).items():  # ... plus the generators it draws from, which must not advance
            if isinstance(v, torch.Generator):
                g = torch.Generator()
                g.set_state(v.get_state())
                setattr(guess, k, g)
        index = guess.next(size)
        index = (index if part is None else index[part]).numpy()
        self.pending = (index, self._submit(index))

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        index = idx.numpy()
        if self.pending is not None and np.array_equal(self.pending[0], index):
            x = np.concatenate([f.result() for f in self.pending[1]]) if len(index) else self.rows.rows(index)
            self.hits += 1
        else:
            if self.pending is not None:
                for f in self.pending[1]:
                    f.cancel()
                self.misses += 1
            x = self.rows.rows(index)
        self.pending = None
        t = torch.from_numpy(x)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
