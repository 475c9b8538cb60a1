"""Every run says what its value, value_std and weight columns mean for its method: in values.parquet's metadata
and in run.json (Run.column_docs)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from valuekit.config import TrainConfig
from valuekit.data.tables import load_table
from valuekit.runs.layout import COLUMN_DOCS_KEY
from valuekit.training.loop import run_training

EXPECT = {  # method -> (words in value's doc, words in value_std's doc)
    "uniform": ("minus the row's mean training loss", "std of the row's training loss"),
    "dds": ("in-run value", "not defined"),
    "hostcp": ("in-run value", "selection weight"),
    "l2rw": ("in-run value", "logged weights"),
    "mwnet": ("in-run value", "logged weights"),
    "bads": ("in-run value", "SGLD samples"),
}


@pytest.mark.parametrize("method", list(EXPECT))
def test_values_parquet_and_run_json_say_what_value_means(method, tables, tmp_path):
    tr = load_table(tables["train"])
    dev = load_table(tables["dev"], like=tr, name="dev")
    cfg = TrainConfig(method=method, steps=6, batch_size=16, eval_every=3, progress=False, device="cpu")
    run = run_training(tr, dev, out=tmp_path / method, config=cfg)
    docs = run.column_docs
    value_words, std_words = EXPECT[method]
    assert value_words in docs["value"] and std_words in docs["value_std"] and docs["weight"]
    if docs["value"].startswith("the in-run value"):
        assert "learned" in docs and "not the method's learned quantity" in docs["value"]
    meta = pq.read_schema(run.values_path).metadata
    assert json.loads(meta[COLUMN_DOCS_KEY]) == docs


def test_the_report_says_what_value_means(tables, tmp_path):
    from valuekit.reporting import write_report

    tr = load_table(tables["train"])
    dev = load_table(tables["dev"], like=tr, name="dev")
    cfg = TrainConfig(method="dds", steps=6, batch_size=16, eval_every=3, progress=False, device="cpu")
    run = run_training(tr, dev, out=tmp_path / "dds", config=cfg)
    page = Path(write_report(run, tmp_path / "r.html")).read_text()
    assert "value means" in page and "the in-run value: the percentile rank of the run" in page
    assert "-mean_loss over the whole table" in page
