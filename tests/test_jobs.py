"""The job seam over a real cache, a real SQLite store and the real local OpenAI-compatible test server:
submit → run (embedded) → rows in the store → export."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
from typer.testing import CliRunner

from autointerp import cli
from autointerp.errors import ConfigError
from autointerp.jobs import JobSpec, parse_job_spec, retry_failed, run, status, submit
from autointerp.jobs.export import export_rows, import_jsonl, read_jsonl, write_jsonl
from autointerp.llm import LLMError, PermanentLLMError
from autointerp.prompt_files import load_prompt, prompts_dir
from autointerp.sampling import SamplingConfig
from autointerp.store import open_store
from llm_server_fixture import start_llm_server

SMALL_SAMPLING = SamplingConfig(n_explain=5, n_test=10, n_negatives=10, n_explain_negatives=0, min_explain=3,
                                min_test=4, min_negatives=4)
FAST_LLM = {"api_key_env": None, "response_cache": False, "max_retries": 1, "backoff_base_s": 0.01}


@pytest.fixture
def cache(small_cache):
    return small_cache


def _spec(cache, latents, srv, model="judge", **kw) -> dict:
    return {"dictionary": str(cache.path), "latents": latents, "explainer_model": f"openai:{model}@{srv.base_url}",
            "sampling": dataclasses.asdict(kw.pop("sampling", SMALL_SAMPLING)), "hard_negatives": False,
            "llm": FAST_LLM, **kw}


def _run(cache, latents, srv, model="judge", **kw):
    store = open_store()
    job_id = submit(store, _spec(cache, latents, srv, model, **kw))
    retry_failed(store, job_id)
    return run(store, job_id, progress=False), list(export_rows(store, job_id=job_id)), job_id


def _total(usages) -> dict:
    u = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}
    for d in usages:
        for k in u:
            u[k] += d.get(k, 0)
    return u


def test_rows_carry_provenance_and_rerun_pays_nothing(cache, store_url):
    latents = [int(i) for i in cache.alive_latents()[:4]]
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        s, rows, job_id = _run(cache, latents, srv)
        calls = srv.stats()["requests"]
        assert s.latents_done + s.latents_skipped == 4 and s.latents_failed == 0 and s.status == "done"
        expl = [r for r in rows if r["type"] == "explanation" and r["text"]]
        scores = [r for r in rows if r["type"] == "score"]
        assert expl
        for r in expl:
            assert r["text"].startswith("fires on")
            assert r["prompt_version"].startswith("explain_default@") and r["model"] == "judge"
            assert r["seed"] == 0 and r["usage"]["calls"] == 1 and r["usage"]["prompt_tokens"] > 0
            assert r["dictionary_id"] == cache.dictionary_id and r["examples_used"]
        assert {r["scorer"] for r in scores} == {"detection", "fuzzing"}
        ids = {r["explanation_id"] for r in expl}
        for r in scores:
            assert r["explanation_id"] in ids and "explanation" not in r  # a reference, not a copy of the text
            assert r["prompt_version"].split("@")[0] in ("detection", "fuzzing")
            assert r["skipped"] or 0.0 <= r["metrics"]["balanced_accuracy"] <= 1.0
        assert calls == s.usage.calls > 0
        per_latent = [r for r in rows if r["type"] == "latent_usage"]
        assert sorted(r["latent"] for r in per_latent) == sorted(latents)
        for u in per_latent:
            mine = [r["usage"] for r in rows if r["type"] in ("explanation", "score") and r["latent"] == u["latent"]]
            assert _total([u["usage"]]) == _total(mine)
            assert set(u["stages"]) <= {"explain", "score:detection", "score:fuzzing"}
        (job,) = [r for r in rows if r["type"] == "job"]
        assert job["usage"]["calls"] == s.usage.calls == sum(u["usage"]["calls"] for u in per_latent)
        assert job["status"] == "done"
        # re-running the same job: the same job, nothing new called or written
        s2, rows2, job2 = _run(cache, latents, srv)
        assert job2 == job_id and srv.stats()["requests"] == calls
        assert s2.latents_already_done == 4 and len(rows2) == len(rows)
        # a new scorer: a new job that reuses the stored explanations (only the new scorer's calls)
        s3, rows3, job3 = _run(cache, latents, srv, scorers=["detection", "fuzzing", "intruder"])
        assert job3 != job_id
        new = [r for r in rows3 if r["type"] == "score" and r["scorer"] == "intruder"]
        assert len(new) == len(expl) and s3.usage.calls == sum(r["usage"]["calls"] for r in new)
        assert srv.stats()["requests"] == calls + s3.usage.calls
        assert len([r for r in rows3 if r["type"] == "explanation"]) == len([r for r in rows if r["type"] == "explanation"])


def test_identity_covers_scorer_options_prompts_and_sampling(cache, tmp_path, store_url):
    """The bug this seam fixes: another batch size, prompt folder or sampling used to report 'already done'."""
    latents = [int(i) for i in cache.alive_latents()[:2]]
    prompts = tmp_path / "prompts"
    shutil.copytree(prompts_dir(), prompts)
    (prompts / "detection.md").write_text((prompts / "detection.md").read_text() + "\nBe careful.\n")
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        base = dict(scorers=["detection"])
        _run(cache, latents, srv, **base)
        n = srv.stats()["requests"]
        for change in ({"scorer_options": {"detection": {"batch_size": 3}}}, {"prompt_dir": str(prompts)},
                       {"sampling": dataclasses.replace(SMALL_SAMPLING, n_test=8)}):
            s, rows, _ = _run(cache, latents, srv, **base, **change)
            assert srv.stats()["requests"] > n, change  # really scored again
            assert s.latents_already_done == 0
            n = srv.stats()["requests"]
    store = open_store()
    scores = store.scores(e["id"] for e in store.explanations())
    # the prompt-dir run stored its own prompt version
    versions = {r["prompt_version"] for r in scores}
    assert load_prompt("detection", {"explanation", "examples", "n"}, prompts).version in versions or \
        any(v.startswith("detection@") for v in versions)
    assert len(versions) >= 2


def test_bad_credentials_stop_the_job_and_record_nothing(cache):
    with start_llm_server(judge="judges:rule_judge", models=["judge"], api_key="sekrit") as srv:
        with pytest.raises(PermanentLLMError, match="bad credentials"):
            _run(cache, [int(i) for i in cache.alive_latents()[:6]], srv)
        assert srv.stats()["requests"] <= 8  # stops at once, no retries
    store = open_store()
    assert not store.explanations() and store.jobs()[0]["status"] == "stopped"
    assert "bad credentials" in store.jobs()[0]["error"]


def test_transient_failures_are_recorded_per_item_and_retried_by_a_rerun(cache, store_url):
    latents = [int(i) for i in cache.alive_latents()[:3]]
    with start_llm_server(judge="judges:rule_judge", models=["judge"], fail_500=1.0) as srv:
        s, rows, job_id = _run(cache, latents, srv)
    assert s.latents_failed == 3 and s.status == "failed"
    st = status(open_store(), job_id)
    assert st.stages["explain"] == {"failed": 3} and all("500" in e["error"] for e in st.errors)
    assert st.spend["calls"] == 0  # nothing answered, nothing paid; the attempts are counted
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        s, rows, job2 = _run(cache, latents, srv)
    assert job2 == job_id and s.latents_done + s.latents_skipped == 3 and s.status == "done"


def test_skipped_latents_are_done_and_say_why(cache):
    latents = [int(i) for i in cache.alive_latents()[:2]]
    never = SamplingConfig(min_explain=10_000)
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        s, rows, _ = _run(cache, latents, srv, sampling=never)
        assert s.latents_skipped == 2 and srv.stats()["requests"] == 0 and s.status == "done"
        skipped = [r for r in rows if r["type"] == "explanation"]
        assert len(skipped) == 2 and "activating windows (need" in skipped[0]["skipped"]
        s, _, _ = _run(cache, latents, srv, sampling=never)
        assert s.latents_already_done == 2


def test_a_failing_scorer_cancels_its_siblings_keeps_what_was_paid_and_counts_the_spend(cache):
    """Fuzzing fails after its retries while detection's calls are in flight: those are cancelled, the latent's
    items fail with the reason, its explanation (paid for) is kept, and its spend is in the job's total."""
    from autointerp.sampling import Skipped, sample_latent

    latents = [int(i) for i in cache.alive_latents()
               if not isinstance(sample_latent(cache.record(int(i)), SMALL_SAMPLING, 0), Skipped)][:2]
    with start_llm_server(judge="judges:failing_fuzzing_judge", models=["judge"]) as srv:
        s, rows, job_id = _run(cache, latents, srv)
        stats = srv.stats()
    assert s.latents_failed == len(latents) and s.latents_done == 0
    assert len([r for r in rows if r["type"] == "explanation" and r["text"]]) == len(latents)  # kept
    assert stats["by_status"].get("500", 0) + stats["by_status"].get(500, 0) >= 2 * len(latents)
    usage_rows = [r for r in rows if r["type"] == "latent_usage"]
    for r in usage_rows:
        assert r["stages"]["score:fuzzing"]["status"] == "failed" and "fuzzing is down" in r["errors"]["score:fuzzing"]
        assert r["stages"]["explain"]["calls"] == 1
    (job,) = [r for r in rows if r["type"] == "job"]
    assert job["usage"]["calls"] == s.usage.calls == sum(r["usage"]["calls"] for r in usage_rows)


