"""A real multi-way parallel corpus built offline from Django's translation catalogs.

Django (BSD licence) ships compiled gettext catalogs `django/conf/locale/<lang>/LC_MESSAGES/django.mo`
and one per contrib app (`django/contrib/*/locale/<lang>/LC_MESSAGES/django.mo`). Every catalog maps the
same English message ids to one language, so the union over languages is a multi-way parallel corpus:
one *group* per English string, one row per (group, language) translation. This is the data of DDS
Algorithm 2 / MultiDDS: translate X -> English, where a low-resource target language X (default
Asturian, `ast`, ~430 messages) can borrow from related (es, gl, pt, ca, it, fr) and unrelated (ru, ja,
de, fi) source languages.

Table columns: `id` (int), `group` (int id of the English string), `source` (language code),
`src_text` (the translation), `tgt_text` (English). Placeholders (`%(name)s`, `%s`, `%d`, `{name}`,
`%%`) are stripped and whitespace collapsed; plural entries contribute their singular form; message
contexts are dropped (the first translation of an English string in catalog order is kept); empty
translations and rows longer than `max_chars` on either side are dropped.

Splits: dev and test hold `dev_size` / `test_size` groups of the target language that are removed from
training for every language (so an English sentence is never seen in training through another
language); train holds all other rows of every language, the target's included.
"""

from __future__ import annotations

import gettext
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from valuekit.errors import InputError, refusal
from valuekit.runs.atomic import write_parquet_atomic

DEFAULT_TARGET = "ast"
DEFAULT_SOURCES = ("es", "gl", "pt", "ca", "it", "fr", "ru", "ja", "de", "fi")
# Known relatives among Django's catalogs (for reports and `--related` suggestions): Asturian is Romance,
# Breton Celtic (Brythonic; Welsh is its closest relative, Irish and Scottish Gaelic Goidelic), Bosnian
# South Slavic (Croatian and Serbian are standard variants of one language, Slovene its neighbour).
RELATED = {
    "ast": ("es", "gl", "pt", "ca", "it", "fr"),
    "br": ("cy", "ga", "gd"),
    "bs": ("hr", "sr_Latn", "sl"),
}
_PLACEHOLDER = re.compile(
    r"%\([^)]*\)[-#0 +]*\d*(?:\.\d+)?[sdifrxXeEgGc]"  # %(name)s, %(count)d
    r"|%[-#0 +]*\d*(?:\.\d+)?[sdifrxXeEgGc]"  # %s, %d, %.2f
    r"|%%"  # literal percent
    r"|\{[^{}]*\}"  # {name}, {0}, {}
)
_SPACE = re.compile(r"\s+")


def strip_placeholders(text: str) -> str:
    """Remove printf/format placeholders, collapse whitespace and trim."""
    return _SPACE.sub(" ", _PLACEHOLDER.sub(" ", text)).strip()


def django_locale_roots() -> list[Path]:
    """Every `locale` folder of the installed Django (core first, then contrib apps, sorted)."""
    try:
        import django
    except ImportError:
        raise InputError("data set 'multilingual' needs Django installed (pip install django); it reads its "
                         "translation catalogs") from None
    base = Path(django.__file__).parent
    roots = [base / "conf" / "locale"]
    roots += sorted(p for p in (base / "contrib").glob("*/locale") if p.is_dir())
    return roots


def available_languages() -> list[str]:
    langs = set()
    for root in django_locale_roots():
        langs.update(p.parent.parent.name for p in root.glob("*/LC_MESSAGES/django.mo"))
    return sorted(langs)


def read_catalog(lang: str) -> dict[str, str]:
    """English message -> translation for one language over all of Django's catalogs (raw text)."""
    out: dict[str, str] = {}
    for root in django_locale_roots():
        path = root / lang / "LC_MESSAGES" / "django.mo"
        if not path.exists():
            continue
        with open(path, "rb") as f:
            cat = gettext.GNUTranslations(f)._catalog
        for key, value in cat.items():
            if isinstance(key, tuple):  # plural entry (msgid, form index): keep the singular form
                msgid, form = key
                if form != 0:
                    continue
            else:
                msgid = key
            if not msgid:  # the header entry
                continue
            msgid = msgid.split("\x04", 1)[-1]  # drop a message context
            if msgid not in out and value:
                out[msgid] = value
    return out


def catalog_pairs(langs, *, max_chars: int) -> list[tuple[str, str, str]]:
    """(language, translated text, English text) of every catalog entry of `langs`, placeholders stripped,
    both sides non-empty and at most `max_chars` long; a language without a Django catalog is an InputError."""
    known = set(available_languages())
    missing = [lang for lang in langs if lang not in known]
    if missing:
        raise InputError(f"language {missing[0]!r} has no Django catalog here; available: {', '.join(sorted(known))}")
    rows = []
    for lang in langs:
        for msgid, text in read_catalog(lang).items():
            src, tgt = strip_placeholders(text), strip_placeholders(msgid)
            if src and tgt and len(src) <= max_chars and len(tgt) <= max_chars:
                rows.append((lang, src, tgt))
    return rows


