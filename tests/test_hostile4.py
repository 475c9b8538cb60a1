"""Hostile inputs, the last cases: library warnings before the error line, odd output paths, tables named by their
file or argument, racing trainers, and library messages that speak of arguments (the CLI of flags).

Every refusal here must be one line on stderr, exit 2, no traceback, and leave every file as it was.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import blobs
from test_hostile import FAST, cli, fresh, refused, world  # noqa: F401 (fixtures)
from test_hostile3 import _image_tables

import valuekit
from valuekit.errors import InputError, RunDirError, ValueKitError, held_warnings, hold_log, release_warnings, say

# ---------------------------------------------------------------- warnings held while the input is checked


def _palette_png_with_byte_transparency() -> bytes:
    """A palette PNG whose transparency is a byte string: Pillow warns when it is converted."""
    from PIL import Image

    img = Image.fromarray(np.arange(36, dtype=np.uint8).reshape(6, 6), mode="L").convert("P")
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=bytes(256))
    return buf.getvalue()


def test_held_warnings_are_shown_when_the_checks_pass_and_dropped_when_they_fail(capsys):
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("valuekit-test-library")
    logger.handlers, logger.propagate = [Catch()], False
    with pytest.raises(ValueError), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with held_warnings():
            hold_log("valuekit-test-library")
            warnings.warn("w1", UserWarning, stacklevel=1)
            logger.warning("l1")
            say("s1")
            raise ValueError("refused")
    assert caught == [] and seen == [] and capsys.readouterr().err == ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with held_warnings():
            hold_log("valuekit-test-library")
            warnings.warn("w2", UserWarning, stacklevel=1)
            logger.warning("l2")
            say("s2")
            assert caught == [] and seen == []
            release_warnings()  # the checks passed: shown now, once, and nothing is held after
            warnings.warn("w3", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["w2", "w3"] and seen == ["l2"]
    assert capsys.readouterr().err == "s2\n"
    assert logger.handlers[0].__class__ is Catch and not logger.propagate


def test_pillow_warnings_before_a_refusal_are_not_printed(tmp_path, recwarn):
    train, dev = _image_tables(tmp_path, b"not an image", row=6)
    df = pd.read_parquet(train)
    df.loc[0, "image"] = _palette_png_with_byte_transparency()
    df.to_parquet(train)
    refused(["train", train, "--dev", dev, "--out", tmp_path / "r", *FAST, "--stream", "no"], tmp_path,
            f"{train}: column 'image' at id 56: image bytes cannot be decoded")
    assert [str(w.message) for w in recwarn] == []
    df.loc[6, "image"] = df.loc[1, "image"]  # the table mended: it trains, and Pillow's warning is still shown
    df.to_parquet(train)
    code, _, err = cli(["train", train, "--dev", dev, "--out", tmp_path / "r", *FAST, "--stream", "no"])
    assert code == 0, err
    assert any("Transparency expressed in bytes" in str(w.message) for w in recwarn)


def test_transformers_config_warnings_before_a_refusal_are_not_printed(tmp_path):
    transformers = pytest.importorskip("transformers")
    df = pd.DataFrame({"id": np.arange(6), "prompt": ["a b"] * 6, "response": ["c d"] * 6})
    df.to_parquet(tmp_path / "t.parquet", index=False)
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=259, n_positions=8, bos_token_id=0,
                            eos_token_id=0).save_pretrained(tmp_path / "gpt")
    config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    config["eos_token_id"] = 774_411  # beyond the vocabulary: transformers warns (once a process) when it loads
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(config))
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    catch = Catch()
    logging.getLogger("transformers").addHandler(catch)
    try:
        refused(["train", tmp_path / "t.parquet", "--dev", tmp_path / "t.parquet", "--out", tmp_path / "r", *FAST,
                 "--model", f"hf-config:{tmp_path / 'gpt'}", "--max-len", "16"], tmp_path,
                "n_positions 8 is smaller than the sequence length 16")
    finally:
        logging.getLogger("transformers").removeHandler(catch)
    assert not [m for m in seen if "774411" in m], seen


def test_valuekit_warnings_before_a_refusal_are_not_printed(tmp_path):
    blobs(10).to_parquet(tmp_path / "t.parquet", index=False)
    # --batch-size 64 > 10 rows would warn; the trainer then refuses the setting: one line
    refused(["train", tmp_path / "t.parquet", "--dev", tmp_path / "t.parquet", "--out", tmp_path / "r", "--steps",
             "2", "--batch-size", "64", "--device", "cpu", "--method", "lrdi", "--set", "feature_layer=nosuch"],
            tmp_path, "feature_layer")


# ---------------------------------------------------------------- outputs that are not files or folders


@pytest.mark.parametrize("target", ["/dev/full", "/dev/null", "fifo"])
@pytest.mark.parametrize("how", ["link", "direct"])
def test_an_output_that_is_a_device_or_a_pipe_is_named_as_such(fresh, tmp_path_factory, target, how):  # noqa: F811
    root, p = fresh
    elsewhere = tmp_path_factory.mktemp("outs")  # outside root: its snapshot reads every file there
    if target == "fifo":
        target = str(elsewhere / "pipe.parquet")
        os.mkfifo(target)
    what = "a named pipe (FIFO)" if target.endswith("pipe.parquet") else "a character device"
    out = target
    if how == "link":
        out = elsewhere / "out.parquet"
        out.symlink_to(target)
    via = f"is a link to {target}, which " if how == "link" else ""
    for argv, option, want in (
        (["score", p["train"], "--run", p["run"], "-o", out], "-o", "a regular file"),
        (["audit", p["run"], "-o", out, "--no-predict"], "-o", "a regular file"),
        (["report", p["run"], "-o", out], "-o", "a regular file"),
        (["train", p["train"], "--dev", p["dev"], "--out", out, *FAST], "--out", "a folder"),
    ):
        refused(argv, root, f"valuekit: error: {option} {out}: {via}is {what}, not {want}; valuekit writes only "
                            f"files and folders")


# ---------------------------------------------------------------- a table is named by its file, or by its argument


def test_clean_names_the_dev_and_test_files_not_a_dataframe(tmp_path):
    blobs(30, seed=1).to_parquet(tmp_path / "train.parquet", index=False)
    dev = blobs(12, seed=2, id_start=100)
    dev.loc[7, "f1"] = np.inf
    dev.to_parquet(tmp_path / "dev.parquet", index=False)
    argv = ["clean", tmp_path / "train.parquet", "--dev", tmp_path / "dev.parquet", "-o", tmp_path / "out",
            "--steps", "2", "--device", "cpu"]
    refused(argv, tmp_path, f"{tmp_path / 'dev.parquet'}: column 'f1' has value inf at id 107")
    blobs(12, seed=2, id_start=100).to_parquet(tmp_path / "dev.parquet", index=False)
    test = blobs(6, seed=3, id_start=200).assign(label="nosuch")
    test.to_parquet(tmp_path / "test.parquet", index=False)
    refused([*argv, "--test", tmp_path / "test.parquet"], tmp_path,
            f"{tmp_path / 'test.parquet'}: column 'label' has label 'nosuch' not present in the training table")
    refused(argv[:3] + [tmp_path / "test.parquet"] + argv[4:], tmp_path,  # the same table as --dev
            f"{tmp_path / 'test.parquet'}: column 'label' has label 'nosuch' not present in the training table")


def test_a_dataframe_given_to_the_python_api_is_named_by_its_argument(world, tmp_path):  # noqa: F811
    _, p = world
    good = blobs(12, seed=2, id_start=100)
    bad = good.astype({"id": object})
    bad.loc[3, "id"] = None
    cases = [
        (lambda: valuekit.train(bad, dev=good, out=tmp_path / "r", steps=1), "train table (argument `train`)"),
        (lambda: valuekit.train(good, dev=bad, out=tmp_path / "r", steps=1), "dev table (argument `dev`)"),
        (lambda: valuekit.score(bad, p["run"]), "table to score (argument `table`)"),
        (lambda: valuekit.audit(p["run"], bad, predict=False), "training table (argument `data`)"),
        (lambda: valuekit.clean(bad, good, out=tmp_path / "c", steps=1), "training table (argument `table`)"),
        (lambda: valuekit.clean(good, bad, out=tmp_path / "c", steps=1), "dev table (argument `dev`)"),
    ]
    for call, where in cases:
        with pytest.raises(InputError) as info:
            call()
        assert str(info.value).startswith(f"{where}: column 'id'"), str(info.value)
        assert "DataFrame>" not in str(info.value)
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


# ---------------------------------------------------------------- the loser of a race to create one run directory


def _contender(out: str, barrier, results) -> None:
    """What `valuekit train --out OUT` does to OUT, in order: check the output, then take the run directory."""
    from valuekit.errors import ValueKitError
    from valuekit.runs.paths import check_output
    from valuekit.training.rundir import prepare_run

    barrier.wait()
    try:
        check_output(out, option="--out", kind="run")
        prepare_run(Path(out), {}, False)
    except ValueKitError as exc:
        results.put(("lost", str(exc)))
        return
    time.sleep(0.3)  # the winner holds the lock and has not written run.json yet
    results.put(("won", os.getpid()))


def test_the_loser_of_a_race_to_create_a_nested_run_directory_is_told_it_is_in_use(tmp_path):
    ctx = mp.get_context("fork")
    out = tmp_path / "a" / "b" / "run"
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(out), barrier, results)) for _ in range(3)]
    for pr in procs:
        pr.start()
    got = [results.get(timeout=60) for _ in procs]
    for pr in procs:
        pr.join(timeout=60)
    assert [g[0] for g in got].count("won") == 1, got
    assert all("is in use by another valuekit process" in g[1] for g in got if g[0] == "lost"), got


def test_a_folder_whose_lock_a_live_process_holds_is_in_use_not_a_foreign_folder(tmp_path):
    import socket

    out = tmp_path / "a" / "b" / "run"
    out.mkdir(parents=True)
    (out / ".lock").write_text(f"{socket.gethostname()}:{os.getpid()}")  # a live process: this one
    blobs(10).to_parquet(tmp_path / "t.parquet", index=False)
    refused(["train", tmp_path / "t.parquet", "--dev", tmp_path / "t.parquet", "--out", out, *FAST], tmp_path,
            f"--out {out}: run directory is in use by another valuekit process ({socket.gethostname()}:"
            f"{os.getpid()}) that is creating a run there; wait for it or choose another folder")
    with pytest.raises(RunDirError, match="out .*: run directory is in use by another valuekit process"):
        valuekit.train(tmp_path / "t.parquet", dev=tmp_path / "t.parquet", out=out, steps=1)


# ---------------------------------------------------------------- library messages name arguments, the CLI flags


@pytest.mark.parametrize("kw, argv, api, flag", [
    ({"steps": 0}, ["--steps", "0"], "steps=0: must be >= 1", "--steps 0: must be >= 1"),
    ({"method": "dds", "scorer_lr": -1.0}, ["--method", "dds", "--set", "scorer_lr=-1"], "scorer_lr=-1.0: must be",
     "--set scorer_lr=-1.0: must be"),
    ({"patience": 2}, ["--patience", "2"], "patience=2: needs early_stopping=True",
     "--patience 2: needs --early-stopping"),
    ({"device": "tpu"}, ["--device", "tpu"], "device='tpu': use 'auto', 'cpu' or 'cuda'",
     "--device 'tpu': use auto, cpu or cuda"),
    ({"model": "cnn"}, ["--model", "cnn"], "model='cnn' needs image-shaped features",
     "--model cnn needs image-shaped features"),
    ({"lora": 2}, ["--lora", "2"], "lora=2: LoRA adapters are for causal LMs (model='hf:DIR' or 'hf-config:DIR'), "
     "not model='mlp'",
     "--lora 2: LoRA adapters are for causal LMs (--model hf:DIR or hf-config:DIR), not --model mlp"),
    ({"method": "dds", "precision": "fp16"}, ["--method", "dds", "--precision", "fp16"],
     "precision='fp16': method 'dds' does not use the gradient scaler fp16 needs; use precision='bf16'",
     "--precision fp16: method 'dds' does not use the gradient scaler fp16 needs; use --precision bf16"),
    ({"resume": True, "lr": 0.5}, ["--resume", "--lr", "0.5"], "resume=True with different config (lr: ",
     "--resume with different config (lr: "),
    ({"model": "nosuchmodule_xyz:f"}, ["--model", "nosuchmodule_xyz:f"],
     "model='nosuchmodule_xyz:f': cannot import module 'nosuchmodule_xyz'",
     "--model nosuchmodule_xyz:f: cannot import module 'nosuchmodule_xyz'"),
])
def test_library_messages_name_arguments_and_the_cli_names_flags(fresh, kw, argv, api, flag):  # noqa: F811
    root, p = fresh
    base = {"steps": 4, "batch_size": 8, "device": "cpu", "progress": False}
    with pytest.raises(ValueKitError) as info:
        valuekit.train(p["train"], dev=p["dev"], out=p["run"], **{**base, **kw})
    assert api in str(info.value) and "--" not in str(info.value), str(info.value)
    refused(["train", p["train"], "--dev", p["dev"], "--out", p["run"], *FAST, *argv], root, flag)