def test_hard_negative_embedding_never_runs_on_the_event_loop(cache, monkeypatch):
    """The stall this seam fixes: MiniLM embedding of test windows ran synchronously inside the event loop."""
    from autointerp import sampling

    threads = []
    real = sampling.NegativePool.add

    def spy(self, ids, texts):
        threads.append(threading.current_thread().name)
        return real(self, ids, texts)

    monkeypatch.setattr(sampling.NegativePool, "add", spy)
    latents = [int(i) for i in cache.alive_latents()[:3]]
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        spec = _spec(cache, latents, srv, scorers=["detection"])
        spec["hard_negatives"] = True
        store = open_store()
        job_id = submit(store, spec)
        s = run(store, job_id, progress=False)
    assert s.latents_failed == 0 and threads
    loop_thread = [t for t in threads if not t.startswith("autointerp-embed")]
    # the pool itself is embedded once before the loop starts (MainThread); every later add is off the loop
    assert loop_thread.count("MainThread") <= 1 and all(t == "MainThread" for t in loop_thread)
    assert any(t.startswith("autointerp-embed") for t in threads)
    # saved beside the cache: a second job does not embed the pool again
    assert list(cache.path.glob("pool_emb-*.npz"))


def test_budget_stops_scheduling_and_resume_continues(cache):
    latents = [int(i) for i in cache.alive_latents()[:6]]
    prices = {"judge": {"prompt": 1000.0, "completion": 1000.0}}
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prices, f)
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        spec = _spec(cache, latents, srv, scorers=["detection"], concurrency=1, budget_usd=0.01,
                     llm={**FAST_LLM, "prices": f.name})
        store = open_store()
        job_id = submit(store, spec)
        s = run(store, job_id, progress=False)
        assert s.status == "budget_exhausted" and 1 <= s.latents_done + s.latents_skipped < 6
        from autointerp.jobs import resume

        resume(store, job_id, budget_usd=1e9)
        s2 = run(store, job_id, progress=False)
        assert s2.status == "done"
        st = status(store, job_id)
        assert st.latents_finished == 6 and st.spend["cost_usd"] > 0.01


