"""Issue 18: hostile paths, damaged run files, races and signals give one line, exit 2, and lose nothing."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import blobs
from valuekit.cli.main import main

from valuekit.runs.reader import read_run
from valuekit.runs.writer import RunWriter

FAST = ["--steps", "4", "--batch-size", "8", "--device", "cpu"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with the hash of its bytes (and folders), to prove nothing changed."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(argv) -> tuple[int, str, str]:
    """main() in-process: (exit code, stdout, stderr); argparse's SystemExit counts as the exit code."""
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def refused(argv, root: Path, fragment: str) -> str:
    """Run argv, expect exit 2 with one error line containing `fragment` and nothing changed under root."""
    before = snapshot(root)
    code, _, err = cli(argv)
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("valuekit: error:") and "Traceback" not in err, err
    assert fragment in err, (fragment, err)
    assert snapshot(root) == before, "files changed"
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny train/dev/test set and a finished uniform run on it (trained once for the module)."""
    root = tmp_path_factory.mktemp("world")
    paths = {}
    for name, df in (("train", blobs(40, seed=1, noise=0.2)), ("dev", blobs(12, seed=2, id_start=1000)),
                     ("test", blobs(12, seed=3, id_start=2000))):
        paths[name] = root / f"{name}.parquet"
        df.to_parquet(paths[name], index=False)
    paths["run"] = root / "run"
    code, _, err = cli(["train", paths["train"], "--dev", paths["dev"], "--out", paths["run"], *FAST])
    assert code == 0, err
    return root, paths


@pytest.fixture
def fresh(world, tmp_path):
    """A private copy of the world (tables + run) in tmp_path."""
    root, paths = world
    for p in root.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp_path / p.name)
    meta_path = tmp_path / "run" / "run.json"
    meta = json.loads(meta_path.read_text())
    for split in ("train", "dev"):  # the copy's run names the copied tables
        meta["data"][split]["path"] = str(tmp_path / Path(meta["data"][split]["path"]).name)
    meta_path.write_text(json.dumps(meta))
    return tmp_path, {k: tmp_path / v.name for k, v in paths.items()}


def _ro_dir(tmp_path) -> Path:
    """A folder nobody may write in: chmod for a normal user; /sys (read-only sysfs) when running as root."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


# ---------------------------------------------------------------- data loss


def test_audit_and_report_never_overwrite_the_training_table_or_the_run(fresh):
    root, p = fresh
    run = p["run"]
    # the table named in run.json, given or not with --data
    refused(["audit", run, "--data", p["train"], "-o", p["train"], "--no-predict"], root, "is the input table")
    refused(["audit", run, "-o", p["train"], "--no-predict"], root, "is the input table")
    for target in ("values.parquet", "x.parquet", "steps/part-00000.parquet"):
        refused(["audit", run, "-o", run / target, "--no-predict"], root, "run directory")
    refused(["report", run, "-o", run / "report.html"], root, "run directory")
    refused(["score", p["train"], "--run", run, "-o", run / "values.parquet"], root, "run directory")
    refused(["score", p["train"], "--run", run, "-o", p["train"]], root, "is the input table")
    assert read_run(run).values() is not None


def test_empty_and_dot_outputs_are_refused(fresh, monkeypatch):
    root, p = fresh
    monkeypatch.chdir(root)
    refused(["train", p["train"], "--dev", p["dev"], "--out", "", *FAST], root, "empty path")
    refused(["train", p["train"], "--dev", p["dev"], "--out", ".", *FAST], root, "not empty and holds no valuekit run")
    refused(["score", p["train"], "--run", p["run"], "-o", ""], root, "empty path")
    refused(["audit", p["run"], "-o", " ", "--no-predict"], root, "empty path")
    refused(["report", p["run"], "-o", ""], root, "empty path")
    refused(["data", "prepare", "digits", "-o", ""], root, "empty path")
    refused(["bench", "layer", "-o", ""], root, "empty path")


