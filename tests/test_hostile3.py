"""Hostile inputs, round three: data loss, silent wrong results, option bounds and late failures.

Every refusal here must be one line on stderr, exit 2, no traceback, and leave every file as it was.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import blobs
from test_hostile import FAST, cli, refused, snapshot

import valuekit
from valuekit.errors import InputError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny train/dev table and a finished uniform run on it (trained once for the module)."""
    root = tmp_path_factory.mktemp("world3")
    paths = {"train": root / "train.parquet", "dev": root / "dev.parquet", "run": root / "run"}
    blobs(40, seed=1, noise=0.2).to_parquet(paths["train"], index=False)
    blobs(12, seed=2, id_start=1000).to_parquet(paths["dev"], index=False)
    code, _, err = cli(["train", paths["train"], "--dev", paths["dev"], "--out", paths["run"], *FAST])
    assert code == 0, err
    return root, paths


@pytest.fixture
def fresh(world, tmp_path):
    """A private copy of the world in tmp_path (run.json names the copied tables)."""
    root, paths = world
    for p in root.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp_path / p.name)
    meta_path = tmp_path / "run" / "run.json"
    meta = json.loads(meta_path.read_text())
    for split in ("train", "dev"):
        meta["data"][split]["path"] = str(tmp_path / Path(meta["data"][split]["path"]).name)
    meta_path.write_text(json.dumps(meta))
    return tmp_path, {k: tmp_path / v.name for k, v in paths.items()}


# ---------------------------------------------------------------- data loss


@pytest.mark.parametrize("held", ["train.parquet", "dev.parquet", "test.parquet"])
def test_data_prepare_refuses_a_folder_holding_a_file_it_would_write(tmp_path, held):
    out = tmp_path / "d"
    out.mkdir()
    (out / held).write_text("the user's own table")
    refused(["data", "prepare", "wine", "-o", out], tmp_path, f"already holds {held}")
    assert (out / held).read_text() == "the user's own table"
    code, _, err = cli(["data", "prepare", "wine", "-o", out, "--overwrite"])
    assert code == 0, err
    assert pd.read_parquet(out / "train.parquet").shape[0] > 50  # replaced only when asked to


def test_data_prepare_into_a_folder_with_other_files_is_allowed(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    code, _, err = cli(["data", "prepare", "wine", "-o", out])
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep" and (out / "dev.parquet").exists()


def test_data_prepare_folder_format_refuses_an_existing_images_folder(tmp_path):
    out = tmp_path / "d"
    (out / "images").mkdir(parents=True)
    refused(["data", "prepare", "digits", "--format", "folder", "-o", out], tmp_path, "already holds images")


@pytest.mark.parametrize("out", ["", ".", "nonempty"])
def test_python_api_applies_the_cli_output_rules(fresh, monkeypatch, out):
    root, p = fresh
    monkeypatch.chdir(root)
    (root / "values.parquet").write_bytes(b"the user's own values")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "values.parquet").write_bytes(b"mine too")
    before = snapshot(root)
    with pytest.raises(InputError, match="empty path" if out == "" else "not empty and holds no valuekit run"):
        valuekit.train(blobs(20), dev=blobs(8, id_start=100), out=out, steps=2, device="cpu")
    assert snapshot(root) == before


def test_python_api_misuse_is_one_input_error(tmp_path):
    dev = blobs(8, id_start=100)
    with pytest.raises(InputError, match="train is None"):
        valuekit.train(None, dev=dev, out=tmp_path / "r")
    with pytest.raises(InputError, match="steps='10': must be a whole number, not str"):
        valuekit.train(blobs(20), dev=dev, out=tmp_path / "r", steps="10", device="cpu")
    with pytest.raises(InputError, match=r"seed=-1: must be in \[0, "):
        valuekit.train(blobs(20), dev=dev, out=tmp_path / "r", seed=-1, device="cpu")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- silent wrong results


def test_audit_and_report_refuse_a_completed_run_without_values(fresh):
    root, p = fresh
    (p["run"] / "values.parquet").unlink()
    refused(["audit", p["run"], "-o", root / "a.parquet", "--no-predict"], root, "values.parquet: missing")
    refused(["report", p["run"], "-o", root / "r.html"], root, "values.parquet: missing")
    with pytest.raises(InputError, match="values.parquet: missing"):
        valuekit.runs.reader.read_run(p["run"]).values()


