"""Per-example in-run signals, accumulated once for every method by the training loop.

For every training row the loop feeds, after each step, what the method reported for that row
(`StepRecord`): its loss, its margin, its weight and its reward. `SignalAccumulator` keeps running
sums, so memory is O(rows) whatever the number of steps, and `columns()` turns them into the
named columns of values.parquet:

* ``mean_loss``   — mean training loss over the steps the row was seen (the "small-loss" signal);
* ``aum``         — area under the margin (Pleiss et al., "Identifying Mislabeled Data using the
  Area Under the Margin Ranking", NeurIPS 2020, eq. 1-2): the mean over those steps of the
  assigned-label logit minus the largest other logit, taken from the step's own forward pass;
* ``mean_weight`` — mean weight the method gave the row (NaN for methods that never weight);
* ``mean_reward`` — mean reward over the steps that computed one (DDS's gradient alignment with the
  dev gradient, L2RW's negated meta-gradient; NaN otherwise);
* ``times_seen``  — how many steps saw the row;
* ``last_loss``   — the training loss at the row's most recent step (late in a run it tells rows the model
  has learnt from rows it has not; early losses, which every row shares, weigh nothing in it).

Rows never seen get NaN (times_seen 0). The sums are float64 and part of the checkpoint, so a
resumed run gives the same columns as an uninterrupted one. Under torchrun every rank adds the whole
global batch (all-gathered), so all replicas hold the same sums.

The helpers at the bottom (`class_percentile`, `rank_average`) turn signals into percentile ranks, over
the whole table or within each class; `in_run_value` ranks over the whole table (selection per class is
the job of the export's per-class quotas, not of the value).
"""

from __future__ import annotations

import numpy as np
import torch

COLUMNS = ("mean_loss", "aum", "mean_weight", "mean_reward", "times_seen", "last_loss")
_SUMS = ("count", "loss", "margin", "margin_n", "weight", "weight_n", "reward", "reward_n", "last_loss")


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Assigned-label logit minus the largest other logit, per row (Pleiss et al. 2020, eq. 1); detached."""
    logits = logits.detach()
    if logits.dim() > 2:  # sequence targets (N, V, L) / (N, L): mean token margin over targets != -100
        scored = y != -100
        yy = y.clamp_min(0)[:, None]
        tok = logits.gather(1, yy).squeeze(1) - logits.scatter(1, yy, float("-inf")).max(1).values
        return (tok * scored).sum(1) / scored.sum(1).clamp_min(1)
    assigned = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    return assigned - other


class SignalAccumulator:
    """Running per-row sums of loss, margin, weight and reward (see the module docstring)."""

    def __init__(self, n: int, *, device: torch.device | str = "cpu", gather=None):
        self.n = n
        self.gather = gather or (lambda t: t)  # torchrun: all-gather a per-example tensor over ranks
        self.sums = {k: torch.zeros(n, dtype=torch.float64, device=device) for k in _SUMS}

    def _add(self, key: str, idx: torch.Tensor, v: torch.Tensor | None) -> None:
        if v is None:
            return
        v = self.gather(v.detach().reshape(-1).to(torch.float64))
        self.sums[key].index_add_(0, idx, v)
        if key != "loss":
            self.sums[key + "_n"].index_add_(0, idx, torch.ones_like(v))

    def update(self, idx: torch.Tensor, *, loss: torch.Tensor, margin: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, reward: torch.Tensor | None = None) -> None:
        """Add one step's per-example signals for rows `idx` (this rank's rows; gathered when distributed)."""
        idx = self.gather(idx.reshape(-1)).to(self.sums["count"].device)
        self.sums["count"].index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64, device=idx.device))
        if loss.dim() > 1:  # token-level losses: one number per example
            loss = loss.reshape(len(loss), -1).mean(1)
        self._add("loss", idx, loss)
        self.sums["last_loss"].index_copy_(0, idx, self.gather(loss.detach().reshape(-1).to(torch.float64)))
        self._add("margin", idx, margin)
        self._add("weight", idx, weight)
        self._add("reward", idx, reward)

    def record(self, batch, rec) -> None:
        """The loop's one call per step: feed a `StepRecord` for `batch`."""
        self.update(batch.idx, loss=rec.loss, margin=getattr(rec, "margin", None), weight=rec.weight,
                    reward=rec.reward)

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.sums.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.sums.items():
            if k in state:
                v.copy_(state[k])

    def columns(self) -> dict[str, np.ndarray]:
        """The values.parquet columns of `COLUMNS` (float64 numpy; NaN where the signal was never seen)."""
        s = {k: v.detach().cpu().numpy() for k, v in self.sums.items()}

        def mean(total, count):
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(count > 0, total / np.maximum(count, 1), np.nan)

        return {"mean_loss": mean(s["loss"], s["count"]), "aum": mean(s["margin"], s["margin_n"]),
                "mean_weight": mean(s["weight"], s["weight_n"]), "mean_reward": mean(s["reward"], s["reward_n"]),
                "times_seen": s["count"].copy(), "last_loss": np.where(s["count"] > 0, s["last_loss"], np.nan)}


# ---------------------------------------------------------------- class-aware combinations (numpy)


