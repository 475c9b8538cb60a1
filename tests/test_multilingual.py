"""The Django-catalog multilingual table: placeholders, plurals, splits, CLI, committed copy."""

from __future__ import annotations

import contextlib
import gettext
import io
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("django")

from valuekit.data import multilingual as ml  # noqa: E402
from valuekit.errors import InputError  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "multilingual"


def test_strip_placeholders():
    assert ml.strip_placeholders("Invalid page (%(page_number)s): %(message)s") == "Invalid page ( ):"
    assert ml.strip_placeholders("%s TB") == "TB"
    assert ml.strip_placeholders("Ensure %(limit_value)d  items, got {count}.") == "Ensure items, got ."
    assert ml.strip_placeholders("100%% sure, %.2f left") == "100 sure, left"
    assert ml.strip_placeholders("%(name)s") == ""


def _mo(entries: dict) -> bytes:
    """A minimal GNU .mo file (little-endian) holding `entries` (keys/values already NUL-joined for plurals)."""
    keys = sorted(entries)
    ids = b"".join(k.encode() + b"\0" for k in keys)
    strs = b"".join(entries[k].encode() + b"\0" for k in keys)
    n = len(keys)
    start = 7 * 4 + 16 * n
    koffs, voffs, o = [], [], 0
    for k in keys:
        koffs += [len(k.encode()), start + o]
        o += len(k.encode()) + 1
    o2 = 0
    for k in keys:
        voffs += [len(entries[k].encode()), start + len(ids) + o2]
        o2 += len(entries[k].encode()) + 1
    head = struct.pack("Iiiiiii", 0x950412DE, 0, n, 7 * 4, 7 * 4 + 8 * n, 0, 0)
    return head + struct.pack(f"{2 * n}i", *koffs) + struct.pack(f"{2 * n}i", *voffs) + ids + strs


def test_read_catalog_takes_singular_of_plurals_and_drops_context(monkeypatch, tmp_path):
    root = tmp_path / "locale"
    (root / "xx" / "LC_MESSAGES").mkdir(parents=True)
    entries = {
        "": "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n",
        "%(n)s file\0%(n)s files": "%(n)s ficheru\0%(n)s ficheros",
        "month name\x04May": "Mayu",
        "Empty": "",
        "Save": "Guardar",
    }
    (root / "xx" / "LC_MESSAGES" / "django.mo").write_bytes(_mo(entries))
    gettext.GNUTranslations(io.BytesIO(_mo(entries)))  # the file is valid for the standard library
    monkeypatch.setattr(ml, "django_locale_roots", lambda: [root])
    cat = ml.read_catalog("xx")
    assert cat == {"%(n)s file": "%(n)s ficheru", "May": "Mayu", "Save": "Guardar"}


def test_build_table_from_installed_django():
    assert "ast" in ml.available_languages()
    t = ml.build_table(target="ast", sources=("es", "ja"))
    assert list(t.columns) == ["id", "group", "source", "src_text", "tgt_text"]
    assert set(t.source) == {"ast", "es", "ja"}
    assert t.id.is_unique and not t.duplicated(["group", "source"]).any()
    assert (t.groupby("group")["tgt_text"].nunique() == 1).all()  # one English string per group
    assert not t.src_text.str.contains(r"%\(|%s|\{\w*\}").any()
    assert (t.src_text.str.len() > 0).all() and (t.tgt_text.str.len() <= 120).all()
    row = t[(t.source == "es") & (t.tgt_text == "Page not found")]
    assert row.src_text.tolist() == ["Página no encontrada"]
    with pytest.raises(InputError, match="'zz'"):
        ml.build_table(target="zz")


def test_prepare_splits_hold_out_target_groups(tmp_path):
    paths = ml.prepare_multilingual(tmp_path, target="ast", sources=("es", "gl"), dev_size=20, test_size=30)
    tr, dev, te = (pd.read_parquet(paths[s]) for s in ("train", "dev", "test"))
    assert set(dev.source) == set(te.source) == {"ast"}
    assert len(dev) == 20 and len(te) == 30
    held = set(dev.group) | set(te.group)
    assert not held & set(tr.group)  # held-out English strings never reach training, in any language
    assert not set(dev.group) & set(te.group)
    assert {"ast", "es", "gl"} == set(tr.source)


