"""Issue 21: instruction tables, causal LMs and LM data selection (tiny, CPU).

Tests that need the optional `transformers` package skip without it (pytest reports them as skipped
with the reason "needs transformers").
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from valuekit.cli.main import main

from valuekit.data.instructions import (
    load_instructions,
    prepare_instructions,
    read_instructions,
    tokenize,
    write_instructions,
)
from valuekit.data.text import ByteTokenizer
from valuekit.data.token_rows import IGNORE, PAD_INPUT
from valuekit.errors import InputError
from valuekit.models.lm import CausalLM, build_lm
from valuekit.ops.losses import per_example_loss


def _has(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


needs_hf = pytest.mark.skipif(not _has("transformers"), reason="needs transformers (pip install 'valuekit[llm]')")
needs_django = pytest.mark.skipif(not _has("django"), reason="needs django (pip install 'valuekit[multilingual]')")


def _table(n_per_task=12, seed=0):
    """Two learnable tasks (copy a word, upper-case a word) and one junk task (random responses)."""
    rng = np.random.default_rng(seed)
    words = ["apple", "river", "stone", "cloud", "green", "light", "table", "house", "bread", "plant", "music", "chair"]
    rows = []
    for t in ("copy", "upper", "junk"):
        for i in range(n_per_task):
            w = words[i % len(words)]
            resp = {"copy": w, "upper": w.upper(), "junk": "".join(rng.choice(list("qxzjv"), 5))}[t]
            rows.append({"prompt": f"{t}: {w}\n", "response": resp, "task": t, "is_noisy": t == "junk"})
    df = pd.DataFrame(rows)
    df.insert(0, "id", np.arange(len(df), dtype=np.int64))
    return df


@pytest.fixture
def tables(tmp_path):
    train = _table()
    dev = train[train.task != "junk"].iloc[::3].copy()
    dev["id"] = np.arange(1000, 1000 + len(dev))
    train.to_parquet(tmp_path / "train.parquet")
    dev.drop(columns="is_noisy").to_parquet(tmp_path / "dev.parquet")
    return tmp_path / "train.parquet", tmp_path / "dev.parquet"


# ---------------------------------------------------------------- tokenisation and loss


def test_tokenize_scores_only_the_response():
    tok = ByteTokenizer()
    x, y, cut = tokenize(["ab:"], ["xyz"], tok, max_len=16)
    seq = [tok.bos_id] + tok.encode("ab:") + tok.encode("xyz") + [tok.eos_id]  # 1 + 3 + 3 + 1 = 8 tokens
    assert x.shape == y.shape == (1, 16) and not cut[0]
    assert x[0, :7].long().tolist() == seq[:-1] and (x[0, 7:] == PAD_INPUT).all()
    # targets: the prompt's next tokens are ignored, then exactly the response + EOS
    assert y[0].tolist() == [IGNORE] * 3 + tok.encode("xyz") + [tok.eos_id] + [IGNORE] * 9


def test_tokenize_cuts_the_prompt_first():
    tok = ByteTokenizer()
    x, y, cut = tokenize(["0123456789"], ["ab"], tok, max_len=6)  # 1 + 10 + 2 + 1 = 14 tokens > 7
    assert cut[0]
    scored = y[0][y[0] != IGNORE].tolist()
    assert scored == tok.encode("ab") + [tok.eos_id]  # the whole response survives
    assert x[0].long().tolist()[-3:] == tok.encode("9") + tok.encode("ab")  # the prompt's tail is kept


def test_sequence_loss_is_mean_response_nll():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)  # (N, V, L)
    y = torch.tensor([[IGNORE, 1, 2, IGNORE, IGNORE], [0, 6, IGNORE, IGNORE, 3], [IGNORE] * 4 + [4]])
    got = per_example_loss(logits, y)
    for i in range(3):
        pos = [t for t in range(5) if y[i, t] != IGNORE]
        ref = np.mean([-torch.log_softmax(logits[i, :, t], 0)[y[i, t]].item() for t in pos])
        assert got[i].item() == pytest.approx(ref, rel=1e-12)


def test_causal_lm_is_causal_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    model = build_lm("causal-lm", vocab=259, max_len=12, hidden=32, generator=g).eval()
    assert isinstance(model, CausalLM)
    x = torch.full((2, 12), float(PAD_INPUT))
    x[0, :8] = torch.arange(8) + 10
    x[1, :3] = torch.tensor([5.0, 6.0, 7.0])
    out = model(x)
    assert out.shape == (2, 259, 12)
    alone = model(x[1:2, :3])
    assert torch.allclose(out[1, :, :3], alone[0], atol=1e-5)  # padding and batch neighbours change nothing
    x2 = x.clone()
    x2[0, 6] = 99.0
    assert torch.allclose(model(x2)[0, :, :6], out[0, :, :6], atol=1e-6)  # a later token never changes earlier logits
    # same seed, same weights
    again = build_lm("causal-lm", vocab=259, max_len=12, hidden=32, generator=torch.Generator().manual_seed(0)).eval()
    assert torch.equal(again(x), out)


# ---------------------------------------------------------------- input tables


def test_instruction_formats_round_trip(tmp_path):
    df = _table(n_per_task=3)
    df.loc[0, "response"] = "a, \"quoted\"\nline"
    for suffix in ("parquet", "jsonl", "csv"):
        path = write_instructions(df, tmp_path / f"t.{suffix}")
        back, _ = read_instructions(path)
        assert back["response"].tolist() == df["response"].tolist()
        data = load_instructions(path)
        assert data.sources == ["copy", "junk", "upper"] and data.is_noisy.sum() == 3
        assert data.trainer_view().is_noisy is None


@needs_django
def test_prepare_instructions(tmp_path):
    paths = prepare_instructions(tmp_path, tasks=("es", "de"), junk_task="fr", noise=0.2, dev_size=30, test_size=30,
                                 max_per_task=100, seed=1)
    train, dev, test = (pd.read_parquet(paths[s]) for s in ("train", "dev", "test"))
    assert list(train.columns) == ["id", "prompt", "response", "task", "is_noisy"]
    assert train.task.value_counts().to_dict() == {"es": 100, "de": 100, "junk": 100}
    assert train[train.task == "junk"].is_noisy.all()
    real = train[train.task != "junk"]
    assert real.is_noisy.sum() == 40  # 20 % of the 200 real rows
    assert (train.response.str.strip().str.len() > 0).all()
    assert train.prompt[train.task == "es"].str.startswith("Translate from Spanish to English: ").all()
    assert len(dev) == len(test) == 30 and not dev.is_noisy.any() and set(dev.task) <= {"es", "de"}
    # held-out English strings never reach training through any language
    assert not set(dev.response) & set(train.response[~train.is_noisy])
    assert len(set(train.id) | set(dev.id) | set(test.id)) == len(train) + len(dev) + len(test)
    again = prepare_instructions(tmp_path / "again", tasks=("es", "de"), junk_task="fr", noise=0.2, dev_size=30,
                                 test_size=30, max_per_task=100, seed=1, fmt="jsonl")
    assert pd.read_json(again["train"], lines=True).equals(train)  # seeded, and the JSONL holds the same rows


def test_prepare_instructions_swap_gives_junk_rows_another_messages_english(tmp_path):
    from valuekit.data.instructions import build_instructions

    kw = dict(tasks=("es", "de"), junk_task="fr", noise=0.2, dev_size=30, test_size=30, max_per_task=100, seed=1)
    swap = pd.read_parquet(prepare_instructions(tmp_path / "swap", junk_kind="swap", **kw)["train"])
    rand = pd.read_parquet(prepare_instructions(tmp_path / "rand", **kw)["train"])
    assert swap.is_noisy.equals(rand.is_noisy) and swap[~swap.is_noisy].equals(rand[~rand.is_noisy])
    frame = build_instructions(tasks=("es", "de"), junk_task="fr")
    truth = dict(zip(frame.prompt, frame.response))
    junk = swap[swap.is_noisy]
    assert junk.response.isin(set(frame.response)).all()  # fluent English from the catalogs
    assert (junk.response != junk.prompt.map(truth)).all()  # ... that does not translate the prompt
    assert (rand[rand.is_noisy].response != junk.response).all()
    with pytest.raises(InputError, match=r"^junk_kind='shuffle': use random or swap$") as info:
        prepare_instructions(tmp_path / "bad", junk_kind="shuffle", **kw)
    assert info.value.cli == "--junk-kind 'shuffle': use random or swap"  # what the CLI prints


def test_prepare_instructions_cli(tmp_path, capsys):
    pytest.importorskip("django", reason="needs django")
    rc = main(["data", "prepare", "instructions", "-o", str(tmp_path), "--tasks", "es", "--junk-task", "none",
               "--dev-size", "20", "--test-size", "20", "--format", "csv"])
    assert rc == 0
    train = pd.read_csv(tmp_path / "train.csv")
    assert set(train.task) == {"es"} and not train.is_noisy.any()
    capsys.readouterr()
    rc = main(["data", "prepare", "instructions", "-o", str(tmp_path / "never"), "--junk-kind", "shuffle"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "--junk-kind 'shuffle'" in err and not (tmp_path / "never").exists()


# ---------------------------------------------------------------- training and export


LM_EXTRA = {
    "uniform": [],
    "bads": ["--set", "burn_in=0"],
    "dds": ["--set", "scorer_warmup=0", "--set", "update_every=1"],
    "multidds": ["--set", "update_every=2"],
}


@pytest.mark.parametrize("method", list(LM_EXTRA))
def test_train_causal_lm(tables, tmp_path, method):
    train, dev = tables
    out = tmp_path / f"run-{method}"
    rc = main(["train", str(train), "--dev", str(dev), "--model", "causal-lm", "--method", method, "--steps", "6",
               "--batch-size", "8", "--max-len", "32", "--device", "cpu", "--out", str(out),
               "--set", "hidden=32", "--set", "eval_every=3", *LM_EXTRA[method]])
    assert rc == 0
    vals = pd.read_parquet(out / "values.parquet")
    assert len(vals) == 36 and vals["value"].notna().any()
    if method in ("bads", "dds"):  # value = percentile rank of -last_loss (signals.in_run_value), by hand
        seen = vals.last_loss.notna().to_numpy()
        rank = (scipy.stats.rankdata(-vals.last_loss[seen]) - 1) / (seen.sum() - 1)
        np.testing.assert_allclose(vals.value[seen], rank, rtol=1e-12)
        assert vals.value[~seen].isna().all()
        assert {"bads": "posterior_mean", "dds": "scorer_logit"}[method] in vals  # the learned quantity, kept
    if method == "dds":  # the token-bag scorer learnt something from the rewards: the rows' logits differ
        assert vals.scorer_logit.std() > 0 and "label" not in vals
        st = pd.concat(pd.read_parquet(p) for p in sorted((out / "steps").glob("part-*.parquet")))
        assert st.reward.notna().all() and st.reward.abs().max() > 0
    if method == "multidds":  # per-task usage: one probability per task and step, summing to 1
        src = pd.concat(pd.read_parquet(p) for p in (out / "sources").glob("part-*.parquet"))
        assert set(src.source) == {"copy", "upper", "junk"}
        np.testing.assert_allclose(src.groupby("step").prob.sum(), 1.0, rtol=1e-6)
    steps = pd.concat(pd.read_parquet(p) for p in sorted((out / "steps").glob("part-*.parquet")))
    assert set(steps.source) <= {"copy", "upper", "junk"} and steps.label.isna().all()
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["model"] == "causal-lm" and meta["status"] == "completed"
    m = pd.concat(pd.read_parquet(p) for p in (out / "metrics").glob("part-*.parquet"))
    assert np.isfinite(m.dev_loss.dropna()).all() and m.dev_loss.dropna().iloc[0] < np.log(259) + 1


def _bad(tmp_path, capsys, argv):
    out = tmp_path / "never"
    capsys.readouterr()  # only what this command prints
    rc = main([*argv, "--device", "cpu", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and not out.exists()
    return err


def test_bad_instruction_input_exit_2(tables, tmp_path, capsys):
    train, dev = tables
    df = pd.read_parquet(train)
    df.drop(columns="response").to_parquet(tmp_path / "noresp.parquet")
    err = _bad(tmp_path, capsys, ["train", str(tmp_path / "noresp.parquet"), "--dev", str(dev), "--model", "causal-lm"])
    assert "missing column 'response'" in err
    empty = df.copy()
    empty.loc[4, "response"] = "   "
    empty.to_parquet(tmp_path / "empty.parquet")
    err = _bad(tmp_path, capsys, ["train", str(tmp_path / "empty.parquet"), "--dev", str(dev), "--model", "causal-lm"])
    assert "empty response at id 4" in err
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    err = _bad(tmp_path, capsys, ["train", str(train), "--dev", str(dev), "--model", "causal-lm",
                                  "--tokenizer", str(tmp_path / "tok")])
    assert "--tokenizer" in err
    for method in ("lrdi", "l2rw", "mwnet", "hostcp"):  # their teacher / selector needs class labels
        err = _bad(
            tmp_path, capsys, ["train", str(train), "--dev", str(dev), "--model", "causal-lm", "--method", method]
        )
        assert err == (f"valuekit: error: --method {method}: not available for causal-LM instruction tables; use "
                       f"uniform, bads, dds, multidds"), err
    err = _bad(tmp_path, capsys, ["train", str(train), "--dev", str(dev), "--model", f"hf-config:{tmp_path / 'nope'}"])
    # without the optional transformers package the model form is refused before its folder is read
    import importlib.util

    assert ("config.json" if importlib.util.find_spec("transformers") else "valuekit[llm]") in err


@needs_hf
def test_hf_config_model_trains_and_bad_models_exit_2(tables, tmp_path, capsys):
    from transformers import DistilBertConfig, GPT2Config

    train, dev = tables
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=259, n_positions=64).save_pretrained(tmp_path / "gpt")
    out = tmp_path / "run"
    rc = main(["train", str(train), "--dev", str(dev), "--model", f"hf-config:{tmp_path / 'gpt'}", "--method", "bads",
               "--steps", "4", "--batch-size", "8", "--max-len", "32", "--device", "cpu", "--out", str(out),
               "--set", "burn_in=0"])
    assert rc == 0 and len(pd.read_parquet(out / "values.parquet")) == 36
    DistilBertConfig(n_layers=1, dim=32, hidden_dim=64, n_heads=2).save_pretrained(tmp_path / "bert")
    err = _bad(tmp_path, capsys, ["train", str(train), "--dev", str(dev), "--model", f"hf-config:{tmp_path / 'bert'}"])
    assert "no causal-LM head" in err
    err = _bad(tmp_path, capsys, ["train", str(train), "--dev", str(dev), "--model", f"hf:{tmp_path / 'gpt'}",
                                  "--max-len", "32"])
    assert "no weights" in err
    err = _bad(tmp_path, capsys, ["train", str(train), "--dev", str(dev), "--model", f"hf-config:{tmp_path / 'gpt'}",
                                  "--max-len", "100"])
    assert "n_positions 64" in err
    from transformers import LlamaConfig, LlamaModel

    base = LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=259, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaModel(base).save_pretrained(tmp_path / "llama-base")  # weights without the output layer
    err = _bad(tmp_path, capsys, ["train", str(train), "--dev", str(dev), "--model", f"hf:{tmp_path / 'llama-base'}",
                                  "--max-len", "32"])
    assert "no causal-LM head" in err


@needs_hf
def test_hf_weights_and_tokenizer(tables, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3}
    for w in "copy upper junk : apple river stone cloud APPLE RIVER".split():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    from valuekit.data.text import get_tokenizer

    tok = get_tokenizer(str(tmp_path / "tok"))
    data = load_instructions(tables[0], tokenizer=tok, max_len=8)
    # row 0: "copy: apple\n" -> <s> copy : apple | apple </s>; scored targets = [apple, </s>]
    assert data.y[0][data.y[0] != IGNORE].tolist() == [vocab["apple"], vocab["</s>"]]
    assert data.num_classes == len(vocab)
    # hf:DIR loads the saved weights: same logits as the model that was saved
    g = torch.Generator().manual_seed(3)
    GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(vocab), n_positions=8).save_pretrained(tmp_path / "m")
    a = build_lm(f"hf-config:{tmp_path / 'm'}", vocab=len(vocab), max_len=8, generator=g).eval()
    a.inner.save_pretrained(tmp_path / "m")
    b = build_lm(f"hf:{tmp_path / 'm'}", vocab=len(vocab), max_len=8).eval()
    assert torch.allclose(a(data.x[:4]), b(data.x[:4]), atol=1e-6)


def test_bads_per_source_weights_follow_task_loss(tables, tmp_path):
    """per_source: one weight per task; with the model frozen (lr_theta tiny) the task with the higher loss
    must lose weight, and sources/ logs every task's w_t at every step."""
    from valuekit.config import TrainConfig
    from valuekit.data.instructions import load_instructions
    from valuekit.training.loop import make_trainer

    train, dev = tables
    tr, dv = load_instructions(train, max_len=32), load_instructions(dev, max_len=32)
    cfg = TrainConfig(method="bads", model="causal-lm", batch_size=36, hidden=32, device="cpu", progress=False)
    trainer, sampler, ctx = make_trainer(tr, dv, cfg, dict(per_source=True, temperature=0.0, lr_theta=1e-9,
                                                           burn_in=0, rho_w=0.0, lr_w=0.01))
    from valuekit.training.context import Batch

    idx = torch.arange(0, 36, 3)  # B = 12 of N = 36 rows, 4 of each task's 12
    batch = Batch(step=1, idx=idx, x=ctx.x[idx], y=ctx.y[idx], source=ctx.source[idx])
    u0 = trainer.task_u.clone()
    rec = trainer.step(batch)
    # exact expected move (T = 0, rho_w = 0):
    # u_t += lr_w B / (N n_t) * [(N/B) sum_{i in B, t} (-rho l_i) w(1-w) + T (1-2w)],  n_t = 12 (T = 0: no Jacobian
    # term)
    w0 = torch.sigmoid(u0.double())
    src = ctx.source[idx]
    for t, name in enumerate(ctx.sources):
        rows = src == t
        g = (36 / 12) * (-trainer.cfg.rho_theta * rec.loss[rows].double()).sum() * w0[t] * (1 - w0[t])
        assert trainer.task_u[t].item() == pytest.approx((u0[t].double() + 0.01 * 12 / (36 * 12) * g).item(), rel=1e-5)
        assert rec.sources[name] == (pytest.approx(torch.sigmoid(trainer.task_u[t].double()).item()), int(rows.sum()))
    vals = trainer.values()
    assert vals.value.shape == (36,)
    assert len(set(vals.value[ctx.source == 0].tolist())) == 1  # rows of one task share the task's weight


