import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from autointerp.metrics import aggregate, binary_metrics, format_table, pearson_r, roc_auc, summarize
from autointerp.scorers.base import ScoreResult

labels = st.lists(st.integers(0, 1), min_size=1, max_size=60)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_binary_metrics_match_sklearn(data):
    y = data.draw(labels)
    p = data.draw(st.lists(st.integers(0, 1), min_size=len(y), max_size=len(y)))
    # coarse scores make ties common
    s = data.draw(st.lists(st.integers(0, 4), min_size=len(y), max_size=len(y)))
    m = binary_metrics(y, p, [v / 4 for v in s])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert m["precision"] == pytest.approx(skm.precision_score(y, p, zero_division=0))
    assert m["recall"] == pytest.approx(skm.recall_score(y, p, zero_division=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, p, zero_division=0))
    if len(set(y)) == 2:
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, s))
    else:
        assert m["auc"] is None
    assert m["n"] == len(y)


@settings(max_examples=100, deadline=None)
@given(y=st.lists(st.integers(0, 1), min_size=2, max_size=200).filter(lambda v: len(set(v)) == 2),
       seed=st.integers(0, 10**6))
def test_auc_continuous_scores(y, seed):
    s = np.random.default_rng(seed).normal(size=len(y)) + np.asarray(y)
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))


@settings(max_examples=100, deadline=None)
# magnitudes below 1e-100 left out: their squares underflow, and no activation is that small
@given(x=st.lists(st.floats(-1e3, 1e3).filter(lambda v: v == 0 or abs(v) > 1e-100), min_size=3, max_size=50),
       seed=st.integers(0, 1000))
def test_pearson_matches_numpy(x, seed):
    y = np.asarray(x) * 0.5 + np.random.default_rng(seed).normal(size=len(x))
    r = pearson_r(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:  # constant (np.std of a constant can be ~1e-13, not 0)
        assert r is None
    else:
        assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)
    assert pearson_r([1, 1, 1], [1, 2, 3]) is None and pearson_r([1], [2]) is None
    # constants that floats cannot represent: centring leaves ~1e-17 residues, still constant
    assert pearson_r([0.1] * 3, [0.1] * 3) is None and pearson_r([0.1] * 3, [1, 2, 3]) is None


def test_empty():
    m = binary_metrics([], [])
    assert m["n"] == 0 and m["accuracy"] is None and m["auc"] is None


def test_aggregate_ignores_skipped_and_none():
    rs = [ScoreResult("detection", i, {"balanced_accuracy": v, "n_failed": 2, "auc": None}) for i, v in
          enumerate([0.5, 0.7, 0.9, 1.0])]
    rs.append(ScoreResult("detection", 9, {}, skipped="too few"))
    rs.append(ScoreResult("fuzzing", 0, {"balanced_accuracy": 0.8, "n_failed": 0}))
    agg = aggregate(rs)
    d = agg["detection"]
    assert (d["n_latents"], d["n_skipped"], d["n_failed"]) == (5, 1, 8)
    ba = d["metrics"]["balanced_accuracy"]
    assert ba["n"] == 4 and ba["mean"] == pytest.approx(0.775) and ba["median"] == pytest.approx(0.8)
    assert ba["q10"] == pytest.approx(np.quantile([0.5, 0.7, 0.9, 1.0], 0.1))
    assert d["metrics"]["auc"]["n"] == 0 and d["metrics"]["auc"]["mean"] is None
    assert agg["fuzzing"]["metrics"]["balanced_accuracy"]["mean"] == 0.8
    table = format_table(agg)
    assert "detection" in table and "0.775" in table
    assert summarize([None, float("nan")])["n"] == 0


def test_aggregate_per_dictionary_with_histograms():
    """Score rows (as in results.jsonl) from two dictionaries: one group per (dictionary, scorer), each with its own
    mean/median and a histogram whose bins are shared across dictionaries (so they can be compared)."""
    rng = np.random.default_rng(0)
    vals = {("saeA", "detection"): rng.uniform(0.5, 1.0, 30), ("saeB", "detection"): rng.uniform(0.4, 0.8, 20),
            ("saeA", "simulation"): rng.uniform(-0.5, 1.0, 25)}
    rows = []
    for (dic, scorer), v in vals.items():
        key = "pearson_r" if scorer == "simulation" else "balanced_accuracy"
        rows += [{"type": "score", "dictionary_id": dic, "scorer": scorer, "latent": i,
                  "metrics": {key: float(x), "n_failed": i % 3}, "skipped": None} for i, x in enumerate(v)]
    rows.append({"type": "score", "dictionary_id": "saeB", "scorer": "detection", "latent": 99, "metrics": {},
                 "skipped": "too few"})
    agg = aggregate(rows)
    assert set(agg) == set(vals)
    for (dic, scorer), v in vals.items():
        d = agg[(dic, scorer)]
        assert (d["dictionary_id"], d["scorer"]) == (dic, scorer)
        assert d["n_latents"] == len(v) + (dic == "saeB") and d["n_skipped"] == (dic == "saeB")
        assert d["n_failed"] == sum(i % 3 for i in range(len(v)))
        s = d["metrics"]["pearson_r" if scorer == "simulation" else "balanced_accuracy"]
        assert s["n"] == len(v)
        assert s["mean"] == pytest.approx(v.mean()) and s["median"] == pytest.approx(np.median(v))
        # correlations are binned over [-1, 1], rates over [0, 1]; every value lands in a bin
        lo = -1.0 if scorer == "simulation" else 0.0
        counts, edges = np.histogram(v, bins=10, range=(lo, 1.0))
        assert s["hist"]["counts"] == counts.tolist() and s["hist"]["edges"] == pytest.approx(edges.tolist())
        assert sum(s["hist"]["counts"]) == len(v)
    # same metric, same bins in both dictionaries: the distributions differ bin by bin, not by scale
    ha, hb = (agg[(k, "detection")]["metrics"]["balanced_accuracy"]["hist"] for k in ("saeA", "saeB"))
    assert ha["edges"] == hb["edges"] and ha["counts"] != hb["counts"]
    # n_failed (a count, not a rate) spans its own values
    nf = agg[("saeA", "detection")]["metrics"]["n_failed"]["hist"]
    assert nf["edges"][0] == 0 and nf["edges"][-1] == 2 and sum(nf["counts"]) == 30

    table = format_table(agg, hist=True)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["dictionary", "scorer"]
    for (dic, scorer), d in agg.items():
        m = "pearson_r" if scorer == "simulation" else "balanced_accuracy"
        line = next(ln for ln in lines if ln.split()[:3] == [dic, scorer, m])
        assert f"{d['metrics'][m]['mean']:7.3f}".strip() in line.split()
        assert line.endswith(" ".join(map(str, d["metrics"][m]["hist"]["counts"])))
    # one dictionary: keyed by scorer alone, and the table has no dictionary column (what the CLI prints)
    single = aggregate(r for r in rows if r["dictionary_id"] == "saeA")
    assert set(single) == {"detection", "simulation"}
    assert single["detection"]["metrics"]["balanced_accuracy"] == \
        agg[("saeA", "detection")]["metrics"]["balanced_accuracy"]
    assert format_table(single).splitlines()[0].split()[0] == "scorer"