def test_prepare_with_related_and_unrelated_groups(tmp_path, capsys):
    import json

    import pyarrow.parquet as pq
    from valuekit.cli.main import main

    assert main(["data", "prepare", "multilingual", "--target", "br", "--related", "cy,ga", "--unrelated", "ja",
                 "--dev-size", "20", "--test-size", "20", "-o", str(tmp_path / "br")]) == 0
    tr = pd.read_parquet(tmp_path / "br" / "train.parquet")
    assert set(tr.source) == {"br", "cy", "ga", "ja"}
    meta = json.loads(pq.read_schema(tmp_path / "br" / "train.parquet").metadata[b"valuekit.dataset"])
    assert meta["related"] == ["cy", "ga"] and meta["unrelated"] == ["ja"] and meta["target"] == "br"
    assert meta["django"]
    for bad, msg in ((["--related", "cy", "--unrelated", "cy"], "both"), (["--related", "br"], "also listed"),
                     (["--related", "cy", "--sources", "ga"], "--sources")):
        assert main(["data", "prepare", "multilingual", "--target", "br", *bad, "-o", str(tmp_path / "x")]) == 2
        assert msg in capsys.readouterr().err
    assert main(["data", "languages"]) == 0
    out = capsys.readouterr().out.splitlines()
    br = [line for line in out if line.startswith("br ")]
    assert len(br) == 1 and "known relatives: cy,ga,gd" in br[0]
    sizes = [int(line.split()[1]) for line in out]
    assert sizes == sorted(sizes, reverse=True) and len(out) > 50


def test_cli_and_committed_copy(tmp_path):
    """Rebuilt from the installed Django, the corpus equals the committed copy, within the Django versions the
    `multilingual` extra pins (the copy was built with 5.2.19; other releases change the catalogs)."""
    import django
    from valuekit.cli.main import main

    version = tuple(int(v) for v in django.__version__.split(".")[:3] if v.isdigit())
    if not (5, 2, 19) <= version < (5, 3):
        pytest.skip(f"Django {django.__version__} is outside the pinned range >=5.2.19,<5.3")

    assert main(["data", "prepare", "multilingual", "-o", str(tmp_path)]) == 0
    for split in ("train", "dev", "test"):
        fresh = pd.read_parquet(tmp_path / f"{split}.parquet")
        committed = pd.read_parquet(DATA / f"{split}.parquet")
        pd.testing.assert_frame_equal(fresh, committed)
    assert "BSD" in (DATA / "LICENSE.md").read_text() or "Redistribution" in (DATA / "LICENSE.md").read_text()


# ---------------------------------------------------------------- chrF, text-pair tables, seq2seq in the loop


def test_chrf_by_hand():
    # order 2: n=1 P=2/2 R=2/3, n=2 P=1/1 R=1/2 -> P=1, R=7/12, F2 = 5PR/(4P+R) = 35/55
    assert ml.chrf(["ab"], ["abc"], order=2) == pytest.approx(100 * 35 / 55)
    assert ml.chrf(["the cat"], ["the cat"]) == pytest.approx(100.0)
    assert ml.chrf(["xyz"], ["abc"]) == 0.0
    # corpus level: statistics are summed over sentences before averaging (not a mean of sentence scores)
    both = ml.chrf(["ab", "xyz"], ["abc", "abc"], order=2)
    n1 = (2 / 5, 2 / 6)  # P, R of order 1: 2 matches, 2+3 hyp grams, 3+3 ref grams
    n2 = (1 / 3, 1 / 4)
    p, r = (n1[0] + n2[0]) / 2, (n1[1] + n2[1]) / 2
    assert both == pytest.approx(100 * 5 * p * r / (4 * p + r))