def test_score_exports_instruction_set_per_task(tables, tmp_path, capsys):
    train, dev = tables
    run = tmp_path / "run"
    assert main(["train", str(train), "--dev", str(dev), "--model", "causal-lm", "--method", "uniform", "--steps", "5",
                 "--batch-size", "12", "--max-len", "32", "--device", "cpu", "--out", str(run),
                 "--set", "hidden=32"]) == 0
    out = tmp_path / "scored.jsonl"
    assert main(["score", str(train), "--run", str(run), "-o", str(out), "--keep-fraction", "0.5", "--per-task"]) == 0
    got = pd.read_json(out, lines=True)
    src = pd.read_parquet(train)
    assert got[list(src.columns)].equals(src)  # every input column kept, rows in order
    vals = pd.read_parquet(run / "values.parquet").set_index("example_id")
    assert np.allclose(got.value, vals.loc[got.id, "value"])
    for _task, part in got.groupby("task"):
        assert part.selected.sum() == 6  # half of each task's 12 rows
        kept, dropped = part[part.selected].value, part[~part.selected].value
        assert kept.min() >= dropped.max()  # the top half by value within the task
    tasks = pd.read_csv(tmp_path / "scored.tasks.csv")
    assert sorted(tasks.task) == ["copy", "junk", "upper"] and (tasks.kept == 6).all()
    means = got.groupby("task").value.mean()
    assert np.allclose(tasks.set_index("task").mean_value.loc[means.index], means)
    assert (tasks.sort_values("mean_value", ascending=False)["rank"] == [1, 2, 3]).all()
    sub = tmp_path / "sub.parquet"
    assert (
        main(["score", str(train), "--run", str(run), "-o", str(sub), "--keep-fraction", "0.25", "--subset-only"]) == 0
    )
    kept = pd.read_parquet(sub)
    assert len(kept) == 9 and set(kept.id) == set(got.sort_values("value").id.iloc[-9:])


