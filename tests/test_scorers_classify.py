import asyncio
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autointerp.errors import ConfigError
from autointerp.explainers import ExplainConfig, explain
from autointerp.llm import make_client
from autointerp.llm.base import Completion, TokenLogprob, Usage
from autointerp.sampling import NegativePool, SamplingConfig, Skipped, sample_latent
from autointerp.scorers import SCORERS, get_scorer
from autointerp.scorers.intruder import parse_intruder
from autointerp.scorers._classify import parse_answer, probs_from_logprobs, split_batches
from llm_server_fixture import start_llm_server
from synthetic import bag_of_words_embed, make_world, oracle_explanation

N_LAT = 6


@pytest.fixture(scope="module")
def world():
    return make_world(n_latents=N_LAT)


@pytest.fixture(scope="module")
def pool(world):
    return NegativePool.from_examples(world.examples(0, world.pool_ids), world.decode, bag_of_words_embed)


def serve(judge):
    return start_llm_server(judge=f"judges:{judge}")


@pytest.fixture(scope="module")
def srv():
    with serve("rule_judge") as s:
        yield s


def client_for(s):
    return make_client("openai", model="judge", base_url=s.base_url, api_key_env=None, cache_path=None)


def run_score(name, rec, expl, s, seed=0, **cfg):
    sc = get_scorer(name)

    async def go():
        async with client_for(s) as client:  # closes its connections inside this event loop
            return await sc.score(rec, expl, client, config=sc.Config(**cfg), seed=seed)

    return asyncio.run(go())


# ------------------------------------------------------------------------------------------------ parsing


def test_parse_answer_tolerates_text_and_takes_last_list():
    assert parse_answer("Sure! Here: [1, 0,1 ,0] done", 4)[0] == [1, 0, 1, 0]
    assert parse_answer("[1, 1] then [0, 1]", 2)[0] == [0, 1]
    assert parse_answer("[0, 1, 1] and [1]", 3)[0] == [0, 1, 1]  # last list of the right length
    assert parse_answer('["True", "false"]', 2)[0] == [1, 0]
    for bad in ("[1, 0, 2]", "1, 0, 1", "[1, 0", "", "[1, 0, 1, 1]"):
        assert parse_answer(bad, 3) is None


@settings(max_examples=150, deadline=None)
@given(noise=st.text(max_size=60), vals=st.lists(st.integers(0, 1), min_size=1, max_size=25))
def test_parse_answer_fuzz(noise, vals):
    text = noise + "\n[" + ", ".join(map(str, vals)) + "]"
    got = parse_answer(text, len(vals))
    assert got is not None and got[0] == vals
    # an answer list one entry short never parses as a full answer
    short = parse_answer(noise.replace("[", "(").replace("]", ")") + "[" + ", ".join(map(str, vals[:-1])) + "]",
                         len(vals))
    assert short is None


def test_probs_from_logprobs_aligns_entries():
    def tok(t, p1=None):
        if p1 is None:
            return TokenLogprob(t, 0.0, {})
        chosen = "1" if p1 >= 0.5 else "0"
        return TokenLogprob(t.replace("X", chosen), math.log(max(p1 if chosen == "1" else 1 - p1, 1e-9)),
                            {t.replace("X", "1"): math.log(p1), t.replace("X", "0"): math.log(1 - p1)})

    toks = [tok("Answer: "), tok("[X", 0.9), tok(", "), tok("X", 0.2), tok(", "), tok("X]", 0.6)]
    text = "".join(t.token for t in toks)
    c = Completion(text, Usage(), "m", toks)
    vals, spans = parse_answer(text, 3)
    assert vals == [1, 0, 1]
    assert np.allclose(probs_from_logprobs(c, spans), [0.9, 0.2, 0.6])
    merged = [TokenLogprob("[1, 0]", -0.1, {})]
    assert probs_from_logprobs(Completion("[1, 0]", Usage(), "m", merged), parse_answer("[1, 0]", 2)[1]) is None


def test_split_batches_even():
    assert [len(b) for b in split_batches(50, 20)] == [17, 17, 16]
    assert [len(b) for b in split_batches(100, 20)] == [20] * 5
    assert split_batches(0, 20) == []


# ------------------------------------------------------------------------------------------------ registry


