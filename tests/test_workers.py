"""Jobs on Celery workers, with real parts: a real Redis (our own redis-server on a free port, so it can be
restarted), real RabbitMQ when it runs here, real worker processes (`autointerp worker`), a real SQLite store and the
local OpenAI-compatible test server with failure injection.

Cheap settings keep it fast: the token-frequency explainer (no LLM call) + the detection scorer (one judge call per
latent at SMALL_SAMPLING), no hard negatives, short leases (AUTOINTERP_LEASE_S) so a killed worker's latents come
back in seconds; the broker's visibility timeout stays at its hour: recovery must not depend on it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from autointerp.jobs import status, submit
from autointerp.store import open_store
from autointerp.store.store import T_EXPL, T_ITEM, T_SCORE
from llm_server_fixture import start_llm_server
from needs import need

SMALL_SAMPLING = dict(n_explain=5, n_test=10, n_negatives=10, n_explain_negatives=0, min_explain=3, min_test=4,
                      min_negatives=4)
FAST_LLM = {"api_key_env": None, "response_cache": False, "max_retries": 1, "backoff_base_s": 0.01}
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Our own redis-server (nothing on disk, like the deployment's), restartable on its port."""

    def __init__(self, tmp: Path):
        need(shutil.which("redis-server") is not None, "redis-server (apt-get install redis-server; scripts/test.sh does)")
        self.port = _free_port()
        self.tmp = tmp
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.kill()


def _rabbitmq_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=0.5).close()
        return True
    except OSError:
        return False


class Workers:
    """`autointerp worker` processes, each in its own process group (kill -9 takes the pool's children too)."""

    def __init__(self, tmp: Path, env: dict):
        self.tmp, self.env, self.procs = tmp, env, []

    def start(self, *args: str, **env) -> subprocess.Popen:
        log = open(self.tmp / f"worker{len(self.procs)}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "autointerp.cli", "worker", "--loglevel", "INFO", *args],
                             env={**self.env, **{k: str(v) for k, v in env.items()}}, cwd=str(REPO),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        p.log_path = log.name
        self.procs.append(p)
        return p

    @staticmethod
    def kill9(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill9(p)

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path}\n" + Path(p.log_path).read_text(errors="replace")[-3000:]
                         for p in self.procs)


@pytest.fixture
def workers(tmp_path, redis_server):
    env = {**os.environ, "AUTOINTERP_BROKER_URL": redis_server.url, "AUTOINTERP_LEASE_S": "3",
           "AUTOINTERP_SWEEP_S": "0.5", "AUTOINTERP_QUEUE_PREFIX": f"t{uuid.uuid4().hex[:8]}.",
           "AUTOINTERP_TASK_LATENTS": "32", "PYTHONPATH": str(REPO)}
    w = Workers(tmp_path, env)
    yield w
    w.stop_all()


def _spec(cache, latents, srv, **kw) -> dict:
    return {"dictionary": str(cache.path), "latents": latents, "explainer": "token_frequency",
            "explainer_model": f"openai:judge@{srv.base_url}", "scorers": ["detection"],
            "sampling": SMALL_SAMPLING, "hard_negatives": False, "llm": FAST_LLM, **kw}


def _wait(pred, timeout: float, what: str, workers: Workers | None = None, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}"
                         + (f"\n{workers.logs()}" if workers else ""))


def _finished(store, job_id) -> int:
    with store.tx() as c:
        return int(c.execute(select(func.count()).where(T_ITEM.c.job_id == job_id,
                                                        T_ITEM.c.status.in_(("done", "skipped", "failed")))
                             .select_from(T_ITEM)).scalar_one())


def _assert_exactly_once(store, job_id, latents):
    """One explanation row per latent, one score row per explanation and scorer; every item finished."""
    d = store.dictionary(store.job(job_id)["dictionary_pk"])
    with store.tx() as c:
        expl = c.execute(select(T_EXPL.c.id, T_EXPL.c.latent, T_EXPL.c.text)
                         .where(T_EXPL.c.dictionary_pk == d["id"], T_EXPL.c.latent.in_(latents))).all()
        scores = c.execute(select(T_SCORE.c.explanation_id, T_SCORE.c.scorer)
                           .where(T_SCORE.c.explanation_id.in_([e.id for e in expl]))).all()
        items = c.execute(select(T_ITEM.c.latent, T_ITEM.c.stage, T_ITEM.c.status, T_ITEM.c.attempts)
                          .where(T_ITEM.c.job_id == job_id)).all()
    per_latent = Counter(e.latent for e in expl)
    assert sorted(per_latent) == sorted(latents) and set(per_latent.values()) == {1}, "explanations not once"
    per_score = Counter(scores)
    assert not per_score or set(per_score.values()) == {1}, "a score row twice"
    with_text = {e.id for e in expl if e.text}
    assert {s.explanation_id for s in scores} == with_text  # every explained latent scored, once
    assert all(i.status in ("done", "skipped") for i in items), Counter(i.status for i in items)
    return items


