"""Shared tiny data for tests: CPU only, seconds per test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

torch.set_num_threads(1)

# Property-based tests draw the same cases on every run and every machine (no example database).
from hypothesis import settings as _hsettings  # noqa: E402

_hsettings.register_profile("valuekit", derandomize=True, database=None, deadline=None)
_hsettings.load_profile("valuekit")


# The two-worker suite (pytest-xdist `--dist loadfile --no-loadscope-reorder`, pyproject's addopts) hands whole files
# to the workers in collection order. xdist's own order (most tests first) left the files with few but long tests
# (the bad-input matrix, torchrun, the quick benchmarks) to the end, where one worker ran them alone; the slowest
# files go first instead, so the workers finish together (longest first). Measured with `--durations=0`; a stale
# list only costs wall time.
SLOWEST_FIRST = ("test_bench.py", "test_badinput.py", "test_distributed_safety.py", "test_readme.py",
                 "test_suites_text.py", "test_distributed.py", "test_reliability.py", "test_report.py", "test_tour.py",
                 "test_badinput_kinds.py", "test_first_hour.py", "test_early_stopping.py", "test_ownmodel.py",
                 "test_layout.py")


def pytest_collection_modifyitems(config, items):
    """The slowest files first (SLOWEST_FIRST; the rest keep their order); `gpu` tests run by default where CUDA is
    present and are skipped (with the reason) elsewhere."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def blobs(
    n: int, *, seed: int = 0, classes: int = 3, dim: int = 4, noise: float = 0.0, id_start: int = 0
) -> pd.DataFrame:
    """Gaussian blobs, one per class; `noise` flips that fraction of labels (is_noisy/clean_label kept)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    centers = np.eye(classes, dim) * 3.0
    x = centers[y] + rng.normal(size=(n, dim))
    df = pd.DataFrame(x.astype(np.float32), columns=[f"f{j}" for j in range(dim)])
    df.insert(0, "id", np.arange(id_start, id_start + n))
    names = np.array([f"c{k}" for k in range(classes)])
    flipped = y.copy()
    if noise > 0:
        idx = rng.choice(n, size=int(round(noise * n)), replace=False)
        flipped[idx] = (y[idx] + rng.integers(1, classes, size=len(idx))) % classes
    df.insert(1, "label", names[flipped])
    if noise > 0:
        df["is_noisy"] = flipped != y
        df["clean_label"] = names[y]
    return df


@pytest.fixture
def tables(tmp_path):
    """Paths of a tiny noisy train table, a clean dev table and a test table (Parquet)."""
    paths = {}
    for name, df in (
        ("train", blobs(90, seed=1, noise=0.2)),
        ("dev", blobs(24, seed=2, id_start=1000)),
        ("test", blobs(60, seed=3, id_start=2000)),
    ):
        p = tmp_path / f"{name}.parquet"
        df.to_parquet(p, index=False)
        paths[name] = p
    return paths
