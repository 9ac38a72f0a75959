"""The SQL store on SQLite and on PostgreSQL (pgvector build): schema, registration, concurrent writers, crashes,
bad URLs. Real databases, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from sqlalchemy import func, select

from autointerp.errors import ConfigError
from autointerp.jobs import run, status, submit
from autointerp.jobs.export import export_rows
from autointerp.store import StoreError, open_store
from autointerp.store.store import T_EXPL, T_ITEM, T_LATENT

PY = sys.executable


def _cli(*args, env=None):
    return subprocess.run([PY, "-m", "autointerp.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _baseline_spec(cache, latents, **kw) -> dict:
    """An LLM-free job: the token-frequency baseline explains (the queue, leases and writes are what is tested)."""
    return {"dictionary": str(cache.path), "latents": latents, "explainer": "token_frequency", "scorers": [],
            "hard_negatives": False, **kw}


def test_registration_holds_every_latents_statistics(store_url, small_cache):
    store = open_store()
    d = store.register_cache(small_cache)
    s = small_cache.stats
    with store.tx() as conn:
        rows = conn.execute(select(T_LATENT).where(T_LATENT.c.dictionary_pk == d["id"])
                            .order_by(T_LATENT.c.index)).mappings().all()
    assert len(rows) == small_cache.n_latents == d["n_latents"]
    assert d["n_alive"] == int((s["n_active"] > 0).sum()) and d["cache_path"] == str(small_cache.path.resolve())
    i = int(small_cache.alive_latents()[3])
    assert rows[i]["n_active"] == int(s["n_active"][i]) and rows[i]["max_act"] == pytest.approx(float(s["act_max"][i]))
    assert rows[i]["frequency"] == pytest.approx(s["n_active"][i] / small_cache.n_tokens)
    assert rows[i]["hist"] == np.asarray(small_cache.array("hist")[i]).tolist()
    # registering again replaces, never duplicates; the dictionary is found by name, key and folder
    again = store.register_cache(small_cache)
    assert again["id"] == d["id"]
    with store.tx() as conn:
        assert conn.execute(select(func.count()).select_from(T_LATENT)).scalar_one() == small_cache.n_latents
    assert store.dictionary(d["name"])["id"] == store.dictionary(str(small_cache.path))["id"] == d["id"]
    with pytest.raises(ConfigError, match="unknown dictionary 'nope'"):
        store.dictionary("nope")


def test_a_job_runs_the_same_on_both_backends(store_url, small_cache):
    store = open_store()
    latents = [int(i) for i in small_cache.alive_latents()[:5]]
    job_id = submit(store, _baseline_spec(small_cache, latents))
    s = run(store, job_id, progress=False)
    assert s.status == "done" and s.latents_done + s.latents_skipped == 5
    rows = list(export_rows(store, job_id=job_id))
    expl = [r for r in rows if r["type"] == "explanation"]
    assert sorted(r["latent"] for r in expl) == latents
    assert all(r["text"].startswith("fires on") for r in expl if r["text"])
    assert submit(store, _baseline_spec(small_cache, latents)) == job_id  # same settings: the same job
    st = status(store, job_id)
    assert st.latents_finished == 5 and st.stages["explain"].get("done", 0) + st.stages["explain"].get("skipped", 0) == 5


_WORKER = """
import sys
from autointerp.jobs import run
from autointerp.store import open_store
s = run(open_store(), int(sys.argv[1]), progress=False)
print("DONE", s.latents_done + s.latents_skipped, s.latents_failed)
"""


def test_four_processes_share_one_job_without_double_work(store_url, small_cache):
    """Four runner processes on one job and one store: every latent explained exactly once, no lock errors."""
    store = open_store()
    latents = [int(i) for i in small_cache.alive_latents()[:120]]
    job_id = submit(store, _baseline_spec(small_cache, latents, concurrency=4))
    procs = [subprocess.Popen([PY, "-c", _WORKER, str(job_id)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    counts = [int(o.split("DONE ")[1].split()[0]) for o, _ in outs]
    assert sum(counts) == 120  # each latent counted by exactly one process
    with store.tx() as conn:
        n = conn.execute(select(func.count()).select_from(T_EXPL)).scalar_one()
        workers = conn.execute(select(func.count(func.distinct(T_ITEM.c.worker)))).scalar_one()
    assert n == 120 and workers >= 2
    assert status(store, job_id).stages["explain"].get("pending", 0) == 0


def test_a_runner_killed_mid_job_leaves_a_consistent_store_and_a_rerun_finishes(small_cache, tmp_path):
    """SIGKILL in the middle of writing: every stored explanation has its finished item (they commit together);
    the killed runner's leases are released at once by the next run on this machine; nothing is done twice."""
    store = open_store()
    latents = [int(i) for i in small_cache.alive_latents()[:400]]
    job_id = submit(store, _baseline_spec(small_cache, latents, concurrency=2))
    p = subprocess.Popen([PY, "-c", _WORKER, str(job_id)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        with store.tx() as conn:
            done = conn.execute(select(func.count()).select_from(T_EXPL)).scalar_one()
        if done >= 20:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with store.tx() as conn:
        expl = set(conn.execute(select(T_EXPL.c.latent)).scalars())
        finished = set(conn.execute(select(T_ITEM.c.latent).where(T_ITEM.c.status.in_(("done", "skipped"))))
                       .scalars())
        running = conn.execute(select(func.count()).select_from(T_ITEM).where(T_ITEM.c.status == "running"))\
            .scalar_one()
    assert 20 <= len(expl) < 400 and expl == finished and running >= 1
    s = run(store, job_id, progress=False)
    assert s.status == "done" and s.latents_done + s.latents_skipped == 400 - len(expl)
    with store.tx() as conn:
        assert conn.execute(select(func.count()).select_from(T_EXPL)).scalar_one() == 400


def test_a_store_older_than_the_code_says_how_to_upgrade(store_url):
    from alembic import command

    from autointerp.store.engine import alembic_config, engine_for, resolve_url

    url = resolve_url(store_url)
    command.upgrade(alembic_config(url), "0001")
    engine_for.cache_clear()
    with pytest.raises(StoreError, match=r"is at schema 0001, this autointerp needs 0003: run `autointerp db upgrade`"):
        open_store()
    r = _cli("job", "list")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "autointerp db upgrade" in r.stderr
    r = _cli("db", "upgrade")
    assert r.returncode == 0 and "0001 -> 0003" in r.stdout, r.stderr
    engine_for.cache_clear()
    assert open_store().dictionaries() == []


def test_bad_urls_are_one_line(tmp_path):
    for url, msg in [("mysql://u@h/db", "scheme 'mysql' is not supported"),
                     ("postgresql://nobody@127.0.0.1:1/none", "is unreachable"),
                     ("::nonsense::", "expected sqlite:///PATH or postgresql://")]:
        with pytest.raises(StoreError, match=msg):
            open_store(url)
        r = _cli("job", "list", env={"AUTOINTERP_DATABASE_URL": url})
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    # a database that holds someone else's tables is not taken over
    import sqlite3

    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("create table customers (id int)").connection.commit()
    with pytest.raises(StoreError, match="holds tables but no autointerp schema"):
        open_store(f"sqlite:///{other}")


def test_a_claim_takes_what_another_claimer_does_not_hold_instead_of_waiting(pg_url, small_cache):
    """PostgreSQL: another transaction holds one item of a latent (its claim's candidate query locked it); a claim
    of that latent leases the latent's other items at once. Its UPDATE used to wait for the held row — and two
    claimers each holding a part of the other's latent deadlocked (seen in the suite)."""
    import threading

    store = open_store()
    latent = int(small_cache.alive_latents()[0])
    job_id = submit(store, {**_baseline_spec(small_cache, [latent]), "explainer_model": "openai:x@http://127.0.0.1:9/v1",
                            "explainer": "default", "scorers": ["detection", "fuzzing"]})
    with store.engine.connect() as other:
        tx = other.begin()
        held = other.execute(select(T_ITEM.c.stage).where(T_ITEM.c.job_id == job_id, T_ITEM.c.latent == latent,
                                                          T_ITEM.c.stage == "score:fuzzing")
                             .with_for_update()).scalar_one()
        got: list = []
        t = threading.Thread(target=lambda: got.append(store.claim_latents(job_id, "w1", 1, 60.0)), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "the claim waited for the row another transaction holds"
        tx.rollback()
    (leased,) = got[0]
    assert leased[0] == latent and held not in leased[1] and sorted(leased[1]) == ["explain", "score:detection"]
    # the held item was left pending: the next claim takes it
    assert store.claim_latents(job_id, "w2", 1, 60.0) == [(latent, ["score:fuzzing"])]
