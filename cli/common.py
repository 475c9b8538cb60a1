"""Options shared by several commands and their translation into library calls."""

from __future__ import annotations

import argparse

from valuekit.config import TrainConfig, available_methods
from valuekit.errors import InputError


def add_table_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("table columns")
    g.add_argument("--id-col", default="id", help="id column (default: id)")
    g.add_argument("--label-col", default="label", help="label column (default: label)")
    g.add_argument("--source-col", default="source",
                   help="source/language/domain column if present (default: source; task in instruction tables)")
    g.add_argument("--feature-cols", default=None,
                   help="comma-separated feature columns (default: every numeric column, or the one list column)")
    g.add_argument(
        "--image-shape", default=None, help="C,H,W of a flattened image column (default: from file metadata)"
    )
    g.add_argument("--image-size", default=None,
                   help="H,W: resize every image of an encoded image column (PNG/JPEG bytes or paths) to this size")
    g.add_argument("--stream", default="auto", choices=["auto", "yes", "no"],
                   help="encoded image columns: keep the images encoded (a Parquet file's in a temporary file in "
                        "$TMPDIR) and decode each batch's rows (yes), decode "
                        "everything up front (no), or stream when the decoded pixels would pass 1 GiB (auto); "
                        "instruction tables: their token ids in a temporary file (yes), in memory (no), or in a "
                        "file past 64 MiB of them (auto)")
    lm = p.add_argument_group("instruction tables (causal-LM fine-tuning; --model causal-lm, hf-config:DIR or hf:DIR)")
    lm.add_argument("--prompt-col", default="prompt", help="prompt column (default: prompt)")
    lm.add_argument(
        "--response-col", default="response", help="response column, the only scored text (default: response)"
    )
    lm.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="local Hugging Face tokenizer folder (default: the built-in byte-level tokenizer); on a "
                         "text classification table it turns --text-col into token ids for your text model")
    lm.add_argument("--text-col", default=None, metavar="NAME",
                    help="text classification tables: the string column --tokenizer tokenizes (default: text)")
    lm.add_argument("--max-len", type=int, default=256, help="tokens per example, prompt cut first (default: 256)")


