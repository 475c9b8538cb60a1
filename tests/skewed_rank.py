"""torchrun entry point for tests/test_distributed_safety.py: `valuekit` with a synchronisation bug planted.

The ranks listed in VALUEKIT_TEST_SKEW_RANKS (comma-separated) add 1e-3 to every averaged gradient before the
optimizer step, so their replicas drift away from the others' exactly as a method whose state is not
synchronised would. Nothing in valuekit reads that variable: the bug lives in this file only.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/skewed_rank.py train ...
"""

from __future__ import annotations

import os
import sys

from valuekit.cli.main import main

from valuekit.training.context import TrainContext

SKEWED = {int(r) for r in os.environ.get("VALUEKIT_TEST_SKEW_RANKS", "").split(",") if r.strip()}

if int(os.environ.get("RANK", "0")) in SKEWED:
    _sync = TrainContext.sync_grads_

    def _skewed(self, params):
        params = list(params)
        _sync(self, params)
        for p in params:
            if p.grad is not None:
                p.grad.add_(1e-3)

    TrainContext.sync_grads_ = _skewed

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