def _held_by(store, job_id: int, p: subprocess.Popen) -> int:
    """Items leased by the processes of `p`'s group (worker names are host:pid:…)."""
    def in_group(name: str) -> bool:
        try:
            return os.getpgid(int(name.split(":")[1])) == p.pid
        except (ProcessLookupError, IndexError, ValueError):
            return False
    with store.tx() as c:
        names = c.execute(select(T_ITEM.c.worker).where(T_ITEM.c.job_id == job_id, T_ITEM.c.status == "running")
                          ).scalars().all()
    return sum(in_group(n) for n in names if n)


def test_a_1000_latent_job_survives_kill_9_of_a_worker_and_a_broker_restart(small_cache, workers, redis_server):
    """Two workers on a 1,000-latent job; one is killed with SIGKILL mid-job (with latents leased), then the broker
    (Redis, nothing on disk: its queues are gone) is restarted. The job finishes with every latent explained and
    scored exactly once, in well under the broker's hour of visibility timeout."""
    cache = small_cache
    latents = [int(i) for i in cache.alive_latents()[:1000]]
    assert len(latents) == 1000
    store = open_store()
    with start_llm_server(judge="judges:rule_judge", models=["judge"], latency_ms=20) as srv:
        job_id = submit(store, _spec(cache, latents, srv))
        a = workers.start("--queues", "llm")
        b = workers.start("--queues", "llm")
        _wait(lambda: _finished(store, job_id) >= 2 * 150, 120, "the first 150 latents", workers)
        # the kill lands while `a` holds leases (a worker between two claims holds none)
        _wait(lambda: _held_by(store, job_id, a), 60, "worker a to hold leases", workers)
        t_kill = time.monotonic()
        workers.kill9(a)
        before = _finished(store, job_id)
        _wait(lambda: _finished(store, job_id) >= before + 2 * 150, 120, "progress after the kill", workers)
        # the broker goes away and comes back empty
        run_id = redis_server.client().info("server")["run_id"]
        redis_server.kill()
        time.sleep(2.0)
        redis_server.start()
        assert redis_server.client().info("server")["run_id"] != run_id  # a new, empty server
        at_restart = _finished(store, job_id)
        _wait(lambda: store.job(job_id)["status"] in ("done", "failed"), 240, "the job to finish", workers)
        elapsed = time.monotonic() - t_kill
        stats = srv.stats()
    assert store.job(job_id)["status"] == "done", workers.logs()
    assert _finished(store, job_id) > at_restart
    assert elapsed < 300  # the visibility timeout (3600 s) played no part
    items = _assert_exactly_once(store, job_id, latents)
    # the killed worker's leased latents were handed out again (a second attempt)
    assert any(i.attempts >= 2 for i in items)
    assert b.poll() is None  # the survivor reconnected to the restarted broker and is still serving
    st = status(store, job_id)
    assert st.latents_finished == 1000 and st.spend["calls"] <= stats["requests"]
    # without a shared limit, two workers × 8 latents in flight reach the server at once (the limit test's contrast)
    assert stats["max_in_flight"] > 3


