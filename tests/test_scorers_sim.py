"""Simulation scorer against the real test HTTP server with rule-based simulator judges (tests/judges_sim.py)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from judges_sim import random_sentences, word_record
from llm_server_fixture import start_llm_server

from autointerp.llm import TokenLogprob
from autointerp.llm.client import make_client
from autointerp.sampling import SamplingConfig
from autointerp.scorers import simulation as sim

ANIMALS = ["cat", "dog", "horse", "rabbit", "goat"]
FILLER = ["house", "table", "went", "blue", "quickly", "over", "river", "paper", "seven", "green", "walked", "under"]


@pytest.fixture(scope="module")
def record():
    act = random_sentences(60, FILLER, 12, seed=1, insert=ANIMALS)
    neg = random_sentences(30, FILLER, 12, seed=2)
    return word_record(act, neg, ANIMALS, latent=3)


def _client(srv, **kw):
    return make_client("openai", model="sim", base_url=srv.base_url, api_key_env=None, cache_path=None, **kw)


def _score(record, explanation, client, **cfg):
    return asyncio.run(sim.score(record, explanation, client, config=sim.SimulationConfig(**cfg), seed=0))


ORACLE = "animal words: cat, dog, horse, rabbit, goat"
RANDOM = "colours and furniture: blue, table, paper"


def test_logprob_mode_oracle_vs_random(record):
    with start_llm_server(judge="judges_sim:simulator") as srv:
        client = _client(srv)
        good = _score(record, ORACLE, client)
        n_ex = good.metrics["n_examples"]
        # 15 examples (10 activating + 5 negatives), 5 per call
        assert srv.stats()["requests"] == math.ceil(n_ex / 5) == 3
        bad = _score(record, RANDOM, client)
    assert good.details["mode"] == "logprob" and good.details["calls_without_logprobs"] == 0
    assert good.metrics["pearson_r"] > 0.9
    assert abs(bad.metrics["pearson_r"]) < 0.3
    assert good.metrics["n_failed_tokens"] == 0 and good.metrics["n_failed_examples"] == 0
    # predictions are expected values of the logprob distribution, not the written numbers
    preds = np.concatenate([e["pred"] for e in good.details["examples"]])
    assert set(np.round(preds, 2)) <= {8.9, 0.1}
    assert good.metrics["mean_pred_negative"] == pytest.approx(0.1, abs=1e-6)
    assert any(k.startswith("pearson_r_q") for k in good.metrics)
    assert good.prompt_version.startswith("simulation@") and good.usage.calls == 3


def test_json_mode_when_backend_has_no_logprobs(record):
    with start_llm_server(judge="judges_sim:simulator", logprobs=False) as srv:
        client = _client(srv, supports_logprobs=False)
        good = _score(record, ORACLE, client, examples_per_call=8)
        assert srv.stats()["requests"] == 2
        bad = _score(record, RANDOM, client, examples_per_call=8)
    assert good.details["mode"] == "json" and good.prompt_version.startswith("simulation_json@")
    assert good.metrics["pearson_r"] > 0.9
    assert abs(bad.metrics["pearson_r"]) < 0.3
    preds = np.concatenate([e["pred"] for e in good.details["examples"]])
    assert set(preds) <= {0.0, 10.0}


def test_misaligned_output_counts_failures(record):
    with start_llm_server(judge="judges_sim:simulator_sloppy", logprobs=False) as srv:
        res = _score(record, ORACLE, _client(srv), mode="logprob", examples_per_call=5)
    # each call's last example is missing, every other example lacks its last row
    assert res.metrics["n_failed_examples"] == 3
    assert res.metrics["n_failed_tokens"] == 12
    assert res.metrics["pearson_r"] > 0.8
    missing = [e for e in res.details["examples"] if e["pred"] is None]
    assert len(missing) == 3


def test_parsers_are_tolerant():
    # JSON with prose, fences, a non-number value; and a broken object salvaged example by example
    rows = sim.parse_json('Sure!\n```json\n{"1": [["a", 3], ["b", "x"]], "2": [["c", 12]]}\n```')
    assert rows[1][0] == ("a", 3.0) and math.isnan(rows[1][1][1]) and rows[2] == [("c", 10.0)]
    rows = sim.parse_json('{"1": [["a", 1], ["b", 2]], "2": [["c", 3]')
    assert rows == {1: [("a", 1.0), ("b", 2.0)]}
    assert sim.parse_json('{"Example 2": [["x", 4]]}') == {2: [("x", 4.0)]}
    pred, failed = sim.align([("a", 1.0), ("b", float("nan"))], 3)
    assert pred.tolist() == [1.0, 0.0, 0.0] and failed == 2
    assert sim.align(None, 4) == (None, 4)
    # row parsing: a numeric token, a blank token, a merged tab+digit logprob token
    text = "## Example 1\n 5\t3\n\t7\n cat\t10\n"
    lps = [TokenLogprob(t, -0.1, top) for t, top in [
        ("## Example 1\n", {}), (" 5", {}), ("\t3", {"\t3": math.log(0.5), "\t1": math.log(0.5)}), ("\n", {}),
        ("\t", {}), ("7", {"7": 0.0}), ("\n", {}), (" cat", {}), ("\t", {}), ("10", {"10": 0.0, "x": -1}), ("\n", {}),
    ]]
    assert sim.parse_rows(text) == {1: [(" 5", 3.0), ("", 7.0), (" cat", 10.0)]}
    assert sim.parse_rows(text, lps) == {1: [(" 5", 2.0), ("", 7.0), (" cat", 10.0)]}
    # digit-splitting tokenizers: "1" "0"; the token after "1" splits its mass between 1 and 10
    lps = [TokenLogprob(t, -0.1, top) for t, top in [
        ("## Example 1\n", {}), ("a", {}), ("\t", {}),
        ("1", {"1": math.log(0.6), "0": math.log(0.4)}), ("0", {"0": math.log(0.5), "\n": math.log(0.5)}),
        ("\n", {}), ("b", {}), ("\t", {}), ("3", {"3": 0.0}),
    ]]
    rows = sim.parse_rows("".join(t.token for t in lps), lps)[1]
    assert rows[0][1] == pytest.approx(0.6 * (0.5 * 10 + 0.5 * 1)) and rows[1] == ("b", 3.0)
    assert sim.pearson(np.ones(5), np.arange(5)) == 0.0 and sim.pearson(np.arange(3), np.ones(3)) is None


def test_prompt_dir_is_used_and_checked(record, tmp_path):
    """A custom prompt folder reaches the simulation prompt (as it does for every scorer), and `preflight` checks
    each template the mode may use before any call."""
    from autointerp.errors import ConfigError
    from autointerp.prompt_files import load_prompt, prompts_dir

    d = tmp_path / "prompts"
    d.mkdir()
    text = (prompts_dir() / "simulation.md").read_text()
    (d / "simulation.md").write_text(text.replace("### user", "### user\nCUSTOM PROMPT\n", 1))
    custom = load_prompt("simulation", {"explanation", "examples"}, d)
    with start_llm_server(judge="judges_sim:simulator") as srv:
        client = _client(srv)
        # "auto" may switch to the JSON prompt mid-job, so it needs both; the folder has no simulation_json.md
        with pytest.raises(ConfigError, match="simulation_json.md not found"):
            sim.preflight(sim.SimulationConfig(prompt_dir=d), client)
        assert [t.version for t in sim.preflight(sim.SimulationConfig(prompt_dir=d, mode="logprob"), client)] == \
            [custom.version]
        res = _score(record, ORACLE, client, prompt_dir=d, mode="logprob")
        assert srv.stats()["requests"] == 3
    assert res.prompt_version == custom.version != load_prompt("simulation", {"explanation", "examples"}).version
    assert res.metrics["pearson_r"] > 0.9


def test_per_quantile_pearson_matches_independent_computation():
    """pearson_r_q* are recomputed here from the returned predictions and the record's own activations, with the
    deciles derived independently (k/10 of the max activation over the latent's activating windows)."""
    from scipy.stats import pearsonr

    # activations spread over 0.5..10 so every decile is populated; 4 test windows per decile
    act = random_sentences(300, FILLER, 12, seed=5, insert=ANIMALS)
    neg = random_sentences(30, FILLER, 12, seed=6)
    rec = word_record(act, neg, ANIMALS, latent=1, lo=0.5, hi=10.0)
    # explainer windows drawn across deciles, so the top decile keeps test windows too
    sampling = SamplingConfig(explain_from="quantiles")
    # half right, half wrong: per-decile r is neither 1 nor constant, so a mix-up between deciles shows
    with start_llm_server(judge="judges_sim:simulator") as srv:
        res = _score(rec, "cat, dog, blue, table", _client(srv), sampling=sampling, n_test=40, n_negatives=8,
                     examples_per_call=8)
    assert res.metrics["n_failed_examples"] == 0 and res.metrics["n_failed_tokens"] == 0
    ex = res.details["examples"]
    assert len(ex) == 48

    truth = {int(w): a for part in (rec.top, rec.sample, rec.negatives) for w, a in zip(part.window_ids, part.acts)}
    top_act = max(float(a.max()) for a in truth.values())
    pred = {e["window_id"]: np.asarray(e["pred"], np.float64) for e in ex}
    by_q: dict[int, list[int]] = {}
    for e in ex:
        w, m = e["window_id"], float(truth[e["window_id"]].max())
        q = -1 if m <= 0 else min(max(math.ceil(m / top_act * 10) - 1, 0), 9)
        by_q.setdefault(q, []).append(w)
    assert len(by_q[-1]) == 8 and set(by_q) == set(range(-1, 10))
    assert all(len(ws) >= 3 for ws in by_q.values())

    def r(ws):
        return pearsonr(np.concatenate([pred[w] for w in ws]), np.concatenate([truth[w] for w in ws]))[0]

    got = {k: v for k, v in res.metrics.items() if k.startswith("pearson_r_q")}
    assert set(got) == {f"pearson_r_q{q}" for q in by_q if q >= 0}
    want = {f"pearson_r_q{q}": r(by_q[q]) for q in range(10)}
    assert got == pytest.approx(want, abs=1e-5)
    assert np.ptp(list(want.values())) > 0.1  # the deciles really differ, so a swap would be caught
    assert res.metrics["pearson_r"] == pytest.approx(r(list(pred)), abs=1e-5)
    assert res.metrics["pearson_r_activating"] == pytest.approx(r([w for q, ws in by_q.items() if q >= 0 for w in ws]),
                                                                abs=1e-5)