def test_bad_specs_are_rejected_with_one_line_and_nothing_queued(cache, tmp_path):
    store = open_store()
    bad = [({"dictionary": str(cache.path), "scorers": ["nope"]}, "unknown scorer 'nope'"),
           ({"dictionary": str(cache.path), "explainer": "nope"}, "unknown explainer 'nope'"),
           ({"dictionary": str(cache.path), "budget_usd": -1}, "budget_usd"),
           ({"dictionary": str(cache.path), "explainer_model": "grpc:x"}, "LLM spec 'grpc:x'"),
           ({"dictionary": str(cache.path), "latents": "0-999999"}, "out of range"),
           ({"dictionary": str(cache.path), "latents": "5-1"}, "reversed"),
           ({"dictionary": "no-such-dictionary"}, "unknown dictionary 'no-such-dictionary'"),
           ({"dictionary": str(tmp_path)}, "not a latent cache"),
           ({"dictionary": str(cache.path), "stages": ["x"]}, "stages"),
           ({"dictionary": str(cache.path), "scorer_options": {"detection": {"nope": 1}}}, "unknown option")]
    for spec, msg in bad:
        with pytest.raises(ConfigError, match=re.escape(msg)) as e:
            submit(store, spec)
        assert "\n" not in str(e.value)
    assert store.jobs() == []