def test_data_prepare_max_train_zero_is_refused(tmp_path):
    refused(["data", "prepare", "digits", "--max-train", "0", "-o", tmp_path / "d"], tmp_path, "--max-train 0")
    refused(["data", "prepare", "digits", "--dev-size", "0", "-o", tmp_path / "d"], tmp_path, "--dev-size 0")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("where", ["existing_file", "under_file", "read_only", "existing_dir"])
def test_unusable_output_locations_for_every_command(fresh, where):
    root, p = fresh
    blocker = root / "blocker.txt"
    blocker.write_text("keep me")
    if where == "existing_file":
        out_file, out_dir, frag_f, frag_d = root / "o.parquet", blocker, None, "is a file, not a folder"
    elif where == "under_file":
        out_file, out_dir = blocker / "o.parquet", blocker / "sub"
        frag_f = frag_d = "which is a file, not a folder"
    elif where == "read_only":
        ro = _ro_dir(root)
        out_file, out_dir = ro / "o.parquet", ro / "sub"
        frag_f = frag_d = "cannot write in"
    else:
        for name in ("o.parquet", "o.html"):
            (root / name).mkdir()
        out_file, out_dir, frag_f, frag_d = root / "o.parquet", None, "is a directory", None
    run = p["run"]
    if frag_f is not None:
        f = Path(out_file)
        refused(["score", p["train"], "--run", run, "-o", f], root, frag_f)
        refused(["audit", run, "-o", f, "--no-predict"], root, frag_f)
        refused(["report", run, "-o", f.with_suffix(".html")], root, frag_f)
    if frag_d is not None:
        refused(["train", p["train"], "--dev", p["dev"], "--out", out_dir, *FAST], root, frag_d)
        refused(["data", "prepare", "wine", "-o", out_dir], root, frag_d)
        refused(["bench", "layer", "--quick", "-o", out_dir], root, frag_d)
        refused(["score", p["train"], "--method", "uniform", "--dev", p["dev"], "--run-dir", out_dir,
                 "-o", root / "s.parquet", *FAST], root, frag_d)
    assert blocker.read_text() == "keep me"


# ---------------------------------------------------------------- damaged run files


def _damage(run: Path, what: str) -> str:
    """Damage one file of a run; return the file name the error must name."""
    values, part = run / "values.parquet", sorted((run / "steps").glob("part-*.parquet"))[0]
    if what == "values-garbage":
        values.write_bytes(b"PAR1 not really")
        return "values.parquet: unreadable"
    if what == "values-truncated":
        values.write_bytes(values.read_bytes()[:-40])
        return "values.parquet: unreadable"
    if what == "values-wrong-schema":
        pq.write_table(pa.table({"example_id": [1, 2], "score": [0.1, 0.2]}), values)
        return "values.parquet: unreadable (no column 'value'"
    if what == "values-wrong-type":
        t = pq.read_table(values)
        t = t.set_column(t.schema.get_field_index("value"), "value", pa.array([str(v) for v in t["value"].to_pylist()]))
        pq.write_table(t, values)
        return "values.parquet: unreadable (column 'value' is string"
    if what == "values-is-dir":
        values.unlink()
        values.mkdir()
        return "values.parquet: unreadable"
    if what == "steps-garbage":
        part.write_bytes(os.urandom(300))
        return f"{part.name}: unreadable"
    if what == "steps-wrong-schema":
        pq.write_table(pa.table({"step": ["a"], "example_id": [1]}), part)
        return f"{part.name}: unreadable"
    if what == "run-json-dir":
        (run / "run.json").unlink()
        (run / "run.json").mkdir()
        return "run.json: unreadable"
    if what == "run-json-config-null":
        meta = json.loads((run / "run.json").read_text())
        meta["config"] = None
        (run / "run.json").write_text(json.dumps(meta))
        return "run.json: unreadable ('config' is null"
    if what == "run-json-list":
        (run / "run.json").write_text("[1, 2]")
        return "run.json: unreadable"
    if what == "run-json-binary":
        (run / "run.json").write_bytes(b"\xff\xfe\x00garbage")
        return "run.json: unreadable"
    raise AssertionError(what)


