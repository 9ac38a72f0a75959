"""Classification metrics for scorers, and per-dictionary aggregates over latents.

Conventions follow scikit-learn (the tests compare on random data): precision/recall/F1 are 0 when undefined
(zero_division=0), balanced accuracy averages the recall of the classes present in y_true, AUC uses average
ranks for ties (= sklearn's roc_auc_score) and is None when y_true has one class. Failed examples never enter
these numbers; they are counted apart in `n_failed`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

BINARY_KEYS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auc")


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1..end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(y_true: Sequence[int], score: Sequence[float]) -> float | None:
    """Mann-Whitney AUC: P(score_pos > score_neg) + ½·P(tie)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int], y_prob: Sequence[float] | None = None) -> dict:
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    n = len(y)
    if n == 0:
        return {k: None for k in BINARY_KEYS} | {"n": 0}
    tp = int((y & p).sum())
    tn = int((~y & ~p).sum())
    fp = int((~y & p).sum())
    fn = int((y & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    recalls = []
    if tp + fn:
        recalls.append(recall)
    if tn + fp:
        recalls.append(tn / (tn + fp))
    return {
        "accuracy": (tp + tn) / n,
        "balanced_accuracy": float(np.mean(recalls)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auc": roc_auc(y, y_prob) if y_prob is not None else None,
        "n": n,
    }


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float | None:
    """None when either side is constant (undefined), instead of nan."""
    a = np.asarray(x, np.float64)
    b = np.asarray(y, np.float64)
    if len(a) < 2:
        return None
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if den == 0 or not np.isfinite(den):
        return None
    return float(np.clip((a * b).sum() / den, -1.0, 1.0))


def per_group_accuracy(y_true, y_pred, groups) -> dict[int, float]:
    y_true, y_pred, groups = (np.asarray(v) for v in (y_true, y_pred, groups))
    return {int(g): float((y_true[groups == g] == y_pred[groups == g]).mean()) for g in np.unique(groups)}


# --------------------------------------------------------------------------------------------------- aggregates

_STATS_Q = (0.1, 0.25, 0.75, 0.9)


def summarize(values: Iterable[float | None]) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not len(v):
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None}
    out = {"n": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
           "min": float(v.min()), "max": float(v.max())}
    for q in _STATS_Q:
        out[f"q{int(q * 100)}"] = float(np.quantile(v, q))
    return out


def histogram(values: Iterable[float | None], bins: int = 10, range_: tuple[float, float] = (0.0, 1.0)) -> dict:
    v = [x for x in values if x is not None and np.isfinite(x)]
    counts, edges = np.histogram(v, bins=bins, range=range_)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def aggregate(results: Iterable, metrics: Sequence[str] | None = None) -> dict[str, dict]:
    """Per scorer: distribution of each metric over latents (skipped results and None values left out).

    `results` are ScoreResult-like (scorer, metrics, skipped). Returns {scorer: {"n_latents", "n_skipped",
    "n_failed", "metrics": {metric: summarize(...)}}}.
    """
    by: dict[str, dict] = {}
    for r in results:
        d = by.setdefault(r.scorer, {"n_latents": 0, "n_skipped": 0, "n_failed": 0, "_vals": {}})
        d["n_latents"] += 1
        if r.skipped:
            d["n_skipped"] += 1
            continue
        d["n_failed"] += int(r.metrics.get("n_failed") or 0)
        for k, v in r.metrics.items():
            if (metrics is None or k in metrics) and (v is None or isinstance(v, (int, float))):
                d["_vals"].setdefault(k, []).append(v)
    for d in by.values():
        d["metrics"] = {k: summarize(v) for k, v in d.pop("_vals").items()}
    return by


def format_table(agg: dict[str, dict], metrics: Sequence[str] = ("balanced_accuracy", "accuracy", "f1", "auc",
                                                                  "pearson_r")) -> str:
    """A plain-text table: one row per (scorer, metric) with mean/median/q10/q90 and counts."""
    head = f"{'scorer':<12} {'metric':<18} {'n':>5} {'mean':>7} {'median':>7} {'q10':>7} {'q90':>7}"
    rows = [head, "-" * len(head)]
    fmt = lambda x: f"{x:7.3f}" if x is not None else f"{'-':>7}"  # noqa: E731
    for scorer, d in sorted(agg.items()):
        for m in metrics:
            s = d["metrics"].get(m)
            if not s or not s["n"]:
                continue
            rows.append(f"{scorer:<12} {m:<18} {s['n']:>5} {fmt(s['mean'])} {fmt(s['median'])} "
                        f"{fmt(s.get('q10'))} {fmt(s.get('q90'))}")
        rows.append(f"{scorer:<12} {'(skipped/failed)':<18} {d['n_skipped']:>5} failed examples: {d['n_failed']}")
    return "\n".join(rows)
