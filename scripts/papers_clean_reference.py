"""Early-stopped uniform on the clean prepared image sets: the reference line of reports/papers.md (what the noisy
features and rotated rows cost uniform training). Same loop as `valuekit bench papers` (300 steps, seeds 0-2).

    python scripts/papers_clean_reference.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from valuekit.bench import papers


def main() -> None:
    torch.set_num_threads(1)
    res: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in papers.DATASETS:
            for seed in (0, 1, 2):
                frames = papers._prepared(d, seed, root / f"c-{d}-{seed}")
                tr, dv, te = papers._load(frames, papers._shape(d))
                _, r = papers._train(tr, dv, te, root / f"c-{d}-{seed}-u", "uniform", steps=300, seed=seed,
                                     device="cpu")
                res.setdefault(d, []).append(r["test_acc_es"])
    for d, v in res.items():
        print(f"{d}: {100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1):.1f}")


if __name__ == "__main__":
    main()