DAMAGES = ["values-garbage", "values-truncated", "values-wrong-schema", "values-wrong-type", "values-is-dir",
           "steps-garbage", "steps-wrong-schema", "run-json-dir", "run-json-config-null", "run-json-list",
           "run-json-binary"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_run_files_give_one_line_for_score_audit_report(fresh, damage):
    root, p = fresh
    run = p["run"]
    fragment = _damage(run, damage)
    if damage.startswith("steps"):  # read by audit only for an unfinished run (from its step log)
        (run / "values.parquet").unlink()
        meta = json.loads((run / "run.json").read_text())
        meta["status"] = "interrupted"
        (run / "run.json").write_text(json.dumps(meta))
        fragment = fragment if damage != "steps-wrong-schema" else "unreadable (column 'step' is string"
    refused(["score", p["train"], "--run", run, "-o", root / "s.parquet"], root,
            "has no values.parquet" if damage.startswith("steps") else fragment)
    refused(["audit", run, "-o", root / "a.parquet", "--no-predict"], root, fragment)
    refused(["report", run, "-o", root / "r.html"], root, fragment)


def _resume(p, root):
    return ["train", p["train"], "--dev", p["dev"], "--out", p["run"], *FAST, "--resume"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/valuekit-evil",))


@pytest.mark.parametrize("kind", ["random", "truncated", "evil-pickle", "not-a-dict", "missing-keys",
                                  "wrong-trainer-state", "bad-parts"])
def test_damaged_checkpoint_on_resume(fresh, kind):
    root, p = fresh
    ckpt = p["run"] / "checkpoint.pt"
    good = torch.load(ckpt, weights_only=True)
    if kind == "random":
        ckpt.write_bytes(np.random.default_rng(0).bytes(2000))
    elif kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:500])
    elif kind == "evil-pickle":
        ckpt.write_bytes(pickle.dumps(_Evil()))
    elif kind == "not-a-dict":
        torch.save([1, 2, 3], ckpt)
    elif kind == "missing-keys":
        torch.save({"step": 4}, ckpt)
    elif kind == "wrong-trainer-state":
        torch.save({**good, "trainer": {"nothing": torch.zeros(2)}}, ckpt)
    else:
        torch.save({**good, "parts": {"steps": -3}}, ckpt)
    # the run is marked interrupted so that --resume is legitimate
    meta = json.loads((p["run"] / "run.json").read_text())
    meta["status"] = "interrupted"
    (p["run"] / "run.json").write_text(json.dumps(meta))
    err = refused(_resume(p, root), root, "checkpoint.pt: unreadable")
    assert "weights_only" not in err and "pickle" not in err.lower().replace("unpickling", "")
    assert not (p["run"] / ".lock").exists()
    assert not Path("/tmp/valuekit-evil").exists()


# ---------------------------------------------------------------- races and signals


def _contender(out: str, barrier, results) -> None:
    from valuekit.errors import ValueKitError
    from valuekit.training.rundir import prepare_run

    # Widen the window between "is it there?" and "make it" (50 ms instead of microseconds) so that the
    # contenders really overlap on a busy 2-core machine: this is where the old code decided "I created it".
    real_mkdir = Path.mkdir

    def slow_mkdir(self, *a, **k):
        time.sleep(0.05)
        return real_mkdir(self, *a, **k)

    Path.mkdir = slow_mkdir
    barrier.wait()
    try:
        prepare_run(Path(out), {}, False)
    except ValueKitError as exc:
        results.put(("lost", str(exc)))
        return
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    try:
        (Path(out) / f"winner-{os.getpid()}").write_text("x")  # the winner starts using its directory
        time.sleep(0.05)
        results.put(("won", os.getpid()))
    except OSError as exc:  # the directory was removed under the winner
        results.put(("error", f"winner lost its directory: {exc}"))


