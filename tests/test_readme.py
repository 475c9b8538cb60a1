"""The README's and docs/*.md's commands run as written, in order, on a fresh copy of the repository's data.

Each page runs in its own empty folder holding a copy of data/ (a fresh clone's data, nothing else). Every
`valuekit ...` line of its ```bash blocks is executed through main() with small step counts (`--steps N` becomes
`--steps 3`; a training command without --steps gets one), and every ```python block is executed in one namespace
per page (`steps=N` becomes `steps=3`); a python block whose first line is `# file: NAME` is written to NAME
instead (a module the page's commands import). Left out: lines that are not `valuekit` commands (`bash
scripts/setup.sh`, `pytest`, `pip`: the environment running this test is that set-up), and blocks preceded by
`<!-- not run by the suite: REASON -->` (torchrun, several nodes, benchmarks that take minutes); the README's
quick benchmark command runs in `test_readme_bench_commands` (slow).
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from valuekit.cli.main import main

REPO = Path(__file__).resolve().parents[1]
STEPS = "3"
SKIP = re.compile(r"<!-- not run by the suite: (.+?) -->\s*$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
DOCS = sorted(p.name for p in (REPO / "docs").glob("*.md"))
SETUP = [  # the README's two set-up commands, character for character (.ci/run runs the second)
    "bash scripts/setup.sh && valuekit score data/digits-noisy20/train.parquet --method lrdi --dev "
    "data/digits-noisy20/dev.parquet --test data/digits-noisy20/test.parquet --steps 400 "
    "-o out/digits-weighted.parquet",
    "bash scripts/setup.sh && python3 -m pytest -q",
]


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, body, skip reason or None) of every fenced block, in order."""
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        out.append((m.group(1), m.group(2), skip.group(1) if skip else None))
    return out


def shell_commands(body: str) -> list[list[str]]:
    """argv of every `valuekit` command of a bash block (continuations joined, comments dropped)."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("#"):
            continue
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("valuekit "):
                commands.append(shlex.split(part)[1:])
    return commands


def page_steps(name: str) -> list[tuple]:
    """What a page asks the reader to run, in order: ("sh", argv), ("py", code) or ("file", path, code)."""
    steps = []
    for lang, body, skip in blocks((REPO / name).read_text()):
        if skip:
            continue
        if lang in ("bash", "sh"):
            steps += [("sh", argv) for argv in shell_commands(body)]
        elif lang == "python":
            first = body.splitlines()[0]
            if first.startswith("# file: "):
                steps.append(("file", first[len("# file: "):].strip(), body))
            else:
                steps.append(("py", body))
    return steps


def _small(argv: list[str]) -> list[str]:
    argv = list(argv)
    if "--steps" in argv:
        argv[argv.index("--steps") + 1] = STEPS
    elif argv[0] == "train" or (argv[0] == "score" and "--method" in argv):
        argv += ["--steps", STEPS]
    if argv[0] in ("train", "score") and "--device" not in argv:
        argv += ["--device", "cpu"]
    return argv


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def run_page(name: str, tmp_path: Path, monkeypatch) -> list:
    """Run a page's steps in a fresh folder with a copy of data/; returns what ran."""
    shutil.copytree(REPO / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / ".hf"))  # `datasets` caches there, not in the user's home
    monkeypatch.setattr(sys, "path", ["", *sys.path])  # a page's own module (# file:) imports from the folder
    namespace: dict = {"__name__": "__page__"}
    ran = []
    for step in page_steps(name):
        if step[0] == "sh":
            argv = _small(step[1])
            code, _, err = _run(argv)
            assert code == 0, (name, argv, err[-2000:])
            assert "Traceback" not in err
        elif step[0] == "file":
            Path(step[1]).write_text(step[2])
        else:
            code = re.sub(r"\bsteps=\d+", f"steps={STEPS}", step[1])
            with redirect_stdout(io.StringIO()):
                exec(compile(code, f"{name} python block", "exec"), namespace)
        ran.append(step)
    for mod in [m for m in sys.modules if m == "mymodels"]:
        del sys.modules[mod]
    return ran