def class_percentile(v, labels) -> np.ndarray:
    """Percentile rank of `v` within each class, in [0, 1] ((rank - 1) / (n_c - 1), ties averaged);
    NaN stays NaN, a class with one valued row gets 0.5."""
    v = np.asarray(v, dtype=np.float64)
    labels = np.asarray(labels)
    out = np.full(len(v), np.nan)
    for c in np.unique(labels):
        rows = np.flatnonzero((labels == c) & np.isfinite(v))
        if len(rows) == 1:
            out[rows] = 0.5
        elif len(rows) > 1:
            order = v[rows].argsort(kind="stable")
            ranks = np.empty(len(rows))
            ranks[order] = np.arange(len(rows), dtype=np.float64)
            # average tied ranks
            vals = v[rows]
            _, inv = np.unique(vals, return_inverse=True)
            sums = np.bincount(inv, weights=ranks)
            counts = np.bincount(inv)
            out[rows] = (sums / counts)[inv] / (len(rows) - 1)
    return out


def class_standardise(v, labels) -> np.ndarray:
    """(v - class mean) / class std, per class (NaN-aware; std 0 gives 0)."""
    v = np.asarray(v, dtype=np.float64)
    labels = np.asarray(labels)
    out = np.full(len(v), np.nan)
    for c in np.unique(labels):
        rows = labels == c
        vals = v[rows]
        fin = np.isfinite(vals)
        if not fin.any():
            continue
        mu, sd = vals[fin].mean(), vals[fin].std()
        out[rows] = (vals - mu) / sd if sd > 0 else np.where(fin, 0.0, np.nan)
    return out


def rank_average(columns, labels) -> np.ndarray:
    """Mean of the within-class percentile ranks of several signals (each oriented higher = more
    valuable); a row's NaN signals are left out of its mean, NaN when all are NaN."""
    ranks = np.stack([class_percentile(c, labels) for c in columns])
    with np.errstate(invalid="ignore"):
        fin = np.isfinite(ranks)
        total = np.where(fin, ranks, 0.0).sum(0)
        count = fin.sum(0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


VALUE_DOC = ("the in-run value: the percentile rank of the run's -mean_loss over the whole table (in [0, 1], "
             "higher = more valuable; chosen by measurement over aum, global and within-class rank averages and the "
             "learned quantity, on some data sets and confirmed on held-out ones, reports/value-choice.md); it is "
             "not the method's learned quantity")
VALUE_DOC_LM = ("the in-run value: the percentile rank of -last_loss, the response loss at the row's latest step "
                "(in [0, 1], higher = more valuable; reports/llm.md); it is not the method's learned quantity")


def _in_run_kind(ctx) -> str:
    """Which value `in_run_value` gives this run: "classes" (class labels), "lm" (causal-LM token rows) or
    "learned" (no in-run signals, or other sequence labels: the method's learned quantity)."""
    from valuekit.models.lm import is_lm

    if ctx.signals is None or (ctx.y.dim() != 1 and not is_lm(ctx.config.model)):
        return "learned"
    return "classes" if ctx.y.dim() == 1 else "lm"


def in_run_value_doc(ctx, learned: str) -> str:
    """What `in_run_value(ctx, ...)` computes for this run, in one sentence (`learned`: the fallback's meaning)."""
    kind = _in_run_kind(ctx)
    return {"classes": VALUE_DOC, "lm": VALUE_DOC_LM}.get(kind, f"the method's learned quantity: {learned}")


def in_run_value(ctx, fallback) -> np.ndarray:
    """value of a learned method: the percentile rank of the run's own -mean_loss over the whole table
    ((rank - 1) / (n - 1), ties averaged; higher = more valuable; in [0, 1]; NaN for rows never seen). The
    small-loss signal: a row the model keeps fitting badly is suspect.

    Chosen by measurement (reports/value-choice.md, `valuekit bench value`): on five data sets x symmetric,
    pair, instance-dependent and long-tail flips x 3 seeds (DDS and MW-Net runs), -mean_loss ranked flipped
    rows above aum, -last_loss, the global and the within-class rank averages of these and the learned
    quantity; on six held-out sets the earlier within-class rank average of -mean_loss and aum
    (reports/quality.md) ranked them worse on every set. Within-class ranks lose most on a long tail and on
    instance-dependent flips; keeping every class at its share is the job of the export's per-class selection.
    Causal-LM tables (sequence labels, `--model causal-lm / hf: / hf-config:`): the percentile rank of -last_loss,
    the response loss at the row's latest step (no classes to rank within; chosen by measurement on three
    instruction sets x 3 seeds, reports/llm.md: it ranked junk rows above -mean_loss, aum and BADS's posterior
    mean in every set). `fallback` (the learned quantity) is returned for a bare TrainContext without signals
    and for other sequence labels (translation pairs).
    """
    kind = _in_run_kind(ctx)
    if kind == "learned":
        return fallback.detach().double().cpu().numpy() if isinstance(fallback, torch.Tensor) else np.asarray(fallback)
    cols = ctx.signals.columns()
    if kind == "lm":
        return class_percentile(-cols["last_loss"], np.zeros(len(cols["last_loss"]), dtype=np.int64))
    return class_percentile(-cols["mean_loss"], np.zeros(len(cols["mean_loss"]), dtype=np.int64))