def test_unreliable_llm_server_every_latent_done_or_failed_with_its_reason(small_cache, workers):
    """20 % 5xx/429, 10 % timeouts, 10 % malformed bodies: the job ends (never hangs), every item is done, skipped
    or failed with the reason recorded in it, and what failed attempts paid is counted."""
    cache = small_cache
    latents = [int(i) for i in cache.alive_latents()[:120]]
    store = open_store()
    with start_llm_server(judge="judges:rule_judge", models=["judge"], fail_500=0.1, fail_429=0.1, retry_after=0.05,
                          timeout_rate=0.1, hang_s=5, malformed_rate=0.1, latency_ms=5) as srv:
        llm = {**FAST_LLM, "timeout_s": 1.0, "max_retries": 2}
        job_id = submit(store, _spec(cache, latents, srv, llm=llm))
        workers.start("--queues", "llm")
        _wait(lambda: store.job(job_id)["status"] not in ("pending", "running"), 180, "the job to end", workers)
        stats = srv.stats()
    job = store.job(job_id)
    with store.tx() as c:
        items = c.execute(select(T_ITEM).where(T_ITEM.c.job_id == job_id)).mappings().all()
    by = Counter(i["status"] for i in items)
    assert set(by) <= {"done", "skipped", "failed"}, by
    failed = [i for i in items if i["status"] == "failed"]
    assert all(i["error"] for i in failed)
    assert job["status"] == ("failed" if failed else "done")
    assert by["done"] > 0
    # failures really happened and were retried: more requests than answered calls
    spend = store.job_spend(job_id)
    assert 0 < spend["calls"] < stats["requests"]
    # a failed detection keeps its (paid) explanation; the failure's reason names the cause
    for i in failed:
        assert any(w in i["error"] for w in ("failed after", "timed out", "malformed", "500", "429", "not finished",
                                             "LLMError", "answer")), i["error"]
    # `autointerp job status` says so
    r = subprocess.run([sys.executable, "-m", "autointerp.cli", "job", "watch", str(job_id), "--interval", "0.2"],
                       capture_output=True, text=True, env=os.environ.copy())
    if failed:
        assert r.returncode == 1 and f"job {job_id} ended failed" in r.stderr
        assert "failed: latent" in r.stdout
    else:
        assert r.returncode == 0


def test_rabbitmq_broker_kill_9_and_a_shared_endpoint_limit(small_cache, workers, redis_server):
    """RabbitMQ by URL: two workers share one LLM endpoint limit through Redis (at most 3 requests in flight at the
    server, where two workers × 8 latents would send many more); one worker is killed with SIGKILL; the job
    finishes exactly once."""
    need(_rabbitmq_up(), "RabbitMQ on 127.0.0.1:5672 (apt-get install rabbitmq-server; scripts/test.sh starts it)")
    cache = small_cache
    latents = [int(i) for i in cache.alive_latents()[1000:1200]]
    prefix = workers.env["AUTOINTERP_QUEUE_PREFIX"]
    env = {"AUTOINTERP_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", "AUTOINTERP_REDIS_URL": redis_server.url,
           "AUTOINTERP_LLM_MAX_IN_FLIGHT": "3"}
    store = open_store()
    try:
        with start_llm_server(judge="judges:rule_judge", models=["judge"], latency_ms=30) as srv:
            job_id = submit(store, _spec(cache, latents, srv))
            a = workers.start("--queues", "llm", **env)
            workers.start("--queues", "llm", **env)
            _wait(lambda: _finished(store, job_id) >= 2 * 40, 120, "the first 40 latents", workers)
            workers.kill9(a)
            _wait(lambda: store.job(job_id)["status"] in ("done", "failed"), 180, "the job to finish", workers)
            stats = srv.stats()
        assert store.job(job_id)["status"] == "done", workers.logs()
        _assert_exactly_once(store, job_id, latents)
        assert 1 <= stats["max_in_flight"] <= 3, stats
    finally:
        workers.stop_all()
        _delete_amqp_queues(prefix)


def _delete_amqp_queues(prefix: str) -> None:
    from kombu import Connection

    with Connection("amqp://guest:guest@127.0.0.1:5672//", connect_timeout=5) as conn:
        chan = conn.channel()
        for q in ("gpu", "llm", "cpu"):
            try:
                chan.queue_delete(prefix + q)
            except Exception:
                chan = conn.channel()


