"""What a new user meets in the first hour: the public API as a library (functions stay functions, every
function takes a path or the objects the others return, re-running a cell works) and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import blobs
from valuekit.cli.main import main

import valuekit
from valuekit.errors import InputError


def _train(tables, out, **kw):
    return valuekit.train(str(tables["train"]), dev=str(tables["dev"]), test=str(tables["test"]), out=out,
                          method=kw.pop("method", "uniform"), steps=kw.pop("steps", 12), device="cpu",
                          eval_every=6, progress=False, **kw)


@pytest.fixture
def run(tables, tmp_path):
    return _train(tables, tmp_path / "run")


def test_report_stays_a_function_after_the_subpackage_is_imported(run, tmp_path):
    import importlib

    assert valuekit.report.__name__ == "write_report"  # the first access imports the subpackage valuekit.reporting
    importlib.import_module("valuekit.reporting")  # no subpackage shares a public function's name
    importlib.import_module("valuekit.reporting.figures")
    assert callable(valuekit.report) and valuekit.report.__name__ == "write_report"
    page = Path(valuekit.report(run, tmp_path / "b.html", top_k=3)).read_text()
    assert page.count("<section") > 3 and 'id="suspects"' in page
    from valuekit.reporting import write_report  # the subpackage stays importable

    assert write_report is valuekit.report


def test_dir_lists_the_public_functions():
    names = set(dir(valuekit))
    assert {"train", "score", "audit", "report", "read_run", "load_table"} <= names


def test_score_takes_the_run_that_train_returns(run, tables):
    by_run = valuekit.score(str(tables["train"]), run)
    by_path = valuekit.score(str(tables["train"]), run.path)
    df = pd.read_parquet(tables["train"])
    by_frame = valuekit.score(df, valuekit.read_run(run.path))
    assert len(by_run) == len(df) == len(by_frame)
    np.testing.assert_allclose(by_run["weight"], by_path["weight"])
    np.testing.assert_allclose(by_run["value"].to_numpy(), by_frame["value"].to_numpy())
    assert valuekit.audit(run, df)["id"].nunique() == len(df)


def test_train_twice_in_python_needs_overwrite_and_says_so_in_arguments(run, tables, capsys):
    from valuekit.errors import RunDirError

    (run.path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already holds a run") as err:
        _train(tables, run.path)
    assert "overwrite=True" in str(err.value) and "--" not in str(err.value)
    first_id = run.meta["run_id"]
    again = _train(tables, run.path, overwrite=True, steps=6)
    assert again.meta["run_id"] != first_id and again.meta["steps_done"] == 6
    assert "replacing the run in" in capsys.readouterr().err  # never silently
    assert (run.path / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    with pytest.raises(InputError, match="choose one"):
        _train(tables, run.path, overwrite=True, resume=True)


def test_quick_start_runs_twice_with_overwrite(tables, tmp_path, capsys):
    out = tmp_path / "out" / "w.parquet"
    cmd = ["score", str(tables["train"]), "--method", "uniform", "--dev", str(tables["dev"]), "--steps", "6",
           "--device", "cpu", "-o", str(out)]
    assert main(cmd) == 0
    capsys.readouterr()
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err and err.count("\n") == 1
    assert main(cmd + ["--overwrite"]) == 0
    assert "replacing the run" in capsys.readouterr().err
    assert len(pd.read_parquet(out)) == 90
    # the trained run scored again into the same file: --overwrite replaces the output, the run (an input) stays
    mtime = (Path(str(out) + ".run") / "values.parquet").stat().st_mtime_ns
    assert main(["score", str(tables["train"]), "--run", str(out) + ".run", "-o", str(out), "--keep-fraction", "0.5",
                 "--overwrite"]) == 0
    assert pd.read_parquet(out)["selected"].sum() == 45
    assert (Path(str(out) + ".run") / "values.parquet").stat().st_mtime_ns == mtime
    run_dir = tmp_path / "r"
    train = ["train", str(tables["train"]), "--dev", str(tables["dev"]), "--steps", "4", "--device", "cpu",
             "--out", str(run_dir)]
    assert main(train) == 0 and main(train) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    assert main(train + ["--overwrite"]) == 0


def test_score_refuses_a_table_that_is_not_the_runs(run, tables, tmp_path, capsys):
    train = pd.read_parquet(tables["train"])
    other = blobs(90, seed=7, classes=2)  # same ids 0..89, labels c0/c1 drawn afresh: another data set
    other["label"] = np.where(train["label"] == "c0", "c1", "c0")  # every row's label differs from the run's
    other.to_parquet(tmp_path / "other.parquet", index=False)
    with pytest.raises(InputError, match="rows have another 'label' than run") as err:
        valuekit.score(str(tmp_path / "other.parquet"), run)
    assert "\n" not in str(err.value)
    strange = train.assign(label=train["label"].str.replace("c", "k"))
    with pytest.raises(InputError, match="has label 'k"):
        valuekit.score(strange, run)
    # the same rows in another file (CSV): scored, with one warning that the file is not the run's
    train.to_csv(tmp_path / "same.csv", index=False)
    capsys.readouterr()
    assert len(valuekit.score(str(tmp_path / "same.csv"), run)) == 90
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256 differs" in err and "ids and labels match" in err
    # the run's own file: no warning
    valuekit.score(str(tables["train"]), run)
    assert capsys.readouterr().err == ""
    # the CLI: exit 2, one line, nothing written
    out = tmp_path / "o.parquet"
    assert main(["score", str(tmp_path / "other.parquet"), "--run", str(run.path), "-o", str(out)]) == 2
    assert not out.exists() and capsys.readouterr().err.count("\n") == 1


def test_csv_export_leaves_out_a_list_column(run, tables, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(tables["train"])
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(2 * t.num_rows, dtype=np.float32)), 2)
    pq.write_table(t.append_column("emb", emb), tmp_path / "with_list.parquet")
    src, out = str(tmp_path / "with_list.parquet"), tmp_path / "o.csv"
    with pytest.raises(InputError, match=r"drop_columns=\['emb'\]") as err:
        valuekit.score(src, run, out=out)
    assert "--drop-columns" not in str(err.value)
    path = valuekit.score(src, run, out=out, drop_columns=["emb"])
    got = pd.read_csv(path)
    assert "emb" not in got.columns and len(got) == 90 and {"f0", "weight", "rank"} <= set(got.columns)
    frame = valuekit.score(pd.read_parquet(src), run, drop_columns="emb")
    assert "emb" not in frame.columns and "f0" in frame.columns
    capsys.readouterr()
    cli = ["score", src, "--run", str(run.path), "-o", str(tmp_path / "c.csv")]
    assert main(cli) == 2 and "--drop-columns emb" in capsys.readouterr().err
    assert main(cli + ["--drop-columns", "emb,f3"]) == 0
    assert list(pd.read_csv(tmp_path / "c.csv").columns[:5]) == ["id", "label", "f0", "f1", "f2"]
    capsys.readouterr()  # c.csv exists now: replacing it needs --overwrite, and the bad column is still refused
    assert main(cli + ["--drop-columns", "nope"]) == 2 and "already exists" in capsys.readouterr().err
    assert main(cli + ["--drop-columns", "nope", "--overwrite"]) == 2
    assert "--drop-columns nope" in capsys.readouterr().err


def test_audit_values_on_one_scale_and_no_tied_top_suspects(tables, tmp_path):
    from valuekit.analysis import scores

    uni = _train(tables, tmp_path / "uni")
    dds = _train(tables, tmp_path / "dds", method="dds", steps=12)
    f = valuekit.audit([uni, dds], predict=False)
    for name, _run in (("uni", uni), ("dds", dds)):
        pct = f[f"value_pct_{name}"].to_numpy()
        assert pct.min() == 0.0 and pct.max() == 1.0  # one scale for both methods
        raw = f[f"value_{name}"].to_numpy()
        ok = np.isfinite(raw)
        want = (pd.Series(raw[ok]).rank().to_numpy() - 1) / (ok.sum() - 1)
        np.testing.assert_allclose(pct[ok], want)
    cols = list(f.columns)
    assert cols.index("value_pct_uni") + 1 == cols.index("value_pct_dds")  # side by side
    # heavy tails: the rows beyond the 1st percentile keep their order instead of all scoring 0
    v = np.random.default_rng(0).normal(size=1000) ** 3
    s = scores.run_score(v)
    low = np.argsort(v)[:10]
    assert len(np.unique(s[low])) == 10 and s.min() == 0.0 and s.max() == 1.0
    assert np.all(np.diff(s[np.argsort(v)]) > 0)


@pytest.mark.parametrize("layout", ["paths", "struct"])
def test_own_image_files_get_predicted_labels_and_thumbnails(tmp_path, layout):
    from test_ownmodel import png_tables

    paths, arrays = png_tables(tmp_path, layout)
    run = valuekit.train(str(paths["train"]), dev=str(paths["dev"]), out=tmp_path / "run", method="uniform",
                         steps=6, device="cpu", progress=False)
    f = valuekit.audit(run, cv_folds=2)
    assert f["predicted_label"].notna().all() and set(f["predicted_label"]) <= {"c0", "c1", "c2"}
    assert "MLPClassifier" in f.attrs["cv_stand_in"]
    html = Path(valuekit.report(run, tmp_path / "r.html", top_k=5)).read_text()
    suspects = html[html.index('id="suspects"'):]
    suspects = suspects[:suspects.index("</table>")]
    assert suspects.count("<img") == 5 and "not computed" not in html


def test_audit_says_why_there_is_no_predicted_label(run, tables, tmp_path):
    df = pd.read_parquet(tables["train"])[["id", "label"]]  # no features at all
    f = valuekit.audit(run, df)
    assert f["predicted_label"].isna().all()
    assert "no feature columns" in f.attrs["predict_note"] and "\n" not in f.attrs["predict_note"]


@pytest.fixture
def lm_runs(tmp_path):
    from test_llm import _table

    train = _table()
    train.loc[0, "prompt"] = "copy: <b>apple</b> & <script>x</script>\n"
    train.loc[0, "response"] = "<b>apple</b>"
    dev = train[train.task != "junk"].iloc[1::3].copy()
    dev["id"] = np.arange(1000, 1000 + len(dev))
    train.to_parquet(tmp_path / "train.parquet")
    dev.drop(columns="is_noisy").to_parquet(tmp_path / "dev.parquet")
    runs = {}
    for method, extra in (("bads", ["--set", "burn_in=0", "--set", "per_source=true"]),
                          ("multidds", ["--set", "update_every=16"])):
        out = tmp_path / method
        assert main(["train", str(tmp_path / "train.parquet"), "--dev", str(tmp_path / "dev.parquet"), "--model",
                     "causal-lm", "--method", method, "--steps", "8", "--batch-size", "8", "--max-len", "32",
                     "--device", "cpu", "--out", str(out), "--set", "hidden=32", "--set", "eval_every=4",
                     *extra]) == 0
        runs[method] = out
    return runs


def test_report_and_audit_of_instruction_runs(lm_runs, tmp_path, capsys):
    import re

    f = valuekit.audit(list(lm_runs.values()))
    assert {"task", "prompt", "response", "value_pct_bads", "value_pct_multidds", "label_score"} <= set(f.columns)
    assert "given_label" not in f.columns and len(f) == 36
    summary = valuekit.audit_summary(f)
    assert {t["task"] for t in summary["tasks"]} == {"copy", "upper", "junk"}
    assert sum(t["rows"] for t in summary["tasks"]) == 36
    capsys.readouterr()
    assert main(["audit", str(lm_runs["bads"]), "-o", str(tmp_path / "a.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "a.csv")) == 36
    html = Path(valuekit.report(list(lm_runs.values()), tmp_path / "r.html")).read_text()
    notes = re.findall(r'class="note[^"]*">(.*?)</div>', html, flags=re.S)
    assert notes == [], notes  # no error boxes: no "class labels unknown", no class balance, no missing 'label'
    text = re.sub(r"<[^>]+>", " ", html)
    assert "next-token accuracy" in text and "vocabulary (tokens)" in text and ">classes<" not in html
    assert 'id="tasks"' in html and 'id="tasks-bads"' in html and 'id="fig-task-usage"' in html
    assert 'id="balance"' not in html and "nan" not in re.findall(r'id="tasks-bads".*?</table>', html, re.S)[0]
    suspects = re.findall(r'id="suspects".*?</table>', html, re.S)[0]
    assert "copy:" in suspects and 'id="suspect-tasks"' in html
    assert "<script>x" not in html and "&lt;b&gt;apple&lt;/b&gt;" in html  # excerpts are escaped


def test_hf_config_vocabulary_is_sized_from_the_tokenizer(tmp_path, capsys):
    pytest.importorskip("transformers")
    from transformers import GPT2Config

    from valuekit.models.lm import build_lm, check_lm

    GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64).save_pretrained(tmp_path / "gpt")  # vocab 50257
    name = f"hf-config:{tmp_path / 'gpt'}"
    check_lm(name, vocab=259, max_len=32)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab_size 50257" in err and "259" in err
    model = build_lm(name, vocab=259, max_len=32)
    n_emb = [m.num_embeddings for m in model.modules() if type(m).__name__ == "Embedding"]
    assert 259 in n_emb and 50257 not in n_emb
    assert sum(p.numel() for p in model.parameters()) < 200_000  # not 50257 x 32 embedding rows (1.6M)


def test_progress_lines_show_rate_and_eta_from_the_first_steps(monkeypatch):
    import io

    from valuekit.training import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    p = progress.Progress(total=1000, desc="dds", stream=out, tty=False)
    for _ in range(3):  # 3 steps in 6 s: 0.5 step/s, the first line comes after 5 s although 10 % is 100 steps
        clock[0] += 2.0
        p.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0] == "dds: step 3/1000 (0%) 0.5 step/s, ETA 33:14", lines[0]  # 997 steps / 0.5 = 1994 s
    clock[0] += 30.0 * 4  # then every 30 s
    p.update(60)
    assert out.getvalue().splitlines()[1] == "dds: step 63/1000 (6%) 0.5 step/s, ETA 31:14"  # 937 left at 0.5/s


def test_model_help_and_errors_list_every_model_kind(capsys):
    from valuekit.models.builtin import MODELS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in (*MODELS, "causal-lm", "hf-config:DIR", "hf:DIR", "package.module:factory", "torchvision:NAME"):
        assert name in text, name
    assert "task in instruction tables" in text  # --source-col: what score --per-task reads by default
    from valuekit.models.user import check_model_spec as check_spec

    with pytest.raises(InputError) as err:
        check_spec("gpt")
    for name in ("causal-lm", "hf-config:DIR", "hf:DIR", "resnet"):
        assert name in str(err.value)
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default task" not in text and "its default is task" in text


def test_resume_with_another_table_names_it(run, tables, capsys):
    from valuekit.errors import RunDirError

    with pytest.raises(RunDirError) as err:
        valuekit.train(str(tables["train"]), dev=str(tables["dev"]), out=run.path, method="uniform", steps=12,
                       device="cpu", eval_every=6, progress=False, resume=True)  # without the test table
    assert "test table: the run was made with one, this call gives none" in str(err.value)
    with pytest.raises(RunDirError) as err:
        valuekit.train(str(tables["train"]), dev=str(tables["test"]), test=str(tables["test"]), out=run.path,
                       method="uniform", steps=12, device="cpu", eval_every=6, progress=False, resume=True)
    assert "dev table: other rows or contents" in str(err.value)


def test_hf_config_that_does_not_build_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    from transformers import GPT2Config

    from valuekit.models.lm import build_lm

    GPT2Config(n_layer=1, n_embd=64, n_positions=64).save_pretrained(tmp_path / "gpt")  # 12 heads do not divide 64
    with pytest.raises(InputError, match="config.json does not build a model") as err:
        build_lm(f"hf-config:{tmp_path / 'gpt'}", vocab=259, max_len=32)
    assert "\n" not in str(err.value) and "divisible" in str(err.value)
