"""The Hook contract: subclasses and plain callback objects are both called with the loop's numbers, and an
object that is neither is refused at the edge, before a run directory exists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import valuekit
from valuekit.errors import InputError


def _data(n=48, c=3, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 4)), columns=[f"f{i}" for i in range(4)])
    return frame.assign(id=np.arange(n), label=rng.integers(0, c, n).astype(str))


def test_subclass_and_plain_hooks_see_every_step_and_evaluation(tmp_path):
    class Sub(valuekit.Hook):
        def __init__(self):
            self.steps, self.evals = [], []

        def on_step_end(self, step, batch, record, trainer):
            self.steps.append((step, len(batch.idx), float(record.loss.mean())))

        def on_eval(self, step, metrics):
            self.evals.append((step, metrics["dev_acc"]))

    class OnlyEval:  # no on_step_end: only what it defines is called
        def __init__(self):
            self.evals = []

        def on_eval(self, step, metrics):
            self.evals.append(step)

    sub, plain = Sub(), OnlyEval()
    run = valuekit.train(_data(), _data(seed=1), out=tmp_path / "r", steps=6, batch_size=8, eval_every=3,
                         hooks=[sub, plain], progress=False)
    assert [s for s, _, _ in sub.steps] == [1, 2, 3, 4, 5, 6] and all(b == 8 for _, b, _ in sub.steps)
    logged = run.metrics().set_index("step").train_loss
    assert all(abs(logged[s] - loss) < 1e-6 for s, _, loss in sub.steps)  # the record the loop logged
    assert [s for s, _ in sub.evals] == plain.evals and plain.evals[-1] == 6
    dev = run.metrics().dropna(subset=["dev_acc"]).set_index("step").dev_acc
    assert all(abs(dev[s] - acc) < 1e-9 for s, acc in sub.evals)


@pytest.mark.parametrize("bad, match", [(object(), r"hooks\[0\]: object is not a valuekit Hook"),
                                        ("on_eval", r"expected a list of Hook objects")])
def test_a_non_hook_is_refused_before_anything_is_written(tmp_path, bad, match):
    hooks = bad if isinstance(bad, str) else [bad]
    with pytest.raises(InputError, match=match):
        valuekit.train(_data(), _data(seed=1), out=tmp_path / "r", steps=2, hooks=hooks, progress=False)
    assert not (tmp_path / "r").exists()