def test_registry():
    with pytest.raises(ConfigError) as e:
        get_scorer("detect")
    assert all(n in str(e.value) for n in SCORERS)
    for name in ("detection", "fuzzing", "intruder"):
        sc = get_scorer(name)
        assert sc.name == name and sc.Config().sampling == SamplingConfig()


# ------------------------------------------------------------------------------------------------ validity


def test_oracle_high_random_at_chance(world, pool, srv):
    """Oracle explanations score high; the `random` explainer baseline (another latent's explanation, drawn by the
    explainer itself, two seeds) scores at chance."""
    oracles = {lat: oracle_explanation(lat) for lat in range(N_LAT)}
    for name in ("detection", "fuzzing"):
        oracle, rand = [], []
        for lat in range(N_LAT):
            rec = world.record(lat)
            r = run_score(name, rec, oracles[lat], srv, pool=pool)
            assert r.metrics["n_failed"] == 0 and r.metrics["n"] == (100 if name == "detection" else 50)
            oracle.append(r.metrics["balanced_accuracy"])
            for seed in (0, 1):
                baseline = asyncio.run(explain(rec, None, kind="random", config=ExplainConfig(random_pool=oracles),
                                               seed=seed))
                assert baseline.kind == "random" and baseline.text != oracles[lat]
                rand.append(run_score(name, rec, baseline, srv, pool=pool).metrics["balanced_accuracy"])
        assert min(oracle) >= 0.9, (name, oracle)
        assert abs(np.mean(rand) - 0.5) <= 0.1, (name, rand)


def test_per_quantile_and_details(world, pool, srv):
    r = run_score("detection", world.record(0), oracle_explanation(0), srv, pool=pool)
    assert r.metrics["accuracy_negatives"] == 1.0 and r.metrics["accuracy_hard_negatives"] == 1.0
    qs = [r.metrics[f"accuracy_q{q}"] for q in range(10)]
    assert sum(q is not None for q in qs) >= 8 and all(q in (None, 1.0) for q in qs)
    assert r.details["n_hard_negatives"] == 25
    assert r.prompt_version.startswith("detection@") and r.model == "judge"
    again = run_score("detection", world.record(0), oracle_explanation(0), srv, pool=pool)
    assert again.details == r.details  # same seed, same batches and order
    json.dumps(r.metrics), json.dumps(r.details)  # plain Python values: storable as JSON


def test_calls_per_latent_at_most_6(world, pool, srv):
    rec = world.record(3)
    srv.reset_stats()
    client = client_for(srv)

    async def one():
        e = await explain(rec, client, kind="default", config=ExplainConfig(pool=pool), seed=0)
        d, f = await asyncio.gather(
            get_scorer("detection").score(rec, e, client, config=get_scorer("detection").Config(pool=pool), seed=0),
            get_scorer("fuzzing").score(rec, e, client, config=get_scorer("fuzzing").Config(pool=pool), seed=0))
        return e, d, f

    e, d, f = asyncio.run(one())
    asyncio.run(client.aclose())
    calls = srv.stats()["requests"]
    # issue 10's budget: explain 1 + detection 100 examples in 3 calls + fuzzing 50 in 2
    assert calls == e.usage.calls + d.usage.calls + f.usage.calls == 1 + 3 + 2 <= 6
    assert d.metrics["n"] == 100 and f.metrics["n"] == 50
    assert d.metrics["balanced_accuracy"] >= 0.9 and f.metrics["balanced_accuracy"] >= 0.9
    # the explanation's own windows are never tested
    tested = {x["window_id"] for x in d.details["examples"]} | {x["window_id"] for x in f.details["examples"]}
    assert not tested & set(e.examples_used)


def test_batches_of_one_latent_go_out_concurrently(world, pool):
    """Detection's 3 batches for one latent are in flight together, not one after another."""
    latency = 0.4
    with start_llm_server(judge="judges:rule_judge", latency_ms=latency * 1000) as s:
        r = run_score("detection", world.record(2), oracle_explanation(2), s, pool=pool)
        st = s.stats()
    assert r.details["n_calls"] == st["requests"] == 3
    assert st["max_in_flight"] == 3  # serial batches would give 1 (no wall-clock bound: speed lives in bench/)
    assert r.metrics["balanced_accuracy"] >= 0.9


