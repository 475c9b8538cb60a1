"""The entry of `valuekit bench`: which kind runs (speed, layer, quality, scale, stream, epoch, papers, a value or
subset suite, a text suite), the scale benchmark, and the index of reports/."""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from valuekit.bench.common import _run_measured, header, logging_overhead, stem, synthetic_step_log, write
from valuekit.bench.suites_text import TextSuite
from valuekit.errors import InputError
from valuekit.runs.atomic import write_text_atomic
from valuekit.runs.layout import RUN_JSON, VALUES


def bench_scale(out: Path, *, command: str, device: str = "cpu", quick: bool = False) -> Path:
    """Logging overhead, report time/memory on a big synthetic step log, score export rows/s."""
    log = logging_overhead(steps=200 if quick else 2000, repeats=1 if quick else 3, device=device)
    report_rows = 200_000 if quick else 10_000_000
    export_rows = 100_000 if quick else 10_000_000
    rows = [{"what": "uniform run, per-example step log on vs off", "size": f"{log['steps']} steps x 64",
             "seconds": log["with_log_s"], "peak_rss_mib": float("nan"),
             "note": f"off: {log['without_log_s']:.2f} s, overhead {100 * log['overhead']:.1f} %"}]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = tmp / "big"
        synthetic_step_log(run_dir, rows=report_rows)
        dt, rss, rc = _run_measured([sys.executable, "-m", "valuekit.cli", "report", str(run_dir), "-o",
                                     str(tmp / "report.html")])
        rows.append({"what": "valuekit report on a synthetic run", "size": f"{report_rows:,} step rows",
                     "seconds": dt, "peak_rss_mib": rss, "note": "ok" if rc == 0 else f"exit code {rc}"})
        table = tmp / "wide.parquet"
        _synthetic_wide_table(table, export_rows, cols=50)
        vdir = tmp / "values-run"
        _values_only_run(vdir, export_rows)
        dt, rss, rc = _run_measured([sys.executable, "-m", "valuekit.cli", "score", str(table), "--run", str(vdir),
                                     "-o", str(tmp / "scored.parquet"), "--keep-fraction", "0.5"])
        rows.append({"what": "valuekit score (streaming export)", "size": f"{export_rows:,} rows x 50 columns",
                     "seconds": dt, "peak_rss_mib": rss,
                     "note": (f"{export_rows / dt:,.0f} rows/s" if rc == 0 else f"exit code {rc}")})
    frame = pd.DataFrame(rows)
    lines = header("Scale: logging overhead, report and export on large inputs", command, device) + [
        "Report and export are timed as child processes (wall time including Python start-up; peak RSS from",
        "getrusage of the children). Report target: <= 20 s and <= 1.5 GB on 10M step rows.", "",
        "| what | size | seconds | peak RSS (MiB) | note |", "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['what']} | {r['size']} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} | {r['note']} |" for r in rows
    ]
    return write(out, stem("scale", device), lines, frame)


def _synthetic_wide_table(path: Path, rows: int, *, cols: int, chunk: int = 500_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64())] + [(f"c{j}", pa.float32()) for j in range(cols - 1)])
    with pq.ParquetWriter(path, schema) as w:
        for s in range(0, rows, chunk):
            m = min(chunk, rows - s)
            arrays = [pa.array(np.arange(s, s + m))] + [
                pa.array(rng.random(m, dtype=np.float32)) for _ in range(cols - 1)
            ]
            w.write_table(pa.Table.from_arrays(arrays, schema=schema))


