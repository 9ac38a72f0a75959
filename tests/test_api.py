"""The HTTP API against a real uvicorn server on 127.0.0.1 and a real SQLite store built from a real extraction:
reads, keyset pagination, filters, search, auth, limits, CORS, the committed OpenAPI contract."""

from __future__ import annotations

import json
import urllib.parse

import numpy as np
import pytest
from sqlalchemy import func, select

from api_support import API_KEY, api_env, api_server, http  # noqa: F401 (fixtures)

KEY = {"X-API-Key": API_KEY}


def get(srv, path, **kw):
    return http("GET", srv.url + path, **kw)


def test_openapi_contract_is_committed_and_current(api_server):
    """The contract is a file: the served schema equals autointerp/api/openapi.json (regenerate with
    `python -m autointerp.api` when an endpoint changes on purpose)."""
    from autointerp.api.__main__ import OPENAPI

    committed = json.loads(OPENAPI.read_text())
    status, _, served = get(api_server, "/api/v1/openapi.json")
    assert status == 200
    assert served == committed, "autointerp/api/openapi.json is stale: run python -m autointerp.api"
    for path in ("/api/v1/dictionaries/{ref}/latents", "/api/v1/search", "/api/v1/activations", "/api/v1/steer",
                 "/api/v1/jobs", "/api/v1/jobs/{job_id}/cancel", "/api/v1/comparisons"):
        assert path in committed["paths"]
    # writes declare the key requirement in the contract
    assert committed["paths"]["/api/v1/steer"]["post"]["security"]


def test_dictionaries_and_score_tables(api_server, api_env):
    status, _, ds = get(api_server, "/api/v1/dictionaries")
    assert status == 200
    d = next(x for x in ds if x["name"] == "xss-mlp2")
    assert d["n_latents"] == 1536 and d["n_explained"] == len(api_env["explained"]) and d["has_cache"]
    assert d["n_explanations"] == 2 * len(api_env["explained"])  # LLM + baseline per latent
    assert d["n_scores"] == 2 * len(api_env["explained"])
    status, _, detail = get(api_server, f"/api/v1/dictionaries/{d['id']}")
    by = {(r["scorer"], r["explainer"]): r for r in detail["scores"]}
    det = by[("detection", "default")]
    store = api_env["store"]
    vals = [s["value"] for s in store.scores(e["id"] for e in store.explanations(d["id"]))
            if s["scorer"] == "detection"]
    assert det["n"] == len(vals) and sum(det["hist"]) == len(vals)
    assert det["mean"] == pytest.approx(float(np.mean(vals))) and det["max"] == pytest.approx(max(vals))
    assert get(api_server, "/api/v1/dictionaries/xss-mlp2")[2]["id"] == d["id"]  # by name too
    status, _, sm = get(api_server, "/api/v1/subject-models")
    assert sm[0]["name"] == "builtin:smollm2" and sm[0]["n_dictionaries"] == 2


def test_one_latent_has_stats_examples_and_explanations(api_server, api_env):
    cache = api_env["cache"]
    i = api_env["explained"][3]
    status, _, lat = get(api_server, f"/api/v1/dictionaries/xss-mlp2/latents/{i}?n_top=5")
    assert status == 200
    rec = cache.record(i)
    assert lat["n_active"] == rec.stats.n_active and lat["max_act"] == pytest.approx(rec.stats.max_act)
    assert lat["hist"] == rec.stats.hist_counts.tolist() and len(lat["hist_edges"]) == len(lat["hist"]) + 1
    assert lat["examples_available"] and 0 < len(lat["top"]) <= 5
    for ex, acts, toks in zip(lat["top"], rec.top.acts, rec.top.tokens):
        assert len(ex["tokens"]) == len(ex["acts"]) == cache.ctx_len
        assert ex["token_ids"] == toks.tolist()
        assert np.allclose(ex["acts"], acts, atol=1e-3)
        assert ex["max_act"] == pytest.approx(float(acts.max()), abs=1e-3)
    assert lat["quantiles"] and all(q["lo"] <= q["hi"] for q in lat["quantiles"])
    ex = lat["explanations"]
    assert ex[0]["explainer"] == "default" and ex[-1]["explainer"] == "token_frequency"  # LLM before baseline
    assert {s["scorer"] for s in ex[0]["scores"]} == {"detection", "fuzzing"}
    assert ex[0]["model"] == "judge" and ex[0]["prompt_version"] == "explain_default@abc"
    assert lat["cost_usd"] == pytest.approx(0.001 + 2 * 0.0005)
    assert get(api_server, "/api/v1/dictionaries/xss-mlp2/latents/99999")[0] == 404
    status, _, body = get(api_server, "/api/v1/dictionaries/nope/latents/1")
    assert status == 404 and body["error"] == "not_found" and "nope" in body["detail"]