def test_explanation_windows_excluded_even_with_other_sampling(world, srv):
    rec = world.record(0)
    quant = sample_latent(rec, SamplingConfig(explain_from="quantiles"), 0)
    e = asyncio.run(explain(rec, None, kind="token_frequency", seed=0, sample=quant))
    r = run_score("detection", rec, e, srv)  # scorer samples with explain_from="top": other explainer windows
    assert not {x["window_id"] for x in r.details["examples"]} & set(e.examples_used)


@pytest.mark.parametrize("judge", ["garbage_judge", "short_judge"])
def test_parse_failures_counted_not_zero(world, judge):
    with serve(judge) as s:
        for name, n in (("detection", 100), ("fuzzing", 50)):
            r = run_score(name, world.record(0), oracle_explanation(0), s)
            assert r.metrics["n_failed"] == n and r.metrics["balanced_accuracy"] is None
            assert r.metrics["accuracy"] is None and len(r.details["failures"]) == r.details["n_calls"]
            assert all(x["pred"] is None for x in r.details["examples"])


def test_partial_failures(world):
    with serve("flaky_judge") as s:
        r = run_score("detection", world.record(0), oracle_explanation(0), s, batch_size=20)
    failed = r.metrics["n_failed"]
    assert 0 < failed < 100 and failed % 20 == 0
    assert r.metrics["balanced_accuracy"] == 1.0  # computed on the answered batches only


def test_logprobs_give_auc(world):
    with serve("soft_judge") as s:
        r = run_score("detection", world.record(0), oracle_explanation(0), s)
    # hard answers are all 0 (chance), but P(1) separates the classes perfectly
    assert r.metrics["balanced_accuracy"] == 0.5 and r.metrics["auc"] == 1.0
    assert all(x["prob"] in (0.4, 0.1) for x in r.details["examples"])


def test_skipped_latent(world, srv):
    srv.reset_stats()
    r = run_score("detection", world.record(0, n_activating=9), oracle_explanation(0), srv)
    assert r.skipped and "activating" in r.skipped and r.metrics == {}
    skipped = Skipped("explainer answer held no explanation", 0)
    assert run_score("fuzzing", world.record(0), skipped, srv).skipped == skipped.reason
    assert srv.stats()["requests"] == 0


def test_intruder(world, pool, srv):
    r = run_score("intruder", world.record(1), None, srv, pool=pool, n_trials=6)
    assert r.metrics["accuracy"] == 1.0 and r.metrics["n"] == 6 and r.metrics["n_failed"] == 0
    assert r.details["n_calls"] == 6 and r.usage.calls == 6
    assert len({t["intruder_pos"] for t in r.details["trials"]}) > 1
    with serve("nonsense_judge") as s:
        bad = run_score("intruder", world.record(1), None, s, n_trials=3)
    assert bad.metrics["accuracy"] is None and bad.metrics["n_failed"] == 3


def test_parse_intruder():
    assert parse_intruder("[ANSWER]: 9\n...\n[ANSWER]: **3**", 5) == 2
    assert parse_intruder("[answer] example #5", 5) == 4
    assert parse_intruder("[ANSWER]: 6", 5) is None and parse_intruder("the third", 5) is None


NASTY = st.sampled_from(["<<", ">>", "<", ">", "[EXPLANATION]:", "[ANSWER]: 2", "${x}", "$", "\n", "\r\n",
                         "\nExample 3: ", "[1, 0, 1]", "]", "[", " Explanation: fires on the words: the", " the"])