def _values_only_run(run_dir: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from valuekit.runs.atomic import write_json_atomic
    from valuekit.runs.layout import SCHEMA_VERSION, values_schema

    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    value = rng.normal(size=rows)
    rank = np.empty(rows, dtype=np.int64)
    rank[np.argsort(-value, kind="stable")] = np.arange(1, rows + 1)
    pq.write_table(pa.table({"example_id": np.arange(rows), "value": value, "value_std": np.zeros(rows),
                             "weight": np.ones(rows), "rank": rank}, schema=values_schema("int64")),
                   run_dir / VALUES)
    write_json_atomic({"schema_version": SCHEMA_VERSION, "name": run_dir.name, "method": "uniform",
                       "status": "completed", "id_type": "int64", "data": {}, "config": {}}, run_dir / RUN_JSON)


def bench_quality(out: Path, **kw) -> Path:
    """Values worth trusting: every method vs its own run's signals, the subset test and the peers
    (valuekit.bench.quality)."""
    from valuekit.bench.quality import bench_quality as run

    return run(out, **kw)


KINDS = ("speed", "layer", "quality", "scale", "stream", "epoch", "outcome")
VALUE = "value"  # which in-run value (valuekit.bench.value); a study over many cells, so not part of `all`
PAPERS = "papers"  # each paper's own experiment (valuekit.bench.papers); a study, so not part of `all`


def run_bench(kind: str, out, *, device: str = "auto", quick: bool = False, argv: list[str] | None = None,
              seeds: str | None = None, steps: int | None = None, datasets: str | None = None,
              methods: str | None = None, settings: str | None = None, runs_dir: str | None = None,
              report_only: bool = False) -> Path:
    """Run one benchmark or study suite (valuekit.bench.suites) and return the markdown file it wrote (list options
    are comma-separated strings)."""
    from valuekit.bench.suites import SUITES, run_suite
    from valuekit.bench.suites_text import NAMES as TEXT_SUITES
    from valuekit.training.options import resolve_device

    if kind not in KINDS and kind not in (PAPERS, VALUE) and kind not in SUITES and kind not in TEXT_SUITES:
        known = ", ".join([*KINDS, PAPERS, VALUE, *SUITES, *TEXT_SUITES])
        raise InputError(f"unknown benchmark {kind!r}; choose from {known}")
    dev = str(resolve_device(device))
    command = "valuekit bench " + " ".join(shlex.quote(a) for a in (argv or [kind] + (["--quick"] if quick else [])))
    out = Path(out)
    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip()) if text else None  # noqa: E731
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps}: must be >= 1")
    try:
        seed_list = tuple(int(s) for s in split(seeds)) if seeds else None
    except ValueError:
        raise InputError(f"--seeds {seeds!r}: expected integers like 0,1,2") from None
    if report_only and ((kind not in TEXT_SUITES and kind != VALUE) or not runs_dir):
        raise InputError(f"--report-only: only for the text suites ({', '.join(TEXT_SUITES)}) and {VALUE} with "
                         "--runs-dir")
    if kind in TEXT_SUITES:
        return registry()[kind].run(out, command=command, device=dev, quick=quick, seeds=seed_list, steps=steps,
                                    datasets=split(datasets), methods=split(methods), runs_dir=runs_dir,
                                    report_only=report_only)
    if kind in SUITES:
        return run_suite(kind, out, command=command, device=dev, quick=quick, seeds=seed_list, steps=steps,
                         datasets=split(datasets))
    if kind == PAPERS:
        from valuekit.bench.papers import PARTS, run_papers

        bad = [s for s in split(settings) or () if s not in PARTS]
        if bad:
            raise InputError(f"--settings {bad[0]!r}: the papers parts are {', '.join(PARTS)}")
        return run_papers(out, command=command, device=dev, quick=quick, seeds=seed_list, steps=steps,
                          datasets=split(datasets), methods=split(methods), parts=split(settings))
    if kind == "speed":
        from valuekit.bench.speed import bench_speed

        return bench_speed(out, command=command, device=dev, quick=quick, methods=split(methods))
    if kind == "layer":
        from valuekit.bench.layer import bench_layer

        return bench_layer(out, command=command, device=dev, quick=quick)
    if kind == "scale":
        return bench_scale(out, command=command, device=dev, quick=quick)
    if kind == "stream":
        from valuekit.bench.stream import bench_stream

        return bench_stream(out, command=command, device=dev, quick=quick, methods=split(methods))
    if kind == "epoch":
        from valuekit.bench.epoch import bench_epoch

        return bench_epoch(out, command=command, device=dev, quick=quick, methods=split(methods))
    if kind == "outcome":
        from valuekit.bench.outcome import SETTINGS as OUTCOME_SETTINGS
        from valuekit.bench.outcome import bench_outcome

        bad = [s for s in split(settings) or () if s not in OUTCOME_SETTINGS]
        if bad:
            raise InputError(f"--settings {bad[0]!r}: choose from {', '.join(OUTCOME_SETTINGS)}")
        return bench_outcome(out, command=command, device=dev, quick=quick, datasets=split(datasets),
                             seeds=seed_list, methods=split(methods), steps=steps, settings=split(settings),
                             runs_dir=runs_dir)
    if kind == VALUE:
        from valuekit.bench.outcome import SETTINGS as VALUE_SETTINGS
        from valuekit.bench.value import bench_value

        bad = [s for s in split(settings) or () if s not in VALUE_SETTINGS]
        if bad:
            raise InputError(f"--settings {bad[0]!r}: choose from {', '.join(VALUE_SETTINGS)}")
        return bench_value(out, command=command, device=dev, quick=quick, datasets=split(datasets), seeds=seed_list,
                           methods=split(methods), steps=steps, settings=split(settings), runs_dir=runs_dir,
                           report_only=report_only)
    from valuekit.bench.quality import SETTINGS

    bad = [s for s in split(settings) or () if s not in SETTINGS]
    if bad:
        raise InputError(f"--settings {bad[0]!r}: choose from {', '.join(SETTINGS)}")
    return bench_quality(out, command=command, device=dev, quick=quick, datasets=split(datasets), seeds=seed_list,
                         methods=split(methods), steps=steps, settings=split(settings), runs_dir=runs_dir)


def write_index(out: Path) -> Path:
    """OUT/BENCHMARKS.md: the latest benchmark files found in OUT, CPU ones and GPU ones (never edited by hand)."""
    out = Path(out)
    lines = ["# Benchmarks", "", "Generated by `valuekit bench`; each section is the latest run of that benchmark",
             "(its own command line, machine and date are in the section). Do not edit numbers here by hand:",
             "re-run the command instead.", ""]
    for kind in KINDS:
        for suffix, title in (("", "CPU"), ("-gpu", "GPU")):
            md = out / f"{kind}{suffix}.md"
            if md.exists():
                body = md.read_text().splitlines()
                lines += [
                    f"## {kind} ({title})",
                    "",
                    *[f"#{line}" if line.startswith("#") else line for line in body[1:]],
                    "",
                ]
    if not any((out / f"{k}-gpu.md").exists() for k in KINDS):
        lines += ["## GPU", "", "No GPU results yet: `valuekit bench all --device cuda -o reports/` on a CUDA machine",
                  "writes them (this project's CI has no GPU).", ""]
    path = out / "BENCHMARKS.md"
    write_text_atomic("\n".join(lines) + "\n", path)
    return path


def registry() -> dict[str, TextSuite]:
    """Suite name -> TextSuite (imported lazily: the runners need torch)."""
    from valuekit.bench import llm_memory, suites_llm, suites_multidds

    return {s.name: s for s in (*suites_multidds.SUITES, *suites_llm.SUITES, *llm_memory.SUITES)}