def add_train_options(p: argparse.ArgumentParser, *, dev_required: bool = True) -> None:
    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--dev", required=dev_required, help="small trusted dev table (same columns as TABLE)")
    g.add_argument("--test", default=None, help="optional test table, evaluated during training")
    g.add_argument("--method", default=None if not dev_required else d.method,
                   help=f"valuation method: {', '.join(available_methods())} (default: {d.method})")
    g.add_argument("--model", default=d.model,
                   help="built-in: linear, mlp, cnn, resnet (small residual CNN with BatchNorm), seq2seq (translation "
                        "tables), causal-lm (instruction tables); a transformers causal LM: hf-config:DIR (random "
                        "weights from DIR/config.json) or hf:DIR (with weights); your own: package.module:factory, "
                        f"torchvision:NAME, timm:NAME (default: {d.model})")
    g.add_argument("--steps", type=int, default=None, help=f"training steps (default: {d.steps})")
    g.add_argument("--epochs", type=float, default=None, metavar="E",
                   help="train for E passes over TABLE instead of --steps: steps = ceil(E x rows / batch size), the "
                        "batch of all processes under --nproc")
    g.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="evaluate on --dev (and --test) every N steps and at the last (default: steps // 20, about "
                        "20 evaluations)")
    g.add_argument("--early-stopping", action="store_true",
                   help="keep the model of the evaluation with the best dev accuracy in RUN/best.pt (ties: lower "
                        "dev loss, then the earlier step) and its step and metrics in run.json")
    g.add_argument("--patience", type=int, default=d.patience, metavar="N",
                   help="with --early-stopping: stop after N evaluations without a better dev accuracy (default: "
                        "0, train all steps)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"model learning rate (default: {d.lr})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    g.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu or cuda (default: auto)")
    g.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp16"],
                   help="fp32, or bf16/fp16 autocast for each step (fp16 with a gradient scaler; uniform only) "
                        f"(default: {d.precision})")
    g.add_argument("--lora", type=int, default=d.lora, metavar="R",
                   help="causal LMs (hf:DIR, hf-config:DIR): train LoRA adapters of rank R on the frozen model; every "
                        "method's gradients are then the adapters' (needs peft: pip install 'valuekit[lora]'; default: "
                        "0, full fine-tuning)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="causal LMs: recompute each block's activations in the backward instead of keeping them "
                        "(less memory, one more forward per step; same values)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="method or loop setting, typed by its default (repeatable), e.g. --set scorer_lr=0.01")
    add_threads_option(g)


def add_threads_option(p) -> None:
    p.add_argument("--threads", default=None, metavar="N",
                   help="CPU threads for torch (default: $VALUEKIT_THREADS, else 1 for the small built-in models "
                        "linear/mlp/cnn, torch's default for larger ones; see valuekit.training.threads)")


def stream_option(args):
    """--stream yes / no / auto as the loaders' True / False / "auto"."""
    return {"yes": True, "no": False}.get(getattr(args, "stream", "auto"), "auto")


def table_kwargs(args) -> dict:
    shape = None
    if args.image_shape:
        try:
            shape = tuple(int(v) for v in args.image_shape.split(","))
        except ValueError:
            raise InputError(f"--image-shape {args.image_shape!r}: expected integers like 1,28,28") from None
        if not 1 <= len(shape) <= 4 or min(shape) < 1:
            raise InputError(f"--image-shape {args.image_shape}: expected 1 to 4 positive integers like 1,28,28")
    size = None
    if getattr(args, "image_size", None):
        try:
            size = tuple(int(v) for v in args.image_size.split(","))
        except ValueError:
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise InputError(f"--image-size {args.image_size!r}: expected two positive integers like 32,32")
    cols = [c for c in args.feature_cols.split(",") if c] if args.feature_cols else None
    return {"id_col": args.id_col, "label_col": args.label_col, "source_col": args.source_col,
            "feature_cols": cols, "image_shape": shape, "image_size": size,
            "stream": stream_option(args)}


TEXT_PAIR_COLUMNS = ("src_text", "tgt_text")


def _is_text_pairs(path) -> bool:
    """A translation table (`valuekit data prepare multilingual`): has src_text and tgt_text columns."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names if str(path).endswith((".parquet", ".pq")) else []
    except Exception:  # unreadable files get load_table's clear error below
        return False
    return all(c in names for c in TEXT_PAIR_COLUMNS)


def load_tables(args, table_path):
    from valuekit.data.tables import load_table

    if _is_instructions(args, table_path):
        return _load_instructions(args, table_path)
    text = getattr(args, "model", None) == "seq2seq" or _is_text_pairs(table_path)
    if text:
        return _load_text_pairs(args, table_path)
    kw = table_kwargs(args)
    if getattr(args, "tokenizer", None):  # a text classification table: token ids of the text column
        from valuekit.data.text import get_tokenizer

        if args.max_len < 1:
            raise InputError(f"--max-len {args.max_len}: must be >= 1")
        kw.update(tokenizer=get_tokenizer(args.tokenizer), text_col=args.text_col or "text", max_len=args.max_len)
    elif getattr(args, "text_col", None):
        raise InputError(f"--text-col {args.text_col}: needs --tokenizer DIR (the tokenizer that turns it into ids)")
    train = load_table(table_path, name="train", **kw)
    kw.pop("feature_cols"), kw.pop("image_shape")
    dev = load_table(args.dev, name="dev", like=train, **kw)
    test = load_table(args.test, name="test", like=train, **kw) if args.test else None
    for note in table_warnings(train, dev, batch_size=getattr(args, "batch_size", 0) or 0):
        warn(note)
    return train, dev, test


def warn(message: str) -> None:
    """One line on stderr for input that is accepted but probably not what the user meant (held with the other
    warnings until the input's checks pass: a refusal is one line)."""
    from valuekit.errors import say

    say(f"valuekit: warning: {message}")


def _is_int_text(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def table_warnings(train, dev, *, batch_size: int) -> list[str]:
    """Accepted but suspicious input: a batch larger than the table, a dev table that is the training
    table, a stray text label among integer labels."""
    notes = []
    if batch_size > len(train):
        notes.append(f"--batch-size {batch_size} is larger than the training table ({len(train)} rows); "
                     f"every step then sees rows repeated")
    if len(dev) == len(train) and dev.fingerprint() == train.fingerprint():
        notes.append(f"the dev table {dev.path or ''} holds the same rows as the training table; the methods "
                     f"then learn nothing a plain run would not (the dev table should be small and trusted)")
    ints = [c for c in train.classes if _is_int_text(c)]
    others = [c for c in train.classes if not _is_int_text(c)]
    if ints and others and len(others) <= max(1, len(train.classes) // 4):
        notes.append(f"{train.path or 'train'}: label {others[0]!r} is not an integer while the other labels "
                     f"are ({', '.join(ints[:5])}{', ...' if len(ints) > 5 else ''}); a stray value?")
    return notes


def train_config(args) -> tuple[TrainConfig, object]:
    """(TrainConfig, method Config) from the flags and --set pairs, typed and validated (trainers.options)."""
    from valuekit.training.options import resolve

    steps, epochs = getattr(args, "steps", None), getattr(args, "epochs", None)
    if steps is not None and epochs is not None:
        raise InputError(f"--steps {steps} --epochs {epochs}: give one of them")
    cfg = TrainConfig(method=args.method, model=args.model, steps=TrainConfig.steps if steps is None else steps,
                      epochs=epochs, eval_every=getattr(args, "eval_every", None),
                      early_stopping=getattr(args, "early_stopping", False), patience=getattr(args, "patience", 0),
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                      precision=getattr(args, "precision", TrainConfig.precision), lora=getattr(args, "lora", 0),
                      gradient_checkpointing=getattr(args, "gradient_checkpointing", False))
    cfg, method_cfg, _ = resolve(cfg, overrides=args.overrides)
    apply_cli_threads(args, model=cfg.model, device=cfg.device)
    return cfg, method_cfg


def apply_cli_threads(args, *, model: str | None = None, device: str | None = None) -> int:
    """Apply --threads / $VALUEKIT_THREADS / the measured default (valuekit.training.threads) before any torch work."""
    from valuekit.training.threads import apply_threads

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return apply_threads(getattr(args, "threads", None), model=model, device=device)


def _load_text_pairs(args, table_path):
    from valuekit.data.tables import load_text_pairs

    if getattr(args, "model", None) != "seq2seq" or getattr(args, "method", None) != "multidds":
        raise InputError(f"{table_path}: is a translation table (src_text, tgt_text); train it with "
                         f"--model seq2seq --method multidds")
    kw = {"id_col": args.id_col, "source_col": args.source_col}
    train = load_text_pairs(table_path, name="train", **kw)
    dev = load_text_pairs(args.dev, name="dev", **kw)
    test = load_text_pairs(args.test, name="test", **kw) if args.test else None
    return train, dev, test


def _columns(path) -> list[str]:
    """Column names of a .parquet/.csv/.jsonl file without reading it all ([] when unreadable)."""
    import json

    import pyarrow.parquet as pq

    p = str(path).lower()
    try:
        if p.endswith((".parquet", ".pq")):
            return pq.read_schema(path).names
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        if p.endswith(".jsonl"):
            return list(json.loads(first))
        if p.endswith(".csv"):
            import csv

            return next(csv.reader([first]))
    except Exception:  # unreadable files get the loader's clear error
        return []
    return []


def _is_instructions(args, table_path) -> bool:
    """An instruction table: a causal-LM --model, or prompt and response columns in the file."""
    from valuekit.models.lm import is_lm

    if is_lm(getattr(args, "model", "") or ""):
        return True
    names = _columns(table_path)
    return getattr(args, "prompt_col", "prompt") in names and getattr(args, "response_col", "response") in names


def _load_instructions(args, table_path):
    from valuekit.data.instructions import load_instructions
    from valuekit.data.text import get_tokenizer
    from valuekit.models.lm import is_lm

    if not is_lm(args.model):
        raise InputError(f"{table_path}: is an instruction table (prompt, response); train it with "
                         f"--model causal-lm, hf-config:DIR or hf:DIR")
    tok = get_tokenizer(args.tokenizer)
    source_col = args.source_col
    if source_col == "source" and "source" not in _columns(table_path):
        source_col = "task"  # instruction tables name their source column `task`
    kw = {"tokenizer": tok, "id_col": args.id_col, "prompt_col": args.prompt_col, "response_col": args.response_col,
          "source_col": source_col, "max_len": args.max_len,
          "stream": stream_option(args)}
    train = load_instructions(table_path, name="train", **kw)
    dev = load_instructions(args.dev, name="dev", **kw)
    test = load_instructions(args.test, name="test", **kw) if args.test else None
    return train, dev, test
