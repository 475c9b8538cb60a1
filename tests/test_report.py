"""HTML report (valuekit.reporting) and the pyarrow step-log aggregates behind it (valuekit.analysis.curves)."""

import importlib.util
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from valuekit.cli.main import main

from valuekit.analysis import curves
from valuekit.reporting import write_report
from valuekit.runs.layout import SOURCE_TABLE, SOURCE_TABLE_SCHEMA, SOURCES_SCHEMA, steps_schema
from valuekit.runs.reader import example_labels, read_run

DATA = Path(__file__).resolve().parents[1] / "data" / "digits-noisy20"
CHROMIUM = Path("/usr/bin/chromium")
HAS_BALANCE = importlib.util.find_spec("valuekit.analysis.balance") is not None
UNIFORM_FIGURES = {"fig-training-curves", "fig-weight-hist", "fig-weight-class", "fig-weight-noisy",
                   "fig-weight-traj", "fig-loss-quantiles", "fig-discovery"}
if HAS_BALANCE:
    UNIFORM_FIGURES |= {"fig-class-balance", "fig-class-balance-steps"}


class Page(HTMLParser):
    """Collects what the checks need: tags, attributes of img/a/script/link, section ids, table ids."""

    def __init__(self):
        super().__init__()
        self.imgs, self.urls, self.scripts, self.links, self.sections, self.tables = [], [], [], [], [], []
        self.stack = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("img", "meta", "br", "link", "input"):
            self.stack.append(tag)
        if tag == "img":
            self.imgs.append(a)
        if tag == "script":
            self.scripts.append(a)
        if tag == "link":
            self.links.append(a)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "table":
            self.tables.append(a.get("id"))
        for k in ("src", "href", "action", "data", "poster"):
            if k in a:
                self.urls.append(a[k])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()


def parse(path) -> Page:
    p = Page()
    p.feed(Path(path).read_text(encoding="utf-8"))
    p.close()
    assert p.stack == [], f"unclosed tags {p.stack}"
    return p


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory):
    """A real uniform run on the committed noisy digits, 60 steps (a few seconds on CPU)."""
    import torch

    from valuekit.config import TrainConfig
    from valuekit.data.tables import load_table
    from valuekit.training.loop import run_training

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "uniform"
    tr = load_table(DATA / "train.parquet")
    dev = load_table(DATA / "dev.parquet", like=tr, name="dev")
    test = load_table(DATA / "test.parquet", like=tr, name="test")
    cfg = TrainConfig(steps=60, eval_every=20, log_every=20, checkpoint_every=60, progress=False, device="cpu")
    run_training(tr, dev, test, out=out, config=cfg)
    return out


@pytest.fixture(scope="module")
def uniform_report(uniform_run, tmp_path_factory):
    return write_report([uniform_run], tmp_path_factory.mktemp("report") / "r.html", top_k=12)


def check_self_contained(page: Page, text: str):
    assert page.scripts == [] and page.links == []
    for url in page.urls:
        assert url.startswith(("data:image/png;base64,", "#")), url[:80]
    # base64 has no ':', so no URL can hide inside the inlined images either
    for needle in ("http://", "https://", "url(", "@import", "<script", "<iframe"):
        assert needle not in text, needle


def test_report_of_a_uniform_run(uniform_run, uniform_report):
    out = uniform_report
    text = out.read_text(encoding="utf-8")
    page = parse(out)
    check_self_contained(page, text)
    figs = {i["id"]: i for i in page.imgs if i.get("id")}
    assert UNIFORM_FIGURES <= set(figs), UNIFORM_FIGURES - set(figs)
    for f in figs.values():
        assert f["alt"] and f["src"].startswith("data:image/png;base64,") and len(f["src"]) > 2000
    assert "fig-rewards" not in figs  # uniform logs no reward; the section says so instead
    assert "no run logs a reward" in text
    assert page.sections == ["summary", "training", "weights", "balance", "rewards", "audit"]
    assert {"run-summary", "suspects", "audit-metrics"} <= set(page.tables)
    thumbs = [i for i in page.imgs if i.get("class") == "thumb"]
    assert len(thumbs) == 12 and all(t["src"].startswith("data:image/png;base64,") for t in thumbs)
    meta = read_run(uniform_run).meta
    assert f"{meta['final_metrics']['dev_acc']:.4g}" in text and "uniform" in text