def test_bad_specs_are_rejected_at_submit_and_nothing_is_queued(small_cache, tmp_path, redis_server):
    from autointerp.jobs.celery_app import make_app
    from autointerp.jobs.dispatch import Dispatcher, WorkerSettings

    bad = [({"scorers": ["nope"]}, "unknown scorer 'nope'"),
           ({"latents": "0-999999"}, "out of range"),
           ({"budget_usd": -1}, "budget_usd"),
           ({"explainer_model": "grpc:x"}, "LLM spec 'grpc:x'"),
           ({"dictionary": "no-such-dictionary"}, "unknown dictionary 'no-such-dictionary'"),
           ({"stages": ["extract"]}, "stages")]
    for change, msg in bad:
        f = tmp_path / "spec.json"
        f.write_text(json.dumps({"dictionary": str(small_cache.path), "explainer_model": "openai:m@http://x/v1",
                                 **change}))
        r = subprocess.run([sys.executable, "-m", "autointerp.cli", "job", "submit", str(f)], capture_output=True,
                           text=True, env=os.environ.copy())
        assert r.returncode == 2 and r.stderr.startswith("error: ") and msg in r.stderr, (change, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stdout == ""
    store = open_store()
    assert store.jobs() == []
    settings = dataclasses.replace(WorkerSettings.from_env(), broker_url=redis_server.url, redis_url=redis_server.url,
                                   queue_prefix=f"t{uuid.uuid4().hex[:8]}.")
    d = Dispatcher(make_app(settings), settings, store)
    assert d.step()["sent"] == 0 and d.waiting(settings.queue("llm")) == 0


def test_budget_is_enforced_across_workers_and_resume_continues(small_cache, workers, tmp_path):
    """Two workers share one budget (a Redis counter per job): the job stops as `budget_exhausted` just past it
    (at most the latents already in flight overshoot), no worker claims more; a raised budget resumes it."""
    cache = small_cache
    latents = [int(i) for i in cache.alive_latents()[300:500]]
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"judge": {"prompt": 10.0, "completion": 10.0}}))
    budget = 0.3
    store = open_store()
    with start_llm_server(judge="judges:rule_judge", models=["judge"], latency_ms=10) as srv:
        job_id = submit(store, _spec(cache, latents, srv, budget_usd=budget, llm={**FAST_LLM, "prices": str(prices)}))
        workers.start("--queues", "llm")
        workers.start("--queues", "llm")
        _wait(lambda: store.job(job_id)["status"] == "budget_exhausted", 120, "the budget to stop the job", workers)
        time.sleep(2.0)  # latents in flight at the stop finish; nothing new is claimed
        spent = store.job_spend(job_id)["cost_usd"]
        with store.tx() as c:
            per_latent = c.execute(select(func.max(T_ITEM.c.cost_usd)).where(T_ITEM.c.job_id == job_id)).scalar_one()
        n_done = _finished(store, job_id)
        assert budget <= spent <= budget + 2 * 8 * per_latent  # overshoot: at most what was in flight
        assert 0 < n_done < 2 * len(latents)
        time.sleep(2.0)
        assert _finished(store, job_id) == n_done and store.job(job_id)["status"] == "budget_exhausted"
        r = subprocess.run([sys.executable, "-m", "autointerp.cli", "job", "resume", str(job_id), "--budget", "1000"],
                           capture_output=True, text=True, env=os.environ.copy())
        assert r.returncode == 0, r.stderr
        _wait(lambda: store.job(job_id)["status"] in ("done", "failed"), 120, "the resumed job to finish", workers)
    assert store.job(job_id)["status"] == "done"
    _assert_exactly_once(store, job_id, latents)
    assert store.job_spend(job_id)["cost_usd"] > spent