def test_score_per_task_half_by_dds_reward(tables, tmp_path, capsys):
    """--rank-by mean_reward --per-task: every task keeps its top half by DDS's mean reward (rows without one
    last); value stays DDS's value; an unknown column stops with exit 2, one line, nothing written."""
    train, dev = tables
    run = tmp_path / "run"
    assert main(["train", str(train), "--dev", str(dev), "--model", "causal-lm", "--method", "dds", "--steps", "2",
                 "--batch-size", "12", "--max-len", "32", "--device", "cpu", "--out", str(run), "--set", "hidden=32",
                 *LM_EXTRA["dds"]]) == 0
    vals = pd.read_parquet(run / "values.parquet").set_index("example_id")
    assert vals.mean_reward.notna().sum() == 24 and vals.mean_reward.nunique() == 24  # 2 reward batches of 12 rows
    out = tmp_path / "half.parquet"
    assert main(["score", str(train), "--run", str(run), "-o", str(out), "--keep-fraction", "0.5", "--per-task",
                 "--rank-by", "mean_reward"]) == 0
    got = pd.read_parquet(out)
    assert np.allclose(got.value, vals.loc[got.id, "value"], equal_nan=True)  # unseen rows: NaN value
    reward = vals.loc[got.id, "mean_reward"].to_numpy()
    for _task, part in got.groupby("task"):
        assert part.selected.sum() == 6
        kept, dropped = reward[part.index[part.selected]], reward[part.index[~part.selected]]
        assert not np.isnan(kept).any() or np.isnan(dropped).all()  # a row without a reward only after all with one
        assert np.nanmin(kept) >= np.nanmax(dropped, initial=-np.inf)
    missing = int(vals.mean_reward.isna().sum())
    assert missing == 12  # the rows never in a reward batch
    warn = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --rank-by")]
    assert (warn == [f"warning: --rank-by mean_reward: {missing} of {len(vals)} rows of the run have none (for "
                     "mean_reward: never in a reward batch); they rank last, in row order"]) if missing else not warn
    bad = tmp_path / "bad.parquet"
    assert main(["score", str(train), "--run", str(run), "-o", str(bad), "--keep-fraction", "0.5", "--per-task",
                 "--rank-by", "mean_rewrd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rank-by mean_rewrd" in err[0] and "mean_reward" in err[0] and not bad.exists()


def test_bads_preconditioned_theta_step_matches_psgld(tables):
    """precondition=True, T=0: theta moves by lr * G * g / N with G = 1 / (sqrt((1-decay) (g/N)^2) + eps)."""
    from valuekit.config import TrainConfig
    from valuekit.training.context import Batch

    train, dev = tables
    tr, dv = load_instructions(train, max_len=32), load_instructions(dev, max_len=32)
    cfg = TrainConfig(method="bads", model="causal-lm", batch_size=8, hidden=32, device="cpu", progress=False)
    mc = dict(precondition=True, temperature=0.0, lr_theta=1e-3, dev_batch_size=100, burn_in=0)
    from valuekit.training.loop import make_trainer

    trainer, sampler, ctx = make_trainer(tr, dv, cfg, mc)
    idx = torch.arange(8)
    batch = Batch(step=1, idx=idx, x=ctx.x[idx], y=ctx.y[idx], source=ctx.source[idx])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    g = trainer.drift(batch, ctx.dev_x, ctx.dev_y)[0]
    trainer.step(batch)
    n, c = trainer.n, trainer.cfg
    moved = 0
    for p0, p1, gi in zip(before, trainer.model.parameters(), g):
        G = 1 / ((1 - c.rms_decay) ** 0.5 * (gi / n).abs() + c.rms_eps)
        assert torch.allclose(p1.detach() - p0, c.lr_theta * G * gi / n, atol=1e-7, rtol=1e-4)
        moved += int((p1.detach() != p0).any())
    assert moved > 0


def test_length_buckets_cut_padding_and_cover_every_row():
    from valuekit.training.samplers import LengthBucketSampler

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (1000,), generator=g)
    s = LengthBucketSampler(lengths, torch.Generator().manual_seed(1), window=20)
    seen, pad_b, pad_r = [], [], []
    for _ in range(1000 // 10):
        idx = s.next(10)
        seen.append(idx)
        pad_b.append(1 - lengths[idx].sum().item() / (10 * lengths[idx].max().item()))
        r = torch.randperm(1000, generator=g)[:10]
        pad_r.append(1 - lengths[r].sum().item() / (10 * lengths[r].max().item()))
    assert sorted(torch.cat(seen).tolist()) == list(range(1000))  # one pass = every row once
    assert np.mean(pad_b) < 0.1 < 0.3 < np.mean(pad_r)  # padding share: bucketed vs random batches
    s.next(35)  # mid-pass, not on a batch boundary
    state, gstate = s.state_dict(), s.g.get_state()  # the loop checkpoints the sampler and the run's generator
    a = torch.cat([s.next(10) for _ in range(150)])  # crosses into the next pass
    g2 = torch.Generator()
    g2.set_state(gstate)
    s2 = LengthBucketSampler(lengths, g2, window=20)
    s2.load_state_dict(state)
    assert torch.equal(torch.cat([s2.next(10) for _ in range(150)]), a)


def test_sequence_margin_is_mean_scored_token_margin():
    from valuekit.training.signals import margins

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)  # (N, V, L)
    y = torch.tensor([[IGNORE, 3, 0, IGNORE], [1, IGNORE, IGNORE, IGNORE]])
    got = margins(logits, y)
    for i in range(2):
        ref = []
        for t in range(4):
            if y[i, t] != IGNORE:
                col = logits[i, :, t]
                ref.append((col[y[i, t]] - torch.cat([col[: y[i, t]], col[y[i, t] + 1:]]).max()).item())
        assert got[i].item() == pytest.approx(np.mean(ref))


def test_lm_dev_batches_are_length_windows_and_draw_every_row_equally(tables):
    """Causal-LM dev batches: consecutive rows of the length-sorted dev set (short rows together) from a uniform
    start; each row lies in exactly `size` of the M windows (probability size / M: M / size x the batch sum is
    unbiased)."""
    from valuekit.config import TrainConfig
    from valuekit.models.lm import token_lengths
    from valuekit.training.loop import build_context

    tr, dv = load_instructions(tables[0], max_len=32), load_instructions(tables[1], max_len=32, name="dev")
    ctx = build_context(tr, dv, TrainConfig(model="causal-lm", device="cpu"), torch.device("cpu"))
    lengths = token_lengths(ctx.dev_x)
    m, size = len(ctx.dev_y), 3
    assert torch.equal(lengths[ctx.dev_order], lengths.sort(stable=True).values)
    window = lambda start: ctx.dev_order[(start + torch.arange(size)) % m]  # noqa: E731
    starts = []
    for _ in range(20):
        twin = torch.Generator()
        twin.set_state(ctx.generator.get_state())
        start = int(torch.randint(m, (1,), generator=twin))
        x, y = ctx.sample_dev(size)
        assert torch.equal(x, ctx.dev_x[window(start)]) and torch.equal(y, ctx.dev_y[window(start)])
        starts.append(start)
    assert len(set(starts)) > 5
    counts = torch.bincount(torch.cat([window(s) for s in range(m)]), minlength=m)
    assert torch.equal(counts, torch.full((m,), size))
    assert int(token_lengths(ctx.dev_x[window(0)]).max()) == int(lengths.sort().values[size - 1])
    plain = build_context(tr, dv, TrainConfig(model="mlp", device="cpu"), torch.device("cpu"))
    assert plain.dev_order is None  # other tables: a uniform random subset as before


def test_per_example_dots_of_a_causal_lm_match_a_per_example_loop(tables):
    """DDS's rewards on instruction rows: forward-mode dots through attention (math kernel) equal the explicit
    per-example loop, with the mean response-token NLL as each row's loss."""
    from valuekit.ops.gradients import per_example_dots, per_example_dots_loop

    data = load_instructions(tables[0], max_len=32)
    model = build_lm("causal-lm", vocab=259, max_len=32, hidden=32, generator=torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    x, y = data.x[:6], data.y[:6]
    loop = per_example_dots_loop(model, x, y, v, loss_fn=per_example_loss)
    assert loop.abs().max() > 1e-3
    torch.testing.assert_close(per_example_dots(model, x, y, v), loop, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- LoRA adapters

needs_peft = pytest.mark.skipif(not (_has("transformers") and _has("peft")), reason="needs transformers and peft")


def _gpt(tmp_path, vocab=259, positions=64):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=positions).save_pretrained(
        tmp_path / "gpt"
    )
    return f"hf-config:{tmp_path / 'gpt'}"


@needs_peft
def test_lora_adapters_start_at_the_base_model_and_are_the_only_trainable_weights(tables, tmp_path):
    from valuekit.ops.gradients import per_example_dots, per_example_dots_loop, trainable_names

    name = _gpt(tmp_path)
    data = load_instructions(tables[0], max_len=32)
    base = build_lm(name, vocab=259, max_len=32, generator=torch.Generator().manual_seed(0)).double().eval()
    lora = build_lm(name, vocab=259, max_len=32, generator=torch.Generator().manual_seed(0), lora=4).double().eval()
    torch.testing.assert_close(lora(data.x[:4]), base(data.x[:4]))  # B = 0: the adapters add nothing yet
    names = trainable_names(lora)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    again = build_lm(name, vocab=259, max_len=32, generator=torch.Generator().manual_seed(0), lora=4)
    a = [p for n, p in again.named_parameters() if "lora_A" in n][0]
    assert torch.equal(a.double(), [p for n, p in lora.named_parameters() if "lora_A" in n][0])  # drawn from the seed
    # the per-example rewards are dot products of the adapters' gradients, exact against a per-example loop
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in lora.named_parameters() if p.requires_grad}
    loop = per_example_dots_loop(lora, data.x[:5], data.y[:5], v, loss_fn=per_example_loss)
    assert loop.abs().max() > 1e-6
    torch.testing.assert_close(per_example_dots(lora, data.x[:5], data.y[:5], v), loop, rtol=1e-9, atol=1e-12)


@needs_peft
@pytest.mark.parametrize("method,settings", [("dds", dict(scorer_warmup=0, update_every=1)),
                                             ("bads", dict(burn_in=0)), ("multidds", dict(update_every=2))])
def test_lora_steps_move_only_the_adapters(tables, tmp_path, method, settings):
    from valuekit.config import TrainConfig
    from valuekit.training.context import Batch
    from valuekit.training.loop import make_trainer

    train, dev = tables
    tr, dv = load_instructions(train, max_len=32), load_instructions(dev, max_len=32)
    cfg = TrainConfig(method=method, model=_gpt(tmp_path), batch_size=8, device="cpu", progress=False, lora=4)
    trainer, sampler, ctx = make_trainer(tr, dv, cfg, settings)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for step in range(1, 4):
        idx = sampler.next(8)
        trainer.step(Batch(step=step, idx=idx, x=ctx.x[idx], y=ctx.y[idx], source=ctx.source[idx]))
    after = trainer.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("lora_B" in k for k in moved) and all("lora_" in k for k in moved)  # the base weights never change


@needs_peft
def test_lora_from_the_command_line(tables, tmp_path):
    train, dev = tables
    out = tmp_path / "run"
    rc = main(["train", str(train), "--dev", str(dev), "--model", _gpt(tmp_path), "--method", "dds", "--steps", "4",
               "--batch-size", "8", "--max-len", "32", "--device", "cpu", "--out", str(out), "--lora", "4",
               *LM_EXTRA["dds"]])
    assert rc == 0 and len(pd.read_parquet(out / "values.parquet")) == 36
    assert json.loads((out / "run.json").read_text())["config"]["lora"] == 4


@needs_peft
def test_lora_on_the_builtin_lm_or_a_classifier_exits_2(tables, tmp_path, capsys):
    train, dev = tables
    err = _bad(tmp_path, capsys, ["train", str(train), "--dev", str(dev), "--model", "causal-lm", "--lora", "4"])
    assert "--lora 4" in err and "hf-config" in err


@pytest.mark.parametrize("method", ["uniform", "bads", "dds", "multidds"])
@pytest.mark.parametrize("model", ["causal-lm", "hf-config", "hf-config-lora"])
def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_values(tables, tmp_path, monkeypatch, method, model):
    from valuekit.config import TrainConfig
    from valuekit.training.loop import run_training

    lora = 4 if model.endswith("-lora") else 0
    if model.startswith("hf-config"):
        if not _has("transformers") or (lora and not _has("peft")):
            pytest.skip("needs transformers (and peft for LoRA)")
        from transformers import GPT2Config

        # a part of the block: transformers checkpoints GPT2Block.forward itself, so that is not patched
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention as block

        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=259, n_positions=48, resid_pdrop=0, embd_pdrop=0,
                   attn_pdrop=0).save_pretrained(tmp_path / "gpt")
        model = f"hf-config:{tmp_path / 'gpt'}"
    else:
        from valuekit.models.lm import Block as block
    calls = []
    forward = block.forward
    monkeypatch.setattr(block, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    tr, dv = (load_instructions(p, max_len=48, name=n) for p, n in zip(tables, ("train", "dev")))
    values, counts = {}, {}
    for on in (False, True):
        cfg = TrainConfig(method=method, model=model, steps=4, batch_size=8, seed=0, device="cpu", progress=False,
                          eval_every=4, checkpoint_every=4, hidden=32, gradient_checkpointing=on, lora=lora)
        calls.clear()
        values[on] = run_training(tr, dv, out=tmp_path / f"run-{on}", config=cfg).values()
        counts[on] = len(calls)
    pd.testing.assert_frame_equal(values[False], values[True], rtol=1e-5, atol=1e-7)
    assert counts[True] > counts[False]  # blocks ran again in the backward of the training steps


def test_gradient_checkpointing_is_for_causal_lms(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("train", "dev"):
        pd.DataFrame({"id": np.arange(20), "f0": rng.normal(size=20), "f1": rng.normal(size=20),
                      "label": np.arange(20) % 2}).to_parquet(tmp_path / f"{name}.parquet")
    rc = main(["train", str(tmp_path / "train.parquet"), "--dev", str(tmp_path / "dev.parquet"), "--model", "mlp",
               "--steps", "2", "--gradient-checkpointing", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert rc == 2 and "--gradient-checkpointing: for causal LMs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@needs_hf
def test_gradient_checkpointing_with_lora_gives_the_adapters_the_same_gradients(tmp_path):
    pytest.importorskip("peft")
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=259, n_positions=32, resid_pdrop=0, embd_pdrop=0,
               attn_pdrop=0).save_pretrained(tmp_path)
    x, y, _ = tokenize(["abc", "hello there"], ["xy", "zzz"], ByteTokenizer(), 32)
    grads = {}
    for on in (False, True):
        model = build_lm(f"hf-config:{tmp_path}", vocab=259, max_len=32, generator=torch.Generator().manual_seed(0),
                         lora=4, checkpointing=on).train()
        per_example_loss(model(x), y).sum().backward()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and any("lora_B" in n for n in grads[True])
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for n, g in grads[True].items() if "lora_B" in n)


def test_stream_yes_on_an_instruction_table_gives_the_in_memory_run(tables, tmp_path, monkeypatch):
    import valuekit.data.instructions as instructions

    train, dev = tables
    vals, asked = {}, []
    load = instructions.load_instructions
    monkeypatch.setattr(
        instructions, "load_instructions", lambda *a, **kw: asked.append(kw["stream"]) or load(*a, **kw)
    )
    for stream in ("yes", "no"):
        out = tmp_path / f"run-{stream}"
        assert main(["train", str(train), "--dev", str(dev), "--model", "causal-lm", "--method", "bads", "--steps", "5",
                     "--batch-size", "8", "--max-len", "32", "--device", "cpu", "--out", str(out), "--stream", stream,
                     "--gradient-checkpointing", "--set", "hidden=32", "--set", "burn_in=0"]) == 0
        vals[stream] = pd.read_parquet(out / "values.parquet")
        meta = json.loads((out / "run.json").read_text())
        assert meta["config"]["gradient_checkpointing"] is True
    pd.testing.assert_frame_equal(vals["yes"], vals["no"])
    assert len(vals["yes"]) == 36 and vals["yes"]["value"].notna().all()
    assert asked == [True, True, False, False]  # train and dev tables, each run


def test_instruction_tables_and_causal_lm_runs_fix_the_mmap_threshold(tables, tmp_path, monkeypatch):
    """Causal-LM rows ask valuekit.data.memory for a fixed glibc mmap threshold (flat peak memory in the number of rows,
    reports/llm-memory.md) when they are loaded and trained; a classifier's table and run do not."""
    from valuekit.config import TrainConfig
    from valuekit.data import memory
    from valuekit.data import tables as datasets
    from valuekit.training import loop as base
    from valuekit.training.loop import run_training

    asked = []
    record = lambda *, causal_lm=False: asked.append(causal_lm) or False  # noqa: E731
    monkeypatch.setattr(memory, "fix_mmap_threshold", record)
    monkeypatch.setattr(base, "fix_mmap_threshold", record)
    monkeypatch.setattr(datasets, "fix_mmap_threshold", record)
    tr, dv = load_instructions(tables[0], max_len=32), load_instructions(tables[1], max_len=32, name="dev")
    assert asked == [True, True]
    run_training(tr, dv, out=tmp_path / "lm", config=TrainConfig(model="causal-lm", steps=1, batch_size=4, device="cpu",
                                                          progress=False))
    assert asked == [True, True, True]
    from pathlib import Path

    from valuekit.data.tables import load_table

    digits = Path(__file__).resolve().parents[1] / "data" / "digits-noisy20"
    run_training(load_table(digits / "train.parquet"), load_table(digits / "dev.parquet"), out=tmp_path / "mlp",
          config=TrainConfig(model="mlp", steps=1, batch_size=4, device="cpu", progress=False))
    assert asked == [True, True, True, False, False, False]
