"""Per-example in-run signals (valuekit.training.signals): accumulator vs explicit loops over the step log."""

import numpy as np
import pandas as pd
import pytest
import torch

from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.runs.reader import read_run
from valuekit.training.loop import run_training
from valuekit.training.signals import SignalAccumulator, class_percentile, class_standardise, margins, rank_average


def _load(tables):
    tr = load_table(tables["train"])
    return tr, load_table(tables["dev"], like=tr, name="dev"), load_table(tables["test"], like=tr, name="test")


def _cfg(method, **kw):
    base = dict(method=method, steps=40, batch_size=16, eval_every=10, log_every=10, checkpoint_every=10,
                progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


class Margins:
    """Hook: the margins each step reported, row by row (the explicit reference for aum)."""

    def __init__(self):
        self.rows = []

    def on_step_end(self, step, batch, record, trainer):
        for i, m in zip(batch.idx.tolist(), record.margin.tolist()):
            self.rows.append((i, m))


def test_margins_match_an_explicit_loop():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    logits[[1, 2, 4, 6], y[[1, 2, 4, 6]]] += 4.0  # these rows' assigned logit is the largest: positive margins
    want = [logits[i, y[i]] - max(logits[i, c] for c in range(4) if c != y[i]) for i in range(7)]
    got = margins(logits, y).numpy()
    assert (got > 0).sum() >= 4 and (got < 0).sum() >= 2
    np.testing.assert_allclose(got, torch.stack(want).numpy(), rtol=0, atol=1e-15)


def test_sequence_margins_are_the_mean_over_scored_tokens():
    """Token targets (N, V, L) / (N, L): per row, the mean over tokens with a target (not -100) of the
    assigned-token logit minus the largest other logit; a row with no scored token gets 0."""
    g = torch.Generator().manual_seed(1)
    n, v, length = 4, 5, 6
    logits = torch.randn(n, v, length, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n, length), generator=g)
    y[0, :2] = -100
    y[2, 3:] = -100
    y[3] = -100
    want = []
    for i in range(n):
        toks = [logits[i, y[i, t], t] - max(logits[i, c, t] for c in range(v) if c != y[i, t])
                for t in range(length) if y[i, t] != -100]
        want.append(torch.stack(toks).mean() if toks else torch.tensor(0.0, dtype=torch.float64))
    np.testing.assert_allclose(margins(logits, y).numpy(), torch.stack(want).numpy(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["dds", "l2rw", "uniform"])
def test_columns_equal_explicit_means_over_the_step_log(tables, tmp_path, method):
    hook = Margins()
    over = {"update_every": 2, "scorer_warmup": 5} if method == "dds" else None
    run = run_training(*_load(tables), out=tmp_path / method, config=_cfg(method), method_config=over, hooks=[hook])
    vals = run.values().set_index("example_id")
    steps = run.steps().to_pandas()
    g = steps.groupby("example_id")
    np.testing.assert_allclose(vals.loc[g.loss.mean().index, "mean_loss"], g.loss.mean(), rtol=1e-6)
    np.testing.assert_array_equal(vals.loc[g.size().index, "times_seen"], g.size())
    last = steps.sort_values("step").groupby("example_id").loss.last()  # the loss at the row's latest step
    np.testing.assert_allclose(vals.loc[last.index, "last_loss"], last, rtol=1e-6)
    assert vals.drop(last.index).last_loss.isna().all()
    ids = _load(tables)[0].ids
    m = pd.DataFrame(hook.rows, columns=["row", "margin"]).groupby("row").margin.mean()
    np.testing.assert_allclose(vals.loc[ids[m.index], "aum"], m.to_numpy(), rtol=1e-12)
    if method == "uniform":  # no weights, no rewards: NaN columns, and value = -mean_loss (the small-loss signal)
        assert vals.mean_weight.isna().all() and vals.mean_reward.isna().all()
        np.testing.assert_allclose(vals.value, -vals.mean_loss, rtol=1e-12)
        return
    w = g.weight.mean()
    np.testing.assert_allclose(vals.loc[w.index, "mean_weight"], w, rtol=1e-5)
    rewarded = steps.dropna(subset=["reward"]).groupby("example_id").reward.mean()
    assert len(rewarded) > 0
    np.testing.assert_allclose(vals.loc[rewarded.index, "mean_reward"], rewarded, rtol=1e-5, atol=1e-12)
    never = vals.index.difference(rewarded.index)
    assert vals.loc[never, "mean_reward"].isna().all()


def test_unseen_rows_are_nan_and_sums_are_exact():
    acc = SignalAccumulator(5)
    acc.update(torch.tensor([0, 1, 1]), loss=torch.tensor([1.0, 2.0, 4.0]), margin=torch.tensor([0.5, -1.0, 1.0]),
               weight=None, reward=torch.tensor([3.0, 1.0, 2.0]))
    acc.update(torch.tensor([0]), loss=torch.tensor([3.0]), weight=torch.tensor([2.0]))
    c = acc.columns()
    np.testing.assert_allclose(c["mean_loss"][:2], [2.0, 3.0])
    np.testing.assert_allclose(c["aum"][:2], [0.5, 0.0])
    np.testing.assert_allclose(c["mean_reward"][:2], [3.0, 1.5])
    assert c["mean_weight"][0] == 2.0 and np.isnan(c["mean_weight"][1])  # weight only reported once, for row 0
    assert np.isnan(c["mean_loss"][2:]).all() and list(c["times_seen"]) == [2, 2, 0, 0, 0]
    again = SignalAccumulator(5)
    again.load_state_dict(acc.state_dict())
    for k, v in again.columns().items():
        np.testing.assert_array_equal(v, c[k])


def test_resume_gives_identical_signals(tables, tmp_path):
    over = {"update_every": 2, "scorer_warmup": 5}
    full = run_training(*_load(tables), out=tmp_path / "full", config=_cfg("dds"), method_config=over)

    class StopAt:
        def on_step_end(self, step, batch, record, trainer):
            if step == 17:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(*_load(tables), out=tmp_path / "part", config=_cfg("dds"), method_config=over, hooks=[StopAt()])
    resumed = run_training(*_load(tables), out=tmp_path / "part", config=_cfg("dds"), method_config=over, resume=True)
    a, b = full.values(), resumed.values()
    for col in ("mean_loss", "aum", "mean_weight", "mean_reward", "times_seen", "value", "scorer_logit"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)
    assert read_run(tmp_path / "part").meta["status"] == "completed"


def test_class_percentile_and_rank_average():
    v = np.array([3.0, 1.0, 2.0, 10.0, np.nan, 5.0, 5.0])
    lab = np.array(["a", "a", "a", "b", "b", "b", "c"])
    np.testing.assert_allclose(class_percentile(v, lab), [1.0, 0.0, 0.5, 1.0, np.nan, 0.0, 0.5], equal_nan=True)
    ties = class_percentile(np.array([1.0, 1.0, 2.0]), np.zeros(3))
    np.testing.assert_allclose(ties, [0.25, 0.25, 1.0])
    w = np.array([1.0, 3.0, 2.0, np.nan, np.nan, 1.0, 0.0])
    # class b: v ranks 10 -> 1, 5 -> 0; w has one finite row (0.5); row 4 has no finite signal -> nan
    np.testing.assert_allclose(rank_average([v, w], lab), [0.5, 0.5, 0.5, 1.0, np.nan, 0.25, 0.5], equal_nan=True)
    z = class_standardise(np.array([1.0, 3.0, 5.0, 5.0]), np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(z, [-1.0, 1.0, 0.0, 0.0])
    z = class_standardise(np.array([0.0, 4.0, np.nan, 8.0, 1.0, 3.0, 7.0]), np.array([0, 0, 0, 0, 1, 1, 2]))
    sd = np.std([0.0, 4.0, 8.0])
    np.testing.assert_allclose(z, [-4 / sd, 0.0, np.nan, 4 / sd, -1.0, 1.0, 0.0], equal_nan=True)


def test_in_run_value_uses_the_signals_only_for_class_labels():
    """Signals and 1-D labels: the percentile rank of -mean_loss over the whole table (classes and aum play no
    part); a bare context (no signals) or sequence
    labels of a non-LM model (translation pairs): the learned quantity passed as the fallback; a causal LM's
    sequence labels: the percentile rank of -last_loss."""
    from types import SimpleNamespace

    from valuekit.training.signals import in_run_value

    acc = SignalAccumulator(4)
    acc.update(torch.arange(4), loss=torch.tensor([0.1, 0.9, 0.5, 0.3]), margin=torch.tensor([2.0, -1.0, 0.5, 1.0]))
    y = torch.tensor([0, 0, 1, 1])
    fallback = torch.tensor([9.0, 8.0, 7.0, 6.0])
    # by hand: -mean_loss -0.1 > -0.3 > -0.5 > -0.9 -> ranks 3, 1, 2, 0 of 3 (the old within-class rank
    # average of -mean_loss and aum gave 1, 0, 0, 1: row 3 (loss 0.3) was the best of its class)
    np.testing.assert_allclose(in_run_value(SimpleNamespace(signals=acc, y=y), fallback), [1.0, 0.0, 1 / 3, 2 / 3])
    acc2 = SignalAccumulator(3)  # ties averaged, never-seen rows NaN
    acc2.update(torch.tensor([0, 1]), loss=torch.tensor([0.5, 0.5]))
    acc2.update(torch.tensor([0]), loss=torch.tensor([0.5]))
    np.testing.assert_allclose(in_run_value(SimpleNamespace(signals=acc2, y=torch.tensor([0, 1, 1])), fallback[:3]),
                               [0.5, 0.5, np.nan], equal_nan=True)
    np.testing.assert_array_equal(in_run_value(SimpleNamespace(signals=None, y=y), fallback), fallback.numpy())
    tokens = torch.zeros(4, 3, dtype=torch.long)
    seq2seq = SimpleNamespace(signals=acc, y=tokens, config=SimpleNamespace(model="translation"))
    np.testing.assert_array_equal(in_run_value(seq2seq, fallback), fallback.numpy())
    acc.update(torch.tensor([1, 2]), loss=torch.tensor([0.2, 0.7]))  # last losses 0.1, 0.2, 0.7, 0.3 (row 1 improved)
    for model in ("causal-lm", "hf-config:/some/dir", "hf:/some/dir"):
        lm = SimpleNamespace(signals=acc, y=tokens, config=SimpleNamespace(model=model))
        np.testing.assert_allclose(in_run_value(lm, fallback), [1.0, 2 / 3, 0.0, 1 / 3])


def test_token_level_losses_count_once_per_row():
    """A (rows, tokens) loss is averaged over its tokens into one loss per row before it is summed."""
    acc = SignalAccumulator(3)
    acc.update(torch.tensor([0, 2]), loss=torch.tensor([[1.0, 3.0, 5.0], [0.0, 0.0, 6.0]]))
    acc.update(torch.tensor([0]), loss=torch.tensor([[7.0, 7.0, 7.0]]))
    cols = acc.columns()
    np.testing.assert_allclose(cols["mean_loss"], [5.0, np.nan, 2.0], equal_nan=True)
    np.testing.assert_array_equal(cols["times_seen"], [2.0, 0.0, 1.0])