def test_an_interrupted_run_without_values_is_still_audited_from_its_step_log(fresh):
    root, p = fresh
    (p["run"] / "values.parquet").unlink()
    meta = json.loads((p["run"] / "run.json").read_text())
    meta["status"] = "interrupted"
    (p["run"] / "run.json").write_text(json.dumps(meta))
    vals = valuekit.runs.reader.read_run(p["run"]).values()
    assert vals.attrs.get("partial") and len(vals) > 0


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage"])
def test_resume_verifies_the_parts_it_continues(fresh, damage):
    root, p = fresh
    run = p["run"]
    part = run / "steps" / "part-00000.parquet"
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif damage == "missing":
        part.unlink()
    else:
        part.write_bytes(os.urandom(200))
    meta = json.loads((run / "run.json").read_text())
    meta["status"] = "interrupted"
    (run / "run.json").write_text(json.dumps(meta))
    refused(["train", p["train"], "--dev", p["dev"], "--out", run, *FAST, "--resume"], root,
            "part-00000.parquet: unreadable")
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert not (run / ".lock").exists()


def test_ids_are_unique_after_conversion_to_the_id_type(tmp_path):
    df = blobs(12)
    df["id"] = df["id"].astype(object)
    df.loc[4, "id"] = "1"  # the int 1 is at row 1
    with pytest.raises(InputError, match="duplicate id '1'"):
        valuekit.train(df, dev=blobs(8, id_start=100), out=tmp_path / "r", steps=2, device="cpu")
    assert not (tmp_path / "r").exists()


def test_a_list_column_as_id_is_named(tmp_path):
    df = blobs(12)
    df["pixels"] = [np.ones(3, dtype=np.float32)] * 12
    df[["id", "label", "pixels"]].to_parquet(tmp_path / "t.parquet", index=False)
    refused(["train", tmp_path / "t.parquet", "--dev", tmp_path / "t.parquet", "--out", tmp_path / "r",
             "--id-col", "pixels", *FAST], tmp_path, "column 'pixels' holds ndarray values (row 0), not ids")


# ---------------------------------------------------------------- option bounds


@pytest.mark.parametrize("threads", ["100000", str(4 * len(os.sched_getaffinity(0)) + 1)])
def test_threads_beyond_four_per_core_are_refused(fresh, threads):
    root, p = fresh
    refused(["train", p["train"], "--dev", p["dev"], "--out", root / "r", *FAST, "--threads", threads], root,
            "threads on this machine")


@pytest.mark.parametrize("seed", ["-1", "-5", str(2**63), "1180591620717411303424"])
def test_seeds_out_of_range_for_every_command(fresh, seed):
    root, p = fresh
    refused(["train", p["train"], "--dev", p["dev"], "--out", root / "r", *FAST, "--seed", seed], root,
            f"--seed {seed}: must be")
    refused(["audit", p["run"], "-o", root / "a.parquet", "--no-predict", "--seed", seed], root, f"--seed {seed}")
    refused(["data", "prepare", "wine", "-o", root / "d", "--seed", seed], root, f"--seed {seed}")
    refused(["bench", "layer", "--quick", "-o", root / "b", "--seeds", f"0,{seed}"], root, f"--seeds {seed}")


@pytest.mark.parametrize("ratio", ["inf", "nan", "-inf", "0.5"])
def test_imbalance_must_be_finite_and_at_least_one(tmp_path, ratio):
    refused(["data", "prepare", "digits", f"--imbalance={ratio}", "-o", tmp_path / "d"], tmp_path,
            f"--imbalance {ratio}")
    from valuekit.data.bundled import prepare

    with pytest.raises(InputError, match=r"^imbalance=") as info:  # the library names its argument
        prepare("digits", tmp_path / "d", imbalance=float(ratio))
    assert "--" not in str(info.value) and info.value.cli.startswith(f"--imbalance {float(ratio)}")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- one validation pass before anything is written


class _NoParams(torch.nn.Module):
    def forward(self, x):
        return x[:, :3] * 1.0


class _IntLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).round().long()


class _NanLogits(_IntLogits):
    def forward(self, x):
        return self.fc(x) * float("nan")


class _BoomInTraining(_IntLogits):
    def forward(self, x):
        if self.training:
            raise RuntimeError("boom")
        return self.fc(x)


class _Tokens(torch.nn.Module):
    def __init__(self, vocab=20):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.emb(x.long()).mean(1))


def no_params(num_classes, input_shape):
    return _NoParams()


def int_logits(num_classes, input_shape):
    return _IntLogits()


def nan_logits(num_classes, input_shape):
    return _NanLogits()


def boom_in_training(num_classes, input_shape):
    return _BoomInTraining()


