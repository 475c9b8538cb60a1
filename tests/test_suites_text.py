"""Text study suites (`valuekit bench multidds-targets / multidds-signal / multidds-model / llm`) on tiny data:
the grid they run, the numbers in their tables, resuming from --runs-dir, and the bench CLI's checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from valuekit.bench import suites_llm
from valuekit.bench import suites_multidds as sm
from valuekit.errors import InputError

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "multilingual"


def _tiny_target(target, folder):
    """ast with two related (es, gl) and two unrelated (ja, fi) sources from the bundled corpus, 60 groups."""
    folder.mkdir(parents=True, exist_ok=True)
    train = pd.read_parquet(BUNDLED / "train.parquet")
    train = train[train.source.isin(["ast", "es", "gl", "ja", "fi"]) & (train.group < train.group.unique()[60])]
    paths = {"train": str(folder / "train.parquet")}
    train.to_parquet(paths["train"], index=False)
    for split in ("dev", "test"):
        paths[split] = str(folder / f"{split}.parquet")
        pd.read_parquet(BUNDLED / f"{split}.parquet").head(6).to_parquet(paths[split], index=False)
    return paths


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(sm, "TARGETS", {"ast": (("es", "gl"), ("ja", "fi"))})
    monkeypatch.setattr(sm, "prepare_target", _tiny_target)
    monkeypatch.setattr(sm, "LOOP", {**sm.LOOP, "hidden": 32})  # a narrow GRU keeps the test fast


def test_multidds_targets_quick_runs_every_variant_and_resumes(tmp_path, tiny, monkeypatch):
    md = sm.run_targets(tmp_path / "out", command="valuekit bench multidds-targets --quick", quick=True, steps=100,
                        runs_dir=tmp_path / "runs")
    frame = pd.read_csv(tmp_path / "out" / "suite-multidds-targets.csv")
    assert list(frame.variant) == list(sm.VARIANTS) and set(frame.seed) == {0} and set(frame.steps) == {10}
    assert frame.dev_chrf.between(0, 100).all() and frame.test_chrf.between(0, 100).all() and (frame.cpu_s > 0).all()
    probs = frame[[f"p_{s}" for s in ("ast", "es", "gl", "ja", "fi")]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    by = dict(zip(frame.variant, probs))
    np.testing.assert_allclose(by["uniform"], 0.2, atol=1e-9)  # scorer fixed at psi = 0
    np.testing.assert_allclose(by["retrained"], by["dds"], atol=1e-5)  # trained with the dds run's final p(S)
    assert not np.allclose(by["dds"], 0.2)  # the scorer moved
    text = md.read_text()
    assert "Command: `valuekit bench multidds-targets --quick`" in text
    row = next(line for line in text.splitlines() if line.startswith("| ast | dds | 1 |"))
    lo, hi = min(by["dds"][1:3]), max(by["dds"][3:])
    assert ("1 of 1" if lo > hi else "0 of 1") == row.split("|")[4].strip()
    assert (tmp_path / "out" / "suite-multidds-targets-usage-ast.png").exists()
    train = pd.read_parquet(tmp_path / "runs" / "multidds-targets" / "data" / "ast" / "train.parquet")
    assert f"| ast | Asturian, Romance | es, gl | {len(train):,} ({(train.source == 'ast').sum()}) |" in text
    # a second call with the same --runs-dir trains nothing: every run is recorded
    monkeypatch.setattr(sm, "_target_run", lambda *a, **k: pytest.fail("re-trained a recorded run"))
    again = sm.run_targets(tmp_path / "out2", command="x", quick=True, steps=100, runs_dir=tmp_path / "runs")
    assert pd.read_csv(tmp_path / "out2" / "suite-multidds-targets.csv").dev_chrf.tolist() == frame.dev_chrf.tolist()
    assert again.exists()
    # report_only: a larger grid (seed 1 never ran) gives the tables of the recorded runs and trains nothing
    sm.run_targets(tmp_path / "out3", command="x", seeds=(0, 1), steps=10, runs_dir=tmp_path / "runs", report_only=True)
    only = pd.read_csv(tmp_path / "out3" / "suite-multidds-targets.csv")
    assert set(only.seed) == {0} and only.dev_chrf.tolist() == frame.dev_chrf.tolist()


def test_signal_blend_and_statistics(tiny):
    wide = pd.DataFrame({"ast": [1.0, 3.0], "es": [2.0, np.nan]})
    se = pd.DataFrame({"ast": [0.1, 0.2], "es": [0.3, np.nan]})
    r, s = sm.blend(wide, se, 0.5)
    assert r.ast.tolist() == [1.0, 2.0] and r.es.tolist() == [2.0, 2.0]  # an unseen source keeps its last value
    np.testing.assert_allclose(s.ast, [0.1, np.hypot(0.05, 0.1)])
    r0, _ = sm.blend(wide, se, 0.0)
    assert r0.ast.tolist() == [1.0, 3.0]
    # two related sources always above two unrelated ones, the target in the middle
    rng = np.random.default_rng(0)
    w = pd.DataFrame({"es": 5 + rng.normal(0, 0.1, 8), "gl": 5 + rng.normal(0, 0.1, 8), "ja": np.ones(8),
                      "fi": np.ones(8), "ast": np.full(8, 3.0)})
    st = sm.signal_stats(w, pd.DataFrame(0.1, index=w.index, columns=w.columns), "ast")
    assert st["updates"] == 6 and st["share_updates_order_ok"] == 1.0 and st["order_of_mean_ok"]
    assert st["target_mean_rank"] == 3 and st["z_related_vs_unrelated"] > 20


def test_multidds_signal_quick_freezes_the_scorer(tmp_path, tiny):
    md = sm.run_signal(tmp_path, command="valuekit bench multidds-signal --quick", quick=True, steps=200)
    frame = pd.read_csv(tmp_path / "suite-multidds-signal.csv")
    assert len(frame) == 2 * len(sm.A1S) and list(frame.arm.unique()) == list(sm.SIGNAL_ARMS)[:2]
    assert frame.share_updates_order_ok.between(0, 1).all() and frame.target_mean_rank.between(1, 5).all()
    assert (frame.updates >= 1).all() and np.isfinite(frame.abs_r_over_se).all()
    assert "| ast | probe-dot-all | 0.05 | 1 |" in md.read_text()


def test_multidds_model_quick_reports_chrf_at_three_points(tmp_path, monkeypatch):
    monkeypatch.setattr(sm, "MODEL_ARMS", {"gru-h128-lr3e-3": ("gru", 3e-3, 1.0), "tf-d128-lr1e-3": ("tf", 1e-3, 0.5)})
    _tiny_target("ast", tmp_path / "data")
    monkeypatch.setattr(sm, "MODEL_DATA", tmp_path / "data")
    md = sm.run_model(tmp_path, command="valuekit bench multidds-model --quick", quick=True, steps=90)
    frame = pd.read_csv(tmp_path / "suite-multidds-model.csv")
    assert len(frame) == 2 * 3 and frame.step.tolist() == [2, 4, 6, 1, 2, 3]  # the Transformer: half the steps
    assert frame.dev_chrf.between(0, 100).all() and (frame.dev_loss > 0).all()
    for _, g in frame.groupby("model"):
        assert g.cpu_s.is_monotonic_increasing
    assert "| tf-d128-lr1e-3 | 3 | 1 |" in md.read_text()


def test_early_stopped_test_loss_is_the_test_loss_at_the_lowest_dev_loss():
    class Run:
        def metrics(self):
            return pd.DataFrame({"step": [1, 2, 3, 4, 5], "dev_loss": [3.0, np.nan, 2.5, 2.7, 2.6],
                                 "test_loss": [3.1, np.nan, 2.9, 2.4, 2.2]})

    assert suites_llm.early_stopped_test_loss(Run()) == 2.9 and suites_llm.best_dev_loss(Run()) == 2.5


@pytest.mark.skipif(not (importlib.util.find_spec("transformers") and importlib.util.find_spec("django")),
                    reason="needs transformers and django (valuekit[llm,multilingual])")
def test_llm_quick_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(suites_llm, "DATA", {"noise": 0.1, "max_per_task": 12, "dev_size": 8, "test_size": 8})
    md = suites_llm.run_llm(tmp_path, command="valuekit bench llm --quick", quick=True, steps=120)
    frame = pd.read_csv(tmp_path / "suite-llm.csv")
    val, sub = frame[frame.kind == "value"], frame[frame.kind == "subset"]
    assert sorted(val.arm) == sorted(suites_llm.DEFAULT_ARMS) and set(val.steps) == {8}
    assert val.auroc_all_junk.between(0, 1).all() and (val.n_tasks == 7).all()
    assert val.junk_task_rank.between(1, 7).all() and (val.dev_loss > 0).all()
    uni = val[val.arm == "uniform"].iloc[0]  # uniform's value is -mean_loss: the same AUROC
    assert val.auroc_last_loss.between(0, 1).all() and uni.auroc_all_junk == pytest.approx(uni.auroc_mean_loss)
    n = 6 * 12 + 12  # six real tasks and the junk task, 12 rows each
    assert list(sub.arm) == list(suites_llm.SUBSETS) and (sub.rows == n // 2).all()
    assert (sub.junk_rows_kept <= sub.rows).all()
    # early-stopped: the lowest of each fine-tuning run's dev evaluations, never above its final one
    assert (sub.best_dev_loss <= sub.dev_loss + 1e-12).all() and (sub.best_dev_loss > 0).all()
    assert np.isfinite(sub.early_test_loss).all() and (sub.test_loss > 0).all()  # the held-out test strings
    assert "test loss at the best dev step per seed" in md.read_text()
    timing = frame[frame.kind == "timing"].iloc[0]
    assert timing.step_s_uniform > 0 and timing.step_s_bads > 0
    pad = frame[frame.kind == "padding"].iloc[0]
    assert 0 <= pad.length_buckets <= pad.random_trimmed <= pad.no_trim < 1
    text = md.read_text()
    assert "Command: `valuekit bench llm --quick`" in text and "| instructions | uniform | 0 |" in text
    assert (val.dataset == "instructions").all() and (sub.dataset == "instructions").all()
    bads = val[val.arm == "bads"].iloc[0]
    assert 0 <= bads.auroc_posterior_mean <= 1 and timing.mean_step_s_bads > 0
    assert timing["mean_step_s_bads-dev-every-step"] > 0  # the settings before dev_every, timed alongside
    assert "bads-dev-every-step" not in set(val.arm)


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("transformers", "django")),
                    reason="needs transformers and django (valuekit[llm,multilingual])")
def test_llm_suite_runs_each_named_instruction_set(tmp_path, monkeypatch):
    """--datasets instructions-swap: its own prepared table (swapped responses), its own runs, named in the tables."""
    monkeypatch.setattr(suites_llm, "DATA", {"noise": 0.1, "max_per_task": 12, "dev_size": 8, "test_size": 8})
    md = suites_llm.run_llm(tmp_path, command="c", quick=True, steps=120, methods=("uniform",),
                            datasets=("instructions-swap",), runs_dir=tmp_path / "runs")
    frame = pd.read_csv(tmp_path / "suite-llm.csv")
    val = frame[frame.kind == "value"]
    assert list(val.dataset) == ["instructions-swap"] and list(val.arm) == ["uniform"]
    runs = tmp_path / "runs" / "llm"
    assert (runs / "uniform-instructions-swap-s0-8" / "values.parquet").exists()
    table = pd.read_parquet(runs / "data-instructions-swap" / "train.parquet")
    english = set(table[~table.is_noisy].response)
    assert table[table.is_noisy].response.isin(english).mean() > 0.5  # junk = other messages' English strings
    assert "| instructions-swap | uniform | 0 |" in md.read_text()


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("transformers", "django", "peft")),
                    reason="needs transformers, django and peft (valuekit[lora,multilingual])")
def test_llm_lora_arms_start_from_the_uniform_runs_model(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(suites_llm, "DATA", {"noise": 0.1, "max_per_task": 12, "dev_size": 8, "test_size": 8})
    suites_llm.run_llm(tmp_path, command="c", quick=True, steps=120, methods=("bads-lora",), runs_dir=tmp_path / "runs")
    frame = pd.read_csv(tmp_path / "suite-llm.csv")
    val = frame[frame.kind == "value"]
    assert sorted(val.arm) == ["bads-lora", "uniform"] and val.auroc_all_junk.between(0, 1).all()
    runs = tmp_path / "runs" / "llm"
    base = runs / "base-s0-8"
    assert (base / "config.json").exists() and any(base.glob("*.safetensors"))
    meta = json.loads((runs / "bads-lora-s0-8" / "run.json").read_text())
    assert meta["config"]["lora"] == suites_llm.LORA and meta["config"]["model"] == f"hf:{base}"
    assert frame[frame.kind == "timing"].iloc[0]["step_s_bads-lora"] > 0
    assert "LoRA arms" in (tmp_path / "suite-llm.md").read_text()


def test_bench_cli_lists_and_checks_the_text_suites(tmp_path, monkeypatch):
    from valuekit.cli import bench as cli_bench
    from valuekit.cli.main import build_parser

    from valuekit.bench import suites_text
    from valuekit.bench.main import registry

    parser = build_parser()
    for name in suites_text.NAMES:
        assert parser.parse_args(["bench", name]).kind == [name]
    assert set(registry()) == set(suites_text.NAMES)
    calls = []
    fake = suites_text.TextSuite("multidds-targets", "t", lambda out, **kw: calls.append(kw) or out / "x.md",
                                 ("ast", "br"), ("dds", "uniform"))
    from valuekit.bench import main as bench_main

    monkeypatch.setattr(bench_main, "registry", lambda: {"multidds-targets": fake})
    args = parser.parse_args(["bench", "multidds-targets", "--datasets", "br", "--methods", "dds", "--seeds", "0,2",
                              "--steps", "40", "--device", "cpu", "-o", str(tmp_path)])
    assert args.func(args) == 0
    (kw,) = calls
    assert kw["datasets"] == ("br",) and kw["methods"] == ("dds",) and kw["seeds"] == (0, 2) and kw["steps"] == 40
    assert kw["command"].startswith("valuekit bench multidds-targets --device cpu")
    for kind, bad, msg in (("multidds-targets", ["--datasets", "digits"], "unknown dataset 'digits'"),
                           ("multidds-targets", ["--methods", "bads"], "unknown method"),
                           ("multidds-targets", ["--report-only"], "with --runs-dir"),
                           ("dds", ["--report-only", "--runs-dir", str(tmp_path)], "only for the text suites")):
        args = parser.parse_args(["bench", kind, *bad, "-o", str(tmp_path)])
        with pytest.raises(InputError, match=msg):
            cli_bench._check(args)


def test_fresh_never_removes_a_run_another_process_is_training(tmp_path):
    """A run folder left by a stopped process is emptied; one whose lock a live process holds is refused."""
    import os
    import socket
    import subprocess
    import sys

    from valuekit.bench.suites_text import fresh
    from valuekit.errors import RunDirError

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / ".lock").write_text(f"{socket.gethostname()}:{os.getpid()}")  # this (live) process
    (busy / "run.json").write_text("{}")
    with pytest.raises(RunDirError, match="in use by another valuekit process"):
        fresh(busy)
    assert (busy / "run.json").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".lock").write_text(f"{socket.gethostname()}:{int(dead.stdout)}")
    (stale / "run.json").write_text("{}")
    assert fresh(stale) == stale and not stale.exists()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers (valuekit[llm])")
def test_llm_suite_model_config_is_never_seen_half_written(tmp_path):
    """Processes sharing --runs-dir rewrite the GPT-2 config while others read it: every read parses (the old
    in-place save_pretrained failed ~600 of 2000 such reads), and no temporary folder is left behind."""
    import json
    import threading

    folder = tmp_path / "gpt2-tiny"
    suites_llm.gpt_config(folder)
    bad = []

    def reader():
        for _ in range(2000):
            try:
                json.loads((folder / "config.json").read_text())
            except ValueError as exc:
                bad.append(exc)

    threads = [
        threading.Thread(target=reader),
        threading.Thread(target=lambda: [suites_llm.gpt_config(folder) for _ in range(100)]),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad and sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-tiny"]
    assert json.loads((folder / "config.json").read_text())["n_layer"] == suites_llm.GPT["n_layer"]
