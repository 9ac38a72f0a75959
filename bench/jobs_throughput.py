"""Throughput of explain + detection + fuzzing at the defaults (hard negatives on, the real MiniLM embedder, 64-token
windows, the job's default concurrency of 8 latents per process) against the local OpenAI-compatible test server
answering after --latency-ms: Celery workers with 1, 2, 4 processes (`autointerp worker --concurrency P`, Redis
broker) and the embedded runner, each on a fresh SQLite store.

    python bench/jobs_throughput.py [--cache runs/bench-cache] [--latents 200] [--latency-ms 100] [--procs 1,2,4]

Reported per configuration: latents/s from submit to the job's end (`end to end`), and after a warm-up job that
made every worker process load its context (tokenizer, MiniLM, the pool's saved embeddings) — `steady`; LLM calls
and prompt characters per latent (from the server's counters); worker CPU ms per latent (user+sys of the worker
processes — the Celery tree, or this process for the embedded runner — over the measured job / its latents: issue 19's
target is <= 30 ms at the defaults) and the test server's CPU per latent beside it (a stand-in for a remote LLM that
shares this machine's cores: a deployment does not pay it); the 1-minute load average at the end of each configuration. The cache is the one
bench/llm_calls.py makes (SmolLM2-135M, the demo SAE or top-32 MLP neurons of layer 15, 60k tokens, 64-token
windows). The judge is a rule-based stand-in: its answers cost nothing to compute, its scores say nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from jobs_common import Redis, Worker, wait_job, worker_env
from llm_server_fixture import start_llm_server


LLM_CONCURRENCY: int | None = None  # --llm-concurrency: None keeps the job's default
JOB_CONCURRENCY: int | None = None  # --job-concurrency: latents in flight per process; None keeps the default


def spec(cache: Path, latents: list[int], srv) -> dict:
    llm = {"api_key_env": None, "response_cache": False}
    if LLM_CONCURRENCY is not None:
        llm["concurrency"] = LLM_CONCURRENCY
    out = {"dictionary": str(cache), "latents": latents, "explainer_model": f"openai:judge@{srv.base_url}",
           "scorers": ["detection", "fuzzing"], "llm": llm}
    if JOB_CONCURRENCY is not None:
        out["concurrency"] = JOB_CONCURRENCY
    return out


def proc_cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run_config(cache: Path, alive: list[int], n: int, procs: int | None, latency_ms: int,
               redis: Redis | None) -> dict:
    from autointerp.jobs import run, submit
    from autointerp.jobs.runner import job_context
    from autointerp.store import open_store

    db = f"sqlite:///{tempfile.mkdtemp(prefix='bench-jobs-')}/store.db"
    os.environ["AUTOINTERP_DATABASE_URL"] = db
    store = open_store(db)
    warm, measured = alive[: max(2, 2 * (procs or 1))], alive[100: 100 + n]
    out: dict = {"procs": procs or "embedded", "latents": n}
    with start_llm_server(judge="judges:rule_judge", latency_ms=latency_ms) as srv:
        if procs is None:
            t0 = time.perf_counter()
            j = submit(store, spec(cache, warm, srv))
            job_context(store, store.job(j))
            run(store, j, progress=False)
            out["warmup_s"] = time.perf_counter() - t0
            srv.reset_stats()
            scpu0 = proc_cpu_s(srv.process.pid)
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            j = submit(store, spec(cache, measured, srv))
            s = run(store, j, progress=False)
            wall = time.perf_counter() - t0
            out["cpu_s_per_latent"] = (time.process_time() - cpu0) / n
            status = s.status
        else:
            env = worker_env(db, redis.url, AUTOINTERP_QUEUE_PREFIX=f"bench{procs}.")
            w = Worker(env, "--queues", "llm", "--concurrency", str(procs))
            try:
                w.wait_ready()
                t0 = time.perf_counter()
                j = submit(store, spec(cache, warm, srv))
                wait_job(store, j)
                out["warmup_s"] = time.perf_counter() - t0
                srv.reset_stats()
                scpu0 = proc_cpu_s(srv.process.pid)
                cpu0 = w.cpu_s()
                t0 = time.perf_counter()
                j = submit(store, spec(cache, measured, srv))
                wall, status = wait_job(store, j)
                wall = time.perf_counter() - t0
                out["cpu_s_per_latent"] = (w.cpu_s() - cpu0) / n
            finally:
                w.stop()
        out["server_cpu_s_per_latent"] = (proc_cpu_s(srv.process.pid) - scpu0) / n
        st = srv.stats()
    out.update(status=status, wall_s=wall, latents_per_s=n / wall, calls_per_latent=st["requests"] / n,
               prompt_chars_per_latent=st["prompt_chars"] / n, max_in_flight=st["max_in_flight"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-cache"))
    ap.add_argument("--latents", type=int, default=200)
    ap.add_argument("--latency-ms", type=int, default=100)
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--no-embedded", action="store_true")
    ap.add_argument("--llm-concurrency", type=int, nargs="+", default=[None],
                    help="requests in flight per process (llm.concurrency); several values run one after the other "
                         "(default: the job's default)")
    ap.add_argument("--job-concurrency", type=int, default=None,
                    help="latents in flight per process (the job's concurrency; default: the job's default)")
    a = ap.parse_args()
    os.environ.setdefault("AUTOINTERP_LLM_CACHE", "off")
    from llm_calls import ensure_cache

    from autointerp.cache import LatentCache

    cache = ensure_cache(a.cache, 60_000)
    alive = [int(i) for i in LatentCache(cache).alive_latents()]
    assert len(alive) >= 100 + a.latents, f"{cache}: only {len(alive)} alive latents"
    configs = [int(p) for p in a.procs.split(",") if p] + ([] if a.no_embedded else [None])
    redis = Redis() if any(p is not None for p in configs) else None  # the embedded runner needs none
    global LLM_CONCURRENCY, JOB_CONCURRENCY
    JOB_CONCURRENCY = a.job_concurrency
    try:
        for LLM_CONCURRENCY, procs in [(c, p) for c in a.llm_concurrency for p in configs]:
            r = run_config(cache, alive, a.latents, procs, a.latency_ms, redis)
            print(f"job concurrency {JOB_CONCURRENCY or 'default'}, "
                  f"llm.concurrency {LLM_CONCURRENCY or 'default'}, {str(r['procs']):>9} procs: {r['latents']} latents in {r['wall_s']:.1f} s = "
                  f"{r['latents_per_s']:.2f} latents/s (after a {r['warmup_s']:.1f} s warm-up job); "
                  f"{r['calls_per_latent']:.2f} calls, {r['prompt_chars_per_latent']:,.0f} prompt chars per latent; "
                  f"{1000 * r['cpu_s_per_latent']:.1f} ms worker CPU per latent "
                  f"({1000 * r['server_cpu_s_per_latent']:.1f} ms in the test server); server max in flight "
                  f"{r['max_in_flight']}; {r['status']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        if redis is not None:
            redis.stop()


if __name__ == "__main__":
    main()
