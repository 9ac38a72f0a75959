"""The store-wide read cache (autointerp/api/read_cache.py): search and latents-list answers served again only
while no write reached the store — from this process or another — identical to a fresh answer, never for a store
that needs a read key; PostgreSQL answers every request itself. Against a real server."""

from __future__ import annotations

import json
import subprocess
import sys

from api_support import ApiServer, api_env, http  # noqa: F401 (fixtures)
from test_api_fast import _expl, _score, fast_env  # noqa: F401 (fixture)


def _search(env, q="words"):
    return http("GET", f"{env['srv'].url}/api/v1/search?q={q}&mode=keyword&k=50")


def _page(env, query="sort=score&scorer=detection&order=desc&limit=5"):
    return http("GET", f"{env['srv'].url}/api/v1/dictionaries/{env['d']['name']}/latents?{query}")


def test_answers_served_again_until_any_write(fast_env):
    store, pk = fast_env["store"], fast_env["d"]["id"]
    i, j = fast_env["latents"][0], fast_env["latents"][2]
    s, _, first = _search(fast_env)
    assert s == 200 and len(first["hits"]) == 2
    page = _page(fast_env)[2]
    assert _search(fast_env)[2] == first and _page(fast_env)[2] == page
    cache = fast_env["srv"].app.state.read_cache
    sqlite = fast_env["url"].startswith("sqlite")
    assert cache.on == sqlite and (cache.hits, cache.misses) == ((2, 2) if sqlite else (0, 0))

    # a write through this process's store: the next answers see it
    with store.tx(write=True) as conn:
        store.insert_explanation(conn, _expl(pk, j, "llm", "more words here"))
    assert len(_search(fast_env)[2]["hits"]) == 3
    # a score written by another process moves the latent to the top of the sorted page
    eid = next(e["id"] for e in store.explanations(pk) if e["latent"] == j)
    code = ("import sys, json\nfrom autointerp.store import open_store\ns = open_store(sys.argv[1])\n"
            "with s.tx(write=True) as c:\n    s.insert_score(c, json.loads(sys.argv[2]))\n")
    subprocess.run([sys.executable, "-c", code, fast_env["url"], json.dumps(_score(eid, "detection", 0.99))],
                   check=True, timeout=120)
    top = _page(fast_env)[2]["items"][0]
    assert (top["index"], top["score"]) == (j, 0.99)
    assert _page(fast_env)[2]["items"][0]["index"] == j  # and cached again, still fresh
    if sqlite:
        assert cache.hits == 3
    # a write that touches neither explanations nor scores (a job's bookkeeping) still invalidates: nothing stale
    from sqlalchemy import update

    from autointerp.store.store import T_LATENT

    with store.tx(write=True) as conn:
        conn.execute(update(T_LATENT).where(T_LATENT.c.dictionary_pk == pk, T_LATENT.c.index == i)
                     .values(frequency=0.5))
    assert next(h for h in _search(fast_env)[2]["hits"] if h["latent"] == i)["frequency"] == 0.5


def test_not_cached_when_a_read_key_is_required_or_off(fast_env):
    from autointerp.api import Settings

    for settings in (Settings(database_url=fast_env["url"], embedded_runner=False, read_key_required=True),
                     Settings(database_url=fast_env["url"], embedded_runner=False, read_cache_mb=0)):
        with ApiServer(settings) as srv:
            url = f"{srv.url}/api/v1/search?q=words&mode=keyword"
            a, b = http("GET", url), http("GET", url)
            assert a[0] == b[0] == (401 if settings.read_key_required else 200)
            assert srv.app.state.read_cache.hits == 0


def test_quick_reads_run_at_most_the_configured_threads_at_once_on_sqlite(fast_env, monkeypatch):
    """access.store_read: the quick read routes run in the app's store-read limiter — on SQLite at most
    `sqlite_read_threads` of them read the store at once (more made each dearer); PostgreSQL keeps anyio's 40.
    Twelve concurrent requests of three routes, each held in the store for 50 ms: at most the limit overlap, and
    all answer as usual."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from autointerp.api import Settings
    from autointerp.store import queries as Q

    sqlite = fast_env["url"].startswith("sqlite")
    lock, now, peak = threading.Lock(), [0], [0]
    real = {name: getattr(Q, name) for name in ("subject_models", "comparisons", "jobs")}

    def held(fn):
        def run(*a, **kw):
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            try:
                time.sleep(0.05)
                return fn(*a, **kw)
            finally:
                with lock:
                    now[0] -= 1
        return run

    for name, fn in real.items():
        monkeypatch.setattr(Q, name, held(fn))
    paths = ["/api/v1/subject-models", "/api/v1/comparisons", "/api/v1/jobs"] * 4
    for limit in (1, 3):
        peak[0] = 0
        with ApiServer(Settings(database_url=fast_env["url"], embedded_runner=False, sqlite_read_threads=limit)) as srv:
            with ThreadPoolExecutor(12) as ex:
                answers = list(ex.map(lambda p: http("GET", srv.url + p), paths))
            assert all(a[0] == 200 for a in answers)
            assert (srv.app.state.read_limiter is not None) == sqlite
        assert peak[0] <= limit if sqlite else peak[0] > 3, peak[0]
        assert peak[0] == limit or not sqlite  # the limit is reached, not undercut


def test_pages_and_the_dictionary_are_cached_until_any_write_too(fast_env):
    """The dictionary's JSON and the pages (home, a dictionary's, a latent's, search) are served again while nothing
    was written, and show a write at once after it."""
    store, pk, name = fast_env["store"], fast_env["d"]["id"], fast_env["d"]["name"]
    j = fast_env["latents"][2]
    base = fast_env["srv"].url
    cache = fast_env["srv"].app.state.read_cache
    sqlite = fast_env["url"].startswith("sqlite")
    paths = ["/", f"/d/{name}", f"/d/{name}/{j}", "/search?q=zanzibar&mode=keyword", f"/api/v1/dictionaries/{name}"]

    def get_all():
        out = []
        for p in paths:
            s, _, body = http("GET", base + p)
            assert s == 200, (p, s)
            out.append(body if isinstance(body, dict) else body.decode())
        return out

    first = get_all()
    hits = cache.hits
    assert get_all() == first
    assert cache.hits - hits == (len(paths) if sqlite else 0)
    assert "zanzibar words" not in first[2] and "zanzibar words" not in first[3]
    with store.tx(write=True) as conn:
        store.insert_explanation(conn, _expl(pk, j, "zanzibar", "zanzibar words"))
    after = get_all()
    assert "zanzibar words" in after[2] and "zanzibar words" in after[3]  # the latent's page and the search page
    assert after[4]["n_explanations"] == first[4]["n_explanations"] + 1
    assert after[1] != first[1]  # the dictionary's page counts it