def test_load_text_pairs_and_byte_round_trip(tmp_path):
    from valuekit.data.tables import load_text_pairs
    from valuekit.models.builtin import BYTE_VOCAB, EOS, decode_bytes

    df = pd.DataFrame({"id": [3, 4], "group": [0, 1], "source": ["ja", "es"],
                       "src_text": ["ページ", "Página no encontrada"], "tgt_text": ["Page", "Page not found"]})
    d = load_text_pairs(df, max_len=8)
    assert d.x.shape == (2, 8) and d.x.dtype.is_floating_point and d.y.dtype == torch.int64
    assert d.num_classes == BYTE_VOCAB and d.group.tolist() == [0, 1] and d.source.tolist() == ["ja", "es"]
    assert decode_bytes(d.y) == ["Page", "Page no"]  # truncated to max_len - 1 bytes + EOS
    assert d.y[0, 4].item() == EOS and d.y[0, 5:].eq(0).all()
    assert decode_bytes(d.x.long()) == ["ペー", "Página"]  # cut at a character boundary: 6 of 7 bytes used
    with pytest.raises(InputError, match="tgt_text"):
        load_text_pairs(df.drop(columns="tgt_text"))
    with pytest.raises(InputError, match="empty text"):
        load_text_pairs(df.assign(src_text=["", "a"]))