def _all_pages(srv, query: str, limit: int) -> list[dict]:
    out, cursor, n = [], None, 0
    while True:
        q = query + f"&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, _, page = get(srv, "/api/v1/dictionaries/xss-mlp2/latents?" + q)
        assert status == 200, page
        out += page["items"]
        cursor = page["next_cursor"]
        n += 1
        assert n < 2000
        if cursor is None:
            return out


def test_keyset_pagination_sorts_and_filters(api_server, api_env):
    from autointerp.store.store import T_LATENT

    store, pk = api_env["store"], api_env["dictionary"]["id"]
    with store.tx() as conn:
        lat = conn.execute(select(T_LATENT.c.index, T_LATENT.c.frequency)
                           .where(T_LATENT.c.dictionary_pk == pk)).all()
    # frequency descending, ties by index descending: every latent exactly once, in order, across pages
    rows = _all_pages(api_server, "sort=frequency&order=desc", 97)
    assert [r["index"] for r in rows] == [i for i, _ in sorted(lat, key=lambda x: (-x[1], -x[0]))]
    rows = _all_pages(api_server, "sort=index", 200)
    assert [r["index"] for r in rows] == list(range(1536))
    # score filter + score sort: only scored latents in range, ordered by score
    rows = _all_pages(api_server, "sort=score&scorer=detection&order=desc&min_score=0.6&max_score=0.85", 4)
    assert rows and all(0.6 <= r["score"] <= 0.85 for r in rows)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert {r["index"] for r in rows} <= set(api_env["explained"])
    rows = _all_pages(api_server, "explained=true", 50)
    assert {r["index"] for r in rows} == set(api_env["explained"])
    assert all(r["explanation"] and r["explainer"] == "default" for r in rows)
    rows = _all_pages(api_server, "min_frequency=0.01&max_frequency=0.05&sort=max_act", 30)
    assert rows and all(0.01 <= r["frequency"] <= 0.05 for r in rows)
    # bad input: one clear 4xx each
    for q, status, field in (("limit=500", 422, "limit"), ("sort=bogus", 422, "sort"),
                             ("cursor=%21%21notacursor", 400, None), ("sort=score", 400, None),
                             ("min_frequency=2", 422, "min_frequency")):
        s, _, body = get(api_server, "/api/v1/dictionaries/xss-mlp2/latents?" + q)
        assert s == status, (q, body)
        assert body["detail"] and (field is None or body["field"] == field), body


@pytest.mark.parametrize("term", ["'; DROP TABLE explanation; --", '" OR 1=1 --', "brackets\" OR \"1\"=\"1",
                                  "NEAR(brackets code)", "*", "code*", "%", "_", "brackets) UNION SELECT key_hash "
                                  "FROM api_key --", "\\x00", "<script>alert(1)</script>", "col:brackets"])
