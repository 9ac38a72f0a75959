"""Orchestration overhead: CPU milliseconds per latent that the job layer adds — store writes, leases, heartbeats,
claims, and for Celery the queue (broker round trips, the dispatcher, Redis' own CPU) — over the same explain +
detection work done by the library functions alone, against an instant LLM (the local test server with no latency,
a rule-based judge; its CPU is not counted anywhere).

    python bench/jobs_overhead.py [--latents 500]

Three runs over the same latents, each after a warm-up: (a) the library alone (explain + score per latent, 8 in
flight, no store); (b) the embedded runner (store + leases); (c) one Celery worker process (`autointerp worker
--concurrency 1`, Redis broker), CPU of the worker's process tree plus redis-server's. Overhead = (b) - (a) and
(c) - (a). Cheap work on purpose (token windows of 32, small samples, no hard negatives), so that the overhead is
not lost in the noise of the work itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from jobs_common import Redis, Worker, wait_job, worker_env
from llm_server_fixture import start_llm_server

SMALL = dict(n_explain=5, n_test=10, n_negatives=10, n_explain_negatives=0, min_explain=3, min_test=4,
             min_negatives=4)


def ensure_small_cache(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    from autointerp.extract import extract
    from autointerp.subject import load_subject

    subject = load_subject("builtin:smollm2", device="cpu")
    extract(subject, "topk-neurons:8", "mlp_neurons.2", "builtin", path, n_tokens=6144, ctx_len=32, batch_size=16,
            top_k=20, n_sample=20, pool_size=40, progress=False)
    return path


def spec(cache: Path, latents: list[int], srv) -> dict:
    return {"dictionary": str(cache), "latents": latents, "explainer_model": f"openai:judge@{srv.base_url}",
            "scorers": ["detection"], "sampling": SMALL, "hard_negatives": False,
            "llm": {"api_key_env": None, "response_cache": False}}


async def library_only(ctx, latents: list[int]) -> None:
    from autointerp.explainers import explain

    sem = asyncio.Semaphore(8)
    async with ctx.clients() as (ec, jc):
        (scorer, cfg), = ctx.scorer_configs

        async def one(latent):
            async with sem:
                rec = ctx.record(latent)
                e = await explain(rec, ec, kind=ctx.spec.explainer, config=ctx.explain_config, seed=0)
                if getattr(e, "text", None):
                    await scorer.score(rec, e, jc, config=cfg, seed=0)
        await asyncio.gather(*(one(latent) for latent in latents))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-small-cache"))
    ap.add_argument("--latents", type=int, default=500)
    a = ap.parse_args()
    os.environ.setdefault("AUTOINTERP_LLM_CACHE", "off")
    from autointerp.cache import LatentCache
    from autointerp.jobs import parse_job_spec, run, submit
    from autointerp.jobs.context import load_context
    from autointerp.store import open_store

    cache = ensure_small_cache(a.cache)
    alive = [int(i) for i in LatentCache(cache).alive_latents()]
    warm, measured = alive[:40], alive[40: 40 + a.latents]
    n = len(measured)
    res = {}
    with start_llm_server(judge="judges:rule_judge", latency_ms=0) as srv:
        # (a) the library alone
        db = f"sqlite:///{tempfile.mkdtemp(prefix='bench-ovh-')}/store.db"
        os.environ["AUTOINTERP_DATABASE_URL"] = db
        store = open_store(db)
        from autointerp.jobs.runner import ensure_dictionary

        d = ensure_dictionary(store, str(cache))
        ctx = load_context(store, parse_job_spec(spec(cache, measured, srv)), d)
        asyncio.run(library_only(ctx, warm))
        srv.reset_stats()
        c0, t0 = time.process_time(), time.perf_counter()
        asyncio.run(library_only(ctx, measured))
        res["library"] = ((time.process_time() - c0) / n, time.perf_counter() - t0, srv.stats()["requests"])
        # (b) the embedded runner
        run(store, submit(store, spec(cache, warm, srv)), progress=False)
        srv.reset_stats()
        c0, t0 = time.process_time(), time.perf_counter()
        s = run(store, submit(store, spec(cache, measured, srv)), progress=False)
        res["embedded"] = ((time.process_time() - c0) / n, time.perf_counter() - t0, srv.stats()["requests"])
        assert s.status == "done", s
        # (c) one Celery worker process, Redis broker
        redis = Redis()
        db = f"sqlite:///{tempfile.mkdtemp(prefix='bench-ovh-')}/store.db"
        os.environ["AUTOINTERP_DATABASE_URL"] = db
        store = open_store(db)
        w = Worker(worker_env(db, redis.url), "--queues", "llm", "--concurrency", "1")
        try:
            w.wait_ready()
            wait_job(store, submit(store, spec(cache, warm, srv)))
            srv.reset_stats()
            c0, r0, t0 = w.cpu_s(), redis.cpu_s(), time.perf_counter()
            j = submit(store, spec(cache, measured, srv))
            _, status = wait_job(store, j, poll=0.05)
            wall = time.perf_counter() - t0
            time.sleep(0.5)
            res["celery"] = ((w.cpu_s() - c0 + redis.cpu_s() - r0) / n, wall, srv.stats()["requests"])
            assert status == "done", status
        finally:
            w.stop()
            redis.stop()
    base = res["library"][0]
    for k, (cpu, wall, calls) in res.items():
        extra = "" if k == "library" else f"; overhead {1000 * (cpu - base):+.1f} ms CPU per latent"
        print(f"{k:>9}: {1000 * cpu:.1f} ms CPU per latent ({n} latents, {calls} LLM calls, {wall:.1f} s wall, "
              f"{n / wall:.0f} latents/s){extra}", flush=True)


if __name__ == "__main__":
    main()