def test_several_runs_side_by_side_and_cli(uniform_run, tmp_path, capsys):
    second = tmp_path / "uniform-copy"
    shutil.copytree(uniform_run, second)
    meta = json.loads((second / "run.json").read_text())
    meta["name"] = "second"
    (second / "run.json").write_text(json.dumps(meta))
    out = tmp_path / "two.html"
    assert main(["report", str(uniform_run), str(second), "-o", str(out), "--top-k", "5"]) == 0
    assert str(out) in capsys.readouterr().out
    page = parse(out)
    text = out.read_text()
    assert "<th>uniform</th>" in text and "<th>second</th>" in text
    assert "uniform ~ second" in text  # agreement between runs
    check_self_contained(page, text)
    assert main(["report", str(uniform_run), "-o", str(tmp_path / "r.pdf")]) == 2
    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err.count("valuekit: error:") == 2


def test_optional_sections_appear_with_their_data(uniform_run, tmp_path):
    run = tmp_path / "multi"
    shutil.copytree(uniform_run, run)
    (run / "sources").mkdir(exist_ok=True)
    src = pa.table({"step": pa.array([1, 1, 2, 2], pa.int64()), "source": ["en", "de", "en", "de"],
                    "prob": [0.5, 0.5, 0.7, 0.3], "count": pa.array([32, 32, 40, 24], pa.int64()),
                    "reward": [None, None, 0.4, -0.1], "reward_se": [None, None, 0.05, 0.02]},
                   schema=SOURCES_SCHEMA)
    pq.write_table(src, run / "sources" / "part-00000.parquet")
    table = pd.DataFrame({"source": ["en", "de"], "prob": [0.7, 0.3], "logit": [0.42, -0.42], "uniform_prob": 0.5,
                          "mean_reward": [0.4, -0.1], "reward_se": [0.05, 0.02], "updates": [1, 1],
                          "rows": [100, 80], "drawn": [72, 56], "is_target": [True, False]})
    pq.write_table(pa.Table.from_pandas(table, schema=SOURCE_TABLE_SCHEMA, preserve_index=False),
                   run / SOURCE_TABLE)
    pd.DataFrame({"fraction": [0.2, 0.5, 0.2, 0.5], "selection": ["value", "value", "random", "random"],
                  "seed": [0, 0, 0, 0], "test_acc": [0.8, 0.9, 0.6, 0.85]}).to_parquet(run / "subset_value.parquet")
    out = write_report(run, tmp_path / "m.html", top_k=3)
    page = parse(out)
    text = out.read_text()
    assert "usage" in page.sections and "subsets" in page.sections
    figs = {i.get("id") for i in page.imgs}
    if importlib.util.find_spec("valuekit.analysis.usage") is not None:
        assert "fig-source-probs" in figs
        assert [t for t in page.tables if t.startswith("sources-")] == [f"sources-{read_run(run).name}"]
        assert "0.4 ± 0.05" in text and "en (target)" in text
    for mod, fig in (("usage", "fig-source-usage"), ("subsets", "fig-subset-value")):
        assert importlib.util.find_spec(f"valuekit.analysis.{mod}") is not None  # shipped: the figure is required
        assert fig in figs, (fig, figs)
        assert f"valuekit.analysis.{mod} is not in this installation" not in text
        assert "not shown" not in text


