"""Issue 17: a text classification table (a string column) with `--tokenizer DIR` (a local Hugging Face tokenizer
folder, built here from code; nothing is downloaded) is tokenized to token-id lists and trains a user's text model
(Embedding + pooling) that values every row. Needs the optional `transformers` package (in the `test` extra)."""

from __future__ import annotations

import importlib.util
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from valuekit.cli.main import main

from valuekit.runs.reader import read_run

pytestmark = pytest.mark.skipif(not importlib.util.find_spec("transformers"),
                                reason="needs transformers (pip install 'valuekit[test]' or 'valuekit[llm]')")

HERE = Path(__file__).resolve().parent
WORDS = {0: "good fine great nice happy".split(), 1: "bad awful poor sad grim".split()}
FILLER = "the a movie plot was very quite and".split()


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def make_tokenizer(folder: Path) -> dict[str, int]:
    """A word-level tokenizer (whitespace pre-tokenizer), saved as a Hugging Face tokenizer folder; its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in [*WORDS[0], *WORDS[1], *FILLER]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return vocab


def reviews(n: int, *, seed: int, start: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    texts = []
    for label in y:
        k = int(rng.integers(2, 7))
        words = [*rng.choice(FILLER, k), *rng.choice(WORDS[int(label)], 2)]
        texts.append(" ".join(rng.permutation(words)))
    return pd.DataFrame({"id": np.arange(start, start + n), "label": np.where(y == 1, "neg", "pos"), "text": texts})


@pytest.fixture
def text_tables(tmp_path):
    vocab = make_tokenizer(tmp_path / "tok")
    paths = {"tok": tmp_path / "tok", "vocab": vocab}
    for name, n, seed, start in (("train", 64, 0, 0), ("dev", 20, 1, 1000)):
        df = reviews(n, seed=seed, start=start)
        if name == "train":
            df.loc[5, "text"] = "unseenword " + df.loc[5, "text"]  # an unknown word: [UNK]
            df.loc[6, "text"] = " ".join(["the"] * 40)  # longer than --max-len: cut
        paths[name] = tmp_path / f"{name}.parquet"
        df.to_parquet(paths[name], index=False)
    return paths


def test_text_table_with_tokenizer_trains_a_users_text_model(text_tables, tmp_path, monkeypatch):
    from valuekit.data.tables import load_table
    from valuekit.data.text import get_tokenizer

    t, vocab = text_tables, text_tables["vocab"]
    # the table as the trainer sees it: token ids of each row, cut at --max-len and padded with [PAD] (0)
    data = load_table(t["train"], tokenizer=get_tokenizer(str(t["tok"])), text_col="text", max_len=12)
    train = pd.read_parquet(t["train"])
    assert data.feature_cols == ["text"] and data.image_shape is None
    longest = max(min(12, len(s.split()) + 0) for s in train.text)
    assert tuple(data.x.shape) == (64, longest)
    for i in (0, 5, 6):
        words = train.text[i].split()[:12]
        expect = [vocab.get(w, vocab["[UNK]"]) for w in words] + [0] * (longest - len(words))
        assert data.x[i].tolist() == expect, i
    assert data.x[5, 0].item() == vocab["[UNK]"]
    dev = load_table(t["dev"], tokenizer=get_tokenizer(str(t["tok"])), text_col="text", max_len=12, like=data)
    assert dev.x.shape[1] == longest  # dev is padded/cut to the training width

    monkeypatch.syspath_prepend(str(HERE))  # usermodels: the user's own module
    for method in ("uniform", "dds"):
        out = tmp_path / method
        code, printed, err = cli(
            [
                "train",
                t["train"],
                "--dev",
                t["dev"],
                "--tokenizer",
                t["tok"],
                "--max-len",
                "12",
                "--model",
                "usermodels:text",
                "--method",
                method,
                "--steps",
                "8",
                "--batch-size",
                "16",
                "--device",
                "cpu",
                "--set",
                "progress=false",
                "--out",
                out,
            ]
        )
        assert code == 0, err
        run = read_run(out)
        assert run.meta["config"]["model"] == "usermodels:text" and run.meta["feature_cols"] == ["text"]
        recorded = run.meta["data"]["train"]["text"]  # which tokenizer made the ids, for whoever reads the run
        assert recorded == {"tokenizer": {"kind": "huggingface", "path": str(t["tok"]), "vocab_size": len(vocab)},
                            "text_col": "text", "max_len": 12}
        assert run.meta["data"]["dev"]["text"] == recorded
        values = run.values()
        assert sorted(values.example_id) == list(range(64)) and values.value.notna().all(), method
        assert sorted(values["rank"]) == list(range(1, 65))
    # the scored table keeps the text as it was
    code, _, err = cli(["score", t["train"], "--run", tmp_path / "dds", "-o", tmp_path / "scored.parquet"])
    assert code == 0, err
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    assert scored.text.equals(train.text) and scored.value.notna().all()


def test_bad_tokenizer_folder_or_text_column_one_line_exit_2_nothing_written(text_tables, tmp_path):
    t = text_tables
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    base = ["train", t["train"], "--dev", t["dev"], "--model", "usermodels:text", "--steps", "2", "--device", "cpu",
            "--out", tmp_path / "run"]
    for extra, fragment in (
        (["--tokenizer", tmp_path / "nowhere"], f"--tokenizer {tmp_path / 'nowhere'}: not a directory"),
        (["--tokenizer", tmp_path / "broken"], f"--tokenizer {tmp_path / 'broken'}: does not load as a tokenizer"),
        (["--tokenizer", t["tok"], "--text-col", "review"], "missing text column 'review'"),
        (["--text-col", "review"], "--text-col review: needs --tokenizer DIR"),
    ):
        code, _, err = cli([*base, *extra])
        assert code == 2 and err.count("\n") == 1 and err.startswith("valuekit: error:"), (extra, err)
        assert fragment in err, (fragment, err)
        assert not (tmp_path / "run").exists()
    # a string column without --tokenizer says how to tokenize it
    code, _, err = cli(base)
    assert code == 2 and "column 'text' is not numeric" in err and "--tokenizer DIR" in err, err
    assert not (tmp_path / "run").exists()


def test_python_api_tokenizer_folder_or_object_same_run(text_tables, tmp_path, monkeypatch):
    """valuekit.train(..., tokenizer=DIR | object with encode) tokenizes every table as --tokenizer does."""
    import valuekit
    from valuekit.data.tables import load_table
    from valuekit.data.text import get_tokenizer
    from valuekit.errors import InputError

    monkeypatch.syspath_prepend(str(HERE))
    t = text_tables
    kw = dict(model="usermodels:text", steps=4, batch_size=16, device="cpu", progress=False, max_len=12)
    a = valuekit.train(t["train"], dev=t["dev"], tokenizer=t["tok"], out=tmp_path / "a", **kw)
    b = valuekit.train(pd.read_parquet(t["train"]), dev=t["dev"], tokenizer=get_tokenizer(str(t["tok"])),
                       out=tmp_path / "b", **kw)
    np.testing.assert_allclose(a.values().value, b.values().value)  # same ids, same seed: the same run
    assert (
        a.meta["data"]["train"]["text"]["tokenizer"]["path"] == str(t["tok"])
        and a.meta["data"]["train"]["text"]["max_len"] == 12
    )

    class Words:  # any object with encode(text) -> ids
        def encode(self, text):
            return [len(w) for w in text.split()]

    c = valuekit.train(t["train"], dev=t["dev"], tokenizer=Words(), out=tmp_path / "c", **kw)
    assert c.meta["data"]["train"]["text"]["tokenizer"] == {"kind": "Words"} and c.values().value.notna().all()
    with pytest.raises(InputError, match="neither a folder nor has encode"):
        valuekit.train(t["train"], dev=t["dev"], tokenizer=3, out=tmp_path / "d", **kw)
    assert not (tmp_path / "d").exists()
    train = load_table(t["train"], tokenizer=get_tokenizer(str(t["tok"])), text_col="text", max_len=12)
    with pytest.raises(InputError, match="column 'text' was tokenized; give this table the same tokenizer"):
        load_table(t["dev"], like=train, name="dev")
    with pytest.raises(InputError, match="tokenized with .*'max_len': 8.*the training table with .*'max_len': 12"):
        load_table(t["dev"], like=train, name="dev", tokenizer=get_tokenizer(str(t["tok"])), max_len=8)