def test_injection_style_search_terms_are_harmless(api_server, api_env, term):
    from autointerp.store.store import T_EXPL, T_KEY

    store = api_env["store"]
    with store.tx() as conn:
        before = conn.execute(select(func.count()).select_from(T_EXPL)).scalar_one()
    for mode in ("keyword", "semantic"):
        status, _, body = get(api_server, "/api/v1/search?" + urllib.parse.urlencode({"q": term, "mode": mode}))
        assert status == 200, body
        for h in body["hits"]:  # results are explanations, never other tables' rows
            assert h["text"] and h["explanation_id"] > 0 and "key_hash" not in h
    with store.tx() as conn:
        assert conn.execute(select(func.count()).select_from(T_EXPL)).scalar_one() == before
        assert conn.execute(select(func.count()).select_from(T_KEY)).scalar_one() >= 1


def test_search_keyword_semantic_and_nearest(api_server, api_env):
    status, _, body = get(api_server, "/api/v1/search?q=brackets&mode=keyword")
    assert status == 200
    assert {h["text"] for h in body["hits"]} == {"closing brackets and commas in python code",
                                                 "commas and brackets in code"}
    status, _, body = get(api_server, "/api/v1/search?q=python+source+code&mode=semantic&k=3&dictionary=xss-mlp2")
    assert status == 200 and len(body["hits"]) == 3
    assert body["hits"][0]["text"] == "closing brackets and commas in python code"
    assert all(h["dictionary"] == "xss-mlp2" for h in body["hits"])
    sims = [h["similarity"] for h in body["hits"]]
    assert sims == sorted(sims, reverse=True)
    i = api_env["explained"][1]  # "closing brackets and commas in python code"
    status, _, near = get(api_server, f"/api/v1/dictionaries/xss-mlp2/latents/{i}/nearest?k=3")
    assert status == 200 and near["hits"]
    assert all(h["dictionary"] == "other-mlp3" for h in near["hits"])  # other dictionaries only
    assert near["hits"][0]["text"] == "commas and brackets in code"
    for q, s in (("/api/v1/search?q=", 422), ("/api/v1/search?q=" + "a" * 501, 422),
                 ("/api/v1/search?q=x&mode=regex", 422), ("/api/v1/search?q=x&min_score=0.5", 422)):
        assert get(api_server, q)[0] == s, q


WRITES = [("POST", "/api/v1/jobs", {"dictionary": "xss-mlp2"}),
          ("POST", "/api/v1/jobs/1/cancel", None), ("POST", "/api/v1/jobs/1/resume", {}),
          ("POST", "/api/v1/activations", {"dictionary": "xss-mlp2", "text": "hello"}),
          ("POST", "/api/v1/steer", {"dictionary": "xss-mlp2", "latent": 1, "prompt": "hi"}),
          ("POST", "/api/v1/comparisons", {"a": "xss-mlp2", "b": "other-mlp3"})]


@pytest.mark.parametrize("method,path,body", WRITES)
def test_unauthenticated_writes_are_rejected(api_server, api_env, method, path, body):
    from autointerp.store.store import T_JOB

    store = api_env["store"]
    with store.tx() as conn:
        jobs = conn.execute(select(func.count()).select_from(T_JOB)).scalar_one()
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"X-API-Key": ""}):
        status, h, resp = http(method, api_server.url + path, body, headers)
        assert status == 401, (path, headers, resp)
        assert resp["error"] == "unauthorized" and "API key" in resp["detail"]
    with store.tx() as conn:
        assert conn.execute(select(func.count()).select_from(T_JOB)).scalar_one() == jobs


def test_keys_are_stored_as_hashes_only(api_env):
    from autointerp.store.store import T_KEY

    with api_env["store"].tx() as conn:
        rows = conn.execute(select(T_KEY)).mappings().all()
    assert rows and all(API_KEY not in json.dumps(dict(r), default=str) for r in rows)
    import hashlib

    assert hashlib.sha256(API_KEY.encode()).hexdigest() in {r["key_hash"] for r in rows}