# ---------------------------------------------------------------- the pages' shape


def test_readme_is_a_short_teaching_page_with_the_setup_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    bash = [body.strip() for lang, body, _ in blocks(text) if lang == "bash"]
    assert bash[:2] == SETUP  # the two set-up commands first, exactly
    assert "values-auroc" not in text and "| AUROC" not in text  # the measurement tables live in docs/benchmarks.md
    for heading in ("## A five-minute tour", "## The same on your own CSV table", "## Concepts",
                    "**`value` and `weight` are different things.**", "**The dev set**", "## Methods: which one when"):
        assert heading in text


def test_readme_links_every_docs_page_and_every_link_resolves():
    text = (REPO / "README.md").read_text()
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", text))
    user_pages = {"input-formats.md", "own-model.md", "language-models.md", "multi-source.md", "distributed.md",
                  "benchmarks.md", "reports.md", "scoring.md", "running.md"}
    assert user_pages <= linked
    for page in ["README.md", *[f"docs/{p}" for p in sorted(user_pages)]]:
        base = (REPO / page).parent
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (REPO / page).read_text()):
            assert (base / target).exists(), (page, target)


@pytest.mark.parametrize("name", ["README.md", *[f"docs/{p}" for p in DOCS]])
def test_every_skipped_block_says_why_and_pages_with_commands_state_times(name):
    text = (REPO / name).read_text()
    for lang, _body, skip in blocks(text):
        assert skip is None or len(skip) > 10
        if lang not in ("bash", "sh", "python", ""):
            pytest.fail(f"{name}: a block in {lang!r}")
    if any(s[0] == "sh" and s[1][0] in ("train", "score", "audit", "report") for s in page_steps(name)):
        assert re.search(r"2-core CPU", text), f"{name} runs commands but states no time on a 2-core CPU"


# ---------------------------------------------------------------- the commands, page by page


def test_readme_commands_run_in_order(tmp_path, monkeypatch):
    ran = run_page("README.md", tmp_path, monkeypatch)
    names = [s[1][0] for s in ran if s[0] == "sh"]
    assert names.count("train") >= 3 and names.count("score") >= 2 and "audit" in names and "report" in names
    assert sum(s[0] == "py" for s in ran) == 3
    assert len(pd.read_parquet("out/digits-weighted.parquet")) == len(pd.read_parquet(
        "data/digits-noisy20/train.parquet"))
    pred = pd.read_parquet("out/digits-predictions.parquet")  # the model `clean` handed over, on the test rows
    assert list(pred.id) == list(pd.read_parquet("data/digits-noisy20/test.parquet").id)
    assert pred.filter(like="prob_").shape[1] == 10 and pred.filter(like="prob_").sum(axis=1).to_numpy() == (
        pytest.approx(1.0))
    clean_report = Path("out/digits-clean-report.html").read_text()
    assert "valuekit clean: the candidates and the model handed over" in clean_report
    kept = pq.read_table("out/digits-kept.parquet")
    assert kept.num_rows == 1338 and kept.column("selected").to_numpy().sum() == round(0.7 * 1338)
    audit = pd.read_parquet("out/digits-audit.parquet")
    assert {"label_score", "is_label_issue", "value_digits-uniform", "value_digits-lrdi"} <= set(audit.columns)
    html = Path("out/digits-report.html").read_text()
    assert "digits-uniform" in html and "digits-lrdi" in html and "<img" in html
    mine = pd.read_csv("out/my-train.scored.csv")  # the own-CSV part: the user's columns kept, ours added
    assert list(mine.columns[:2]) == ["alcohol", "malic_acid"] and {"sample", "cultivar", "weight", "value"} <= set(
        mine.columns)
    assert len(mine) == 178 - 30 and mine.weight.mean() == pytest.approx(1.0)
    assert pd.read_csv("out/my-audit.csv").shape[0] == len(mine) and Path("out/my-report.html").exists()
    assert Path("runs/py-mwnet/values.parquet").exists()
    _check_value_and_weight_table()
    _run_again(ran)


