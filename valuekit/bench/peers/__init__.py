"""Peer data-valuation methods measured next to valuekit's (`valuekit bench quality`).

pyDVL 0.10 (Data-OOB, KNN-Shapley) needs numpy < 2, which valuekit does not, so it runs in its own
interpreter: `pydvl_values` writes the arrays to a temporary .npz, runs `pydvl_worker.py` (numpy,
scikit-learn and pyDVL only) with the Python named by VALUEKIT_PYDVL_PYTHON (or this one when it can
import pydvl) and reads the values back. Install it with
``python -m venv /path/pydvl && /path/pydvl/bin/pip install 'pydvl==0.10.0' 'numpy<2' scikit-learn``
(or the `peers` extra where numpy < 2 suits the environment).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("pydvl_worker.py")
ENV = "VALUEKIT_PYDVL_PYTHON"


def pydvl_python() -> str | None:
    """The interpreter that runs pyDVL, or None when none is configured and this one lacks it."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    return sys.executable if importlib.util.find_spec("pydvl") is not None else None


def pydvl_values(x, y, dev_x, dev_y, *, seed: int = 0, k: int = 10, trees: int = 100,
                 methods=("data-oob", "knn-shapley")) -> dict[str, np.ndarray]:
    """pyDVL values of the training rows (higher = more valuable): Data-OOB (Kwon & Zou 2023) of a random
    forest with `trees` trees, and exact KNN-Shapley (Jia et al. 2019, K = `k`) against the dev rows.
    Raises RuntimeError when no pyDVL interpreter is available or the worker fails."""
    python = pydvl_python()
    if python is None:
        raise RuntimeError(f"pydvl is not importable here; set {ENV} to a Python that has pydvl 0.10")
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, x=np.asarray(x, np.float64), y=np.asarray(y, np.int64), dev_x=np.asarray(dev_x, np.float64),
                 dev_y=np.asarray(dev_y, np.int64))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        res = subprocess.run(
            [python, str(WORKER), str(inp), str(out), str(seed), str(k), str(trees), ",".join(methods)],
            capture_output=True,
            text=True,
            env=env,
        )
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"pyDVL worker failed: {last}")
        with np.load(out) as f:
            return {m: f[m.replace("-", "_")] for m in methods}
