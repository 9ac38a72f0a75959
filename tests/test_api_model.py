"""API endpoints that run things: jobs through the embedded runner against the local OpenAI-compatible test server
(reads keep answering while the job writes to the same store), "which latents fire on this text" and steering on
the real SmolLM2, checked against direct computations."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from api_support import API_KEY, api_env, api_server, http  # noqa: F401 (fixtures)
from llm_server_fixture import start_llm_server

KEY = {"X-API-Key": API_KEY}
SAMPLING = {"n_explain": 5, "n_test": 10, "n_negatives": 10, "n_explain_negatives": 0, "min_explain": 3,
            "min_test": 4, "min_negatives": 4}
LLM = {"api_key_env": None, "response_cache": False, "max_retries": 1, "backoff_base_s": 0.01}


@pytest.fixture
def shared_subject(subject):
    """The server runs in this process: let its model cache hold the session's SmolLM2 (the same real model, loaded
    once) instead of a second copy."""
    from autointerp.api import runtime

    runtime._MODELS.get(("builtin:smollm2", None), lambda: subject)
    return subject


def _spec(srv, latents, **kw):
    return {"dictionary": "xss-mlp2", "latents": latents, "explainer_model": f"openai:judge@{srv.base_url}",
            "scorers": ["detection"], "hard_negatives": False, "sampling": SAMPLING, "llm": LLM, **kw}


def test_job_through_the_api_while_reads_keep_answering(api_server, api_env):
    cache = api_env["cache"]
    latents = [int(i) for i in cache.alive_latents()[60:68]]
    probe = api_env["explained"][3]
    reads = {"n": 0, "bad": [], "slowest": 0.0}
    stop = threading.Event()

    def reader():
        paths = [f"/api/v1/dictionaries/xss-mlp2/latents/{probe}", "/api/v1/dictionaries/xss-mlp2/latents?limit=50"
                 "&sort=frequency&order=desc", "/api/v1/search?q=brackets&mode=keyword", "/api/v1/jobs"]
        while not stop.is_set():
            for p in paths:
                t = time.perf_counter()
                s, _, body = http("GET", api_server.url + p, timeout=30)
                reads["slowest"] = max(reads["slowest"], time.perf_counter() - t)
                reads["n"] += 1
                if s != 200:
                    reads["bad"].append((p, s, body))

    with start_llm_server(judge="judges:rule_judge", models=["judge"], latency_ms=150) as srv:
        status, _, sub = http("POST", api_server.url + "/api/v1/jobs", _spec(srv, latents, concurrency=2), KEY)
        assert status == 201 and sub["running_here"], sub
        job = sub["job_id"]
        t = threading.Thread(target=reader)
        t.start()
        try:
            deadline = time.monotonic() + 240
            seen = set()
            while True:
                s, _, st = http("GET", f"{api_server.url}/api/v1/jobs/{job}")
                assert s == 200
                seen.add(st["status"])
                if st["status"] in ("done", "failed", "stopped"):
                    break
                assert time.monotonic() < deadline, st
                time.sleep(0.3)
        finally:
            stop.set()
            t.join(60)
    assert st["status"] == "done", st
    assert st["latents"] == st["latents_finished"] == len(latents) and st["spend"]["calls"] > 0
    assert "running" in seen
    assert reads["n"] >= 8 and not reads["bad"], reads["bad"][:3]
    # the job's results are what the read endpoints now show
    for i in latents:
        s, _, lat = http("GET", f"{api_server.url}/api/v1/dictionaries/xss-mlp2/latents/{i}")
        mine = [e for e in lat["explanations"] if e["job_id"] == job]
        assert mine and (mine[0]["text"] is None or mine[0]["text"].startswith("fires on"))
        assert all(s["scorer"] == "detection" for e in mine for s in e["scores"])
    s, _, jobs = http("GET", f"{api_server.url}/api/v1/jobs?limit=5")
    assert jobs[0]["id"] == job and jobs[0]["status"] == "done"


def test_cancel_and_resume_through_the_api(api_server, api_env):
    cache = api_env["cache"]
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        spec = _spec(srv, [int(i) for i in cache.alive_latents()[80:82]])
        s, _, sub = http("POST", api_server.url + "/api/v1/jobs?run=false", spec, KEY)
        assert s == 201 and sub["status"]["status"] == "pending" and not sub["running_here"]
        job = sub["job_id"]
        s, _, st = http("POST", f"{api_server.url}/api/v1/jobs/{job}/cancel", None, KEY)
        assert s == 200 and st["status"] == "cancelled"
        s, _, res = http("POST", f"{api_server.url}/api/v1/jobs/{job}/resume?run=false", {"budget_usd": 1.5}, KEY)
        assert s == 200 and res["status"]["status"] == "pending" and res["status"]["budget_usd"] == 1.5
        # the same spec again is the same job (identity), not a second one
        s, _, again = http("POST", api_server.url + "/api/v1/jobs?run=false", spec, KEY)
        assert again["job_id"] == job
    assert http("POST", f"{api_server.url}/api/v1/jobs/999999/cancel", None, KEY)[0] == 404
    assert http("GET", f"{api_server.url}/api/v1/jobs/999999")[0] == 404


def test_activations_match_a_direct_encode(api_server, api_env, shared_subject):
    from autointerp.dictionaries import load_cached_dictionary

    text = "Rivers carry sediment to the sea. <b>def</b> parse(x): return 1"
    s, _, out = http("POST", api_server.url + "/api/v1/activations",
                     {"dictionary": "xss-mlp2", "text": text, "top_k": 3}, KEY, timeout=120)
    assert s == 200, out
    cache = api_env["cache"]
    ids = shared_subject.tokenizer(text, return_tensors="pt").input_ids
    x = shared_subject.capture(ids, ["mlp_neurons.2"])["mlp_neurons.2"][0]
    codes = load_cached_dictionary(cache.manifest["dictionary"]).encode(x.float())
    codes = torch.as_tensor(codes.to_dense() if hasattr(codes, "to_dense") else codes).float()
    assert [t["token_id"] for t in out["tokens"]] == ids[0].tolist()
    assert out["hookpoint"] == "mlp_neurons.2" and out["model"] == "builtin:smollm2"
    for t, row in zip(out["tokens"], codes):
        want = torch.topk(row, 3)
        got = [(l["latent"], l["activation"]) for l in t["latents"]]
        expect = [(int(i), float(v)) for v, i in zip(want.values, want.indices) if v > 0]
        assert [g[0] for g in got] == [e[0] for e in expect]
        assert all(abs(g[1] - e[1]) < 1e-3 for g, e in zip(got, expect))
    # explained latents carry their explanation
    labelled = [l for t in out["tokens"] for l in t["latents"] if l["explanation"]]
    assert all(l["latent"] in api_env["explained"] for l in labelled)
    s, _, body = http("POST", api_server.url + "/api/v1/activations", {"dictionary": "xss-mlp2", "text": ""}, KEY)
    assert s == 422 and body["field"] == "text"


def test_steering_sweep(api_server, api_env, shared_subject):
    latent = api_env["explained"][4]
    prompt = "The most important thing is"
    s, _, out = http("POST", api_server.url + "/api/v1/steer",
                     {"dictionary": "xss-mlp2", "latent": latent, "prompt": prompt, "strengths": [0.0, 12.0],
                      "max_new_tokens": 10}, KEY, timeout=300)
    assert s == 200, out
    assert [c["strength"] for c in out["completions"]] == [0.0, 12.0] and out["norm"] > 0
    tok = shared_subject.tokenizer
    enc = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        gen = shared_subject.model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                                            temperature=None, top_p=None, top_k=None)
    clean = tok.decode(gen[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert out["completions"][0]["completion"] == clean  # strength 0 is the unsteered model
    assert out["completions"][1]["completion"] != clean  # a strong push changes the text
    s, _, body = http("POST", api_server.url + "/api/v1/steer",
                      {"dictionary": "xss-mlp2", "latent": 10 ** 6, "prompt": "x"}, KEY)
    assert s == 404 and "out of range" in body["detail"]


def test_diff_endpoint_stores_what_the_library_computes(api_server, api_env, shared_subject):
    """POST /diffs = corpus_latents.diff on the same texts (ranking, rates, examples), stored and listed; the
    analysis and its page read back; bad input is a 422 naming the field."""
    from autointerp.api import runtime
    from autointerp.corpus_latents import Side, diff

    code = ["def parse(x):\n    return int(x) + 1", "for i in range(10):\n    print(i, end=', ')",
            "class A:\n    def f(self):\n        return [1, 2]"]
    prose = ["The committee met on Tuesday to discuss the budget.", "Rivers carry sediment to the sea.",
             "She poured the coffee and read the letter twice.", "Prices rose by 3 percent in March."]
    body = {"dictionary": "xss-mlp2", "texts_a": code * 3, "texts_b": prose * 3, "label_a": "code",
            "label_b": "prose", "top": 6, "max_tokens": 48}
    s, _, out = http("POST", api_server.url + "/api/v1/diffs", body, KEY, timeout=300)
    assert s == 201, out
    assert out["kind"] == "diff" and out["title"] == "code vs prose" and out["summary"]["docs_a"] == 9
    reader = runtime.reader_for(api_env["dictionary"], None, api_env["store"])
    want = diff(reader, Side("code", texts=code * 3), Side("prose", texts=prose * 3), top=6, max_tokens=48,
                progress=False)
    got = out["result"]["rows"]
    assert [r["latent"] for r in got] == [r["latent"] for r in want["rows"]]
    assert [r["rate_a"] for r in got] == [r["rate_a"] for r in want["rows"]]
    assert got[0]["examples_a"][0]["tokens"] == want["rows"][0]["examples_a"][0]["tokens"]
    s, _, listed = http("GET", api_server.url + "/api/v1/analyses?kind=diff&dictionary=xss-mlp2")
    assert s == 200 and out["id"] in [a["id"] for a in listed] and all("result" not in a or a["result"] is None
                                                                      for a in listed)
    s, _, one = http("GET", api_server.url + f"/api/v1/analyses/{out['id']}")
    assert s == 200 and one["result"]["rows"] == got
    s, _, page = http("GET", api_server.url + f"/analyses/{out['id']}")
    assert s == 200 and b"code vs prose" in page and page.count(b'class="diff-row"') == len(got)
    s, _, err = http("POST", api_server.url + "/api/v1/diffs", {**body, "texts_a": []}, KEY)
    assert s == 422 and err["field"].startswith("texts_a")
    s, _, err = http("POST", api_server.url + "/api/v1/diffs", {**body, "dictionary": "nope"}, KEY)
    assert s == 404
    s, _, _ = http("GET", api_server.url + "/api/v1/analyses/999999")
    assert s == 404
