"""`valuekit bench ... --quick`: every benchmark writes its markdown, CSV and figure with measured numbers."""

import numpy as np
import pandas as pd
import pytest
from valuekit.cli.main import main


def test_bench_all_quick(tmp_path, capsys):
    out = tmp_path / "reports"
    assert main(["bench", "all", "--quick", "--device", "cpu", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    for kind in ("speed", "layer", "quality", "scale"):
        md = (out / f"{kind}.md").read_text()
        assert md.startswith("# ") and "Command: `valuekit bench all --quick --device cpu -o" in md, kind
        assert (out / f"{kind}.csv").exists() and f"{kind}: " in printed

    speed = pd.read_csv(out / "speed.csv")
    uni = speed[speed.method == "uniform"]
    assert np.allclose(uni.ratio_vs_uniform, 1.0) and (speed.median_step_ms > 0).all()
    assert {"dds", "bads"} <= set(speed.method)
    ratio = speed.set_index("method").ratio_vs_uniform
    np.testing.assert_allclose(ratio, speed.set_index("method").median_step_ms / uni.median_step_ms.iloc[0])
    mean = speed.set_index("method")  # the amortised ratio: every timed step, scorer updates included
    np.testing.assert_allclose(mean.mean_ratio_vs_uniform, mean.mean_step_ms / uni.mean_step_ms.iloc[0])
    assert (out / "speed.png").stat().st_size > 1000

    stream = pd.read_csv(out / "stream.csv")  # a user's BatchNorm ResNet factory on PNG bytes
    assert set(stream.method) == {"uniform"} and set(stream.stream) == {True, False}
    assert (stream.values_rows == stream.rows).all() and (stream.peak_rss_mib >= stream.rss_after_load_mib).all()
    assert (stream.interleaved_step_s > 0).all() and "derived" in (out / "stream.md").read_text()
    assert "## stream (CPU)" in (out / "BENCHMARKS.md").read_text()

    epoch = pd.read_csv(out / "epoch.csv")  # timed epochs: every row valued, ceil(N / 64) steps each
    assert sorted(set(zip(epoch.method, epoch.rows))) == [
        ("dds", 300),
        ("dds", 1338),
        ("uniform", 300),
        ("uniform", 1338),
    ]
    assert (epoch.steps == np.ceil(epoch.rows / 64)).all() and (epoch.rows_valued == epoch.rows).all()
    assert (epoch.epoch_s > 0).all() and (epoch.peak_rss_mib > 0).all()
    np.testing.assert_allclose(epoch[epoch.method == "uniform"].ratio_vs_uniform, 1.0)
    np.testing.assert_allclose(epoch.steps_per_s, epoch.steps / epoch.steps_s_sum)
    assert len((out / "epoch.jsonl").read_text().splitlines()) == 4
    assert "Time per epoch and peak memory vs N" in (out / "BENCHMARKS.md").read_text()

    layer = pd.read_csv(out / "layer.csv")
    assert (layer.max_abs_diff_w < 1e-5).all() and (layer.max_abs_diff_grad < 1e-5).all()
    assert (layer.ratio > 1).all()  # the closed form beats the generic conic solver even at n = 64

    quality = pd.read_csv(out / "quality.csv")
    assert list(quality.method) == ["uniform", "dds"]
    q = quality.set_index("method")
    assert q.loc["uniform", "auroc"] > 0.9  # digits, 40 % flips: small loss
    np.testing.assert_allclose(q.loc["uniform", "auroc"], q.loc["uniform", "auroc_loss"])  # uniform's value IS -loss
    assert q[["auroc", "f1_at_k", "auroc_loss", "auroc_aum"]].stack().between(0, 1).all()
    assert 0.5 < q.loc["uniform", "test_acc"] <= 1 and 0.5 < q.loc["uniform", "test_acc_es"] <= 1
    assert (q.acc_top50 > q.acc_random50).all() and q.min_share_top50_pc.between(0.9, 1.1).all()
    assert q.loc["dds", "median_ess"] > 0.3 and np.isnan(q.loc["uniform", "median_ess"])
    det = pd.read_csv(out / "quality_detectors.csv").set_index("detector")
    assert {"valuekit audit label_score", "uniform small loss", "cleanlab (early-stopped MLP)"} <= set(det.index)
    assert det.auroc.between(0.8, 1).all()
    md = (out / "quality.md").read_text()
    assert "## Acceptance" in md and ("**PASS**" in md or "**FAIL**" in md)
    row = next(
        line for line in md.splitlines() if line.startswith("| digits | noise40 | dds | ") and line.count("|") == 8
    )
    cells = [c.strip() for c in row.split("|")[4:7]]  # last step, own best-dev evaluation, uniform-ES
    assert cells == [f"{q.loc['dds', 'test_acc']:.3f}", f"{q.loc['dds', 'test_acc_es']:.3f}",
                     f"{q.loc['uniform', 'test_acc_es']:.3f}"]

    scale = pd.read_csv(out / "scale.csv")
    assert len(scale) == 3 and (scale.seconds > 0).all()
    assert scale.note.iloc[1] == "ok" and "rows/s" in scale.note.iloc[2]

    index = (out / "BENCHMARKS.md").read_text()
    assert "## speed (CPU)" in index and "## quality (CPU)" in index and "No GPU results yet" in index


def test_bench_rejects_unknown_kind(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "nope"])
    assert err.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_quality_helpers_exact():
    from valuekit.bench.quality import criteria, early_stopped_acc, min_class_share, top_fraction

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    value = np.array([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, np.nan])
    assert list(np.flatnonzero(top_fraction(value, labels))) == [0, 1, 2, 3]
    assert list(np.flatnonzero(top_fraction(value, labels, per_class=True))) == [0, 1, 4, 5]
    assert min_class_share(top_fraction(value, labels), labels) == 0.0
    assert min_class_share(np.array([1, 0, 0, 0, 1, 1, 1, 0], bool), labels) == pytest.approx((1 / 4) / (1 / 2))
    m = pd.DataFrame({"step": [100, 200, 300], "dev_acc": [0.5, 0.9, 0.9], "test_acc": [0.4, 0.8, 0.7]})
    assert early_stopped_acc(m) == 0.8  # first best dev accuracy
    rows = pd.DataFrame({"dataset": "d", "setting": "noise40", "seed": [0, 1], "method": "dds", "auroc": [0.9, 0.9],
                         "auroc_loss": [0.95, 0.95], "acc_top50": 0.9, "acc_random50": 0.8, "min_share_top50": 0.7,
                         "test_acc": 0.85, "test_acc_es": [0.87, 0.89], "median_ess": 0.5})
    uni = rows.assign(method="uniform", test_acc_es=0.86)
    det = pd.DataFrame({"dataset": "d", "setting": "noise40", "seed": 0,
                        "detector": ["valuekit audit label_score", "pyDVL data-oob"], "f1_at_k": [0.9, 0.85]})
    got = {c.split(",")[0][:20]: ok for c, ok, _ in criteria(pd.concat([uni, rows]), det)}
    assert got == {"AUROC(value) >= AURO": False, "top 50 % by value be": True, "audit label_score be": True,
                   "every reweighting me": False}
    evidence = criteria(pd.concat([uni, rows]), det)[-1][2]
    assert evidence.startswith("fails: d/dds 0.850 vs 0.860") and evidence.endswith("same way reach: d/dds 0.880)")


def test_quality_bad_settings_exit_2_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["bench", "quality", "--settings", "noise99", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "noise99" in err[0] and "noise20" in err[0] and not out.exists()