def _run_again(ran):
    """The README a second time in the same folder, as a reader who runs it twice: every command stops with one
    line naming --overwrite and writes nothing; the quick-start with --overwrite, as the README says, trains and
    writes again (said on stderr); the From-Python cell (overwrite=True) runs again."""
    import os

    outputs = sorted(p for p in Path(".").rglob("*") if p.is_file() and "data" not in p.parts)
    stamp = {p: os.stat(p).st_mtime_ns for p in outputs}
    for step in [s for s in ran if s[0] == "sh"]:
        code, _, err = _run(_small(step[1]))
        assert code == 2 and "--overwrite" in err and err.count("\n") == 1, (step[1], err[-500:])
    assert {p: os.stat(p).st_mtime_ns for p in outputs} == stamp  # nothing written
    quick = [s for s in ran if s[0] == "sh"][0][1]
    assert quick[0] == "score" and "--method" in quick  # the set-up's first command
    code, _, err = _run(_small(quick) + ["--overwrite"])
    assert code == 0, err[-2000:]
    assert "replacing the run in" in err and os.stat("out/digits-weighted.parquet").st_mtime_ns > stamp[
        Path("out/digits-weighted.parquet")]
    cell = [s for s in ran if s[0] == "py" and "runs/py-mwnet" in s[1]][0][1]
    namespace: dict = {"__name__": "__page__"}
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        exec(compile(re.sub(r"\bsteps=\d+", f"steps={STEPS}", cell), "README.md python block", "exec"), namespace)
    assert namespace["run"].meta["steps_done"] == int(STEPS)


def _check_value_and_weight_table():
    """The README's "`value` and `weight`" table, for the runs of its tour: uniform's value is -mean_loss and its
    weight 1; lrdi's value is the percentile rank of -mean_loss over the table, its weight the teacher weight."""
    from valuekit.training.signals import class_percentile

    uni = pd.read_parquet("runs/digits-uniform/values.parquet")
    np.testing.assert_allclose(uni.value, -uni.mean_loss, rtol=1e-6)
    assert (uni.weight == 1).all()
    lrdi = pd.read_parquet("runs/digits-lrdi/values.parquet")
    np.testing.assert_allclose(lrdi.value, class_percentile(-lrdi.mean_loss, np.zeros(len(lrdi))), rtol=1e-9)
    np.testing.assert_allclose(lrdi.weight, lrdi.teacher_weight / lrdi.teacher_weight.mean(), rtol=1e-6)
    assert lrdi.value.dropna().between(0, 1).all() and lrdi.value.notna().any()


def test_docs_input_formats(tmp_path, monkeypatch):
    run_page("docs/input-formats.md", tmp_path, monkeypatch)
    train = pd.read_parquet("data/mnist40/train.parquet")
    assert len(train) > 1000 and train.is_noisy.mean() == pytest.approx(0.4, abs=0.02)
    assert pd.read_parquet("data/bc/train.parquet").is_noisy.mean() == pytest.approx(0.2, abs=0.02)
    assert len(pd.read_parquet("runs/mnist-uniform/values.parquet")) == len(train)


def test_docs_scoring(tmp_path, monkeypatch):
    run_page("docs/scoring.md", tmp_path, monkeypatch)
    weighted = pd.read_parquet("out/train.weighted.parquet")
    assert {"weight", "value", "value_std", "rank"} <= set(weighted.columns)
    assert weighted.weight.mean() == pytest.approx(1.0)
    assert len(pd.read_parquet("out/train.pruned.parquet")) == round(0.7 * len(weighted))


def test_docs_own_model(tmp_path, monkeypatch):
    run_page("docs/own-model.md", tmp_path, monkeypatch)
    assert "mymodels:small_cnn" in Path("runs/own-mwnet/run.json").read_text()  # the factory named on the command line
    for run in ("runs/own-mwnet", "runs/own-dds"):
        assert json.loads(Path(run, "run.json").read_text())["status"] == "completed"
        assert len(pd.read_parquet(Path(run, "values.parquet"))) == 1338


