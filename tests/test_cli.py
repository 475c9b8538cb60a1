"""The `valuekit` command: happy paths and bad input (one line, exit code 2, nothing written)."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from valuekit.cli.main import main

FAST = ["--steps", "12", "--batch-size", "16", "--device", "cpu", "--set", "eval_every=6"]


def test_train_then_score_keeps_columns_and_adds_values(tables, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tables["train"]), "--dev", str(tables["dev"]), "--test", str(tables["test"]),
                 "--out", str(run), *FAST]) == 0
    out = capsys.readouterr().out
    assert str(run) in out and "values.parquet" in out
    scored = tmp_path / "scored.parquet"
    assert main(["score", str(tables["train"]), "--run", str(run), "-o", str(scored), "--keep-fraction", "0.5"]) == 0
    src = pd.read_parquet(tables["train"])
    got = pd.read_parquet(scored)
    assert list(got.columns) == list(src.columns) + ["weight", "value", "value_std", "rank", "selected"]
    pd.testing.assert_frame_equal(got[src.columns], src)
    assert got.weight.mean() == pytest.approx(1.0) and got.selected.sum() == 45
    values = pd.read_parquet(run / "values.parquet").set_index("example_id")
    np.testing.assert_allclose(got.value, values.value.loc[got.id], equal_nan=True)


def test_score_with_method_trains_first(tables, tmp_path, capsys):
    out = tmp_path / "w.csv"
    assert main(["score", str(tables["train"]), "--method", "uniform", "--dev", str(tables["dev"]),
                 "-o", str(out), "--top-k", "10", "--subset-only", *FAST]) == 0
    got = pd.read_csv(out)
    assert len(got) == 10 and got.selected.all() and sorted(got["rank"]) == list(range(1, 11))
    assert (tmp_path / "w.csv.run" / "values.parquet").exists()
    assert "scored table" in capsys.readouterr().out


def test_data_list_and_prepare(tmp_path, capsys):
    assert main(["data", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ("digits", "breast-cancer", "wine", "mnist5k", "fashion-mnist"):
        assert name in listed
    assert main(["data", "prepare", "wine", "-o", str(tmp_path / "w"), "--noise", "0.1", "--dev-size", "9"]) == 0
    train = pd.read_parquet(tmp_path / "w" / "train.parquet")
    assert train.is_noisy.sum() == round(0.1 * len(train))


def _write(tmp_path, name, df):
    p = tmp_path / name
    if name.endswith(".csv"):
        df.to_csv(p, index=False)
    else:
        df.to_parquet(p, index=False)
    return p


def _bad_cases(tmp_path, tables):
    """(argv, expected message fragment) for each bad input."""
    good, dev = str(tables["train"]), str(tables["dev"])
    out = str(tmp_path / "out")
    base = lambda table, d=dev: ["train", str(table), "--dev", str(d), "--out", out, *FAST]  # noqa: E731
    train_df = pd.read_parquet(tables["train"])
    dev_df = pd.read_parquet(tables["dev"])
    (tmp_path / "x.txt").write_text("hello")
    run = tmp_path / "made"
    main(["train", good, "--dev", dev, "--out", str(run), *FAST])
    other = _write(tmp_path, "other.parquet", train_df.iloc[:-3])
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    foreign = _write(tmp_path, "foreign.parquet", train_df.assign(id=train_df.id + 10_000))
    img = pa.table({"id": np.arange(12), "label": ["a", "b"] * 6,
                    "px": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(48, np.float32)), 4)})
    pq.write_table(img.replace_schema_metadata({b"valuekit.image_shape": b"[1, 2, 2]"}), tmp_path / "img.parquet")
    pq.write_table(img.replace_schema_metadata({b"valuekit.image_shape": b"[4, 1, 1]"}), tmp_path / "img_dev.parquet")
    return [
        (base(tmp_path / "corrupt.parquet"), "corrupt.parquet: cannot read train table"),
        (base(_write(tmp_path, "nulllab.parquet", train_df.assign(label=train_df.label.where(train_df.index != 4)))),
         "null label at id 4"),
        (base(_write(tmp_path, "one.parquet", train_df.assign(label="c1"))), "single class 'c1'"),
        (base(tmp_path / "img.parquet", tmp_path / "img_dev.parquet"), "image shape (4, 1, 1) differs"),
        (["score", str(foreign), "--run", str(run), "-o", str(tmp_path / "o.parquet")], "not in run"),
        (base(tmp_path / "missing.parquet"), "missing.parquet: no such file"),
        (base(tmp_path / "x.txt"), "unknown table format '.txt'"),
        (base(_write(tmp_path, "nolabel.parquet", train_df.drop(columns="label"))), "missing column 'label'"),
        (base(_write(tmp_path, "dup.parquet", train_df.assign(id=0))), "duplicate id 0"),
        (base(_write(tmp_path, "nan.csv", train_df.assign(f0=np.where(train_df.index == 5, np.nan, train_df.f0)))),
         "column 'f0' has value nan at id 5"),
        (base(_write(tmp_path, "empty.parquet", train_df.iloc[:0])), "table is empty"),
        (base(_write(tmp_path, "str.parquet", train_df.assign(city="Oslo"))), "column 'city' is not numeric"),
        (base(good, _write(tmp_path, "dev_label.parquet", dev_df.assign(label="zz"))), "label 'zz' not present"),
        (base(good, _write(tmp_path, "dev_cols.parquet", dev_df.rename(columns={"f1": "g1"}))),
         "feature column 'f1' not found"),
        (["score", good, "--run", str(run), "-o", good], "is the input table"),
        (["train", good, "--dev", dev, "--out", good, *FAST], "is the input table"),
        (["train", str(other), "--dev", dev, "--out", str(run), "--resume", *FAST], "--resume with different data"),
        (["train", good, "--dev", dev, "--out", str(run), "--resume", "--method", "uniform", "--model", "linear",
          *FAST], "--resume with different config"),
        (base(good) + ["--set", "nope=1"], "--set nope: unknown setting"),
        (base(good) + ["--set", "eval_every=x"], "expected int"),
        (base(good) + ["--method", "nope"], "unknown method 'nope'"),
        (base(good) + ["--model", "transformer"], "--model transformer: not a built-in model"),
        (base(good) + ["--device", "tpu"], "--device 'tpu'"),
        (base(good) + ["--model", "cnn"], "--model cnn needs image-shaped features"),
        (["score", good, "--run", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o.parquet")], "not a valuekit run"),
        (["score", good, "--run", str(run), "-o", str(tmp_path / "o.parquet"), "--keep-fraction", "1.5"],
         "--keep-fraction 1.5: must be in (0, 1]"),
    ]


def test_bad_input_gives_one_line_and_exit_2(tables, tmp_path, capsys):
    cases = _bad_cases(tmp_path, tables)
    capsys.readouterr()
    for argv, fragment in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert err.startswith("valuekit: error:") and "\n" not in err, err
        assert fragment in err, (fragment, err)
        assert not (tmp_path / "out").exists(), argv
        assert not (tmp_path / "o.parquet").exists()


def test_cuda_without_gpu_is_refused(tables, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = main(["train", str(tables["train"]), "--dev", str(tables["dev"]), "--out", str(tmp_path / "o"),
                 "--steps", "2", "--device", "cuda"])
    assert code == 2 and "no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_console_entry_point_runs_as_a_module(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "valuekit.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "train" in ok.stdout and "score" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "valuekit.cli", "train", str(tmp_path / "no.parquet"), "--dev",
                          "x", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such file" in bad.stderr