def build_table(
    *,
    target: str = DEFAULT_TARGET,
    sources: tuple[str, ...] | list[str] = DEFAULT_SOURCES,
    max_chars: int = 120,
) -> pd.DataFrame:
    """The multi-way table (all languages, all groups) before splitting; see the module docstring."""
    langs = [target] + [s for s in sources if s != target]
    rows = catalog_pairs(langs, max_chars=max_chars)
    frame = pd.DataFrame(rows, columns=["source", "src_text", "tgt_text"])
    # one group per English string; a stripped English string reached from several msgids keeps one row per language
    frame = frame.drop_duplicates(["tgt_text", "source"], keep="first")
    english = sorted(frame["tgt_text"].unique())
    gid = {t: i for i, t in enumerate(english)}
    frame.insert(0, "group", frame["tgt_text"].map(gid).astype("int64"))
    order = {lang: i for i, lang in enumerate(langs)}
    frame = frame.sort_values(["group", "source"], key=lambda s: s.map(order) if s.name == "source" else s)
    frame.insert(0, "id", np.arange(len(frame), dtype=np.int64))
    return frame.reset_index(drop=True)


def language_sizes() -> dict[str, int]:
    """Language code -> number of messages in Django's catalogs (before filtering), largest first."""
    sizes = {lang: len(read_catalog(lang)) for lang in available_languages()}
    return dict(sorted(((k, v) for k, v in sizes.items() if v), key=lambda kv: (-kv[1], kv[0])))


def prepare_multilingual(
    out_dir,
    *,
    target: str = DEFAULT_TARGET,
    sources: tuple[str, ...] | list[str] = DEFAULT_SOURCES,
    related: tuple[str, ...] | list[str] = (),
    unrelated: tuple[str, ...] | list[str] = (),
    dev_size: int = 60,
    test_size: int = 60,
    max_chars: int = 120,
    seed: int = 0,
) -> dict[str, str]:
    """Write DIR/train.parquet (every language, held-out groups removed), DIR/dev.parquet and
    DIR/test.parquet (target language only, held-out groups). Returns the written paths.

    `related` / `unrelated` (when given) replace `sources` by their union and are recorded in the tables'
    metadata (`valuekit.dataset` JSON: related, unrelated), so reports can tell the groups apart."""
    if related or unrelated:
        both = set(related) & set(unrelated)
        if both:
            lang = sorted(both)[0]
            raise InputError(f"language {lang!r} is in both related and unrelated",
                             cli=f"language {lang!r} is in both --related and --unrelated")
        if target in set(related) | set(unrelated):
            said = "is also listed as a source; its own rows are always included"
            raise InputError(f"target={target!r} {said}", cli=f"--target {target} {said}")
        sources = tuple(related) + tuple(unrelated)
    if dev_size < 1 or test_size < 1:
        raise InputError(f"dev_size={dev_size} / test_size={test_size}: must be >= 1",
                         cli=f"--dev-size {dev_size} / --test-size {test_size}: must be >= 1")
    table = build_table(target=target, sources=sources, max_chars=max_chars)
    tgt_groups = np.sort(table.loc[table.source == target, "group"].unique())
    if len(tgt_groups) < dev_size + test_size + 10:
        raise refusal(
            f"--target {target}: only {len(tgt_groups)} messages; too few for dev {dev_size} + test {test_size}"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(tgt_groups)
    dev_g, test_g = set(perm[:dev_size].tolist()), set(perm[dev_size: dev_size + test_size].tolist())
    held = table.group.isin(dev_g | test_g)
    splits = {
        "train": table[~held],
        "dev": table[(table.source == target) & table.group.isin(dev_g)],
        "test": table[(table.source == target) & table.group.isin(test_g)],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"dataset": "multilingual", "target": target, "sources": [s for s in sources if s != target],
            "max_chars": max_chars, "seed": seed, "origin": "Django translation catalogs (BSD licence)"}
    if related or unrelated:
        import django

        info.update(related=list(related), unrelated=list(unrelated), django=django.__version__)
    written = {}
    for split, frame in splits.items():
        t = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        t = t.replace_schema_metadata({b"valuekit.dataset": json.dumps({**info, "split": split}).encode()})
        path = out / f"{split}.parquet"
        write_parquet_atomic(t, path)
        written[split] = str(path)
    return written


def chrf(hyps: list[str], refs: list[str], *, order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popovic 2015): character n-gram (n = 1..order, whitespace removed) matches summed over
    the corpus per order, precision and recall averaged over the orders, then F_beta (beta = 2); 0-100.
    (sacrebleu, not installed here, averages per-order F scores instead: close, not identical.)"""
    from collections import Counter

    if len(hyps) != len(refs):
        raise ValueError(f"chrf: {len(hyps)} hypotheses vs {len(refs)} references")
    match = np.zeros(order)
    hyp_n = np.zeros(order)
    ref_n = np.zeros(order)
    for h, r in zip(hyps, refs):
        h, r = "".join(h.split()), "".join(r.split())
        for n in range(1, order + 1):
            hc = Counter(h[i: i + n] for i in range(len(h) - n + 1))
            rc = Counter(r[i: i + n] for i in range(len(r) - n + 1))
            match[n - 1] += sum((hc & rc).values())
            hyp_n[n - 1] += sum(hc.values())
            ref_n[n - 1] += sum(rc.values())
    # orders with no reference n-grams at all do not count (sacrebleu's effective order)
    valid = ref_n > 0
    if not valid.any():
        return 0.0
    prec = np.where(hyp_n > 0, match / np.maximum(hyp_n, 1), 0.0)[valid].mean()
    rec = (match / np.maximum(ref_n, 1))[valid].mean()
    if prec + rec == 0:
        return 0.0
    b2 = beta * beta
    return float(100 * (1 + b2) * prec * rec / (b2 * prec + rec))