def test_docs_language_models(tmp_path, monkeypatch):
    run_page("docs/language-models.md", tmp_path, monkeypatch)
    train = pd.read_parquet("data/instr/train.parquet")
    half = pd.read_json("out/instr-half.jsonl", lines=True)
    assert 0.4 * len(train) <= len(half) <= 0.6 * len(train) and set(half.task) == set(train.task)
    assert len(pd.read_json("out/instr.jsonl", lines=True)) == len(train)
    assert json.loads(Path("runs/instr-gpt2/run.json").read_text())["status"] == "completed"
    bads = pd.read_parquet("runs/instr-bads/values.parquet")  # README: bads' weight is its posterior mean
    np.testing.assert_allclose(bads.weight, bads.posterior_mean / bads.posterior_mean.mean(), rtol=1e-6)


def test_docs_multi_source(tmp_path, monkeypatch):
    run_page("docs/multi-source.md", tmp_path, monkeypatch)
    sources = pd.read_parquet("runs/br-dds/sources.parquet")  # one row per language
    assert set(sources.source) == {"br", "cy", "ga", "gd", "ja", "fi", "tr", "hu"} and sources.is_target.sum() == 1
    assert sources.prob.sum() == pytest.approx(1.0, abs=1e-6)
    assert "fig-source-usage" in Path("out/br.html").read_text()  # (a shortened run may hold no reward yet)
    assert "fig-source-usage" in Path("out/bs.html").read_text()
    values = pd.read_parquet("runs/br-dds/values.parquet")  # README: multidds' weight is exp(value), mean 1
    np.testing.assert_allclose(values.weight, np.exp(values.value) / np.exp(values.value).mean(), rtol=1e-6)


def test_docs_reports(tmp_path, monkeypatch):
    run_page("docs/reports.md", tmp_path, monkeypatch)
    audit = pd.read_parquet("out/audit.parquet")
    assert {"label_score", "is_label_issue", "value_uniform", "value_dds"} <= set(audit.columns)
    assert Path("out/audit.summary.json").exists()
    html = Path("out/report.html").read_text()
    assert "uniform" in html and "dds" in html and "<img" in html
    dds = pd.read_parquet("runs/dds/values.parquet")  # README: dds' weight is the softmax of the scorer's logits x N
    soft = np.exp(dds.scorer_logit - dds.scorer_logit.max())
    np.testing.assert_allclose(dds.weight, soft / soft.mean(), rtol=1e-6)
    assert dds.value.dropna().between(0, 1).all()  # the in-run value, not the scorer logit


def test_docs_running(tmp_path, monkeypatch):
    ran = run_page("docs/running.md", tmp_path, monkeypatch)
    assert [s[1][-1] for s in ran] == ["runs/resumable", "--resume"]
    assert json.loads(Path("runs/resumable/run.json").read_text())["status"] == "completed"


def test_docs_without_runnable_commands_are_the_known_ones():
    """distributed (torchrun), benchmarks (minutes) and the internal records run nothing here; a new page with
    commands must get a test above."""
    tested = {"input-formats.md", "scoring.md", "own-model.md", "language-models.md", "multi-source.md",
              "reports.md", "running.md"}
    untested = {p for p in DOCS if p not in tested and page_steps(f"docs/{p}")}
    assert untested == set()


@pytest.mark.slow
def test_readme_bench_commands(tmp_path, monkeypatch):
    """docs/benchmarks.md's quick alternative (in its comment): `valuekit bench all --quick -o /tmp/bench`."""
    code, _, err = _run(["bench", "all", "--quick", "-o", str(tmp_path / "bench")])
    assert code == 0, err
    assert all((tmp_path / "bench" / f"{k}.md").exists() for k in ("speed", "layer", "quality", "scale"))
