"""A job from model + dictionary + corpus to detection scores: the extraction is the job's first stage (shards on
the gpu queue, an exact merge, examples in the store), run by the embedded runner and by Celery workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llm_server_fixture import start_llm_server
from sqlalchemy import select
from test_workers import _held_by, _wait, redis_server, workers  # noqa: F401 (fixtures)

from autointerp.errors import ConfigError
from autointerp.extract import extract
from autointerp.jobs import run, status, submit
from autointerp.store import open_store
from autointerp.store.store import T_EXPL, T_ITEM, T_LATENT, T_SCORE

SMALL_SAMPLING = dict(n_explain=5, n_test=10, n_negatives=10, n_explain_negatives=0, min_explain=3, min_test=4,
                      min_negatives=4)
FAST_LLM = {"api_key_env": None, "response_cache": False, "max_retries": 1, "backoff_base_s": 0.01}
EXTRACTION = dict(model="builtin:smollm2", dictionary="topk-neurons:8", hookpoint="mlp_neurons.2", corpus="builtin",
                  n_tokens=3072, ctx_len=32, batch_size=16, top_k=12, n_sample=12, pool_size=40, seed=1, shards=3)


def _spec(srv, **kw) -> dict:
    return {"extraction": {**EXTRACTION, **kw.pop("extraction", {})}, "n_latents": 6, "explainer": "token_frequency",
            "explainer_model": f"openai:judge@{srv.base_url}", "scorers": ["detection"], "sampling": SMALL_SAMPLING,
            "hard_negatives": False, "llm": FAST_LLM, **kw}


def results(store, job_id: int) -> dict:
    """What a job produced, comparable across runs and stores: latent statistics, examples, explanations, scores."""
    d = store.dictionary(store.job(job_id)["dictionary_pk"])
    with store.tx() as c:
        lat = [tuple(r) for r in c.execute(select(T_LATENT.c.index, T_LATENT.c.n_active, T_LATENT.c.max_act,
                                                  T_LATENT.c.mean_act).where(T_LATENT.c.dictionary_pk == d["id"])
                                           .order_by(T_LATENT.c.index))]
        expl = {r.latent: (r.id, r.text) for r in c.execute(select(T_EXPL).where(T_EXPL.c.dictionary_pk == d["id"]))}
        by_id = {v[0]: k for k, v in expl.items()}
        scores = sorted((by_id[r.explanation_id], r.scorer, r.value, r.skipped) for r in c.execute(
            select(T_SCORE).where(T_SCORE.c.explanation_id.in_(list(by_id)))))
    from autointerp.store.examples import StoredCache

    ex = StoredCache(store, d)
    examples = {i: [ex.kept(b, i) for b in ("top", "sample")] for i in sorted(expl)}
    return {"latents": lat, "explanations": sorted((k, v[1]) for k, v in expl.items()), "scores": scores,
            "examples": {i: [(r.tolist(), a.round(6).tolist()) for r, a in v] for i, v in examples.items()},
            "n_tokens": d["n_tokens"]}


def test_an_extraction_job_runs_embedded_reuses_its_extraction_and_equals_the_cli(subject, tmp_path):
    store = open_store()
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        job_id = submit(store, _spec(srv))
        assert store.job(job_id)["dictionary_pk"] is None
        st = status(store, job_id)
        assert st.extraction["shards"] == 3 and st.extraction["shards_done"] == 0 and st.latents == 0
        summary = run(store, job_id, progress=False)
        assert summary.status == "done" and summary.latents_failed == 0
        assert summary.latents_done + summary.latents_skipped == 6
        st = status(store, job_id)
        assert st.extraction["shards_done"] == 3 and st.extraction["merged"]
        assert st.extraction["tokens"] == EXTRACTION["n_tokens"] and st.extraction["tokens_per_s"] > 0
        d = store.dictionary(store.job(job_id)["dictionary_pk"])
        assert d["examples_in_store"] and d["cache_path"] is None and d["n_tokens"] == EXTRACTION["n_tokens"]
        with store.tx() as c:
            assert not c.execute(select(T_ITEM).where(T_ITEM.c.job_id == job_id, T_ITEM.c.status != "done",
                                                      T_ITEM.c.status != "skipped")).first()
            from autointerp.store.tables import Blob

            assert c.execute(select(Blob.__table__.c.key)).scalars().all() == [f"examples/{d['id']}/pool"]
        first = results(store, job_id)
        assert first["scores"] and all(s[1] == "detection" for s in first["scores"])
        # the same spec again: the same job; another scorer: a new job on the stored extraction (no shard runs)
        assert submit(store, _spec(srv)) == job_id
        again = submit(store, _spec(srv, scorers=["detection", "intruder"], extraction={"shards": 5}))
        assert again != job_id and store.job(again)["dictionary_pk"] == d["id"]
        assert status(store, again).extraction is None
        assert run(store, again, progress=False).status == "done"
    # the CLI's one-process extraction of the same settings gives the same statistics as the sharded job
    kw = {k: v for k, v in EXTRACTION.items() if k not in ("model", "dictionary", "hookpoint", "corpus", "shards")}
    (cache,) = extract(subject, "topk-neurons:8", "mlp_neurons.2", "builtin", tmp_path / "cli", progress=False, **kw)
    n_active = np.array([r[1] for r in first["latents"]])
    assert np.array_equal(n_active, cache.stats["n_active"])
    assert np.allclose([r[2] for r in first["latents"]], cache.stats["act_max"], rtol=0, atol=0)
    for latent, bufs in first["examples"].items():
        for (rows, acts), buf in zip(bufs, ("top", "sample")):
            crows, cacts = cache.kept(buf, latent)
            assert np.allclose(np.asarray(acts), cacts.round(6)), (latent, buf)


def test_a_bad_extraction_spec_is_refused_at_submit_and_a_failing_shard_stops_the_job(tmp_path):
    store = open_store()
    with pytest.raises(ConfigError, match="extraction.corpus .*no such file"):
        submit(store, {"extraction": {**EXTRACTION, "corpus": str(tmp_path / "missing.txt")}, "explainer":
                       "token_frequency", "scorers": ["embedding"]})
    with pytest.raises(ConfigError, match="either dictionary .* or extraction"):
        submit(store, {"dictionary": "x", "extraction": EXTRACTION})
    with pytest.raises(ConfigError, match="extraction.n_tokens"):
        submit(store, {"extraction": {**EXTRACTION, "n_tokens": 0}})
    assert store.jobs() == []
    # a hookpoint the model does not have: found by the shard, which fails; the job stops with the reason
    job_id = submit(store, {"extraction": {**EXTRACTION, "hookpoint": "mlp_neurons.99"}, "explainer": "token_frequency",
                            "scorers": ["embedding"], "hard_negatives": False})
    with pytest.raises(ConfigError, match="mlp_neurons.99"):
        run(store, job_id, progress=False)
    job = store.job(job_id)
    assert job["status"] == "stopped" and "mlp_neurons.99" in job["error"]
    assert status(store, job_id).extraction["per_shard"][0]["status"] == "failed"


def test_celery_workers_give_what_the_embedded_runner_gives_and_survive_kill_9_of_a_gpu_worker(store_url, tmp_path,
                                                                                              workers):
    """Two workers on gpu,llm,cpu run the same spec as the embedded runner (an SQLite store beside); one is killed
    with SIGKILL while it holds a shard: the shard is leased again, nothing is counted twice, the results are equal —
    on SQLite and on PostgreSQL."""
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        embedded = open_store(f"sqlite:///{tmp_path / 'embedded.db'}")
        ref = embedded_job = submit(embedded, _spec(srv))
        assert run(embedded, embedded_job, progress=False).status == "done"
        expected = results(embedded, ref)

        store = open_store()
        job_id = submit(store, _spec(srv))
        victim = workers.start("--queues", "gpu,llm,cpu")
        _wait(lambda: _held_by(store, job_id, victim), 120, "the first worker to lease a shard", workers)
        workers.kill9(victim)
        workers.start("--queues", "gpu,llm,cpu")
        workers.start("--queues", "gpu,llm,cpu")
        _wait(lambda: store.job(job_id)["status"] in ("done", "failed", "stopped"), 300, "the job to finish", workers)
        assert store.job(job_id)["status"] == "done", (store.job(job_id)["error"], workers.logs())
        shards = store.unit_items(job_id, ("extract",))
        assert [s["status"] for s in shards] == ["done"] * 3 and max(s["attempts"] for s in shards) >= 2
        got = results(store, job_id)
    assert got == expected


def test_job_status_prints_the_shards(tmp_path):
    """`autointerp job status` of an extraction job names its shards and their tokens before anything ran."""
    from typer.testing import CliRunner

    from autointerp import cli

    store = open_store()
    job_id = submit(store, {"extraction": {**EXTRACTION, "shards": 2}, "explainer": "token_frequency",
                            "scorers": ["embedding"], "hard_negatives": False})
    r = CliRunner().invoke(cli.app, ["job", "status", str(job_id)])
    assert r.exit_code == 0, r.output
    assert "extraction: 0/2 shards, 0 tokens" in r.output
    assert "shard 1   pending           0/1,536 tokens" in r.output


def test_one_pass_extracts_several_dictionaries_and_a_later_job_reuses_a_member():
    store = open_store()
    ex = {**EXTRACTION, "shards": 2, "also": ["topk-neurons:4"], "names": ["k8", "k4"]}
    job_id = submit(store, {"extraction": ex, "n_latents": 4, "explainer": "token_frequency", "scorers": [],
                            "hard_negatives": False})
    assert run(store, job_id, progress=False).status == "done"
    k8, k4 = store.dictionary("k8"), store.dictionary("k4")
    assert store.job(job_id)["dictionary_pk"] == k8["id"]
    assert k4["examples_in_store"] and k4["n_tokens"] == k8["n_tokens"] == EXTRACTION["n_tokens"]
    assert k4["n_alive"] <= k8["n_alive"]  # top-4 of the same neurons fire on a subset of top-8's tokens
    # a single-dictionary job on the member's settings starts at its latents: nothing extracted again
    member = {**EXTRACTION, "dictionary": "topk-neurons:4"}
    again = submit(store, {"extraction": member, "n_latents": 4, "explainer": "token_frequency", "scorers": [],
                           "hard_negatives": False})
    assert store.job(again)["dictionary_pk"] == k4["id"] and status(store, again).extraction is None
    assert run(store, again, progress=False).status == "done"


def test_the_api_takes_an_extraction_spec_and_its_job_page_shows_the_shards():
    """POST /api/v1/jobs with `extraction` (left to workers), then its status JSON and the job page."""
    from api_support import ApiServer, http

    store = open_store()
    key = "k" * 32
    store.create_api_key("t", key)
    spec = {"extraction": {**EXTRACTION, "shards": 2}, "explainer": "token_frequency", "scorers": ["embedding"],
            "hard_negatives": False}
    with ApiServer(store=store) as srv:
        code, _, body = http("POST", f"{srv.url}/api/v1/jobs?run=false", spec, {"X-API-Key": key})
        assert code == 201, body
        job_id = body["job_id"]
        assert body["status"]["extraction"]["shards"] == 2 and not body["running_here"]
        code, _, page = http("GET", f"{srv.url}/jobs/{job_id}")
        assert code == 200 and b"extraction: 0 / 2 shards" in page
        code, _, err = http("POST", f"{srv.url}/api/v1/jobs?run=false", {**spec, "dictionary": "x"},
                            {"X-API-Key": key})
        assert code == 422 and "either dictionary" in json.dumps(err)


def test_worker_processes_share_the_cores():
    """`autointerp worker --concurrency N` gives each pool process cores / N torch threads (oversubscribed workers
    ran a sharded extraction slower than one process), unless OMP_NUM_THREADS says otherwise."""
    from autointerp.cli import worker_threads

    assert worker_threads(2, 2, "prefork", {}) == 1 and worker_threads(16, 4, "prefork", {}) == 4
    assert worker_threads(2, 8, "prefork", {}) == 1
    assert worker_threads(16, 2, "prefork", {"OMP_NUM_THREADS": "3"}) is None
    assert worker_threads(16, 2, "solo", {}) is None and worker_threads(16, 2, "threads", {}) is None
