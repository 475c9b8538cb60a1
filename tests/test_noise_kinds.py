"""`valuekit data prepare` noise kinds (symmetric, pair, instance) and long-tail imbalance: the realised flips,
where they go, the class counts, the Parquet metadata, seeds, and bad values (one line, exit code 2)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from valuekit.cli.main import main

from valuekit.data.bundled import INSTANCE_MODEL, clean_margins, flip_labels, prepare

K = 10  # digits: classes "0".."9", class c is label str(c)


def _prepare(tmp_path, name="d", **kw) -> pd.DataFrame:
    prepare("digits", tmp_path / name, seed=kw.pop("seed", 0), **kw)
    return pd.read_parquet(tmp_path / name / "train.parquet")


def _codes(col: pd.Series) -> np.ndarray:
    return col.astype(int).to_numpy()


def _pixels(tr: pd.DataFrame) -> np.ndarray:
    return np.stack(tr.pixels.to_numpy()).astype(np.float32)


@pytest.mark.parametrize("kind", ["symmetric", "pair", "instance"])
def test_realised_flip_rate_is_the_requested_one(tmp_path, kind):
    tr = _prepare(tmp_path, noise=0.3, noise_kind=kind)
    assert tr.is_noisy.sum() == round(0.3 * len(tr))
    assert ((tr.label != tr.clean_label) == tr.is_noisy).all()


def test_pair_flips_all_go_to_the_next_class(tmp_path):
    tr = _prepare(tmp_path, noise=0.4, noise_kind="pair")
    y, f = _codes(tr.clean_label), _codes(tr.label)
    flipped = tr.is_noisy.to_numpy()
    assert flipped.sum() == round(0.4 * len(tr))
    assert np.array_equal(f[flipped], (y[flipped] + 1) % K)
    assert set(y[flipped]) == set(range(K))  # every class, including 9 -> 0


def test_instance_flips_concentrate_on_low_margin_rows_and_go_to_the_confused_class(tmp_path):
    rate = 0.3
    tr = _prepare(tmp_path, noise=rate, noise_kind="instance")
    y, f, flipped = _codes(tr.clean_label), _codes(tr.label), tr.is_noisy.to_numpy()
    margin, wrong = clean_margins(_pixels(tr), y, K)  # the same clean model, refitted on the written rows
    assert np.array_equal(f[flipped], wrong[flipped])
    assert margin[flipped].mean() < margin[~flipped].mean()
    low = margin < np.median(margin)
    assert flipped[low].mean() > 1.5 * rate > flipped[~low].mean()  # measured 0.56 vs 0.04 on this table (seed 0)
    # the same rate of symmetric flips falls on low and high margins alike
    sym = flip_labels(y, rate, "symmetric", K, np.random.default_rng(0)) != y
    assert abs(sym[low].mean() - sym[~low].mean()) < 0.1


def test_instance_margins_against_an_exact_reference():
    """Two classes on one feature, mirror images of each other: the clean model's margin p(y) - p(other) =
    |2 sigma(w x) - 1| is symmetric about the boundary x = 0, grows away from it, and the confused class is the
    other one."""
    x = np.linspace(-3, 3, 60)[:, None]  # no row on the boundary
    y = (x[:, 0] > 0).astype(np.int64)
    margin, wrong = clean_margins(x, y, 2)
    assert np.array_equal(wrong, 1 - y)
    np.testing.assert_allclose(margin, margin[::-1], atol=1e-6)
    assert np.all(np.diff(margin[30:]) > 0) and np.all(np.diff(margin[:30]) < 0) and 0 < margin.min() < 0.2


@pytest.mark.parametrize("ratio", [10.0, 4.5])
def test_imbalance_class_counts_follow_r_to_1_with_an_exponential_profile(tmp_path, ratio):
    tr = _prepare(tmp_path, imbalance=ratio, noise=0.2, noise_kind="pair")
    counts = np.bincount(_codes(tr.clean_label), minlength=K)
    m = counts[0]
    assert counts.tolist() == [max(1, round(m * ratio ** (-c / (K - 1)))) for c in range(K)]
    assert counts.max() / counts.min() == pytest.approx(ratio, rel=0.05)
    dev = pd.read_parquet(tmp_path / "d" / "dev.parquet")
    assert set(dev.label.value_counts()) == {10}  # dev stays balanced and clean


def test_settings_are_recorded_in_each_tables_parquet_metadata(tmp_path):
    prepare("digits", tmp_path / "d", noise=0.25, noise_kind="instance", imbalance=3.0, seed=7)
    for split in ("train", "dev", "test"):
        meta = json.loads(pq.read_schema(tmp_path / "d" / f"{split}.parquet").metadata[b"valuekit.dataset"])
        assert meta == {"dataset": "digits", "noise": 0.25, "noise_kind": "instance", "imbalance": 3.0, "seed": 7,
                        "noise_model": INSTANCE_MODEL, "split": split}
    prepare("digits", tmp_path / "p", noise=0.1, noise_kind="pair")
    meta = json.loads(pq.read_schema(tmp_path / "p" / "train.parquet").metadata[b"valuekit.dataset"])
    assert meta == {"dataset": "digits", "noise": 0.1, "noise_kind": "pair", "imbalance": 1.0, "seed": 0,
                    "split": "train"}


@pytest.mark.parametrize("kind", ["symmetric", "pair", "instance"])
def test_a_seed_gives_the_same_tables_and_another_seed_other_flips(tmp_path, kind):
    kw = dict(noise=0.3, noise_kind=kind, imbalance=2.0)
    a, b = _prepare(tmp_path, "a", seed=1, **kw), _prepare(tmp_path, "b", seed=1, **kw)
    pd.testing.assert_frame_equal(a, b)
    c = _prepare(tmp_path, "c", seed=2, **kw)
    assert set(a.id[a.is_noisy]) != set(c.id[c.is_noisy])


@pytest.mark.parametrize("extra, message", [
    (["--imbalance", "0.5"], "--imbalance 0.5: must be a finite number >= 1"),
    (["--imbalance", "inf"], "--imbalance inf: must be a finite number >= 1"),
    (["--imbalance", "nan"], "--imbalance nan: must be a finite number >= 1"),
    (["--noise", "1.0"], "--noise 1.0: must be in [0, 1)"),
])
def test_bad_values_exit_2_with_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["data", "prepare", "digits", "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_unknown_kind_and_kinds_for_text_sets_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare", "digits", "-o", str(out), "--noise-kind", "asymmetric"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--noise-kind" in err
    for extra, message in ((["--noise-kind", "pair"], "--noise-kind pair: not available for instructions"),
                           (["--imbalance", "3"], "--imbalance 3.0: not available for instructions")):
        assert main(["data", "prepare", "instructions", "-o", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not out.exists()