@settings(max_examples=12, deadline=None)
@given(toks=st.lists(NASTY, min_size=6, max_size=6), seed=st.integers(0, 100))
def test_adversarial_text_end_to_end(srv, toks, seed):
    """Example text full of markers, brackets and newlines: the judge still sees one example per line and one
    highlight pair per run, so every batch parses."""
    from autointerp.records import Examples, LatentRecord, LatentStats

    vocab = list(toks) + [" filler", " kitten"]
    rng = np.random.default_rng(seed)
    n, ctx = 30, 6
    tokens = rng.integers(0, len(vocab) - 1, (n, ctx)).astype(np.int32)
    fire = len(vocab) - 1
    tokens[:15, 2] = fire  # the latent fires on " kitten" only
    acts = np.where(tokens == fire, rng.uniform(0.2, 1, (n, ctx)), 0).astype(np.float32)
    act_rows = np.flatnonzero(acts.max(axis=1) > 0)
    neg_rows = np.flatnonzero(acts.max(axis=1) == 0)
    ex = Examples(np.arange(n, dtype=np.int64), tokens, acts)
    rec = LatentRecord(0, ex.take(act_rows[np.argsort(-acts[act_rows].max(axis=1), kind="stable")]),
                       ex.take(act_rows), ex.take(neg_rows), LatentStats(1, 1, 1, 1, np.zeros(2), np.zeros(1)),
                       decode=lambda ids: [vocab[i] for i in ids])
    cfg = SamplingConfig(n_explain=3, n_test=10, n_negatives=10, min_explain=2, min_test=5, min_negatives=5,
                         n_explain_negatives=0)
    for name in ("detection", "fuzzing"):
        r = run_score(name, rec, "fires on the words: kitten", srv, seed=seed, sampling=cfg)
        assert r.skipped is None and r.metrics["n_failed"] == 0, r.details["failures"]
        assert r.metrics["balanced_accuracy"] == 1.0


# ------------------------------------------------------------------------------------------------ display windows


class RecordingJudge:
    """An in-process client that answers like the rule judge and keeps every prompt."""

    model = "judge"
    supports_logprobs = False

    def __init__(self):
        self.prompts = []

    async def complete(self, messages, params):
        from judges import rule_judge

        msgs = [{"role": m.role, "content": m.content} for m in messages]
        self.prompts.append(msgs)
        return Completion(rule_judge(msgs, {}), Usage(calls=1), "judge")


def _example_lines(prompts):
    from judges import examples

    return [line for msgs in prompts for line in examples(msgs[-1]["content"])]


def test_scorers_show_display_windows_and_fuzzing_highlights_stay_correct():
    """48-token windows shown as 16-token display windows: every example line holds 16 tokens; a fuzzing example
    marked correct highlights exactly the displayed tokens above the threshold (its peak among them), a wrong one
    as many silent displayed tokens; the rule judge still separates them."""
    from autointerp.formatting import highlight_mask, render_tokens
    from autointerp.scorers.fuzzing import FuzzingConfig

    w = make_world(n_latents=3, ctx=48)
    pool = NegativePool.from_examples(w.examples(0, w.pool_ids), w.decode, bag_of_words_embed)
    sampling = SamplingConfig(display_ctx=16)
    for lat in range(3):
        rec = w.record(lat)
        for name in ("detection", "fuzzing"):
            judge = RecordingJudge()
            sc = get_scorer(name)
            r = asyncio.run(sc.score(rec, oracle_explanation(lat), judge, config=sc.Config(sampling=sampling,
                                                                                            pool=pool)))
            lines = _example_lines(judge.prompts)
            assert len(lines) == r.metrics["n"] and len(judge.prompts) == r.details["n_calls"]
            assert all(len(ln.replace("<<", "").replace(">>", "").split()) == 16 for ln in lines)
            assert r.metrics["balanced_accuracy"] >= 0.9, (name, lat, r.metrics)
            if name != "fuzzing":
                continue
            s = sample_latent(rec, sampling, 0, pool=pool, explain_negatives=False)
            shown = s.shown("test")
            tag = {x["window_id"]: x["tag"] for x in r.details["examples"]}
            for wid, toks, acts in zip(shown.window_ids, shown.tokens, shown.acts):
                strs = rec.token_strings(toks)
                true = highlight_mask(acts, FuzzingConfig().threshold * acts.max())
                assert true[np.argmax(acts)]  # the peak is displayed and highlighted
                mine = [ln for ln in lines if ln.replace("<<", "").replace(">>", "") == render_tokens(strs)]
                if tag.get(int(wid)) == "correct":
                    assert any((_marked(ln) == true).all() for ln in mine)
                elif tag.get(int(wid)) == "wrong":
                    m = [_marked(ln) for ln in mine if not (_marked(ln) == true).all()]
                    assert m and m[0].sum() == true.sum() and (acts[m[0]] <= 0).all()


def _marked(line: str) -> np.ndarray:
    """Per token of a rendered example line (one word per token here): inside << >> or not."""
    out, inside = [], False
    for piece in re.split(r"(<<|>>)", line):
        if piece in ("<<", ">>"):
            inside = piece == "<<"
        else:
            out += [inside] * len(piece.split())
    return np.array(out, bool)
