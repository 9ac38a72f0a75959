"""Steering and the intervention scorer with the real SmolLM2, a real direction (the ' wedding' token embedding minus
the mean embedding) and scripted judges on the real test HTTP server."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
import torch
from judges_sim import random_sentences, word_record
from llm_server_fixture import start_llm_server

from autointerp.errors import ConfigError
from autointerp.llm.client import make_client
from autointerp.hf_loading import load_causal_lm
from autointerp.scorers import intervention as iv
from autointerp.steering import steer

torch.set_num_threads(1)  # shared CPU: 2 OpenMP threads competing with other processes are ~10x slower

PROMPTS = iv.DEFAULT_PROMPTS[:4]


@pytest.fixture(scope="module")
def lm():
    return load_causal_lm()


@pytest.fixture(scope="module")
def target(lm):
    model, tok = lm
    E = model.get_input_embeddings().weight.detach()
    wedding = E[tok(" wedding", add_special_tokens=False).input_ids[0]] - E.mean(0)
    other = torch.randn(E.shape[1], generator=torch.Generator().manual_seed(0))
    return iv.SteeringTarget(model, tok, "resid_post.10", torch.stack([other, wedding]))


@pytest.fixture(scope="module")
def record():
    # the scorer only needs the latent index (1 = the wedding direction); records come from the cache in a job
    return word_record(random_sentences(10, ["a", "b"], 4, 0), random_sentences(5, ["c"], 4, 1), ["a"], latent=1)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1]


def test_steer_hookpoints_agree_and_clean_up(lm):
    model, tok = lm
    ids = tok("The weather today is", return_tensors="pt").input_ids
    clean = _logits(model, ids)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    out = {}
    # resid_post.5 == resid_pre.6 (same tensor) == mlp_out.5 (the MLP output is added to the residual)
    for hp in ("resid_post.5", "resid_pre.6", "mlp_out.5", "model.layers.5", "attn_out.5"):
        with steer(model, hp, v, 3.0):
            out[hp] = _logits(model, ids)
    assert torch.allclose(out["resid_post.5"], out["resid_pre.6"], atol=1e-4)
    assert torch.allclose(out["resid_post.5"], out["mlp_out.5"], atol=1e-4)
    assert torch.equal(out["resid_post.5"], out["model.layers.5"])
    assert not torch.allclose(out["attn_out.5"], clean, atol=1e-3)  # tuple output: shifted too
    assert not torch.allclose(out["resid_post.5"], clean, atol=1e-3)
    with steer(model, "resid_post.5", v, 0.0):
        assert torch.equal(_logits(model, ids), clean)
    assert torch.equal(_logits(model, ids), clean)  # hooks removed on exit
    with pytest.raises(ConfigError, match="width"):
        with steer(model, "resid_post.5", torch.ones(7), 1.0):
            _logits(model, ids)
    assert torch.equal(_logits(model, ids), clean)  # removed after an error too


def test_kl_grows_with_strength(target):
    strengths = (0.0, 0.25, 0.5, 1.0, 2.0)
    _, clean = target.run(list(PROMPTS), None, 0.0, 4)
    kls = [iv.kl_divergence(target.run(list(PROMPTS), 1, s, 4)[1], clean).mean().item() for s in strengths]
    assert kls[0] == 0.0
    assert all(b > a for a, b in zip(kls, kls[1:])), kls
    assert 50 < target.norm < 500  # median residual norm at layer 10 of SmolLM2


def _client(srv):
    return make_client("openai", model="judge", base_url=srv.base_url, api_key_env=None, cache_path=None)


def _expected(pairs, judge):
    credit = []
    for p in pairs:
        if p["identical"]:
            credit.append(0.5)
        else:
            answer = judge(p)
            credit.append(float(answer == p["steered"]))
    return float(np.mean(credit))


def test_scorer_accuracy_and_effect(target, record):
    cfg = iv.InterventionConfig(target=target, strengths=(0.0, 0.5, 2.0), prompts=PROMPTS, max_new_tokens=8)
    with start_llm_server(judge="judges_sim:pick_keyword") as srv:
        res = asyncio.run(iv.score(record, "the word wedding", _client(srv), config=cfg, seed=3))
        assert srv.stats()["requests"] == 1  # all 8 pairs in one call
    with start_llm_server(judge="judges_sim:pick_a") as srv:
        res_a = asyncio.run(iv.score(record, "the word wedding", _client(srv), config=cfg, seed=3))
    m = res.metrics
    assert m["kl_s0"] == 0.0 and 0 < m["kl_s0.5"] < m["kl_s2"]
    assert m["n_pairs"] == 8 and m["n_failed"] == 0
    pairs = res.details["pairs"]
    assert all("wedding" in p["a" if p["steered"] == "A" else "b"] for p in pairs if p["strength"] == 2.0)
    assert m["accuracy_s2"] == 1.0
    # the accuracy is what the scripted judges' rules give on the pairs they were shown
    has = lambda s: "wedding" in re.findall(r"[a-z]+", s.lower())  # noqa: E731
    kw = lambda p: "B" if (not has(p["a"]) and has(p["b"])) else "A"  # noqa: E731
    assert m["accuracy"] == pytest.approx(_expected(pairs, kw))
    assert res_a.metrics["accuracy"] == pytest.approx(_expected(res_a.details["pairs"], lambda p: "A"))
    # effect size: the advantage over a coin flip, overall and per strength
    assert m["effect_size"] == pytest.approx(m["accuracy"] - 0.5) and m["effect_size_s2"] == 0.5
    assert res_a.metrics["effect_size"] == pytest.approx(res_a.metrics["accuracy"] - 0.5)
    assert "effect_size_s0" not in m
    # bare directions, no encoder: no activation change, and it says so
    assert m["activation_change"] is None and m["activation_change_s2"] is None
    # same seed, same latent: the same order of the pairs
    assert [p["steered"] for p in res_a.details["pairs"]] == [p["steered"] for p in pairs]
    assert res.usage.calls == 1 and res.prompt_version.startswith("intervention@")


def test_a_judge_without_one_parsable_answer_gives_no_score(target, record):
    """Identical pairs (a strength too small to change the text) are worth chance only beside real judgements:
    when the judge answers nothing usable, the latent is skipped, not scored 0.5."""
    cfg = iv.InterventionConfig(target=target, strengths=(1e-6, 2.0), prompts=PROMPTS[:2], max_new_tokens=6)
    with start_llm_server(judge="judges:nonsense_judge") as srv:
        res = asyncio.run(iv.score(record, "the word wedding", _client(srv), config=cfg, seed=3))
    m = res.metrics
    assert m["n_identical"] == 2 and m["n_failed"] == 2  # s=1e-6 changes nothing; s=2 pairs differ, unanswered
    assert res.skipped == "judge gave no parsable answer" and m["accuracy"] is None and m["effect_size"] is None


def test_target_from_subject_and_dictionary(lm, record):
    from types import SimpleNamespace

    from autointerp.dictionaries import NeuronDictionary
    from autointerp.subject import SubjectModel

    model, tok = lm
    subject = SubjectModel(model, tok, "builtin:smollm2")
    cfg = iv.InterventionConfig(subject=subject, dictionary=NeuronDictionary(576, hookpoint="resid_post.10"))
    t = cfg.get_target()
    assert cfg.get_target() is t and t.hookpoint.module_path == "model.layers.10"
    assert torch.equal(t.direction(3), torch.eye(576)[3])
    _, clean = t.run(["Hello"], None, 0.0, 1)
    assert iv.kl_divergence(t.run(["Hello"], 3, 1.0, 1)[1], clean).item() > 0
    # a transcoder reads its module's input and writes its output: steer the output, whichever side names it
    # and whether the hookpoint comes from the dictionary or is passed (the CLI passes the cache's)
    tc = SimpleNamespace(hookpoint="mlp_in.5", transcoder=True, decoder_directions=lambda: torch.eye(576))
    for passed in (None, "mlp_in.5", "model.layers.5.mlp:input", "mlp_out.5", "layers.5.mlp"):
        t2 = iv.SteeringTarget.from_subject(subject, tc, passed)
        assert (t2.hookpoint.module_path, t2.hookpoint.mode) == ("model.layers.5.mlp", "output"), passed
        assert (t2.read_hookpoint.module_path, t2.read_hookpoint.mode) == ("model.layers.5.mlp", "input"), passed
    # a cache made explicitly at the module's output (extract keeps an explicit ':output'): read where it was made
    t_out = iv.SteeringTarget.from_subject(subject, tc, "model.layers.5.mlp:output")
    assert (t_out.hookpoint.mode, t_out.read_hookpoint.mode) == ("output", "output")
    # the steering really lands on the MLP's output: the same logits as adding the vector to mlp_out.5
    ids = tok("The weather today is", return_tensors="pt").input_ids
    with steer(model, t2.hookpoint, t2.direction(7), 30.0):
        got = _logits(model, ids)
    with steer(model, "mlp_out.5", torch.eye(576)[7], 30.0):
        want = _logits(model, ids)
    with steer(model, "mlp_in.5", torch.eye(576)[7], 30.0):
        at_input = _logits(model, ids)
    assert torch.equal(got, want) and not torch.allclose(got, at_input, atol=1e-3)
    # an SAE (not a transcoder) is steered where it reads, even at a module's input
    sae = SimpleNamespace(hookpoint="mlp_in.5", transcoder=False, decoder_directions=lambda: torch.eye(576))
    t3 = iv.SteeringTarget.from_subject(subject, sae, "mlp_in.5")
    assert (t3.hookpoint.mode, t3.read_hookpoint.mode) == ("input", "input")
    with pytest.raises(ConfigError, match="needs config.target"):
        asyncio.run(iv.score(record, "x", None, config=iv.InterventionConfig()))


def test_activation_change_reads_the_latent_on_steered_text(lm, record):
    """With a dictionary encoder, the scorer reports how much more the latent fires on steered completions than on
    clean ones, read unsteered at the dictionary's hookpoint: checked here against a plain forward pass."""
    from autointerp.dictionaries.base import LinearDictionary

    model, tok = lm
    E = model.get_input_embeddings().weight.detach()
    wedding = E[tok(" wedding", add_special_tokens=False).input_ids[0]] - E.mean(0)
    other = torch.randn(E.shape[1], generator=torch.Generator().manual_seed(0))
    W = torch.nn.functional.normalize(torch.stack([other, wedding]), dim=-1)
    d = LinearDictionary(format="test", source="test", id="test:wedding", hookpoint="resid_post.10",
                         transcoder=False, W_enc=W, b_enc=torch.zeros(2), W_dec=W, b_dec=torch.zeros(576),
                         activation="relu")
    target = iv.SteeringTarget(model, tok, "resid_post.10", d)
    cfg = iv.InterventionConfig(target=target, strengths=(0.0, 2.0), prompts=PROMPTS, max_new_tokens=8)
    with start_llm_server(judge="judges_sim:pick_keyword") as srv:
        res = asyncio.run(iv.score(record, "the word wedding", _client(srv), config=cfg, seed=3))
    m, acts = res.metrics, res.details["activation_per_prompt"]

    def latent_max(prompt, completion):  # independent: hidden_states[11] is the output of layer 10
        p, c = tok(prompt).input_ids, tok(completion, add_special_tokens=False).input_ids
        with torch.no_grad():
            h = model(input_ids=torch.tensor([p + c]), output_hidden_states=True).hidden_states[11][0, len(p):]
        return float(torch.relu(h @ W[1]).max())

    steered = {pr["prompt"]: pr["a" if pr["steered"] == "A" else "b"] for pr in res.details["pairs"]}
    want_clean = [latent_max(p, c) for p, c in zip(PROMPTS, res.details["clean"])]
    want_steered = [latent_max(p, steered[p]) for p in PROMPTS]
    assert acts["clean"] == pytest.approx(want_clean, abs=1e-3) and acts["2"] == pytest.approx(want_steered, abs=1e-3)
    assert acts["0"] == acts["clean"] and "activation_change_s0" not in m  # strength 0 is the clean run
    assert m["activation_change_s2"] == pytest.approx(np.mean(want_steered) - np.mean(want_clean), abs=1e-3)
    assert m["activation_change"] == m["activation_change_s2"] > 0  # steered text is about weddings
    assert m["activation_clean"] == pytest.approx(np.mean(want_clean), abs=1e-3)
    assert res.details["read_hookpoint"] == "resid_post.10"
