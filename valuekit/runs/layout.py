"""The run directory: the contract between training and everything after it.

    run.json                  config, seed, versions, input hashes, status
    steps/part-NNNNN.parquet  one row per example per step it was seen
    metrics/part-NNNNN.parquet one row per step
    sources/part-NNNNN.parquet multi-source methods: step, source, prob, count, reward, reward_se
    values.parquet            final per-example value
    sources.parquet           multi-source methods: one row per source (final prob, mean reward, rows)
    checkpoint.pt, best.pt    enough to resume; early stopping's best model (both loaded with weights_only=True)

Parts are written to a hidden temporary file and renamed, so every visible part is a
closed, readable Parquet file even after SIGKILL. Schemas are declared here once and
stored in each file's metadata.

This module is the one owner of the run directory: the file names above are spelled only
here (RUN_JSON, VALUES, CHECKPOINT, ...), and preparing/locking a directory, checkpoint
save/load, atomic writes (`write_atomic`, also used for reports, audits and exports) and
opening a run (`open_run`) live here; the part writers live in `valuekit.runs.parts` (re-exported
here). It imports torch only inside the checkpoint functions.
"""


from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1


RUN_JSON = "run.json"


VALUES = "values.parquet"


CHECKPOINT, BEST = "checkpoint.pt", "best.pt"


SUBSET_VALUE = "subset_value.parquet"  # written by valuekit.bench.retrain.subset_value


SOURCE_TABLE = "sources.parquet"  # per-source companion of values.parquet (multi-source methods)


LOCK = ".lock"


STEPS, METRICS, SOURCES = "steps", "metrics", "sources"


TABLES = (STEPS, METRICS, SOURCES)


# Everything in a run directory that belongs to the run: never an output (valuekit.runs.paths.check_output).
RUN_FILES = (RUN_JSON, VALUES, CHECKPOINT, BEST, LOCK, *TABLES)


def _id_type(id_type: str) -> pa.DataType:
    return pa.int64() if id_type == "int64" else pa.string()


def steps_schema(id_type: str) -> pa.Schema:
    return pa.schema([
        ("step", pa.int64()),
        ("example_id", _id_type(id_type)),
        ("label", pa.int32()),
        ("source", pa.string()),
        ("weight", pa.float32()),
        ("reward", pa.float32()),
        ("loss", pa.float32()),
        ("selected", pa.bool_()),
    ])


METRICS_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("train_loss", pa.float64()),
    ("train_acc", pa.float64()),
    ("dev_loss", pa.float64()),
    ("dev_acc", pa.float64()),
    ("test_loss", pa.float64()),
    ("test_acc", pa.float64()),
    ("scorer_loss", pa.float64()),  # dds/multidds: the scorer's REINFORCE loss
    ("meta_loss", pa.float64()),  # lrdi/l2rw/mwnet/hostcp: the dev loss of the meta (look-ahead) step
    ("step_time", pa.float64()),
    ("wall_time", pa.float64()),
    ("cuda_mem_mb", pa.float64()),  # peak CUDA memory allocated during the step (MiB); null off CUDA
])


META_LOSS_METHODS = ("lrdi", "l2rw", "mwnet", "hostcp")  # methods whose meta_loss column is filled


SOURCES_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("source", pa.string()),
    ("prob", pa.float64()),
    ("count", pa.int64()),
    # the scorer update's per-source reward and its standard error (null where the step had no update);
    # runs written before these columns existed read back without them
    ("reward", pa.float64()),
    ("reward_se", pa.float64()),
])


SOURCE_TABLE_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("prob", pa.float64()),  # final scorer probability (as in sources/)
    ("logit", pa.float64()),  # final scorer logit, centred over sources
    ("uniform_prob", pa.float64()),  # the probability a uniform scorer gives the source
    ("mean_reward", pa.float64()),  # mean over scorer updates of the source's reward
    ("reward_se", pa.float64()),  # standard error of that mean from the per-update standard errors
    ("updates", pa.int64()),  # scorer updates that observed the source
    ("rows", pa.int64()),  # training rows of the source
    ("drawn", pa.int64()),  # rows drawn from the source over the run
    ("is_target", pa.bool_()),  # the dev set's (target) source
])


def values_schema(id_type: str, extra: list[str] = ()) -> pa.Schema:
    fields = [
        ("example_id", _id_type(id_type)),
        ("value", pa.float64()),
        ("value_std", pa.float64()),
        ("weight", pa.float64()),
        ("rank", pa.int64()),
    ]
    return pa.schema(fields + [(c, pa.float64()) for c in extra])


COLUMN_DOCS_KEY = b"valuekit.column_docs"  # values.parquet: JSON {column: what it means for this run's method}


def _meta(table: str, run_id: str) -> dict[bytes, bytes]:
    return {
        b"valuekit.schema_version": str(SCHEMA_VERSION).encode(),
        b"valuekit.table": table.encode(),
        b"valuekit.run_id": run_id.encode(),
    }
