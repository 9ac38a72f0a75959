"""Helpers for the API, web and export tests: a real cache extracted from a corpus that holds XSS payloads, a real
store with explanations and scores (some hostile), and a real uvicorn server on 127.0.0.1 in a thread."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

XSS = ['<script>window.__xss=1</script>', '<img src=x onerror="window.__xss=2">',
       '"><svg onload=window.__xss=3>', "javascript:window.__xss=4", "{{7*7}}</td></tr></table><b>bold</b>"]
PROSE = ["The committee met on Tuesday to discuss the budget for the new library.",
         "She poured the coffee, opened the window and read the letter twice.",
         "Rivers carry sediment to the sea, where it settles into wide deltas.",
         "def parse(x):\n    return int(x) + 1  # a tiny function",
         "Prices rose by 3 percent in March, the highest increase this year."]


def write_corpus(path: Path, n_docs: int = 160) -> Path:
    """A JSON-lines corpus: ordinary prose with XSS payloads inside the text (arbitrary web text)."""
    with path.open("w") as f:
        for i in range(n_docs):
            text = f"{PROSE[i % len(PROSE)]} {XSS[i % len(XSS)]} {PROSE[(i + 2) % len(PROSE)]}"
            f.write(json.dumps({"text": text}) + "\n")
    return path


def make_cache(subject, out: Path, corpus: Path, n_tokens: int = 4096):
    from autointerp.extract import extract

    (c,) = extract(subject, "topk-neurons:8", "mlp_neurons.2", str(corpus), out, n_tokens=n_tokens, ctx_len=32,
                   batch_size=16, top_k=12, n_sample=16, pool_size=32, progress=False)
    return c


def populate(store, cache, n_explained: int = 24) -> dict:
    """Register the cache and give some alive latents explanations (one hostile) and scores, through the store's
    own insert methods (what a job's units call)."""
    from autointerp.jobs.spec import digest

    d = store.register_cache(cache, name="xss-mlp2")
    alive = [int(i) for i in cache.alive_latents()[:n_explained]]
    with store.tx(write=True) as conn:
        for j, i in enumerate(alive):
            text = f"fires on words about topic {j}" if j % 6 else XSS[j // 6 % len(XSS)] + f" latent {i}"
            if j == 1:
                text = "closing brackets and commas in python code"
            eid = store.insert_explanation(conn, {
                "dictionary_pk": d["id"], "latent": i, "explain_key": digest({"t": "llm"}), "explainer": "default",
                "model": "judge", "prompt_version": "explain_default@abc", "seed": 0, "text": text, "skipped": None,
                "parsed": True, "examples_used": [], "usage": {"calls": 1, "cost_usd": 0.001}, "cost_usd": 0.001})
            store.insert_explanation(conn, {
                "dictionary_pk": d["id"], "latent": i, "explain_key": digest({"t": "tf"}),
                "explainer": "token_frequency", "model": "", "prompt_version": "", "seed": 0,
                "text": f"fires on: tok{j}", "skipped": None, "parsed": True, "examples_used": [], "usage": {},
                "cost_usd": 0.0})
            for scorer, v in (("detection", 0.5 + 0.4 * ((j * 7) % 11) / 10), ("fuzzing", 0.55 + 0.02 * (j % 9))):
                store.insert_score(conn, {
                    "explanation_id": eid, "score_key": digest({"s": scorer}), "scorer": scorer, "model": "judge",
                    "prompt_version": f"{scorer}@v1", "seed": 0, "value": round(v, 4),
                    "metrics": {"balanced_accuracy": round(v, 4), "f1": 0.5, "n": 20}, "skipped": None,
                    "details": {"examples": [{"window_id": int(r), "label": 1, "quantile": 0, "pred": 1, "prob": 0.9}
                                             for r in cache.kept("top", i)[0][:3]]
                                + [{"window_id": int(cache.array("pool_rows")[0]), "label": 0, "quantile": -1,
                                    "pred": 0, "prob": 0.1}]},
                    "usage": {"calls": 1}, "cost_usd": 0.0005})
    return {"dictionary": d, "explained": alive}


def free_port_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


class ApiServer:
    """uvicorn serving create_app(settings) on 127.0.0.1:<free port> in a daemon thread; `.url`, `.stop()`."""

    def __init__(self, settings=None, store=None):
        import uvicorn

        from autointerp.api import create_app

        self.app = create_app(settings, store)
        self.sock = free_port_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("API server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def http(method: str, url: str, body=None, headers=None, timeout: float = 60.0):
    """(status, headers, parsed JSON or bytes) — urllib, no client library between the test and the server."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, h = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, h = e.read(), e.code, dict(e.headers)
    if h.get("content-type", h.get("Content-Type", "")).startswith("application/json"):
        return status, h, json.loads(raw)
    return status, h, raw


# ------------------------------------------------------------------------------------------ shared test environment

import pytest  # noqa: E402

_ENV: dict = {}
API_KEY = "test-key-" + "x" * 24


def build_env(subject, tmp_root: Path) -> dict:
    """Built once per test session (several test modules share it): the XSS corpus cache, a second small cache at
    another layer, a store with both registered and explained, an API key."""
    if "env" in _ENV:
        return _ENV["env"]
    from autointerp.store import open_store

    root = tmp_root
    corpus = write_corpus(root / "corpus.jsonl")
    cache = make_cache(subject, root / "cache", corpus)
    cache.attach_tokenizer(subject.tokenizer)
    from autointerp.extract import extract

    (cache2,) = extract(subject, "topk-neurons:8", "mlp_neurons.3", str(corpus), root / "cache2", n_tokens=2048,
                        ctx_len=32, batch_size=16, top_k=8, n_sample=8, pool_size=16, progress=False)
    url = f"sqlite:///{root / 'api-store.db'}"
    store = open_store(url)
    info = populate(store, cache)
    d2 = store.register_cache(cache2, name="other-mlp3")
    from autointerp.jobs.spec import digest

    with store.tx(write=True) as conn:
        for i in [int(x) for x in cache2.alive_latents()[:6]]:
            store.insert_explanation(conn, {
                "dictionary_pk": d2["id"], "latent": i, "explain_key": digest({"t": "llm"}), "explainer": "default",
                "model": "judge", "prompt_version": "explain_default@abc", "seed": 0,
                "text": "commas and brackets in code" if i % 2 else "words about rivers and the sea",
                "skipped": None, "parsed": True, "examples_used": [], "usage": {}, "cost_usd": 0.0})
    store.create_api_key("tests", API_KEY)
    _ENV["env"] = {"root": root, "cache": cache, "cache2": cache2, "url": url, "store": store, **info,
                   "dictionary2": d2, "key": API_KEY, "payload_latents": payload_latents(cache, info["explained"])}
    return _ENV["env"]


def payload_latents(cache, first: list[int], want: int = 3, n_top: int = 20) -> dict[int, str]:
    """{latent: a whole XSS payload (one with markup) found in one of its first `n_top` top contexts, the ones the
    latent page shows}: explained latents first, then other alive ones. A payload sits in every fifth document of
    the corpus, so such latents exist; the web test's XSS check relies on them, hence the assertion here."""
    found: dict[int, str] = {}
    order = list(first) + [int(i) for i in cache.alive_latents() if int(i) not in set(first)]
    for i in order:
        for w in cache.record(i).top.tokens[:n_top]:
            text = "".join(cache._decode(w.tolist()))
            hit = next((p for p in XSS[:3] if p in text), None)
            if hit:
                found[i] = hit
                break
        if len(found) >= want:
            break
    assert found, "no latent's top contexts hold an XSS payload: the corpus or the extraction changed"
    return found


@pytest.fixture(scope="session")
def api_env(subject, tmp_path_factory):
    return build_env(subject, tmp_path_factory.mktemp("api_env"))


@pytest.fixture(scope="session")
def api_server(api_env):
    from autointerp.api import Settings

    srv = ApiServer(Settings(database_url=api_env["url"], embedded_runner=True))
    yield srv
    srv.stop()