def _raw_post(port: int, path: str, head: dict, chunks) -> int | str:
    """Send a request over a bare socket, body chunk by chunk; the status line's code, or "reset" when the server
    closed the connection before the client could read an answer (it refused the body mid-stream)."""
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                   "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode())
        try:
            for c in chunks:
                s.sendall(c)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            return "reset"
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else "reset"
    finally:
        s.close()


def test_ten_megabyte_body_is_refused(api_server, api_env):
    from autointerp.store.store import T_JOB

    with api_env["store"].tx() as conn:
        jobs = conn.execute(select(func.count()).select_from(T_JOB)).scalar_one()
    ten_mb = 10 * 1024 * 1024
    for headers in (KEY, {}):
        # declared 10 MB: refused from the headers, before a byte of it is read
        head = {**headers, "Content-Type": "application/json", "Content-Length": str(ten_mb)}
        assert _raw_post(api_server.port, "/api/v1/jobs", head, [b'{"dictionary": "', b"a" * 65536]) == 413
        # the whole 10 MB sent: refused too (answered 413, or cut off mid-body), never accepted
        got = _raw_post(api_server.port, "/api/v1/jobs", head, (b"a" * (1 << 20) for _ in range(10)))
        assert got in (413, "reset")
    # chunked (no Content-Length): refused while it streams, past the 1 MiB limit
    head = {**KEY, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    chunk = b"a" * (1 << 20)
    body = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10))
    assert _raw_post(api_server.port, "/api/v1/activations", head, body) in (413, "reset")
    # a small body that declares its true length is fine, and the server is fine afterwards
    assert http("POST", api_server.url + "/api/v1/activations", {"dictionary": "nope", "text": "x"}, KEY)[0] == 404
    assert http("GET", api_server.url + "/api/v1/health")[0] == 200
    with api_env["store"].tx() as conn:
        assert conn.execute(select(func.count()).select_from(T_JOB)).scalar_one() == jobs


def test_text_length_and_field_caps(api_server):
    s, _, body = http("POST", api_server.url + "/api/v1/activations",
                      {"dictionary": "xss-mlp2", "text": "x" * 2001}, KEY)
    assert s == 422 and body["field"] == "text"
    s, _, body = http("POST", api_server.url + "/api/v1/steer",
                      {"dictionary": "xss-mlp2", "latent": 1, "prompt": "p", "strengths": [1.0] * 9}, KEY)
    assert s == 422 and body["field"] == "strengths"
    s, _, body = http("POST", api_server.url + "/api/v1/jobs", b"{not json", {**KEY})
    assert s == 422 and body["error"] == "invalid"
    s, _, body = http("POST", api_server.url + "/api/v1/jobs", {"dictionary": "xss-mlp2", "scorers": ["bogus"]}, KEY)
    assert s == 422 and "bogus" in body["detail"] and body["field"] == "scorers"
    s, _, body = http("POST", api_server.url + "/api/v1/jobs", {"dictionary": "/no/such/folder"}, KEY)
    assert s == 404 and "unknown dictionary" in body["detail"]
    s, _, body = http("POST", api_server.url + "/api/v1/jobs", {"dictionary": "x" * 5000}, KEY)
    assert s in (400, 404) and body["detail"], body