def test_report_without_the_training_table(uniform_run, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(uniform_run, run)
    meta = json.loads((run / "run.json").read_text())
    meta["data"]["train"]["path"] = str(tmp_path / "gone.parquet")
    (run / "run.json").write_text(json.dumps(meta))
    out = write_report(run, tmp_path / "g.html")
    text = out.read_text()
    assert "audit not available" in text and "--data" in text
    figs = {i.get("id") for i in parse(out).imgs}
    assert {"fig-training-curves", "fig-weight-hist", "fig-weight-class"} <= figs  # labels from the step log
    # --data brings the audit back
    out = write_report(run, tmp_path / "d.html", data=DATA / "train.parquet")
    assert "fig-discovery" in {i.get("id") for i in parse(out).imgs}


def test_report_of_an_unfinished_run(uniform_run, tmp_path):
    run = tmp_path / "interrupted"
    shutil.copytree(uniform_run, run)
    (run / "values.parquet").unlink()
    meta = json.loads((run / "run.json").read_text())
    meta["status"] = "interrupted"  # a completed run without values.parquet is refused (values.parquet: missing)
    (run / "run.json").write_text(json.dumps(meta))
    out = write_report(run, tmp_path / "i.html")
    text = out.read_text()
    figs = {i.get("id") for i in parse(out).imgs}
    # an unfinished run is shown from its step log, and the report says so
    assert {"fig-training-curves", "fig-loss-quantiles", "fig-weight-hist"} <= figs
    assert "the run did not finish; its values here are aggregates of the step log" in text


# ---------------------------------------------------------------- aggregates on a synthetic log


def synthetic_run(tmp_path, steps=100, batch=8, n=30):
    rng = np.random.default_rng(0)
    d = tmp_path / "syn"
    (d / "steps").mkdir(parents=True)
    step = np.repeat(np.arange(1, steps + 1), batch)
    ids = rng.integers(0, n, len(step))
    frame = pd.DataFrame({"step": step, "example_id": ids, "label": (ids % 3).astype(np.int32), "source": None,
                          "weight": rng.random(len(step)).astype(np.float32),
                          "reward": rng.normal(size=len(step)).astype(np.float32),
                          "loss": rng.random(len(step)).astype(np.float32), "selected": None})
    schema = steps_schema("int64")
    half = len(frame) // 2
    for p, part in enumerate((frame[:half], frame[half:])):
        pq.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False),
                       d / "steps" / f"part-{p:05d}.parquet")
    (d / "run.json").write_text(json.dumps({"schema_version": 1, "steps_done": steps, "classes": ["a", "b", "c"]}))
    return d, frame