def test_simultaneous_creation_of_one_run_directory_is_race_free(tmp_path):
    """Four processes released by one barrier create the same new run directory, 8 times: exactly one
    wins each time, and its directory, lock and files survive the losers' clean-up (the code before
    this guard failed in the first round: a loser that had seen no directory removed the winner's, and a
    third process then took a second lock)."""

    ctx = mp.get_context("fork")
    for i in range(8):
        out = tmp_path / f"r{i}" / "run"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(str(out), barrier, results)) for _ in range(4)]
        for pr in procs:
            pr.start()
        got = [results.get(timeout=60) for _ in procs]
        for pr in procs:
            pr.join(timeout=60)
        winners = [g[1] for g in got if g[0] == "won"]
        assert not [g for g in got if g[0] == "error"], got
        assert len(winners) == 1, got
        assert all("in use by another valuekit process" in g[1] for g in got if g[0] == "lost"), got
        assert (out / f"winner-{winners[0]}").exists() and (out / ".lock").exists()
        assert (out / ".lock").read_text().endswith(f":{winners[0]}")


def test_stale_lock_of_a_dead_process_is_taken_over_once(tmp_path):
    import socket

    from valuekit.runs.lock import acquire_lock

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(f"{socket.gethostname()}:{int(dead.stdout)}")
    lock = acquire_lock(run)
    assert lock.read_text().endswith(f":{os.getpid()}")
    assert sorted(x.name for x in run.iterdir()) == [".lock"]  # no renamed leftovers


def test_sigterm_during_score_leaves_no_temporary(tmp_path):
    n = 300_000
    ids = np.arange(n)
    w = RunWriter(tmp_path / "run", meta={"method": "uniform", "id_type": "int64"}, id_type="int64")
    w.write_values(pd.DataFrame({"example_id": ids, "value": np.linspace(0, 1, n), "value_std": np.nan,
                                 "weight": np.ones(n), "rank": np.arange(n, 0, -1)}))
    w.close("completed")
    table = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": ids, "a": np.random.default_rng(0).normal(size=n)}), table)
    before = table.read_bytes()
    out = tmp_path / "out.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "valuekit.cli", "score", str(table), "--run", str(tmp_path / "run"),
                             "-o", str(out), "--batch-rows", "16"], stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(tmp_path.glob(".out.parquet.*.tmp")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not list(tmp_path.glob(".*.tmp")) and not out.exists()
    assert table.read_bytes() == before


# ---------------------------------------------------------------- smaller items


def test_csv_value_beyond_float32_is_named_without_warnings(tmp_path, recwarn):
    df = blobs(12)
    df["f1"] = df["f1"].astype(np.float64)
    df.loc[3, "f1"] = 1e308
    df.to_csv(tmp_path / "t.csv", index=False)
    code, _, err = cli(["train", tmp_path / "t.csv", "--dev", tmp_path / "t.csv", "--out", tmp_path / "r", *FAST])
    assert code == 2 and "column 'f1' has value 1e+308 at id 3; beyond float32" in err
    assert not [w for w in recwarn if "overflow" in str(w.message)]
    assert not (tmp_path / "r").exists()


def test_bare_valuekit_and_unknown_settings_messages(tables):
    code, _, err = cli([])
    assert code == 2 and "(see valuekit --help)" in err and "valuekit valuekit" not in err
    code, _, err = cli(["train", tables["train"], "--dev", tables["dev"], "--out", "/nonexistent-x/r", "--set",
                        "nope=1", *FAST])
    assert code == 2 and "method settings:" in err and "loop settings:" in err and "checkpoint_every" in err


def test_data_list_says_bundled_and_unknown_name_lists_multilingual(tmp_path):
    code, out, _ = cli(["data", "list"])
    assert code == 0
    lines = out.splitlines()
    digits = lines[lines.index(next(x for x in lines if x.startswith("digits"))) + 1]
    assert "bundled: data/digits-noisy20" in digits
    assert any(x.startswith("multilingual") for x in lines) and "[prepare: " in out
    code, _, err = cli(["data", "prepare", "nope", "-o", tmp_path / "d"])
    assert code == 2 and "multilingual" in err and "wine" in err


def test_data_prepare_options_all_have_help():
    from valuekit.cli.main import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "clean", "predict", "score", "audit", "report", "bench", "data"} <= set(commands)
    for cmd, sub in commands.items():
        subs = [sub]
        if cmd == "data":
            subs = list(sub._subparsers._group_actions[0].choices.values())
        for s in subs:
            for a in s._actions:
                if a.dest != "help" and not isinstance(a, type(parser._subparsers._group_actions[0])):
                    assert a.help, (cmd, a.dest)