def tokens(num_classes, input_shape):
    return _Tokens()


@pytest.mark.parametrize("factory, fragment", [("no_params", "has no trainable parameters"),
                                               ("int_logits", "output has dtype int64; expected floating-point"),
                                               ("nan_logits", "output holds NaN or inf")])
def test_own_models_that_cannot_train_are_refused_before_the_run_exists(fresh, factory, fragment):
    root, p = fresh
    refused(["train", p["train"], "--dev", p["dev"], "--out", root / "r", *FAST, "--model",
             f"test_hostile3:{factory}"], root, fragment)


def test_a_forward_that_raises_during_training_marks_the_run_failed_in_one_line(fresh):
    root, p = fresh
    code, _, err = cli(["train", p["train"], "--dev", p["dev"], "--out", root / "r", *FAST, "--model",
                        "test_hostile3:boom_in_training"])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "test_hostile3:boom_in_training" in err and "RuntimeError: boom" in err
    meta = json.loads((root / "r" / "run.json").read_text())
    assert meta["status"] == "failed" and meta["error"] == "RuntimeError: boom"
    assert not (root / "r" / ".lock").exists()


def _token_table(path, ids, rows=8, start=0):
    y = np.arange(rows) % 2
    seq = [np.array(ids(i), dtype=np.float32) for i in range(rows)]
    pd.DataFrame({"id": np.arange(start, start + rows), "label": y, "tokens": seq}).to_parquet(path, index=False)


@pytest.mark.parametrize("bad, where", [(-1, "train"), (20, "train"), (2**40, "train"), (25, "dev"), (1.5, "train")])
def test_token_ids_outside_the_embedding_are_named_before_training(tmp_path, bad, where):
    good = lambda i: [1 + i % 5, 2, 3]  # noqa: E731
    _token_table(
        tmp_path / "train.parquet", (lambda i: [1, 2, bad] if i == 5 else good(i)) if where == "train" else good
    )
    _token_table(tmp_path / "dev.parquet", (lambda i: [bad, 1, 1] if i == 3 else good(i)) if where == "dev" else good,
                 start=100)
    row, ident = (5, 5) if where == "train" else (3, 103)
    shown = int(bad) if float(bad).is_integer() else bad
    refused(["train", tmp_path / "train.parquet", "--dev", tmp_path / "dev.parquet", "--out", tmp_path / "r", *FAST,
             "--model", "test_hostile3:tokens"], tmp_path,
            f"{where}.parquet: token id {shown} at id {ident} (row {row}) is outside --model test_hostile3:tokens's "
            f"embedding of 20 entries")


def test_token_ids_in_range_train(tmp_path):
    _token_table(tmp_path / "train.parquet", lambda i: [i % 20, 19, 0])
    _token_table(tmp_path / "dev.parquet", lambda i: [1, 2, 3], start=100)
    code, _, err = cli(["train", tmp_path / "train.parquet", "--dev", tmp_path / "dev.parquet", "--out",
                        tmp_path / "r", *FAST, "--model", "test_hostile3:tokens"])
    assert code == 0, err


@pytest.mark.parametrize("argv", [["--method", "lrdi", "--set", "feature_layer=nosuch"],
                                  ["--method", "multidds"]])
def test_settings_the_trainer_refuses_leave_no_run_skeleton_or_lock(fresh, argv):
    root, p = fresh
    out = root / "r"
    refused(["train", p["train"], "--dev", p["dev"], "--out", out, *FAST, *argv], root, "")
    assert not out.exists()
    out.mkdir()  # the corrected command may then use the folder (here: an empty one)
    refused(["train", p["train"], "--dev", p["dev"], "--out", out, *FAST, *argv], root, "")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- a full disk (fault injection)


def _without_progress(err: str) -> str:
    """stderr less the progress lines of the steps that ran before the failure."""
    return "".join(x for x in err.splitlines(keepends=True) if not re.match(r"\w+: step \d+/", x))


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_a_step_part_marks_the_run_failed(fresh, monkeypatch):
    from valuekit.runs import atomic

    root, p = fresh
    real = atomic.pq.write_table

    def write_table(table, where, *a, **k):
        if "part-" in Path(where).name and "steps" in str(where):
            _enospc()
        return real(table, where, *a, **k)

    monkeypatch.setattr(atomic.pq, "write_table", write_table)
    code, _, err = cli(["train", p["train"], "--dev", p["dev"], "--out", root / "r", *FAST])
    err = _without_progress(err)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and "steps/part-00000.parquet" in err
    meta = json.loads((root / "r" / "run.json").read_text())
    assert meta["status"] == "failed" and "No space left on device" in meta["error"]
    assert list((root / "r").rglob(".*")) == []  # no hidden temporary, no lock