def test_cli_interpret_exports_and_reports(cache, tmp_path):
    env = {**os.environ, "OPENAI_API_KEY": "x"}
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        r = subprocess.run([sys.executable, "-m", "autointerp.cli", "interpret", str(cache.path), "--n-latents", "3",
                            "--explainer-model", f"openai:judge@{srv.base_url}", "--scorers", "detection",
                            "--out", str(tmp_path / "o.jsonl"), "--no-progress", "--no-hard-negatives"],
                           capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(tmp_path / "o.jsonl")
    scores = [x for x in rows if x["type"] == "score"]
    assert {x["scorer"] for x in scores} == {"detection"}
    assert len([x for x in rows if x["type"] == "latent_usage"]) == 3
    done, _, skipped, failed = map(int, re.search(r"(\d+) latents done, (\d+) already done, (\d+) skipped, "
                                                  r"(\d+) failed", r.stdout).groups())
    assert done + skipped == 3 and failed == 0
    vals = [x["metrics"]["balanced_accuracy"] for x in scores if not x["skipped"]]
    line = next(ln.split() for ln in r.stdout.splitlines() if ln.split()[:2] == ["detection", "balanced_accuracy"])
    assert int(line[2]) == len(vals) > 0 and float(line[3]) == pytest.approx(sum(vals) / len(vals), abs=5e-4)
    bad = subprocess.run([sys.executable, "-m", "autointerp.cli", "interpret", str(cache.path), "--scorers", "nope"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown scorer 'nope'" in bad.stderr and bad.stderr.count("\n") == 1
    # an unreachable server fails every latent: exit 1, never 0
    fresh = ",".join(str(int(i)) for i in cache.alive_latents()[5:7])  # not explained above
    r = subprocess.run([sys.executable, "-m", "autointerp.cli", "interpret", str(cache.path), "--latents", fresh,
                        "--explainer-model", "openai:judge@http://127.0.0.1:9/v1", "--scorers", "detection",
                        "--no-progress", "--no-hard-negatives", "--llm-retries", "0", "--llm-timeout", "2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "ended failed" in r.stderr, (r.stdout, r.stderr)


def test_export_import_round_trip(cache, tmp_path):
    latents = [int(i) for i in cache.alive_latents()[:3]]
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        _, rows, _ = _run(cache, latents, srv, scorers=["detection"])
    path = tmp_path / "r.jsonl"
    write_jsonl(rows, path)
    os.environ["AUTOINTERP_DATABASE_URL"] = f"sqlite:///{tmp_path / 'other.db'}"
    other = open_store()
    with pytest.raises(ConfigError, match="is not in the store"):
        import_jsonl(other, path)
    counts = import_jsonl(other, path, str(cache.path))
    assert counts == {"explanations": 3, "scores": len([r for r in rows if r["type"] == "score"])}
    again = import_jsonl(other, path, str(cache.path))  # nothing twice
    assert len(other.explanations()) == 3 and again == counts
    texts = sorted(r["text"] or "" for r in rows if r["type"] == "explanation")
    assert sorted(e["text"] or "" for e in other.explanations()) == texts
    # a malformed line names its number and writes nothing
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"type": "expl\n')
    os.environ["AUTOINTERP_DATABASE_URL"] = f"sqlite:///{tmp_path / 'third.db'}"
    third = open_store()
    with pytest.raises(ConfigError, match=rf"bad.jsonl:{len(rows) + 1}: not a JSON object"):
        import_jsonl(third, bad, str(cache.path))
    assert third.explanations() == []


def test_spec_is_data():
    spec = JobSpec(dictionary="d", scorers=["detection"], scorer_options={"detection": {"batch_size": 5}})
    again = parse_job_spec(spec.model_dump_json())
    assert again == spec
    with pytest.raises(ConfigError, match="job spec field concurrency"):
        parse_job_spec({"dictionary": "d", "concurrency": 0})


def test_a_sampling_option_updates_the_jobs_sampling_not_the_default():
    from autointerp.jobs.scoring import scorer_config

    spec = JobSpec(dictionary="d", sampling={"n_test": 7, "n_negatives": 9}, scorers=["detection", "fuzzing"],
                   scorer_options={"detection": {"sampling": {"n_negatives": 3}}})
    _, det = scorer_config("detection", spec, None, {})
    _, fuzz = scorer_config("fuzzing", spec, None, {})
    assert (det.sampling.n_test, det.sampling.n_negatives) == (7, 3)
    assert (fuzz.sampling.n_test, fuzz.sampling.n_negatives) == (7, 9)


def test_gather_or_cancel_cancels_the_rest_and_raises_the_error_itself():
    from autointerp.aio import gather_or_cancel

    state = {"finished": False, "cancelled": False}

    async def fails():
        await asyncio.sleep(0.01)
        raise LLMError("boom")

    async def slow():
        try:
            await asyncio.sleep(5)
            state["finished"] = True
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    async def ok(v):
        return v

    with pytest.raises(LLMError, match="boom"):
        asyncio.run(gather_or_cancel(slow(), fails()))
    assert state == {"finished": False, "cancelled": True}
    assert asyncio.run(gather_or_cancel(ok(1), ok(2), ok(3))) == [1, 2, 3]




def _prompt_copy(tmp_path, edit: dict[str, tuple[str, str]]):
    """A copy of the packaged prompts with `name: (old, new)` replacements."""
    d = tmp_path / "prompts"
    shutil.copytree(prompts_dir(), d)
    for name, (old, new) in edit.items():
        text = (d / f"{name}.md").read_text()
        assert old in text
        (d / f"{name}.md").write_text(text.replace(old, new))
    return d


def test_broken_template_fails_at_submit_with_nothing_queued(cache, tmp_path):
    bad = _prompt_copy(tmp_path, {"fuzzing": ("Explanation: ${explanation}", "Explanation:")})
    latents = [int(i) for i in cache.alive_latents()[:3]]
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        with pytest.raises(ConfigError, match=r"fuzzing.md: missing variable\(s\) \$\{explanation\}"):
            _run(cache, latents, srv, prompt_dir=str(bad))
        bad_expl = _prompt_copy(tmp_path / "e", {"explain_default": ("${examples}", "")})
        with pytest.raises(ConfigError, match="explain_default.md"):
            _run(cache, latents, srv, prompt_dir=str(bad_expl))
        assert srv.stats()["requests"] == 0
        r = CliRunner().invoke(cli.app, ["interpret", str(cache.path), "--n-latents", "2", "--explainer-model",
                                         f"openai:judge@{srv.base_url}", "--scorers", "detection,fuzzing",
                                         "--no-progress", "--no-hard-negatives", "--prompt-dir", str(bad)],
                               env={"OPENAI_API_KEY": "x"})
        assert r.exit_code == 2 and srv.stats()["requests"] == 0
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: prompt ") and "fuzzing.md" in r.stderr
    assert open_store().jobs() == []


def test_unknown_model_stops_the_job_with_one_error(cache):
    latents = [int(i) for i in cache.alive_latents()[:6]]
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        with pytest.raises(PermanentLLMError, match="'nope' not found"):
            _run(cache, latents, srv, model="nope", concurrency=2)
        assert srv.stats()["by_status"] == {"404": srv.stats()["requests"]} and srv.stats()["requests"] <= 2
        r = CliRunner().invoke(cli.app, ["interpret", str(cache.path), "--n-latents", "3", "--explainer-model",
                                         f"openai:nope@{srv.base_url}", "--scorers", "detection",
                                         "--no-progress", "--no-hard-negatives"], env={"OPENAI_API_KEY": "x"})
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: model 'nope' not found at " + srv.base_url)
    store = open_store()
    assert not [e for e in store.explanations() if e["text"]]
    assert all(j["status"] == "stopped" and "PermanentLLMError" in j["error"] for j in store.jobs())


def test_cli_scorer_options(cache):
    from autointerp.sampling import Skipped, sample_latent

    latent = next(int(i) for i in cache.alive_latents()
                  if not isinstance(sample_latent(cache.record(int(i)), SamplingConfig(), 0), Skipped))
    base = ["interpret", str(cache.path), "--latents", str(latent), "--no-progress", "--no-hard-negatives"]
    runner = CliRunner()
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        model = ["--explainer-model", f"openai:judge@{srv.base_url}"]
        bad = [(["-o", "detection.batchsize=5"], "scorer detection: unknown option(s) batchsize"),
               (["-o", "detection.batch_size=five"], "scorer option detection.batch_size: expected int"),
               (["-o", "fuzzing.batch_size=5"], "scorer option for 'fuzzing', which is not among the scorers"),
               (["-o", "detection"], "expected SCORER.FIELD=VALUE")]
        for args, msg in bad:
            r = runner.invoke(cli.app, base + model + ["--scorers", "detection"] + args, env={"OPENAI_API_KEY": "x"})
            assert r.exit_code == 2 and r.stderr.startswith("error: ") and msg in r.stderr, r.output
            assert r.stderr.count("\n") == 1
        assert srv.stats()["requests"] == 0 and open_store().jobs() == []
        r = runner.invoke(cli.app, base + model + ["--scorers", "detection,fuzzing,intruder", "--batch-size", "7",
                                                   "-o", "intruder.n_trials=2"], env={"OPENAI_API_KEY": "x"})
        assert r.exit_code == 0, r.output
    rows = list(export_rows(open_store()))
    scores = {r["scorer"]: r for r in rows if r["type"] == "score"}
    assert set(scores) == {"detection", "fuzzing", "intruder"}
    for name in ("detection", "fuzzing"):
        if not scores[name]["skipped"]:
            assert scores[name]["details"]["n_calls"] == -(-scores[name]["metrics"]["n"] // 7), name
    assert scores["detection"]["skipped"] is None
    if not scores["intruder"]["skipped"]:
        assert scores["intruder"]["details"]["n_calls"] == 2


def test_cli_table_shows_the_judge_of_this_run(cache):
    latents = ",".join(str(int(i)) for i in cache.alive_latents()[:3])
    runner = CliRunner()

    def go(srv, judge):
        r = runner.invoke(cli.app, ["interpret", str(cache.path), "--latents", latents, "--no-progress",
                                    "--no-hard-negatives", "--scorers", "detection",
                                    "--explainer-model", f"openai:rule@{srv.base_url}",
                                    "--judge-model", f"openai:{judge}@{srv.base_url}"], env={"OPENAI_API_KEY": "x"})
        assert r.exit_code == 0, r.output
        line = next(ln for ln in r.stdout.splitlines() if ln.split()[:2] == ["detection", "balanced_accuracy"])
        return float(line.split()[3])

    with start_llm_server(judge="judges:by_model_judge") as srv:
        careful = go(srv, "careful")
        careless = go(srv, "careless")
        assert careless == pytest.approx(0.5) and careful != pytest.approx(careless)
        n = srv.stats()["requests"]
        assert go(srv, "careful") == careful
        assert srv.stats()["requests"] == n


def test_surprisal_and_intervention_in_a_job(cache, tmp_path):
    """The job loads what these scorers run (the subject model, a steering target at the cache's hookpoint) itself,
    and both read templates from the job's prompt dir."""
    import torch

    torch.set_num_threads(1)
    prompts = _prompt_copy(tmp_path, {"surprisal": ("The feature is described", "The feature is explained"),
                                      "intervention": ("We are studying", "We study")})
    latent = int(cache.alive_latents()[0])
    opts = {"intervention": {"strengths": [1.0], "prompts": ["I think that", "My favorite"], "max_new_tokens": 4}}
    with start_llm_server(judge="judges:rule_judge") as expl_srv, \
            start_llm_server(judge="judges_sim:pick_a") as judge_srv:
        s, rows, _ = _run(cache, [latent], expl_srv, scorers=["surprisal", "intervention"], scorer_options=opts,
                          prompt_dir=str(prompts), judge_model=f"openai:judge@{judge_srv.base_url}")
        assert judge_srv.stats()["requests"] == 1 and expl_srv.stats()["requests"] == 1
    assert s.latents_done == 1 and s.latents_failed == 0
    by = {r.get("scorer", r["type"]): r for r in rows}
    sp, iv = by["surprisal"], by["intervention"]
    assert sp["skipped"] is None and 0.0 <= sp["metrics"]["auc"] <= 1.0 and sp["metrics"]["n_activating"] > 0
    assert sp["prompt_version"] == load_prompt("surprisal", {"explanation"}, prompts).version
    assert iv["prompt_version"] == load_prompt("intervention", {"explanation", "pairs"}, prompts).version
    assert iv["details"]["hookpoint"] == iv["details"]["read_hookpoint"] == cache.manifest["hookpoint"]
    m = iv["metrics"]
    assert iv["skipped"] is None and m["n_pairs"] == 2 and m["accuracy"] is not None
    assert m["effect_size"] == pytest.approx(m["accuracy"] - 0.5)
    lu = by["latent_usage"]
    assert lu["usage"]["calls"] == by["explanation"]["usage"]["calls"] + iv["usage"]["calls"]


@pytest.mark.slow
def test_end_to_end_with_the_real_local_model(cache):
    """explain → detection on the real in-process SmolLM2: the judge decodes under the 0/1-list grammar, so a 135M
    model that would break the answer format in free text still judges every example, with P(1) (hence an AUC)."""
    latent = int(cache.alive_latents()[0])
    store = open_store()
    job_id = submit(store, {"dictionary": str(cache.path), "latents": [latent], "explainer_model": "local",
                            "scorers": ["detection"], "hard_negatives": False,
                            "sampling": dataclasses.asdict(SMALL_SAMPLING), "llm": {"response_cache": False}})
    s = run(store, job_id, progress=False)
    assert s.latents_failed == 0 and s.usage.calls >= 2 and s.usage.cost_usd == 0
    rows = list(export_rows(store, job_id=job_id))
    expl = [r for r in rows if r["type"] == "explanation"][0]
    assert expl["text"] and expl["model"] and expl["usage"]["completion_tokens"] > 0
    det = [r for r in rows if r["type"] == "score"][0]
    m, examples = det["metrics"], det["details"]["examples"]
    assert det["skipped"] is None and m["n"] == len(examples) > 0
    assert m["n_failed"] == sum(e["pred"] is None for e in examples) == 0
    assert 0.0 <= m["balanced_accuracy"] <= 1.0 and 0.0 <= m["auc"] <= 1.0


def test_identity_holds_display_windows_and_scorer_defaults(monkeypatch):
    """Display windows change what the explainer and the judges see: another display_ctx is another explanation
    and score. A scorer default (e.g. detection's batch size) is in the identity as the value it has, so a changed
    default never reads as 'already done', and spelling out the default changes nothing."""
    from autointerp.jobs.spec import digest, explain_identity, score_identity
    from autointerp.scorers import detection

    def keys(**kw):
        spec = JobSpec(dictionary="d", scorers=["detection", "fuzzing"], **kw)
        ek = digest(explain_identity(spec, "dict-key"))
        return ek, {s: digest(score_identity(spec, s, ek)) for s in spec.scorers}

    base = keys()
    assert SamplingConfig().display_ctx == 32
    other = keys(sampling={"display_ctx": 0})
    assert other[0] != base[0] and other[1]["detection"] != base[1]["detection"]
    assert keys(scorer_options={"detection": {"batch_size": detection.DetectionConfig().batch_size}}) == base

    @dataclasses.dataclass(frozen=True)
    class OtherDefault(detection.DetectionConfig):
        batch_size: int = 7

    monkeypatch.setattr(detection, "Config", OtherDefault)
    changed = keys()
    assert changed[0] == base[0] and changed[1]["detection"] != base[1]["detection"]
    assert changed[1]["fuzzing"] == base[1]["fuzzing"]


def test_job_context_decodes_each_token_id_once():
    from autointerp.tokens import TokenDecoder

    class Tok:
        calls = 0

        def decode(self, ids):
            Tok.calls += 1
            return f"<{ids[0]}>"

    decode = TokenDecoder(Tok())
    assert decode([5, 7, 5]) == ["<5>", "<7>", "<5>"] and decode([7, 7]) == ["<7>", "<7>"]
    assert Tok.calls == 2