def test_warnings_for_big_batch_dev_equal_to_train_and_stray_label(tmp_path):
    df = blobs(20, classes=2)
    df["label"] = np.where(np.arange(20) % 2 == 0, "0", "1")
    df.loc[5, "label"] = "x"
    df["label"] = df["label"].astype(object)
    df.to_parquet(tmp_path / "t.parquet", index=False)
    code, _, err = cli(["train", tmp_path / "t.parquet", "--dev", tmp_path / "t.parquet", "--out", tmp_path / "r",
                        "--steps", "2", "--batch-size", "64", "--device", "cpu"])
    assert code == 0, err
    warns = [x for x in err.splitlines() if x.startswith("valuekit: warning:")]
    assert len(warns) == 3, err
    assert "--batch-size 64 is larger than the training table (20 rows)" in warns[0]
    assert "holds the same rows as the training table" in warns[1]
    assert "label 'x' is not an integer" in warns[2]


def test_progress_lines_without_a_terminal_and_no_nan_before_first_eval():
    from valuekit.training.progress import Progress

    stream = io.StringIO()
    bar = Progress(total=100, desc="dds", stream=stream, every_s=1e9)
    for step in range(1, 101):
        bar.set_postfix(loss="0.500", dev_acc=None if step < 50 else "0.900")
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("dds: step 10/100 (10%) loss=0.500 ")
    assert "dev_acc" not in lines[3] and "dev_acc=0.900" in lines[5] and "nan" not in stream.getvalue()
    assert lines[-1].startswith("dds: step 100/100 (100%)")
    slow = io.StringIO()
    bar = Progress(total=10**6, desc="x", stream=slow, every_s=0.0)
    bar.update(1)
    bar.update(1)
    assert len(slow.getvalue().splitlines()) == 2  # the time rule fires without waiting for 10 %


def test_train_prints_progress_lines_when_not_a_terminal(tables, tmp_path):
    code, _, err = cli(["train", tables["train"], "--dev", tables["dev"], "--out", tmp_path / "r", "--steps", "20",
                        "--device", "cpu", "--set", "eval_every=10"])  # stderr is a StringIO here: no terminal
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.startswith("uniform: step ")]
    assert len(lines) == 10 and "nan" not in err
    assert "dev_acc=" not in lines[3] and "dev_acc=" in lines[-1]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_interrupt_while_the_output_file_opens_leaves_no_temporary(tmp_path, monkeypatch, suffix):
    """The window the SIGTERM test sometimes hit on a loaded machine: the temporary file exists but the writer was
    not returned yet, so `score` had no sink to abort. The sink removes its own file then."""
    from valuekit.export import tablestream

    def opened_then_interrupted(path, schema, *a, **k):
        Path(path).write_bytes(b"PAR1")
        raise KeyboardInterrupt

    monkeypatch.setattr(tablestream.pq, "ParquetWriter", opened_then_interrupted)
    monkeypatch.setattr(tablestream.pacsv, "CSVWriter", opened_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        tablestream._FileSink(tmp_path / f"out{suffix}", pa.schema([("a", pa.int64())]))
    assert list(tmp_path.iterdir()) == []
