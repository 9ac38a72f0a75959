"""Submitting a job of a million latents: wall time of `submit` (spec checks, latent selection, the job row and one
item per (latent, stage) written in one transaction), the store's size, the broker's memory once the dispatcher has
filled the queue (work tokens: bounded whatever the job's size), and the cost of the store queries the workers and
the dispatcher make at that size (a claim, the sweep, the completion check, `job status`).

    python bench/jobs_submit.py [--latents 1000000] [--scorers detection,fuzzing] [--db-url URL] [--spent]

The dictionary is synthetic (registered straight into the store: 1M latent rows, all alive) since submit needs only
the store's rows, not the cache; nothing runs the job. Default store: a fresh SQLite file in a temp folder. With
`--spent`, `job status` and the spend sum are timed once more after every item was given a final status and spend
(a finished job: the spend sum's worst case).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from jobs_common import Redis


def synthetic_dictionary(store, n: int) -> None:
    from autointerp.store.store import T_DICT, T_LATENT, T_SUBJECT
    from autointerp.store.tables import utcnow

    with store.tx(write=True) as c:
        c.execute(T_SUBJECT.insert().values(name="synthetic", created=utcnow()))
        c.execute(T_DICT.insert().values(key="synthetic@resid_post.0", name="synthetic", dictionary_id="synthetic",
                                         subject_model_id=1, hookpoint="resid_post.0", format="synthetic", source="",
                                         n_latents=n, d_in=1, n_alive=n, created=utcnow()))
        for lo in range(0, n, 50_000):
            c.execute(T_LATENT.insert(), [{"dictionary_pk": 1, "index": i, "n_active": 10, "frequency": 1e-3,
                                           "max_act": 1.0, "mean_act": 0.5} for i in range(lo, min(n, lo + 50_000))])


def timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latents", type=int, default=1_000_000)
    ap.add_argument("--scorers", default="detection,fuzzing")
    ap.add_argument("--db-url", default=None, help="the store (default: a fresh SQLite file in a temp folder)")
    ap.add_argument("--spent", action="store_true",
                    help="then finish every item (done, some failed or skipped) with spend and time `job status` again")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-submit-")
    url = a.db_url or f"sqlite:///{tmp}/store.db"
    os.environ["AUTOINTERP_DATABASE_URL"] = url
    from autointerp.jobs import status, submit
    from autointerp.jobs.celery_app import make_app
    from autointerp.jobs.dispatch import Dispatcher, WorkerSettings
    from autointerp.store import open_store

    store = open_store(url)
    _, t_dict = timed(synthetic_dictionary, store, a.latents)
    spec = {"dictionary": "synthetic", "latents": "all", "explainer_model": "openai:m@http://127.0.0.1:9/v1",
            "scorers": a.scorers.split(","), "hard_negatives": False}
    c0 = time.process_time()
    job_id, t_submit = timed(submit, store, spec)
    cpu_submit = time.process_time() - c0
    n_items = store.job(job_id)["n_items"]
    size = os.path.getsize(f"{tmp}/store.db") if url.startswith("sqlite") and not a.db_url else None
    print(f"{a.latents:,} latents x {n_items // a.latents} stages = {n_items:,} job items: submit {t_submit:.1f} s "
          f"wall, {cpu_submit:.1f} s CPU (synthetic dictionary registered in {t_dict:.1f} s)"
          + (f"; store {size / 2**20:.0f} MiB" if size else ""), flush=True)

    redis = Redis()
    try:
        settings = WorkerSettings(broker_url=redis.url, redis_url=redis.url, queue_prefix="bench.")
        d = Dispatcher(make_app(settings), settings, store)
        m0 = redis.used_memory()
        step, t_step = timed(d.step)
        waiting = d.waiting(settings.queue("llm"))
        m1 = redis.used_memory()
        _, t_step2 = timed(d.step)
        print(f"dispatcher: first round {1000 * t_step:.0f} ms, queued {step['sent']} messages "
              f"({waiting} waiting); broker memory {m0 / 2**20:.2f} MiB -> {m1 / 2**20:.2f} MiB "
              f"(+{(m1 - m0) / 1024:.1f} KiB); a round with the queue full {1000 * t_step2:.0f} ms", flush=True)
    finally:
        redis.stop()
    claimed, t_claim = timed(store.claim_latents, job_id, "bench", 1, 60.0)
    _, t_claim8 = timed(store.claim_latents, job_id, "bench", 8, 60.0)
    _, t_sweep = timed(store.has_expired_leases, job_id)
    _, t_done = timed(store.has_items, job_id, ("pending", "running"))
    _, t_status = timed(status, store, job_id)
    _, t_spend = timed(store.job_spend, job_id)
    _, t_counts = timed(store.item_counts, job_id)
    print(f"at this size: claim of 1 latent {1000 * t_claim:.1f} ms, of 8 {1000 * t_claim8:.1f} ms; sweep check "
          f"{1000 * t_sweep:.1f} ms; completion check {1000 * t_done:.1f} ms; `job status` {1000 * t_status:.0f} ms "
          f"(its item counts {1000 * t_counts:.0f} ms); spend sum {1000 * t_spend:.0f} ms (workers read the Redis "
          "counter instead)", flush=True)
    if a.spent:
        _, t_upd = timed(_finish_all, store, job_id)
        _, t_status = timed(status, store, job_id)
        _, t_counts = timed(store.item_counts, job_id)
        _, t_spend = timed(store.job_spend, job_id)
        print(f"every item finished with spend ({t_upd:.0f} s to write): `job status` {1000 * t_status:.0f} ms (its "
              f"item counts {1000 * t_counts:.0f} ms); spend sum {1000 * t_spend:.0f} ms", flush=True)


def _finish_all(store, job_id: int) -> None:
    from sqlalchemy import case, update

    from autointerp.store.store import T_ITEM

    c = T_ITEM.c
    with store.tx(write=True) as conn:
        conn.execute(update(T_ITEM).where(c.job_id == job_id).values(
            status=case((c.latent % 97 == 0, "failed"), (c.latent % 89 == 0, "skipped"), else_="done"),
            lease_until=None, calls=1 + c.latent % 3, prompt_tokens=1000 + c.latent % 500, completion_tokens=50,
            cost_usd=0.00125 * (1 + c.latent % 3)))
    if store.dialect == "postgresql":
        with store.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE job_item")  # as autovacuum would after so many changed rows
            conn.commit()


if __name__ == "__main__":
    main()
