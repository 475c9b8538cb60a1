"""Issue 18: a property-based bad-input matrix for every command.

Hypothesis builds broken tables (types, NaN/inf, duplicate and null ids, shapes, encodings, empty
files, truncated Parquet), damaged run directories, bad options and hostile output paths, and each
case runs the CLI's main() in-process (no Python start per case). Every case holds at least one
fault, so every case must end with: exit 2, exactly one line on stderr, no traceback, every file
byte-identical and no new file. Derandomised: the same cases on every run. At least 300 cases per
command (counted, not assumed).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import string
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import blobs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from valuekit.cli.main import main

CASES = 300  # per command
SETTINGS = settings(max_examples=CASES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))
FAST = ["--steps", "2", "--batch-size", "2", "--device", "cpu"]
RO = Path("/sys/kernel") if os.geteuid() == 0 else None  # read-only even for root (sysfs)


# ---------------------------------------------------------------- running a case


def _snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        if root is None or not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, err.getvalue()


def refused(argv, *roots: Path) -> None:
    """The case must fail cleanly and leave every file under roots as it was."""
    before = _snapshot(*roots)
    code, err = _run(argv)
    assert "Traceback" not in err, err
    assert code == 2, (argv, code, err)
    assert err.count("\n") == 1 and err.startswith("valuekit: error:"), (argv, err)
    assert _snapshot(*roots) == before, (argv, "files changed", err)


# ---------------------------------------------------------------- the shared world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    train, dev = root / "train.parquet", root / "dev.parquet"
    blobs(40, seed=1, classes=3, noise=0.2).to_parquet(train, index=False)
    blobs(12, seed=2, classes=3, id_start=1000).to_parquet(dev, index=False)
    run = root / "run"
    code, err = _run(["train", train, "--dev", dev, "--out", run, "--steps", "4", "--batch-size", "8",
                      "--device", "cpu"])
    assert code == 0, err
    if RO is None:
        ro = root / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    return {"root": root, "train": train, "dev": dev, "run": run, "ro": RO or root / "ro"}


# ---------------------------------------------------------------- broken tables

TABLE_FAULTS = ["dup_id", "null_id", "null_label", "nan_feature", "inf_feature", "huge_feature", "text_feature",
                "mixed_feature", "no_id", "no_label", "zero_rows", "single_class", "empty_file", "truncated",
                "random_bytes", "bad_utf8", "utf16", "ragged_list", "bad_suffix", "is_dir", "missing"]
# faults that matter to a command that reads only ids (score) or ids and labels (audit --data)
ID_FAULTS = ["dup_id", "null_id", "no_id", "zero_rows", "empty_file", "truncated", "random_bytes", "bad_suffix",
             "is_dir", "missing", "foreign_ids", "bad_utf8_id", "clash_column"]
LABEL_FAULTS = ["dup_id", "null_id", "null_label", "no_id", "no_label", "zero_rows", "empty_file", "truncated",
                "random_bytes", "bad_suffix", "is_dir", "missing", "foreign_label", "bad_utf8"]


@st.composite
def broken_table(draw, faults=TABLE_FAULTS):
    """(frame or raw bytes, file suffix, the faults applied); at least one fault, each one fatal."""
    n = draw(st.integers(4, 12))
    df = blobs(n, seed=draw(st.integers(0, 50)), classes=draw(st.integers(2, 3)), dim=draw(st.integers(1, 3)))
    df["f0"] = df["f0"].astype(np.float64)
    if draw(st.booleans()):
        df["id"] = [f"ex{i}" for i in df["id"]]
    fmt = draw(st.sampled_from([".parquet", ".csv"]))
    chosen = draw(st.lists(st.sampled_from(faults), min_size=1, max_size=3, unique=True))
    last = ("ragged_list", "no_id", "no_label", "zero_rows")  # those that remove columns or rows go last
    chosen = sorted(chosen, key=lambda f: last.index(f) + 1 if f in last else 0)
    rows = st.integers(0, n - 1)
    raw = None
    for fault in chosen:
        if fault == "dup_id":
            i, j = draw(rows), draw(rows)
            j = j if j != i else (i + 1) % n
            df.loc[j, "id"] = df.loc[i, "id"]
        elif fault == "null_id":
            df["id"] = df["id"].astype(object)
            df.loc[draw(rows), "id"] = None
        elif fault == "null_label":
            df.loc[draw(rows), "label"] = None
        elif fault in ("nan_feature", "inf_feature", "huge_feature"):
            value = {"nan_feature": np.nan, "inf_feature": draw(st.sampled_from([np.inf, -np.inf])),
                     "huge_feature": draw(st.sampled_from([1e39, -1e300, 3.5e38]))}[fault]
            if not pd.api.types.is_float_dtype(df["f0"]):  # after a text fault (pandas' str dtype refuses a float)
                df["f0"] = df["f0"].astype(object)
            df.loc[draw(rows), "f0"] = value
        elif fault == "text_feature":
            df["f0"] = draw(st.lists(st.text(string.ascii_letters, min_size=1, max_size=4), min_size=n, max_size=n))
        elif fault == "mixed_feature":  # numbers written as text and one word (what a spreadsheet export gives)
            df["f0"] = df["f0"].astype(str)
            df.loc[draw(rows), "f0"] = draw(st.sampled_from(["x", "1,5", "--", "n/a?"]))
        elif fault == "no_id":
            df = df.drop(columns=["id"], errors="ignore")
        elif fault == "no_label":
            df = df.drop(columns=["label"], errors="ignore")
        elif fault == "zero_rows":
            df = df.iloc[:0]
        elif fault == "single_class":
            df["label"] = "c0"
        elif fault == "foreign_ids":
            df["id"] = [f"zz{i}" for i in range(len(df))]
        elif fault == "foreign_label":
            df.loc[draw(rows), "label"] = "never-seen"
        elif fault == "clash_column":
            df[draw(st.sampled_from(["weight", "value", "rank"]))] = 1.0
        elif fault == "ragged_list":
            fmt = ".parquet"
            lens = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n).filter(lambda v: len(set(v)) > 1))
            df = df[[c for c in df.columns if not c.startswith("f")]].copy()
            df["pixels"] = [np.ones(k, dtype=np.float32) for k in lens]
        elif fault in ("empty_file", "random_bytes"):
            raw = b"" if fault == "empty_file" else draw(st.binary(min_size=1, max_size=200))
        elif fault == "truncated":
            fmt = ".parquet"
            raw = "truncate"
        elif fault in ("bad_utf8", "bad_utf8_id"):
            fmt = ".csv"
            col = "label" if fault == "bad_utf8" else "id"
            df[col] = df[col].astype(object)
            df.loc[draw(rows), col] = "\udce9caf"  # a lone byte 0xE9 (latin-1 é) in a UTF-8 file
        elif fault == "utf16":
            fmt = ".csv"
            raw = "utf16"
        elif fault == "bad_suffix":
            fmt = draw(st.sampled_from([".txt", ".json", "", ".parq"]))
        elif fault in ("is_dir", "missing"):
            raw = fault
    return df, fmt, raw, chosen


def write_table(case, folder: Path, name: str = "t") -> Path:
    df, fmt, raw, _ = case
    path = folder / f"{name}{fmt}"
    if raw == "utf16" or raw == "truncate" or fmt in (".parquet", ".parq"):  # only a UTF-8 CSV holds a lone byte
        df = df.map(lambda v: v.replace("\udce9", "\u00e9") if isinstance(v, str) else v)
    if raw == "is_dir":
        path.mkdir()
    elif raw == "missing":
        pass
    elif isinstance(raw, bytes):
        path.write_bytes(raw)
    elif raw == "utf16":
        path.write_bytes(df.to_csv(index=False).encode("utf-16"))
    elif raw == "truncate" or fmt in (".parquet", ".parq"):
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        data = buf.getvalue()
        path.write_bytes(data[: len(data) // 2] if raw == "truncate" else data)
    else:
        path.write_bytes(df.to_csv(index=False).encode("utf-8", errors="surrogateescape"))
    return path


# ---------------------------------------------------------------- hostile outputs

_names = st.text(string.ascii_letters + string.digits + "-_ é", min_size=1, max_size=10).map(lambda s: "o" + s)


@st.composite
def hostile_output(draw, *, kind: str, suffix: str, inputs: list[str]):
    """(how, a function (folder, world) -> path); kind 'file', 'dir' or 'run' (train's run directory)."""
    options = ["empty", "blank", "under_file", "read_only", "run_file", "run_inside"] + (["input"] if inputs else [])
    options += {"file": ["existing_dir", "bad_suffix"], "dir": ["existing_file"],
                "run": ["existing_file", "nonempty_dir"]}[kind]
    how = draw(st.sampled_from(options))
    name = draw(_names)
    which = draw(st.sampled_from(inputs)) if inputs else None
    run_file = draw(st.sampled_from(["values.parquet", "run.json", "checkpoint.pt", "steps", "metrics/x" + suffix]))
    bad = draw(st.sampled_from([".txt", "", ".json", suffix + ".bak"]))

    def make(folder: Path, w: dict) -> str:
        if how == "empty":
            return ""
        if how == "blank":
            return "  "
        if how == "under_file":
            blocker = folder / "blocker"
            blocker.write_text("x")
            return str(blocker / (name + suffix))
        if how == "read_only":
            return str(w["ro"] / name / ("x" + suffix))
        if how == "input":
            return str(w[which])
        if how == "run_file":
            return str(w["run"] / run_file)
        if how == "run_inside":
            return str(w["run"] / (name + suffix))
        if how == "existing_dir":
            d = folder / (name + suffix)
            d.mkdir()
            return str(d)
        if how == "bad_suffix":
            return str(folder / (name + bad))
        if how == "existing_file":
            f = folder / name
            f.write_text("x")
            return str(f)
        d = folder / name  # nonempty_dir
        d.mkdir()
        (d / "keep.txt").write_text("x")
        return str(d)

    return how, make


def _case_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vk-bad-"))


def _count(seen):
    assert len(seen) >= CASES, f"only {len(seen)} cases ran"


# ---------------------------------------------------------------- the commands


def test_train_bad_inputs(world):
    seen = []

    @SETTINGS
    @given(mode=st.sampled_from(["train", "dev", "out"]), case=broken_table(),
           out=hostile_output(kind="run", suffix="", inputs=["train", "dev"]))
    def check(mode, case, out):
        folder = _case_dir()
        try:
            train, dev = world["train"], world["dev"]
            target = folder / "run"
            if mode == "train":
                train = write_table(case, folder)
            elif mode == "dev":
                dev = write_table(case, folder, "dev")
            else:
                target = out[1](folder, world)
            refused(["train", train, "--dev", dev, "--out", target, *FAST], folder, world["root"])
            seen.append(mode)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    _count(seen)


def test_score_bad_inputs(world):
    seen = []

    @SETTINGS
    @given(mode=st.sampled_from(["table", "out", "run", "option"]), case=broken_table(ID_FAULTS),
           out=hostile_output(kind="file", suffix=".parquet", inputs=["train"]),
           damage=st.sampled_from(DAMAGES), option=st.sampled_from(BAD_SCORE_OPTIONS))
    def check(mode, case, out, damage, option):
        folder = _case_dir()
        try:
            table, run, target, extra = world["train"], world["run"], folder / "s.parquet", []
            if mode == "table":
                table = write_table(case, folder)
            elif mode == "out":
                target = out[1](folder, world)
            elif mode == "run":
                run = damaged_copy(world["run"], folder, damage)
            else:
                extra = list(option)
            refused(["score", table, "--run", run, "-o", target, *extra], folder, world["root"])
            seen.append(mode)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    _count(seen)


BAD_SCORE_OPTIONS = [("--keep-fraction", "1.5"), ("--keep-fraction", "-0.1"), ("--top-k", "-1"),
                     ("--drop-fraction", "2"), ("--keep-fraction", "0.5", "--top-k", "3"), ("--min-weight", "nan"),
                     ("--batch-rows", "0"), ("--subset-only",), ("--keep-fraction", "abc"), ("--run-dir", "x"),
                     ("--id-col", "nope"), ("--method", "uniform")]

DAMAGES = ["values-garbage", "values-truncated", "values-wrong-schema", "values-wrong-type", "values-is-dir",
           "run-json-dir", "run-json-config-null", "run-json-list", "run-json-binary", "run-json-missing",
           "schema-version"]


def damaged_copy(run: Path, folder: Path, damage: str) -> Path:
    import json

    copy = folder / "run"
    shutil.copytree(run, copy)
    values, meta = copy / "values.parquet", copy / "run.json"
    if damage == "values-garbage":
        values.write_bytes(b"PAR1 garbage")
    elif damage == "values-truncated":
        values.write_bytes(values.read_bytes()[:-30])
    elif damage == "values-wrong-schema":
        pq.write_table(pa.table({"example_id": [1], "score": [0.5]}), values)
    elif damage == "values-wrong-type":
        t = pq.read_table(values)
        pq.write_table(t.set_column(t.schema.get_field_index("weight"), "weight",
                                    pa.array(["w"] * t.num_rows)), values)
    elif damage == "values-is-dir":
        values.unlink()
        values.mkdir()
    elif damage == "run-json-dir":
        meta.unlink()
        meta.mkdir()
    elif damage == "run-json-config-null":
        m = json.loads(meta.read_text())
        m["config"] = None
        meta.write_text(json.dumps(m))
    elif damage == "run-json-list":
        meta.write_text("[]")
    elif damage == "run-json-binary":
        meta.write_bytes(b"\x00\xff\xfe")
    elif damage == "run-json-missing":
        meta.unlink()
    else:
        m = json.loads(meta.read_text())
        m["schema_version"] = 99
        meta.write_text(json.dumps(m))
    return copy


def _audit_like(command: str, suffix: str, extra: list[str]):
    def test(world):
        seen = []

        @SETTINGS
        @given(mode=st.sampled_from(["data", "out", "run"]), case=broken_table(LABEL_FAULTS),
               out=hostile_output(kind="file", suffix=suffix, inputs=["train", "dev"]),
               damage=st.sampled_from(DAMAGES))
        def check(mode, case, out, damage):
            folder = _case_dir()
            try:
                run, target, data = world["run"], folder / f"a{suffix}", []
                if mode == "data":
                    data = ["--data", write_table(case, folder)]
                elif mode == "out":
                    target = out[1](folder, world)
                else:
                    run = damaged_copy(world["run"], folder, damage)
                refused([command, run, "-o", target, *data, *extra], folder, world["root"])
                seen.append(mode)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        check()
        _count(seen)

    return test


test_audit_bad_inputs = _audit_like("audit", ".parquet", ["--no-predict"])
test_report_bad_inputs = _audit_like("report", ".html", [])


BAD_PREPARE = [("--noise", "1.0"), ("--noise", "-0.1"), ("--imbalance", "0.5"), ("--test-fraction", "0"),
               ("--test-fraction", "1.5"), ("--max-train", "0"), ("--max-train", "-5"), ("--dev-size", "0"),
               ("--noise-kind", "weird"), ("--noise", "x"), ("--seed", "1.5"), ("--test-size", "0")]


def test_data_prepare_bad_inputs(world):
    seen = []

    @SETTINGS
    @given(mode=st.sampled_from(["name", "option", "out"]), name=st.text(string.ascii_lowercase + "-", max_size=8),
           option=st.sampled_from(BAD_PREPARE), out=hostile_output(kind="dir", suffix="", inputs=[]))
    def check(mode, name, option, out):
        folder = _case_dir()
        try:
            dataset, extra, target = "wine", [], folder / "d"
            if mode == "name":
                dataset = "x" + name if name in ("wine", "digits", "mnist5k", "breast-cancer") or not name else name
                dataset = dataset if dataset not in ("wine", "digits") else "x" + dataset
            elif mode == "option":
                extra = list(option)
                dataset = "multilingual" if option[0] == "--test-size" else "wine"
            else:
                target = out[1](folder, world)
            refused(["data", "prepare", dataset, "-o", target, *extra], folder, world["root"])
            seen.append(mode)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    _count(seen)


BAD_BENCH = [("--steps", "0"), ("--steps", "-3"), ("--seeds", "a,b"), ("--seeds", ","), ("--datasets", "nope"),
             ("--methods", "nope"), ("--methods", "dds,zzz"), ("--device", "tpu"), ("--device", "cuda:99"),
             ("--steps", "x")]


def test_bench_bad_inputs(world):
    seen = []

    @SETTINGS
    @given(mode=st.sampled_from(["option", "out", "kind"]), option=st.sampled_from(BAD_BENCH),
           kinds=st.lists(st.sampled_from(["speed", "layer", "quality", "scale", "all"]), min_size=1, max_size=3),
           out=hostile_output(kind="dir", suffix="", inputs=[]), word=st.text(string.ascii_lowercase, max_size=6))
    def check(mode, option, kinds, out, word):
        folder = _case_dir()
        try:
            extra, target = [], folder / "b"
            if mode == "option":
                extra = list(option)
            elif mode == "out":
                target = out[1](folder, world)
            else:
                kinds = kinds + ["x" + word]
            refused(["bench", *kinds, "-o", target, "--quick", *extra], folder, world["root"])
            seen.append(mode)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()
    _count(seen)