def test_step_quantiles_match_pandas(tmp_path):
    d, frame = synthetic_run(tmp_path)
    q = curves.step_quantiles(d, "reward", bins=10)
    assert list(q["step"]) == list(range(10, 101, 10))
    expected = frame.groupby((frame["step"] - 1) * 10 // 100)["reward"]
    np.testing.assert_allclose(q["mean"], expected.mean().to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(q["count"], expected.size().to_numpy())
    # t-digest is exact up to interpolation on 80 values per bin; compare to pandas' quantile loosely
    for col, qq in (("q10", 0.1), ("q50", 0.5), ("q90", 0.9)):
        np.testing.assert_allclose(q[col], expected.quantile(qq).to_numpy(), atol=0.25)
    assert curves.step_quantiles(d, "reward", bins=1000)["step"].tolist() == list(range(1, 101))


def test_step_quantiles_of_a_big_log_sample_only_the_digest(tmp_path, monkeypatch):
    d, frame = synthetic_run(tmp_path, steps=400, batch=16)
    exact = curves.step_quantiles(d, "loss", bins=4)
    monkeypatch.setattr(curves, "DIGEST_ROWS", 800)  # every 8th row feeds the t-digest
    sampled = curves.step_quantiles(d, "loss", bins=4)
    np.testing.assert_allclose(sampled["mean"], exact["mean"])  # means and counts still use every row
    np.testing.assert_array_equal(sampled["count"], [1600] * 4)
    np.testing.assert_allclose(sampled[["q10", "q50", "q90"]], exact[["q10", "q50", "q90"]], atol=0.08)


def test_trajectories_labels_and_visits(tmp_path):
    d, frame = synthetic_run(tmp_path)
    t = curves.trajectories(d, [3, 7], column="weight")
    exp = frame[frame["example_id"].isin([3, 7])].sort_values(["example_id", "step"], kind="stable")
    np.testing.assert_array_equal(t["step"], exp["step"])
    np.testing.assert_allclose(np.sort(t["value"]), np.sort(exp["weight"]))
    lab = example_labels(d).set_index("example_id")["label"]
    assert (lab == lab.index % 3).all()
    v = curves.visits(d).set_index("example_id")["count"].sort_index()
    np.testing.assert_array_equal(v, frame["example_id"].value_counts().sort_index())


def test_training_curves_bins_and_eval_rows(uniform_run):
    c = curves.training_curves(uniform_run, max_points=6)
    m = read_run(uniform_run).metrics()
    assert list(c.columns) == ["step", "train_loss", "train_acc", "dev_loss", "dev_acc", "test_loss", "test_acc"]
    train = c.dropna(subset=["train_loss"])
    assert len(train) == 6 and train["step"].tolist() == [10, 20, 30, 40, 50, 60]
    np.testing.assert_allclose(train["train_loss"].iloc[0], m["train_loss"][:10].mean())
    ev = c.dropna(subset=["dev_acc"])
    assert ev["step"].tolist() == [20, 40, 60]
    np.testing.assert_allclose(ev["dev_acc"], m.dropna(subset=["dev_acc"])["dev_acc"])


# ---------------------------------------------------------------- a real browser


# Added to a copy of a report (in tmp_path) before it is opened: the report itself has no script. Every image that
# does not decode, and any script or resource error, becomes a console error; the body's data-probe says it ran.
PROBE = """<script>
addEventListener("error", e => console.error("page error: " + (e.message || (e.target && e.target.id) || e.type)),
                 true);
addEventListener("load", () => {
  for (const img of document.images)
    if (!(img.complete && img.naturalWidth > 0)) console.error("image does not decode: " + (img.id || img.alt));
  document.body.dataset.probe = "loaded";
});
</script>
"""


def render(report: Path, tmp_path: Path) -> tuple[str, list[str], Path]:
    """Open `report` in headless Chromium once: (the DOM after load, the page's console messages, a screenshot)."""
    page = tmp_path / "page.html"
    html = report.read_text(encoding="utf-8")
    assert html.count("</body>") == 1
    page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    png = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--window-size=1280,2400",
           f"--screenshot={png}", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console, png


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (install Debian's chromium to run)")
def test_the_browser_check_sees_a_broken_image_and_an_error_box(tmp_path):
    """The checks below can fail: a page with an image that does not decode and an error box is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><div class="note error">weights: not shown (boom)</div>'
                   '<img id="fig-x" alt="x" src="data:image/png;base64,AAAA"></body></html>')
    dom, console, _ = render(bad, tmp_path)
    assert 'data-probe="loaded"' in dom and 'class="note error">weights: not shown' in dom
    assert console and all("fig-x" in line for line in console)  # the image's error event and the load check
    assert any("image does not decode: fig-x" in line for line in console)


def _train(table, dev, out, **kw):
    import valuekit

    return valuekit.train(str(table), dev=str(dev), out=out, device="cpu", progress=False, **kw).path


def _dds(root):
    """As in the README's tour, a uniform and a learned run side by side (on conftest's small noisy blobs: the
    digits' cross-validated audit would cost more than the rest of the test)."""
    from conftest import blobs

    blobs(120, seed=0, noise=0.2).to_parquet(root / "train.parquet", index=False)
    blobs(30, seed=1, id_start=1000).to_parquet(root / "dev.parquet", index=False)
    return [_train(root / "train.parquet", root / "dev.parquet", root / method, method=method, steps=20,
                   eval_every=10) for method in ("uniform", "dds")]


def _multidds(root):
    """A classification table whose rows come from three sources (test_multidds' tables)."""
    from test_multidds import make_tables

    tr, _, _ = make_tables(n=40)
    dev = tr[tr.source == "copy"].head(40).drop(columns="source").assign(id=np.arange(1000, 1040))
    tr.to_parquet(root / "train.parquet", index=False)
    dev.to_parquet(root / "dev.parquet", index=False)
    return [_train(root / "train.parquet", root / "dev.parquet", root / "multidds", method="multidds", steps=8,
                   batch_size=16, eval_every=4, hidden=16, update_every=4)]


def _translation(root):
    """Sentence pairs of the bundled multilingual table (ast, es, ja), --model seq2seq."""
    data = DATA.parent / "multilingual"
    tr = pd.read_parquet(data / "train.parquet")
    tr[tr.source.isin(["ast", "es", "ja"]) & (tr.src_text.str.len() < 20)].head(200).to_parquet(root / "train.parquet")
    assert main(["train", str(root / "train.parquet"), "--dev", str(data / "dev.parquet"), "--model", "seq2seq",
                 "--method", "multidds", "--steps", "4", "--batch-size", "8", "--device", "cpu", "--set", "hidden=16",
                 "--set", "eval_every=2", "--out", str(root / "mt")]) == 0
    return [root / "mt"]


def _instructions(root):
    """An instruction table with a junk task (test_llm's), the built-in causal LM, BADS with per-task weights."""
    from test_llm import _table

    train = _table()
    dev = train[train.task != "junk"].iloc[1::3].copy().assign(id=lambda d: np.arange(1000, 1000 + len(d)))
    train.to_parquet(root / "train.parquet")
    dev.drop(columns="is_noisy").to_parquet(root / "dev.parquet")
    assert main(["train", str(root / "train.parquet"), "--dev", str(root / "dev.parquet"), "--model", "causal-lm",
                 "--method", "bads", "--steps", "8", "--batch-size", "8", "--max-len", "32", "--device", "cpu",
                 "--set", "hidden=32", "--set", "eval_every=4", "--set", "burn_in=0", "--set", "per_source=true",
                 "--out", str(root / "lm")]) == 0
    return [root / "lm"]


def _images(root):
    """A folder of PNG files named by a path column (test_ownmodel's tables)."""
    from test_ownmodel import png_tables

    paths, _ = png_tables(root, "paths")
    return [_train(paths["train"], paths["dev"], root / "run-img", method="uniform", steps=6)]


KINDS = {"dds": _dds, "multidds": _multidds, "translation": _translation, "instructions": _instructions,
         "images": _images}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (install Debian's chromium to run)")
# dds and multidds take the report's classification paths that uniform's covers; each costs 20-30 s on the shared
# 2-core machine under load (two runs side by side, a cross-validated audit), hence slow.
@pytest.mark.parametrize("kind", ["uniform", pytest.param("dds", marks=pytest.mark.slow),
                                  pytest.param("multidds", marks=pytest.mark.slow), "translation", "instructions",
                                  "images"])
def test_report_of_every_run_kind_renders_in_headless_chromium(kind, request, tmp_path, capsys):
    """No error box (a section part that failed: class "note error"), no console error, every image decodes, and
    the screenshot (in tmp_path) is not blank."""
    import re

    import matplotlib.pyplot as plt

    if kind == "uniform":
        report = request.getfixturevalue("uniform_report")
    else:
        runs = KINDS[kind](tmp_path)
        report = write_report(runs, tmp_path / f"{kind}.html", top_k=5)
    capsys.readouterr()
    dom, console, png = render(report, tmp_path)
    assert 'data-probe="loaded"' in dom  # the page loaded and the probe ran
    assert console == [], console
    errors = re.findall(r'class="note error">(.*?)</div>', dom, flags=re.S)
    assert errors == [], errors
    sections = re.findall(r'<section id="([\w-]+)"', dom)
    assert sections[:2] == ["summary", "training"] and "audit" in sections
    assert len(re.findall(r"<tr>", re.findall(r'id="suspects".*?</table>', dom, flags=re.S)[0])) >= 6  # head + 5
    if kind in ("uniform", "images"):  # image rows: a thumbnail per suspect
        assert dom.count('class="thumb"') >= 5
    if kind == "instructions":
        assert 'id="fig-task-usage"' in dom and 'id="suspect-tasks"' in dom
    if kind in ("multidds", "translation"):
        assert 'id="fig-source-usage"' in dom
    if kind == "translation":  # sentence pairs and their languages in place of labels
        assert "<th>src_text</th>" in dom and "<th>source</th>" in dom and "vocabulary (tokens)" in dom
    img = plt.imread(png)
    assert img.shape[:2] == (2400, 1280)
    # not a blank page: the rendered figures and tables give many distinct colours
    assert img[..., :3].std() > 0.05 and len(np.unique(img[..., :3].reshape(-1, 3)[::97], axis=0)) > 50
