"""GET one latent's fast path (autointerp/api/fast.py): cached bytes served only while the latent's version is
current — never stale after a write, from this process or another — the same body as the FastAPI route, ETag/304,
and every unusual request handed to the full route. On SQLite and PostgreSQL, against a real server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import update

from api_support import ApiServer, api_env, http  # noqa: F401 (fixtures)


@pytest.fixture
def fast_env(api_env, store_url):
    """A store of its own (writes here do not disturb the shared API store): the second cache registered, two
    latents explained, one scored; a real server on it."""
    from autointerp.api import Settings
    from autointerp.store import open_store

    store = open_store(store_url)
    d = store.register_cache(api_env["cache2"], name="fast-mlp3")
    lat = [int(i) for i in api_env["cache2"].alive_latents()[:3]]
    with store.tx(write=True) as conn:
        for i in lat[:2]:
            eid = store.insert_explanation(conn, _expl(d["id"], i, "llm", f"first words of latent {i}"))
            store.insert_score(conn, _score(eid, "detection", 0.7))
    srv = ApiServer(Settings(database_url=store_url, embedded_runner=False))
    yield {"store": store, "d": d, "latents": lat, "srv": srv, "url": store_url}
    srv.stop()


def _expl(pk, i, key, text):
    from autointerp.jobs.spec import digest

    return {"dictionary_pk": pk, "latent": i, "explain_key": digest({"t": key}), "explainer": "default",
            "model": "judge", "prompt_version": "p@1", "seed": 0, "text": text, "skipped": None, "parsed": True,
            "examples_used": [], "usage": {"calls": 1}, "cost_usd": 0.001}


def _score(eid, scorer, v):
    from autointerp.jobs.spec import digest

    return {"explanation_id": eid, "score_key": digest({"s": scorer, "v": v}), "scorer": scorer, "model": "judge",
            "prompt_version": f"{scorer}@1", "seed": 0, "value": v, "metrics": {"balanced_accuracy": v},
            "skipped": None, "details": {}, "usage": {}, "cost_usd": 0.0005}


def _get(env, i, query="", headers=None):
    return http("GET", f"{env['srv'].url}/api/v1/dictionaries/{env['d']['name']}/latents/{i}{query}",
                headers=headers)


def test_fast_path_body_equals_the_full_route(fast_env):
    fast = fast_env["srv"].app.state.fast_latent
    for i in fast_env["latents"]:
        for q in ("", "?n_top=3", "?n_top=0"):
            s1, h1, a = _get(fast_env, i, q)
            # an extra parameter is not the fast path's: the FastAPI route answers (no ETag there)
            s2, h2, b = _get(fast_env, i, q + ("&" if q else "?") + "other=1")
            assert s1 == s2 == 200 and a == b
            assert "etag" in {k.lower() for k in h1} and "etag" not in {k.lower() for k in h2}
    assert a["examples_available"] and len(a["top"]) == 0
    assert fast.misses >= 9
    hits = fast.hits
    _get(fast_env, fast_env["latents"][0])
    assert fast.hits == hits + 1  # unchanged latent: served from the cache


def test_never_stale_after_writes_here_or_in_another_process(fast_env):
    store, pk = fast_env["store"], fast_env["d"]["id"]
    i = fast_env["latents"][0]
    _, h0, before = _get(fast_env, i)
    _get(fast_env, i)  # cached now
    # a new explanation, written through the store (another connection of this process)
    with store.tx(write=True) as conn:
        eid = store.insert_explanation(conn, _expl(pk, i, "second", "a second explanation"))
    _, h1, after = _get(fast_env, i)
    assert len(after["explanations"]) == len(before["explanations"]) + 1
    assert "a second explanation" in [e["text"] for e in after["explanations"]]
    assert h1["etag"] != h0["etag"]
    # a score of that explanation, written by another process, seen on the very next request
    code = ("import sys, json\nfrom autointerp.store import open_store\ns = open_store(sys.argv[1])\n"
            "with s.tx(write=True) as c:\n    s.insert_score(c, json.loads(sys.argv[2]))\n")
    subprocess.run([sys.executable, "-c", code, fast_env["url"], json.dumps(_score(eid, "fuzzing", 0.91))],
                   check=True, timeout=120)
    _, h2, scored = _get(fast_env, i)
    second = next(e for e in scored["explanations"] if e["id"] == eid)
    assert [s["value"] for s in second["scores"]] == [0.91] and second["mean_score"] == 0.91
    assert scored["cost_usd"] == pytest.approx(after["cost_usd"] + 0.0005)
    assert h2["etag"] != h1["etag"]
    # statistics replaced (what a re-extraction does to the latent rows)
    from autointerp.store.store import T_LATENT

    with store.tx(write=True) as conn:
        conn.execute(update(T_LATENT).where(T_LATENT.c.dictionary_pk == pk, T_LATENT.c.index == i)
                     .values(max_act=123.5))
    assert _get(fast_env, i)[2]["max_act"] == 123.5
    # a latent without explanations gains its first
    j = fast_env["latents"][2]
    assert _get(fast_env, j)[2]["explanations"] == []
    with store.tx(write=True) as conn:
        store.insert_explanation(conn, _expl(pk, j, "llm", "now explained"))
    assert [e["text"] for e in _get(fast_env, j)[2]["explanations"]] == ["now explained"]


def test_etag_answers_304_until_the_latent_changes(fast_env):
    store, pk = fast_env["store"], fast_env["d"]["id"]
    i = fast_env["latents"][1]
    _, h, body = _get(fast_env, i)
    etag = h["etag"]
    s, h304, raw = _get(fast_env, i, headers={"If-None-Match": etag})
    assert s == 304 and raw == b"" and h304["etag"] == etag
    assert _get(fast_env, i, "?n_top=3", headers={"If-None-Match": etag})[0] == 200  # another n_top, another tag
    assert _get(fast_env, i, headers={"If-None-Match": f'"other", {etag}'})[0] == 304
    assert _get(fast_env, i, headers={"If-None-Match": "*"})[0] == 304
    with store.tx(write=True) as conn:
        store.insert_explanation(conn, _expl(pk, i, "third", "changed"))
    s, h2, body2 = _get(fast_env, i, headers={"If-None-Match": etag})
    assert s == 200 and h2["etag"] != etag and len(body2["explanations"]) == len(body["explanations"]) + 1


def test_unusual_requests_answered_by_the_full_route(fast_env, api_env):
    from autointerp.api import Settings

    i = fast_env["latents"][0]
    s, _, body = _get(fast_env, i, "?n_top=101")
    assert s == 422 and body["field"] == "n_top"
    s, _, body = _get(fast_env, 10 ** 6)
    assert s == 404 and "out of range" in body["detail"]
    s, _, body = http("GET", f"{fast_env['srv'].url}/api/v1/dictionaries/nope/latents/{i}")
    assert s == 404 and body["error"] == "not_found"
    assert _get(fast_env, "x1")[0] == 422
    s, _, body = http("POST", f"{fast_env['srv'].url}/api/v1/dictionaries/{fast_env['d']['id']}/latents/{i}")
    assert s == 405
    with ApiServer(Settings(database_url=fast_env["url"], embedded_runner=False, read_key_required=True)) as srv:
        s, _, body = http("GET", f"{srv.url}/api/v1/dictionaries/{fast_env['d']['id']}/latents/{i}")
        assert s == 401 and body["error"] == "unauthorized"
        assert srv.app.state.fast_latent.hits == srv.app.state.fast_latent.misses == 0


def test_cache_off_builds_every_answer(fast_env):
    from autointerp.api import Settings

    i = fast_env["latents"][0]
    with ApiServer(Settings(database_url=fast_env["url"], embedded_runner=False, latent_cache_mb=0)) as srv:
        url = f"{srv.url}/api/v1/dictionaries/{fast_env['d']['id']}/latents/{i}"
        first, second = http("GET", url), http("GET", url)
        fast = srv.app.state.fast_latent
        assert first[0] == second[0] == 200 and first[2] == second[2] == _get(fast_env, i)[2]
        assert fast.hits == 0 and fast.misses == 2 and first[1]["etag"] == second[1]["etag"]


def test_reads_racing_a_writer_never_go_back(fast_env):
    """A writer commits explanations of one latent while a client reads it: every answer holds at least every
    explanation committed before its request was sent (a body built across a write is stored under the older version
    and never served again)."""
    import threading

    store, pk = fast_env["store"], fast_env["d"]["id"]
    i = fast_env["latents"][1]
    base = len(_get(fast_env, i)[2]["explanations"])
    committed = [0]
    done = threading.Event()

    def writer():
        for n in range(25):
            with store.tx(write=True) as conn:
                store.insert_explanation(conn, _expl(pk, i, f"race-{n}", f"race {n}"))
            committed[0] = n + 1
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    seen = []
    while not done.is_set() or len(seen) < 3:
        before = committed[0]
        status, _, body = _get(fast_env, i)
        assert status == 200
        n = len(body["explanations"]) - base
        assert n >= before
        seen.append(n)
    t.join()
    assert seen == sorted(seen)
    assert len(_get(fast_env, i)[2]["explanations"]) - base == 25