def test_seq2seq_loss_matches_token_cross_entropy_and_ignores_padding():
    from valuekit.models.builtin import build_model, encode_bytes

    m = build_model("seq2seq", in_features=24, num_classes=259, hidden=16,
                    generator=torch.Generator().manual_seed(0)).double()
    x = encode_bytes(["hola", "una casa grande", "x"], 24).double()
    y = encode_bytes(["hello", "a big house", "x"], 24)
    batch = m.per_example_loss(x, y)
    alone = torch.stack([m.per_example_loss(x[i: i + 1], y[i: i + 1])[0] for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-12)  # padding of the batch changes nothing
    # reference: mean over the row's real tokens (EOS included) of -log softmax at the teacher-forced logits
    logits = m(x[:1, :5], y[:1, :6])
    ref = torch.nn.functional.cross_entropy(logits[0], y[0, :6])
    torch.testing.assert_close(batch[0], ref)
    out = m.translate(x, max_len=7)
    assert out.shape[0] == 3 and out.shape[1] <= 7


def test_translation_trains_in_the_loop_with_null_labels(tmp_path):
    from valuekit.config import TrainConfig
    from valuekit.data.tables import load_text_pairs
    from valuekit.training.loop import run_training

    tr = pd.read_parquet(DATA / "train.parquet")
    tr = tr[tr.source.isin(["ast", "es", "ja"]) & (tr.src_text.str.len() < 20)].head(300)
    train_ds = load_text_pairs(tr.reset_index(drop=True), max_len=24)
    dev = load_text_pairs(DATA / "dev.parquet", max_len=24, name="dev")
    run = run_training(train_ds, dev, out=tmp_path / "r", method_config={"update_every": 32, "init": "tcs"},
                config=TrainConfig(method="multidds", model="seq2seq", steps=6, batch_size=16, hidden=16,
                                   eval_every=3, progress=False))
    steps = run.steps(["label", "source", "loss"]).to_pandas()
    assert len(steps) == 6 * 16 and steps["label"].isna().all() and steps["loss"].gt(0).all()
    m = run.metrics().dropna(subset=["dev_loss"])
    assert m.step.tolist() == [3, 6] and m.dev_loss.between(0.5, 10).all() and m.dev_acc.between(0, 1).all()
    s = run.sources()
    assert set(s.source) == {"ast", "es", "ja"}
    first = s[s.step == 1].set_index("source")["prob"]
    assert first["es"] > first["ja"]  # TCS: Spanish shares far more character 3-grams with Asturian than Japanese
    assert np.isclose(run.values()["weight"].mean(), 1.0)


def test_translation_table_trains_from_the_cli(tmp_path, capsys):
    from valuekit.cli.main import main

    from valuekit.runs.reader import read_run

    data = Path(__file__).resolve().parents[1] / "data" / "multilingual"
    args = ["train", str(data / "train.parquet"), "--dev", str(data / "dev.parquet"), "--steps", "4",
            "--batch-size", "8", "--device", "cpu", "--set", "eval_every=2"]
    assert main(args + ["--out", str(tmp_path / "wrong")]) == 2  # a text table needs seq2seq + multidds
    assert "--model seq2seq --method multidds" in capsys.readouterr().err and not (tmp_path / "wrong").exists()
    assert main(args + ["--model", "seq2seq", "--method", "uniform", "--out", str(tmp_path / "u")]) == 2
    assert main(args + ["--model", "seq2seq", "--method", "multidds", "--out", str(tmp_path / "run")]) == 0
    assert "dev_chrf/100=" in capsys.readouterr().out
    run = read_run(tmp_path / "run")
    steps = run.steps().to_pandas()
    assert len(steps) == 4 * 8 and steps.label.isna().all() and steps.source.notna().all()
    assert set(run.sources().source) <= set(pd.read_parquet(data / "train.parquet").source)
    assert len(run.values()) == len(pd.read_parquet(data / "train.parquet"))


def test_byte_transformer_loss_padding_and_greedy_decoding():
    from valuekit.models.builtin import encode_bytes
    from valuekit.models.translation import ByteTransformer, init_transformer_

    m = ByteTransformer(dim=16, heads=2, layers=1, dropout=0.0).double()
    init_transformer_(m, torch.Generator().manual_seed(0))
    m.eval()
    x = encode_bytes(["hola", "una casa grande", "x"], 24).double()
    y = encode_bytes(["hello", "a big house", "x"], 24)
    batch = m.per_example_loss(x, y)
    alone = torch.stack([m.per_example_loss(x[i: i + 1], y[i: i + 1])[0] for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-10)  # padding of the batch changes nothing
    logits = m(x[:1, :5], y[:1, :6])
    torch.testing.assert_close(batch[0], torch.nn.functional.cross_entropy(logits[0], y[0, :6]))
    # causal: the logits at position t do not depend on later target tokens
    y2 = y[:1, :6].clone()
    y2[0, 4] = 77
    torch.testing.assert_close(m(x[:1, :5], y2)[0, :5], logits[0, :5])
    out = m.translate(x, max_len=7)
    assert out.shape[0] == 3 and out.shape[1] <= 7
    # greedy decoding = argmax of the teacher-forced logits fed with its own output
    first = m(x[:1], out[:1, :1])[0, 0].argmax()
    assert first.item() == out[0, 0].item()
    assert m.src_emb.weight[0].abs().sum() == 0 and m.tgt_emb.weight[0].abs().sum() == 0  # PAD embeddings


def test_audit_of_a_translation_run_lists_sentence_pairs_and_sources(tmp_path):
    """Translation rows have no class label: the audit gives each pair's source language and excerpts of its two
    sentences (the columns of the table), and the summary one row per language, instead of failing on 'label'."""
    import valuekit

    tr = pd.read_parquet(DATA / "train.parquet")
    tr = tr[tr.source.isin(["ast", "es", "ja"]) & (tr.src_text.str.len() < 20)].head(120)
    tr.to_parquet(tmp_path / "train.parquet")
    from valuekit.cli.main import main

    run = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(tmp_path / "train.parquet"), "--dev", str(DATA / "dev.parquet"), "--model",
                     "seq2seq", "--method", "multidds", "--steps", "3", "--batch-size", "8", "--set", "hidden=16",
                     "--set", "eval_every=3", "--device", "cpu", "--out", str(run)]) == 0
    f = valuekit.audit(run, out=tmp_path / "audit.csv")
    assert list(f.columns[:4]) == ["id", "source", "src_text", "tgt_text"] and len(f) == 120
    row = f.set_index("id").loc[tr.id.iloc[0]]
    assert (row.source, row.src_text) == (tr.source.iloc[0], " ".join(tr.src_text.iloc[0].split()))
    assert row.tgt_text.startswith(" ".join(tr.tgt_text.iloc[0].split())[:40])
    assert f.attrs["kind"] == "translation" and "given_label" not in f.columns
    summary = valuekit.audit_summary(f)
    by_source = {s["source"]: s["rows"] for s in summary["sources"]}
    assert by_source == tr.source.value_counts().to_dict()
    assert len(pd.read_csv(tmp_path / "audit.csv")) == 120
