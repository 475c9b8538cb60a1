"""Hostile inputs, the last cases: library warnings before the error line, odd output paths, tables named by their
file or argument, racing trainers, and library messages that speak of arguments (the CLI of flags).

Every refusal here must be one line on stderr, exit 2, no traceback, and leave every file as it was.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import blobs
from test_hostile import FAST, cli, fresh, refused, world  # noqa: F401 (fixtures)
from test_hostile3 import _image_tables

from valuekit.errors import held_warnings, hold_log, release_warnings, say

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
