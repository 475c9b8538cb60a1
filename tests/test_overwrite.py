"""Outputs are never replaced silently: `valuekit score/audit/report -o FILE` and their Python counterparts refuse an
existing output with one line unless told `--overwrite` / `overwrite=True`; an input (the training table, a run's
files) is never replaced, not even then."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest
from valuekit.cli.main import main

import valuekit
from valuekit.errors import InputError


def cli(argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny uniform run and its tables (a few seconds)."""
    from conftest import blobs

    root = tmp_path_factory.mktemp("ow")
    paths = {}
    for name, df in (("train", blobs(90, seed=0, noise=0.2)), ("dev", blobs(30, seed=1, id_start=1000))):
        paths[name] = root / f"{name}.parquet"
        df.to_parquet(paths[name], index=False)
    run = valuekit.train(str(paths["train"]), dev=str(paths["dev"]), out=root / "run", method="uniform", steps=6,
                         device="cpu", progress=False)
    return root, paths, run


COMMANDS = {  # command, its output's name, what the second run must give
    "score": lambda p, run, out: ["score", p["train"], "--run", run.path, "-o", out],
    "audit": lambda p, run, out: ["audit", run.path, "--no-predict", "-o", out],
    "report": lambda p, run, out: ["report", run.path, "--top-k", "3", "-o", out],
}
SUFFIX = {"score": ".csv", "audit": ".parquet", "report": ".html"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_refuses_an_existing_output_unless_overwrite(made, tmp_path, command):
    _, paths, run = made
    out = tmp_path / f"mine{SUFFIX[command]}"
    out.write_text("the user's own file")
    code, err = cli(COMMANDS[command](paths, run, out))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"-o {out}: already exists; pass --overwrite" in err and "overwrite=True" not in err
    assert out.read_text() == "the user's own file"  # nothing written
    assert not list(tmp_path.glob(".*.tmp")) and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    code, err = cli(COMMANDS[command](paths, run, out) + ["--overwrite"])
    assert code == 0, err
    if command == "score":
        assert len(pd.read_csv(out)) == 90 and "weight" in pd.read_csv(out).columns
    elif command == "audit":
        assert len(pd.read_parquet(out)) == 90
        assert json.loads(Path(str(out).replace(".parquet", ".summary.json")).read_text())["n"] == 90
    else:
        assert out.read_text().startswith("<!DOCTYPE html>")
    code, err = cli(COMMANDS[command](paths, run, out))  # the command's own output from a run before: refused too
    assert code == 2 and "already exists" in err


def test_audit_refuses_an_existing_summary_next_to_a_new_table(made, tmp_path):
    _, paths, run = made
    (tmp_path / "a.summary.json").write_text("{}")
    code, err = cli(["audit", run.path, "--no-predict", "-o", tmp_path / "a.csv"])
    assert code == 2 and "its companion file" in err and "a.summary.json" in err and "--overwrite" in err
    assert not (tmp_path / "a.csv").exists() and (tmp_path / "a.summary.json").read_text() == "{}"
    assert cli(["audit", run.path, "--no-predict", "-o", tmp_path / "a.csv", "--overwrite"])[0] == 0
    assert json.loads((tmp_path / "a.summary.json").read_text())["n"] == 90


def test_overwrite_never_replaces_an_input(made):
    root, paths, run = made
    before = paths["train"].read_bytes()
    refusals = [
        (["score", paths["train"], "--run", run.path, "-o", paths["train"], "--overwrite"], "is the input table"),
        (["score", paths["train"], "--run", run.path, "-o", run.path / "values.parquet", "--overwrite"],
         "run directory"),
        (["audit", run.path, "--no-predict", "-o", paths["train"], "--overwrite"], "is the input table"),
        (["audit", run.path, "--no-predict", "-o", run.path / "values.parquet", "--overwrite"], "run directory"),
        (["report", run.path, "-o", run.path / "r.html", "--overwrite"], "run directory"),
    ]
    for argv, why in refusals:
        code, err = cli(argv)
        assert code == 2 and why in err, (argv, err)
    assert paths["train"].read_bytes() == before and run.values() is not None
    with pytest.raises(InputError, match="never overwrites its input"):
        valuekit.score(str(paths["train"]), run, out=paths["train"], overwrite=True)
    with pytest.raises(InputError, match="lies in the run directory"):
        valuekit.score(str(paths["train"]), run, out=run.path / "steps" / "part-00000.parquet", overwrite=True)
    with pytest.raises(InputError, match="is the input table"):
        valuekit.audit(run, predict=False, out=paths["train"], overwrite=True)
    with pytest.raises(InputError, match="run directory"):
        valuekit.audit(run, predict=False, out=run.path / "values.parquet", overwrite=True)
    assert paths["train"].read_bytes() == before


def test_python_api_refuses_an_existing_out_in_arguments(made, tmp_path):
    _, paths, run = made
    calls = {
        "score": lambda out, **kw: valuekit.score(str(paths["train"]), run, out=out, **kw),
        "audit": lambda out, **kw: valuekit.audit(run, predict=False, out=out, **kw),
        "report": lambda out, **kw: valuekit.report(run, out, top_k=3, **kw),
    }
    for name, call in calls.items():
        out = tmp_path / f"{name}{'.parquet' if name != 'report' else '.html'}"
        out.write_text("mine")
        with pytest.raises(InputError, match="already exists; pass overwrite=True") as err:
            call(out)
        assert f"out='{out}'" in str(err.value) and "--" not in str(err.value)
        assert "-o" in err.value.cli and "--overwrite" in err.value.cli
        assert out.read_text() == "mine"
        if name != "report":  # (the report is replaced by the CLI test above, through the same overwrite=)
            call(out, overwrite=True)  # a notebook cell run again
            assert len(pd.read_parquet(out)) == 90
    frame = valuekit.audit(run, predict=False, out=tmp_path / "again.csv")  # audit(out=) writes what the CLI writes
    assert len(pd.read_csv(tmp_path / "again.csv")) == len(frame) == 90
    assert json.loads((tmp_path / "again.summary.json").read_text())["n_flagged"] == int(frame.is_label_issue.sum())


def test_clean_again_into_its_folder_needs_overwrite(made, tmp_path):
    _, paths, _ = made
    out = tmp_path / "clean"
    argv = ["clean", paths["train"], "--dev", paths["dev"], "--methods", "dds", "--steps", "4", "--batch-size", "16",
            "--device", "cpu", "-o", out]
    assert cli(argv)[0] == 0
    (out / "notes.txt").write_text("mine")
    first = json.loads((out / "clean.json").read_text())
    stamp = (out / "table.parquet").stat().st_mtime_ns
    code, err = cli(argv)
    assert code == 2 and err.count("\n") == 1 and "folder is not empty; pass --overwrite" in err
    assert (out / "table.parquet").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="pass overwrite=True") as exc:
        valuekit.clean(paths["train"], paths["dev"], out=out, methods="dds", steps=4, device="cpu")
    assert "--" not in str(exc.value)
    code, err = cli(argv + ["--overwrite"])
    assert code == 0 and "replacing the run in" in err
    again = json.loads((out / "clean.json").read_text())
    assert [c["candidate"] for c in again["candidates"]] == [c["candidate"] for c in first["candidates"]]
    assert (out / "notes.txt").read_text() == "mine" and (out / "table.parquet").stat().st_mtime_ns > stamp