def test_a_locked_database_delays_the_workers_and_loses_nothing(small_cache, workers):
    """Another process holds SQLite's write lock for 4 s mid-job: workers wait (busy timeout / task retries), then
    the job finishes exactly once."""
    import sqlite3

    cache = small_cache
    latents = [int(i) for i in cache.alive_latents()[500:800]]
    store = open_store()
    path = store.engine.url.database
    with start_llm_server(judge="judges:rule_judge", models=["judge"], latency_ms=10) as srv:
        job_id = submit(store, _spec(cache, latents, srv))
        workers.start("--queues", "llm")
        _wait(lambda: _finished(store, job_id) >= 2 * 30, 120, "the first latents", workers)
        con = sqlite3.connect(path, timeout=30, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        held = _count_direct(con, job_id)
        time.sleep(4.0)
        assert _count_direct(con, job_id) == held  # nobody wrote meanwhile
        con.execute("COMMIT")
        con.close()
        _wait(lambda: store.job(job_id)["status"] in ("done", "failed"), 120, "the job to finish", workers)
    assert store.job(job_id)["status"] == "done", workers.logs()
    _assert_exactly_once(store, job_id, latents)


def _count_direct(con, job_id) -> int:
    return con.execute("SELECT count(*) FROM job_item WHERE job_id = ? AND status IN ('done', 'skipped', 'failed')",
                       (job_id,)).fetchone()[0]


def test_workers_on_postgresql_kill_9_exactly_once(small_cache, workers, pg_url):
    """The same guarantees on PostgreSQL (claims by UPDATE … RETURNING with SKIP LOCKED): two workers, one killed
    with SIGKILL mid-job, every latent explained and scored once."""
    cache = small_cache
    latents = [int(i) for i in cache.alive_latents()[800:1000]]
    workers.env["AUTOINTERP_DATABASE_URL"] = pg_url
    store = open_store()
    assert store.dialect == "postgresql"
    with start_llm_server(judge="judges:rule_judge", models=["judge"], latency_ms=20) as srv:
        job_id = submit(store, _spec(cache, latents, srv))
        a = workers.start("--queues", "llm")
        workers.start("--queues", "llm")
        _wait(lambda: _finished(store, job_id) >= 2 * 40, 120, "the first 40 latents", workers)
        workers.kill9(a)
        _wait(lambda: store.job(job_id)["status"] in ("done", "failed"), 180, "the job to finish", workers)
    assert store.job(job_id)["status"] == "done", workers.logs()
    _assert_exactly_once(store, job_id, latents)


def test_stages_are_routed_to_their_queues(small_cache, tmp_path):
    """Store level: a job's gpu/cpu share is claimable only once the latent is explained; an explanation that failed
    fails the latent's items on the other queues (the job cannot wait on work that can never start)."""
    from autointerp.jobs.dispatch import queue_plan

    store = open_store()
    latents = [int(i) for i in small_cache.alive_latents()[:4]]
    spec = {"dictionary": str(small_cache.path), "latents": latents, "explainer_model": "openai:m@http://x/v1",
            "scorers": ["detection", "embedding", "intervention"], "hard_negatives": False}
    job_id = submit(store, spec)
    plan = queue_plan(store.job(job_id)["spec"])
    assert plan == {"llm": (["explain", "score:detection"], False), "cpu": (["score:embedding"], True),
                    "gpu": (["score:intervention"], True)}
    assert store.claim_stages(job_id, "cpu-w", 4, 60, *plan["cpu"]) == []  # nothing explained yet
    assert not store.has_claimable(job_id, *plan["gpu"])
    got = store.claim_stages(job_id, "llm-w", 2, 60, *plan["llm"])
    assert got == [(latents[0], ["explain", "score:detection"]), (latents[1], ["explain", "score:detection"])]
    with store.tx(write=True) as c:
        store.finish_item(c, job_id, latents[0], "explain", "done")
        store.finish_item(c, job_id, latents[1], "explain", "failed", error="LLMError: boom")
    assert store.has_claimable(job_id, *plan["cpu"])
    assert store.claim_stages(job_id, "cpu-w", 4, 60, *plan["cpu"]) == [(latents[0], ["score:embedding"])]
    assert store.fail_orphans(job_id) == 2  # latent 1's embedding and intervention items
    counts = store.item_counts(job_id)
    assert counts["score:intervention"] == {"pending": 3, "failed": 1}
    assert store.claim_stages(job_id, "gpu-w", 4, 60, *plan["gpu"]) == [(latents[0], ["score:intervention"])]


def test_a_job_split_across_llm_and_cpu_workers(small_cache, workers):
    """detection on the llm queue, the embedding scorer on the cpu queue, each served by its own worker: every
    item is done by a worker of its queue, once."""
    cache = small_cache
    latents = [int(i) for i in cache.alive_latents()[1200:1260]]
    store = open_store()
    with start_llm_server(judge="judges:rule_judge", models=["judge"], latency_ms=5) as srv:
        job_id = submit(store, _spec(cache, latents, srv, scorers=["detection", "embedding"]))
        llm = workers.start("--queues", "llm")
        cpu = workers.start("--queues", "cpu")
        _wait(lambda: store.job(job_id)["status"] in ("done", "failed"), 180, "the job to finish", workers)
    assert store.job(job_id)["status"] == "done", workers.logs()
    _assert_exactly_once(store, job_id, latents)
    with store.tx() as c:
        rows = c.execute(select(T_ITEM.c.stage, T_ITEM.c.worker).where(T_ITEM.c.job_id == job_id,
                                                                      T_ITEM.c.status == "done")).all()
    pids = {stage: {int(w.split(":")[1]) for s, w in rows if s == stage and w} for stage in
            ("explain", "score:detection", "score:embedding")}
    tree = {p: {c.pid for c in psutil_children(p.pid)} | {p.pid} for p in (llm, cpu)}
    assert pids["score:embedding"] and pids["score:embedding"] <= tree[cpu]
    assert pids["score:detection"] and pids["score:detection"] <= tree[llm]


def psutil_children(pid: int):
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_cancel_stops_the_workers_resume_continues_and_bad_credentials_stop_the_job(small_cache, workers):
    cache = small_cache
    latents = [int(i) for i in cache.alive_latents()[:300]]
    store = open_store()
    cli = [sys.executable, "-m", "autointerp.cli", "job"]
    with start_llm_server(judge="judges:rule_judge", models=["judge"], latency_ms=30) as srv:
        job_id = submit(store, _spec(cache, latents, srv))
        workers.start("--queues", "llm")
        _wait(lambda: _finished(store, job_id) >= 2 * 20, 120, "the first latents", workers)
        r = subprocess.run(cli + ["cancel", str(job_id)], capture_output=True, text=True, env=os.environ.copy())
        assert r.returncode == 0, r.stderr
        time.sleep(3.0)  # the latents in flight finish; nothing new is claimed
        n = _finished(store, job_id)
        time.sleep(2.0)
        assert _finished(store, job_id) == n < 2 * len(latents) and store.job(job_id)["status"] == "cancelled"
        subprocess.run(cli + ["resume", str(job_id)], check=True, capture_output=True, env=os.environ.copy())
        _wait(lambda: store.job(job_id)["status"] in ("done", "failed"), 120, "the resumed job", workers)
    assert store.job(job_id)["status"] == "done"
    _assert_exactly_once(store, job_id, latents)
    # a permanent LLM error (bad credentials) stops the job at once with the reason; nothing is retried for ever
    with start_llm_server(judge="judges:rule_judge", models=["judge"], api_key="sekrit") as srv:
        bad = submit(store, _spec(cache, [int(i) for i in cache.alive_latents()[300:340]], srv))
        _wait(lambda: store.job(bad)["status"] not in ("pending", "running"), 60, "the job to stop", workers)
        time.sleep(1.0)
        assert srv.stats()["requests"] <= 16  # the latents in flight at most, no retries
    job = store.job(bad)
    assert job["status"] == "stopped" and "bad credentials" in job["error"]


def _limited_requests(url: str, max_in_flight: int, rate: float, n: int, key: str, out) -> None:
    """One process's share of the shared-limit test: n concurrent 'requests' through SharedEndpointLimit, each
    counting itself in flight in Redis while it holds its slot."""
    import asyncio

    import redis

    from autointerp.jobs.dispatch import SharedEndpointLimit

    class Local:  # the process's own endpoint (OpenAIBackend._endpoint): no limit of its own here
        limit = 1000

        def semaphore(self):
            return asyncio.Semaphore(1000)

    r = redis.Redis.from_url(url)
    ep = SharedEndpointLimit(Local(), r, key, max_in_flight, rate, hold_s=30)

    async def one():
        async with ep.semaphore():
            r.rpush(key + ":t", time.time())
            now = r.incr(key + ":now")
            r.eval("if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then "
                   "redis.call('SET', KEYS[1], ARGV[1]) end", 1, key + ":max", now)
            await asyncio.sleep(0.02)
            r.decr(key + ":now")

    async def main():
        await asyncio.gather(*(one() for _ in range(n)))

    asyncio.run(main())
    out.put(os.getpid())


def test_the_shared_endpoint_limit_holds_across_processes(redis_server):
    """Two processes, 30 concurrent requests each: through the Redis semaphore (3 slots) never more than 3 in
    flight together (unlimited: ~58); through the token bucket (40 requests/s) no faster than the rate (unlimited,
    the 60 requests take ~0.1 s)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    r = redis_server.client()

    def run(max_in_flight: int, rate: float) -> str:
        key = f"http://test-{uuid.uuid4().hex[:6]}/v1"
        procs = [ctx.Process(target=_limited_requests, args=(redis_server.url, max_in_flight, rate, 30, key, q))
                 for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert all(p.exitcode == 0 for p in procs)
        return key

    key = run(3, 0.0)
    assert int(r.get(key + ":max")) == 3  # reached, never passed
    key = run(0, 40.0)
    times = sorted(float(t) for t in r.lrange(key + ":t", 0, -1))
    assert len(times) == 60
    burst = 4  # the bucket starts full (max(1, rate / 10))
    assert times[-1] - times[0] >= (60 - burst) / 40.0 * 0.95