def test_full_disk_while_saving_the_checkpoint_marks_the_run_failed(fresh, monkeypatch):
    import shutil as sh

    root, p = fresh

    def save(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 73664 vs 73552")

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(sh, "disk_usage", lambda path: sh._ntuple_diskusage(10**9, 10**9, 0))
    code, _, err = cli(["train", p["train"], "--dev", p["dev"], "--out", root / "r", *FAST])
    err = _without_progress(err)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and "checkpoint.pt" in err and "enforce" not in err
    assert json.loads((root / "r" / "run.json").read_text())["status"] == "failed"
    assert list((root / "r").rglob(".*")) == []


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_full_disk_during_score_leaves_no_temporary_and_names_the_file(fresh, monkeypatch, suffix):
    from valuekit.export import tablestream

    root, p = fresh

    class Full:
        def __init__(self, path, schema, *a, **k):
            self.path = Path(path)
            self.path.write_bytes(b"PAR1")

        def write_table(self, *a, **k):
            raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

        write_batch = write_table

        def close(self):
            pass

    monkeypatch.setattr(tablestream.pq, "ParquetWriter", Full)
    monkeypatch.setattr(tablestream.pacsv, "CSVWriter", Full)
    out = root / f"s{suffix}"
    before = snapshot(root)
    code, _, err = cli(["score", p["train"], "--run", p["run"], "-o", out])
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err == f"valuekit: error: {out}: No space left on device\n"
    assert snapshot(root) == before


# ---------------------------------------------------------------- untrusted images and image shapes


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring width x height grey pixels (the data is never there): a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _image_tables(folder: Path, bad: bytes | None = None, row: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images = [_png(rng.integers(0, 255, (6, 6), dtype=np.uint8)) for _ in range(10)]
    if bad is not None:
        images[row] = bad
    train, dev = folder / "imgs.parquet", folder / "imgdev.parquet"
    pd.DataFrame({"id": np.arange(10) + 50, "label": np.arange(10) % 2, "image": images}).to_parquet(train)
    pd.DataFrame({"id": np.arange(4) + 100, "label": np.arange(4) % 2, "image": images[1:5] if row == 0 else
                  images[:4]}).to_parquet(dev)
    return train, dev


@pytest.mark.parametrize("row", [0, 6])
@pytest.mark.parametrize("stream", ["yes", "no", "auto"])
@pytest.mark.parametrize("kind", ["bomb", "junk"])
def test_undecodable_images_and_decompression_bombs_name_file_column_and_row(tmp_path, row, stream, kind):
    bad = _png_declaring(100_000, 100_000) if kind == "bomb" else b"not an image at all"
    train, dev = _image_tables(tmp_path, bad, row)
    why = "decompression-bomb limit" if kind == "bomb" else "UnidentifiedImageError"
    refused(["train", train, "--dev", dev, "--out", tmp_path / "r", *FAST, "--stream", stream], tmp_path,
            f"{train}: column 'image' at id {50 + row}: image bytes cannot be decoded")
    code, _, err = cli(["train", train, "--dev", dev, "--out", tmp_path / "r", *FAST, "--stream", stream])
    assert why in err and "BytesIO" not in err


def _shaped(folder: Path, raw: bytes) -> Path:
    path = folder / "shaped.parquet"
    t = pa.table({"id": np.arange(8), "label": np.arange(8) % 2, "pixels": [np.ones(64, dtype=np.float32)] * 8})
    pq.write_table(t.replace_schema_metadata({b"valuekit.image_shape": raw}), path)
    return path


@pytest.mark.parametrize("raw", [b'{"c": 1}', b"64", b"[1, -8, -8]", b"[1, 0, 64]", b"[1, 8.0, 8]", b"\xff{",
                                 b"[true, 8, 8]", b"[1, 1, 1, 1, 64]", b'"1,8,8"'])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_image_shape_metadata_must_be_positive_bounded_numbers(tmp_path, raw, model):
    path = _shaped(tmp_path, raw)
    refused(["train", path, "--dev", path, "--out", tmp_path / "r", *FAST, "--model", model], tmp_path,
            f"{path}: metadata valuekit.image_shape is ")


@pytest.mark.parametrize("shape", ["1,-8,-8", "0,8,8", "1,8,8,1,1", "-64"])
def test_image_shape_option_must_be_positive(fresh, shape):
    root, p = fresh
    refused(["train", p["train"], "--dev", p["dev"], "--out", root / "r", *FAST, f"--image-shape={shape}"], root,
            f"--image-shape {shape}: expected 1 to 4 positive integers")
    with pytest.raises(InputError, match=r"image_shape=\("):
        valuekit.train(p["train"], dev=p["dev"], out=root / "r", steps=2, device="cpu",
                       table_kw={"image_shape": tuple(int(v) for v in shape.split(","))})


def test_instruction_table_with_a_missing_task_is_one_line(tmp_path):
    df = pd.DataFrame({"id": np.arange(8), "prompt": [f"say {i}" for i in range(8)],
                       "response": [f"word {i}" for i in range(8)], "task": ["a", "b"] * 4})
    df.to_parquet(tmp_path / "dev.parquet", index=False)
    df.loc[5, "task"] = None
    df.to_parquet(tmp_path / "train.parquet", index=False)
    refused(["train", tmp_path / "train.parquet", "--dev", tmp_path / "dev.parquet", "--out", tmp_path / "r",
             *FAST, "--model", "causal-lm", "--method", "bads", "--set", "per_source=true"], tmp_path,
            "column 'task' has a missing task at id 5")


# ---------------------------------------------------------------- $TMPDIR


def _tmpdir_after(tmp_path, *extra) -> list[str]:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    blobs(30).to_parquet(tmp_path / "t.parquet", index=False)
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-m", "valuekit.cli", "train", str(tmp_path / "t.parquet"), "--dev",
                           str(tmp_path / "t.parquet"), "--out", str(tmp_path / "r"), *FAST, *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return sorted(os.listdir(tmpdir))


def test_train_leaves_nothing_in_tmpdir(tmp_path):
    assert _tmpdir_after(tmp_path) == []  # torch._dynamo made torchinductor_USER there at import


@pytest.mark.slow
def test_train_under_torchrun_leaves_nothing_in_tmpdir(tmp_path):
    assert _tmpdir_after(tmp_path, "--nproc", "2") == []


# ---------------------------------------------------------------- causal LMs


def test_a_bidirectional_hf_config_is_not_a_causal_lm(tmp_path):
    transformers = pytest.importorskip("transformers")
    df = pd.DataFrame({"id": np.arange(6), "prompt": ["a b"] * 6, "response": ["c d"] * 6})
    df.to_parquet(tmp_path / "t.parquet", index=False)
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    cfg.save_pretrained(tmp_path / "bert")
    argv = ["train", tmp_path / "t.parquet", "--dev", tmp_path / "t.parquet", "--out", tmp_path / "r", *FAST,
            "--model", f"hf-config:{tmp_path / 'bert'}", "--max-len", "16"]
    refused(argv, tmp_path, "'bert' encoder without \"is_decoder\": true")
    cfg.is_decoder = True  # BertLMHeadModel with is_decoder masks later tokens: a causal LM
    cfg.save_pretrained(tmp_path / "bert")
    code, _, err = cli(argv)
    assert code == 0, err


# ---------------------------------------------------------------- columns that are not what the options say


def test_a_list_column_as_label_and_an_all_empty_list_column_are_named(tmp_path):
    good = pd.DataFrame({"id": np.arange(8), "label": np.arange(8) % 2, "pixels": [np.ones(4, dtype=np.float32)] * 8})
    good.to_parquet(tmp_path / "t.parquet", index=False)
    good.assign(pixels=[np.zeros(0, dtype=np.float32)] * 8).to_parquet(tmp_path / "e.parquet", index=False)
    refused(["train", tmp_path / "t.parquet", "--dev", tmp_path / "t.parquet", "--out", tmp_path / "r", *FAST,
             "--label-col", "pixels"], tmp_path, "column 'pixels' holds ndarray values (id 0), not labels")
    # the training table is named, not the dev table that then disagrees with it
    refused(["train", tmp_path / "e.parquet", "--dev", tmp_path / "t.parquet", "--out", tmp_path / "r", *FAST],
            tmp_path, f"{tmp_path / 'e.parquet'}: column 'pixels' holds only empty lists")


def test_an_empty_id_in_a_text_file_is_a_missing_id(tmp_path):
    df = blobs(8)
    df["id"] = [f"r{i}" for i in range(8)]
    df.loc[3, "id"] = " "
    df.to_csv(tmp_path / "t.csv", index=False)
    refused(["train", tmp_path / "t.csv", "--dev", tmp_path / "t.csv", "--out", tmp_path / "r", *FAST], tmp_path,
            "column 'id' has an empty id at row 3")
