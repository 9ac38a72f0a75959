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
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:  # before centring: rounding would leave tiny spreads
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


def _field(r, name: str, default=None):
    """A result's field, whether it is a ScoreResult-like object or a results.jsonl score row (a dict)."""
    return r.get(name, default) if isinstance(r, dict) else getattr(r, name, default)


def _hist_range(values: list[float]) -> tuple[float, float]:
    """One range per metric for every group, so the histograms of two dictionaries line up bin for bin:
    [0, 1] for rates/AUC, [-1, 1] for correlations, else the values' own span (counts such as n_failed)."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v or (min(v) >= 0.0 and max(v) <= 1.0):
        return 0.0, 1.0
    if min(v) >= -1.0 and max(v) <= 1.0:
        return -1.0, 1.0
    return float(min(v)), float(max(v))


def aggregate(results: Iterable, metrics: Sequence[str] | None = None, bins: int = 10) -> dict:
    """Per scorer, and per dictionary when the results come from more than one: the distribution of each metric
    over latents (skipped results and None values left out).

    `results` are ScoreResult-like objects (scorer, metrics, skipped, optionally dictionary_id) or results.jsonl
    score rows. Keys are the scorer name when all results share one dictionary (or carry none), else
    (dictionary_id, scorer). Each value: {"dictionary_id", "scorer", "n_latents", "n_skipped", "n_failed",
    "metrics": {metric: summarize(...) | {"hist": histogram(...)}}}; a metric's histogram has the same edges in
    every group.
    """
    results = list(results)
    dicts = {_field(r, "dictionary_id") for r in results}
    per_dict = len(dicts) > 1
    by: dict = {}
    for r in results:
        dict_id, scorer = _field(r, "dictionary_id"), _field(r, "scorer")
        key = (dict_id, scorer) if per_dict else scorer
        d = by.setdefault(key, {"dictionary_id": dict_id, "scorer": scorer, "n_latents": 0, "n_skipped": 0,
                                "n_failed": 0, "_vals": {}})
        d["n_latents"] += 1
        if _field(r, "skipped"):
            d["n_skipped"] += 1
            continue
        m = _field(r, "metrics") or {}
        d["n_failed"] += int(m.get("n_failed") or 0)
        for k, v in m.items():
            if (metrics is None or k in metrics) and (v is None or isinstance(v, (int, float))):
                d["_vals"].setdefault(k, []).append(v)
    ranges: dict[str, list] = {}
    for d in by.values():
        for k, v in d["_vals"].items():
            ranges.setdefault(k, []).extend(v)
    ranges = {k: _hist_range(v) for k, v in ranges.items()}
    for d in by.values():
        d["metrics"] = {k: summarize(v) | {"hist": histogram(v, bins, ranges[k])} for k, v in d.pop("_vals").items()}
    return by


def format_table(agg: dict, metrics: Sequence[str] = ("balanced_accuracy", "accuracy", "f1", "auc", "pearson_r"),
                 hist: bool = False) -> str:
    """A plain-text table: one row per (scorer, metric) with mean/median/q10/q90 and counts; a dictionary column
    first when `agg` spans several dictionaries; with `hist`, the counts per histogram bin."""
    per_dict = any(isinstance(k, tuple) for k in agg)
    width = max([len(str(d.get("dictionary_id"))) for d in agg.values()] + [10]) if per_dict else 0
    lead = (lambda d: f"{str(d.get('dictionary_id')):<{width}} ") if per_dict else (lambda d: "")  # noqa: E731
    head = (f"{'dictionary':<{width}} " if per_dict else "") + \
        f"{'scorer':<12} {'metric':<18} {'n':>5} {'mean':>7} {'median':>7} {'q10':>7} {'q90':>7}"
    rows = [head, "-" * len(head)]
    fmt = lambda x: f"{x:7.3f}" if x is not None else f"{'-':>7}"  # noqa: E731
    order = lambda kv: (str(kv[1].get("dictionary_id") or ""), str(kv[1].get("scorer", kv[0])))  # noqa: E731
    for key, d in sorted(agg.items(), key=order):  # sort by name: a missing dictionary id (None) sorts first
        scorer = d.get("scorer", key)
        for m in metrics:
            s = d["metrics"].get(m)
            if not s or not s["n"]:
                continue
            line = (f"{lead(d)}{scorer:<12} {m:<18} {s['n']:>5} {fmt(s['mean'])} {fmt(s['median'])} "
                    f"{fmt(s.get('q10'))} {fmt(s.get('q90'))}")
            if hist and s.get("hist"):
                e = s["hist"]["edges"]
                line += f"  hist[{e[0]:g},{e[-1]:g}] " + " ".join(str(c) for c in s["hist"]["counts"])
            rows.append(line)
        rows.append(f"{lead(d)}{scorer:<12} {'(skipped/failed)':<18} {d['n_skipped']:>5} "
                    f"failed examples: {d['n_failed']}")
    return "\n".join(rows)
