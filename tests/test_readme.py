"""Issue 18: the README's commands run as written, in order, on a fresh copy of the repository's data.

Every `valuekit ...` line of the README's bash blocks is executed through main() with small step
counts (`--steps N` becomes `--steps 3`; a training command without --steps gets one). Left out,
and why: `bash scripts/setup.sh` / `pytest` (the environment running this test is that set-up),
torchrun / `--nproc` lines (multi-process training: tests/test_distributed.py) and the benchmark
lines, which take minutes even with --quick (run by `test_readme_bench_commands`, marked slow).
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from valuekit.cli.main import main

REPO = Path(__file__).resolve().parents[1]
STEPS = "3"


def readme_commands() -> list[list[str]]:
    """argv of every `valuekit` command in the README's bash blocks, in order (continuations joined)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("#"):
                continue
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("valuekit "):
                    commands.append(shlex.split(part)[1:])
    return commands


def _small(argv: list[str]) -> list[str]:
    argv = list(argv)
    if "--steps" in argv:
        argv[argv.index("--steps") + 1] = STEPS
    elif argv[0] == "train" or (argv[0] == "score" and "--method" in argv):
        argv += ["--steps", STEPS]
    if argv[0] in ("train", "score") and "--device" not in argv:
        argv += ["--device", "cpu"]
    return argv


def _skipped(argv: list[str]) -> bool:
    return argv[0] == "bench" or "--nproc" in argv


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_readme_lists_the_commands_this_test_runs():
    cmds = readme_commands()
    names = [c[0] for c in cmds]
    assert names.count("score") >= 5 and "audit" in names and "report" in names and ["data", "list"] in cmds
    assert sum(_skipped(c) for c in cmds) <= 3  # bench x2, --nproc x1: everything else is executed


def test_readme_commands_run_in_order(tmp_path, monkeypatch):
    shutil.copytree(REPO / "data", tmp_path / "data")  # a fresh clone's data, nothing else
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in readme_commands():
        if _skipped(argv):
            continue
        argv = _small(argv)
        code, out, err = _run(argv)
        assert code == 0, (argv, err[-2000:])
        assert "Traceback" not in err
        ran.append(argv)
    assert len(ran) >= 12
    # what the Tour and the sections promise is there, with the right contents
    train = pd.read_parquet("data/mnist40/train.parquet")
    assert len(train) > 1000 and train.is_noisy.mean() == pytest.approx(0.4, abs=0.02)
    pruned = pq.read_table("out/mnist-pruned.parquet")
    assert pruned.num_rows == len(train) and pruned.column("selected").to_numpy().sum() == round(0.7 * len(train))
    weighted = pd.read_parquet("out/train.weighted.parquet")
    assert {"weight", "value", "value_std", "rank"} <= set(weighted.columns)
    assert weighted.weight.mean() == pytest.approx(1.0)
    sub = pd.read_parquet("out/train.pruned.parquet")
    assert len(sub) == round(0.7 * len(weighted))
    audit = pd.read_parquet("out/audit.parquet")
    assert {"label_score", "is_label_issue", "value_mnist-uniform", "value_mnist-dds"} <= set(audit.columns)
    assert Path("out/audit.summary.json").exists()
    html = Path("out/report.html").read_text()
    assert "mnist-uniform" in html and "mnist-dds" in html and "<img" in html
    assert Path("runs/br-dds/values.parquet").exists()  # the Tour's multi-source run on a prepared target
    sources = pd.read_parquet("runs/br-dds/sources.parquet")  # one row per language
    assert set(sources.source) == {"br", "cy", "ga", "gd", "ja", "fi", "tr", "hu"} and sources.is_target.sum() == 1
    assert sources.prob.sum() == pytest.approx(1.0, abs=1e-6)
    assert "fig-source-usage" in Path("out/br.html").read_text()  # (a shortened run may hold no reward yet)
    assert pd.read_parquet("out/digits-weighted.parquet").shape[0] == len(pd.read_parquet(
        "data/digits-noisy20/train.parquet"))


@pytest.mark.slow
def test_readme_bench_commands(tmp_path, monkeypatch):
    """The README's quick alternative (in its comment): `valuekit bench all --quick -o /tmp/bench`."""
    code, _, err = _run(["bench", "all", "--quick", "-o", str(tmp_path / "bench")])
    assert code == 0, err
    assert all((tmp_path / "bench" / f"{k}.md").exists() for k in ("speed", "layer", "quality", "scale"))
