"""torchrun entry point for tests/test_distributed.py: several `valuekit train` command lines in one launch.

Every process starts the interpreter, torch and valuekit once and joins one gloo process group, then runs each
command line of the JSON file (``{"name": [argv after "train"], ...}``) in order through the CLI's `main`. The
loop joins a process group that is already up and leaves it up (training.distributed.init / shutdown), so each
run is trained exactly as under its own torchrun launch; what is shared is only the start-up, which is most of a
six-step test run's time. Rank 0 writes ``{"name": exit code}`` to the JSON file's path + ".status".

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_batch.py CASES.json
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
from valuekit.cli.main import main


def run(spec: str) -> int:
    cases = json.loads(open(spec).read())
    dist.init_process_group("gloo")
    codes = {}
    try:
        for name, argv in cases.items():
            codes[name] = main(["train", *argv])
    finally:
        dist.destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        with open(spec + ".status", "w") as f:
            json.dump(codes, f)
    return max(codes.values(), default=0)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