def test_cors_closed_by_default_and_opened_by_config(api_server, api_env):
    from api_support import ApiServer

    from autointerp.api import Settings

    origin = {"Origin": "https://evil.example"}
    s, h, _ = http("GET", api_server.url + "/api/v1/health", headers=origin)
    assert s == 200 and not any(k.lower() == "access-control-allow-origin" for k in h)
    s, h, _ = http("OPTIONS", api_server.url + "/api/v1/jobs",
                   headers={**origin, "Access-Control-Request-Method": "POST"})
    assert not any(k.lower() == "access-control-allow-origin" for k in h)
    with ApiServer(Settings(database_url=api_env["url"], cors_origins=["https://ok.example"],
                            read_key_required=True)) as srv:
        s, h, _ = http("GET", srv.url + "/api/v1/dictionaries",
                       headers={"Origin": "https://ok.example", **KEY})
        assert s == 200 and h.get("access-control-allow-origin") == "https://ok.example"
        # reads keyed by configuration
        s, _, body = http("GET", srv.url + "/api/v1/dictionaries")
        assert s == 401 and body["error"] == "unauthorized"
        assert http("GET", srv.url + "/d/1")[0] == 401
        assert http("GET", srv.url + "/api/v1/health")[0] == 200  # liveness stays open


def test_exports_through_the_api(api_server, tmp_path):
    import gzip
    import io
    import zipfile

    s, h, body = get(api_server, "/api/v1/dictionaries/xss-mlp2/export?format=neuronpedia")
    assert s == 200 and h["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(body))
    names = z.namelist()
    feats = [n for n in names if "/features/batch-" in n]
    assert feats and any("/explanations/batch-0.jsonl.gz" in n for n in names)
    first = json.loads(gzip.decompress(z.read(sorted(feats)[0])).splitlines()[0])
    assert first["index"] == "0" and first["hookName"] == "mlp_neurons.2"
    s, h, body = get(api_server, "/api/v1/dictionaries/xss-mlp2/export?format=jsonl")
    assert s == 200 and body.count(b"\n") >= 48
    assert get(api_server, "/api/v1/dictionaries/xss-mlp2/export?format=csv")[0] == 422


def test_pages_send_security_headers(api_server, api_env):
    s, h, body = get(api_server, f"/d/1/{api_env['explained'][0]}")
    assert s == 200
    csp = h.get("content-security-policy", "")
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert h.get("x-content-type-options") == "nosniff"
    assert b"<script>window.__xss" not in body and b"&lt;script&gt;window.__xss" in body
    assert b"onerror=\"window" not in body


def test_compare_through_the_api_and_its_page(api_server, api_env):
    body = {"a": "xss-mlp2", "b": "other-mlp3", "method": "embedding"}
    s, _, c = http("POST", api_server.url + "/api/v1/comparisons", body, KEY, timeout=300)
    assert s == 201, c
    assert c["method"] == "embedding" and c["dictionary_a"] == api_env["dictionary"]["id"]
    pairs = c["result"]["pairs"]
    assert c["summary"]["explained_a"] == len(api_env["explained"]) and c["summary"]["explained_b"] == 6
    assert isinstance(pairs, list) and all(a in api_env["explained"] for a, _, _ in pairs)
    s, _, again = get(api_server, f"/api/v1/comparisons/{c['id']}")
    assert s == 200 and again["result"]["pairs"] == pairs
    assert any(x["id"] == c["id"] for x in get(api_server, "/api/v1/comparisons")[2])
    s, _, page = get(api_server, f"/compare/{c['id']}")
    assert s == 200 and b'id="pairs"' in page and page.count(b"<tr><td class=\"num\">") == min(len(pairs), 200)
    assert b"pairs." in page or b"No similarity distribution" in page
    # decoder directions (both dictionaries are 1536 MLP neurons of SmolLM2)
    s, _, d = http("POST", api_server.url + "/api/v1/comparisons", {**body, "method": "decoder"}, KEY, timeout=300)
    assert s == 201 and d["method"] == "decoder" and "shared_fraction" in d["summary"]
    assert get(api_server, f"/compare/{d['id']}")[0] == 200
    # activation comparison needs the same pool windows: one clear 400
    s, _, err = http("POST", api_server.url + "/api/v1/comparisons", {**body, "method": "activation"}, KEY)
    assert s == 400 and "pool windows" in err["detail"]
    s, _, err = http("POST", api_server.url + "/api/v1/comparisons", {**body, "b": "nope"}, KEY)
    assert s == 404
