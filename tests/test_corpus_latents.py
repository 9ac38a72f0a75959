"""Corpus-level aggregates (autointerp.corpus_latents): per-document embeddings, dataset diffs, separability; the
real SmolLM2 subject model, real stores, the real CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from autointerp.cli import app
from autointerp.corpus import CorpusSpec
from autointerp.corpus_latents import (FiringCounts, LatentReader, Side, bh_qvalues, document_codes, histograms,
                                       js_distance, rank_diff, run_diff, run_separability, token_codes)

PROSE = ["The river flooded the valley after a week of heavy rain in early spring.",
         "Her grandmother baked bread every Sunday and gave the loaves to the neighbours.",
         "The orchestra tuned their instruments while the audience found their seats.",
         "A small boat drifted past the lighthouse as the fog rolled in from the sea.",
         "The museum opened a new wing devoted to paintings from the northern coast."]
CODE = ["def total(items):\n    return sum(x.price for x in items)\n",
        "def parse(line):\n    key, value = line.split(':')\n    return key.strip(), int(value)\n",
        "class Stack:\n    def push(self, x):\n        self.items.append(x)\n        return len(self.items)\n"]


@pytest.fixture(scope="module")
def reader(subject):
    from autointerp.dictionaries import load_dictionary

    d = load_dictionary("topk-neurons:8", d_in=subject.width("mlp_neurons.2"), hookpoint="mlp_neurons.2")
    return LatentReader(subject, d, "mlp_neurons.2", "builtin:smollm2", "topk-neurons:8")


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# ------------------------------------------------------------------------------------------- diff statistics

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diff_ranking_equals_a_direct_numpy_computation_on_random_binary_matrices(seed):
    from scipy.stats import false_discovery_control, norm

    rng = np.random.default_rng(seed)
    n = 300
    A = rng.random((120, n)) < rng.random(n) * 0.5
    B = rng.random((90, n)) < rng.random(n) * 0.5
    ca, cb = FiringCounts(n), FiringCounts(n)
    for fc, M in ((ca, A), (cb, B)):
        for i, row in enumerate(M):  # documents one at a time, as the corpus pass feeds them
            lat = np.nonzero(row)[0]
            fc.add(i, lat, np.ones(len(lat), np.float32))
    r = rank_diff(ca.count, ca.n_docs, cb.count, cb.n_docs)
    # the direct computation, written independently
    ra, rb = A.mean(0), B.mean(0)
    p_pool = (A.sum(0) + B.sum(0)) / (len(A) + len(B))
    se = np.sqrt(p_pool * (1 - p_pool) * (1 / len(A) + 1 / len(B)))
    z = np.divide(ra - rb, se, out=np.zeros(n), where=se > 0)
    p = 2 * norm.sf(np.abs(z))
    expect = sorted(range(n), key=lambda j: (-abs(ra[j] - rb[j]), p[j], j))
    assert r["order"].tolist() == expect
    np.testing.assert_allclose(r["diff"], ra - rb)
    np.testing.assert_allclose(r["p"], p, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(r["q"], false_discovery_control(p), rtol=1e-9)
    np.testing.assert_allclose(bh_qvalues(p), false_discovery_control(p), rtol=1e-9)


def test_firing_counts_keep_each_latents_best_documents():
    fc = FiringCounts(4, n_examples=2)
    for doc, (lat, val) in enumerate([([0, 2], [1.0, 5.0]), ([0], [3.0]), ([0, 2], [2.0, 1.0]), ([1], [0.5])]):
        fc.add(doc, np.array(lat), np.array(val, np.float32))
    assert fc.examples(0) == [(1, 3.0), (2, 2.0)]
    assert fc.examples(2) == [(0, 5.0), (2, 1.0)]
    assert fc.examples(3) == [] and fc.count.tolist() == [3, 1, 2, 0] and fc.n_docs == 4


# ------------------------------------------------------------------------------------------- documents

def test_a_documents_codes_do_not_depend_on_its_batch(reader):
    """Documents are read whole and apart: batched (right-padded beside longer ones) = alone; max-pooled = the
    max of the per-token codes; mean = their mean over the positions read."""
    texts = PROSE[:3] + CODE[:2]
    batched = list(document_codes(reader, CorpusSpec(source="<t>"), documents=texts, batch_size=5, max_tokens=64))
    for k, t in enumerate(texts):
        (alone,) = document_codes(reader, CorpusSpec(source="<t>"), documents=[t], batch_size=1, max_tokens=64)
        assert batched[k].latents.tolist() == alone.latents.tolist()
        np.testing.assert_allclose(batched[k].max, alone.max, rtol=1e-4, atol=1e-5)
        ids, codes = token_codes(reader, t, alone.latents.tolist(), 64)
        np.testing.assert_allclose(codes.max(0).values.numpy(), alone.max, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(codes.sum(0).numpy() / alone.n_tokens, alone.mean, rtol=1e-4, atol=1e-5)
        assert alone.n_tokens <= len(ids) - 1  # BOS is not read (nor massive-activation outliers)
    exact = LatentReader(reader.subject, reader.dictionary, reader.hookpoint, reader.model_spec, max_norm_ratio=0)
    for d, t in zip(document_codes(exact, CorpusSpec(source="<t>"), documents=texts, max_tokens=64), texts):
        assert d.n_tokens == len(reader.subject.tokenizer(t, add_special_tokens=False)["input_ids"])
        assert (alone.active == (codes > 0).sum(0).numpy()).all()


def test_embed_docs_streams_parquet_in_file_order(tmp_path, subject):
    import pyarrow.parquet as pq

    texts = [f"{PROSE[i % 5]} Number {i}." for i in range(37)]
    corpus = _jsonl(tmp_path / "c.jsonl", texts)
    out = tmp_path / "emb.parquet"
    res = CliRunner().invoke(app, ["embed-docs", str(corpus), "-o", str(out), "-d", "topk-neurons:8", "--hookpoint",
                                   "mlp_neurons.2", "--max-tokens", "32", "--batch-size", "8", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote 37 documents" in res.output
    t = pq.read_table(out)
    pf = pq.ParquetFile(out)
    assert pf.num_row_groups >= 1 and t.num_rows == 37 and not (tmp_path / "emb.parquet.partial").exists()
    assert t.column("text").to_pylist() == texts and t.column("doc").to_pylist() == list(range(37))
    lat, mx = t.column("latents").to_pylist(), t.column("max").to_pylist()
    assert all(len(a) == len(b) > 0 and all(v > 0 for v in b) and a == sorted(a) for a, b in zip(lat, mx))
    meta = json.loads(pf.schema_arrow.metadata[b"autointerp"])
    assert meta["hookpoint"] == "mlp_neurons.2" and meta["n_latents"] == 1536


def test_embed_docs_bad_input_is_one_line_and_exit_2(tmp_path):
    r = CliRunner().invoke(app, ["embed-docs", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "x.parquet"),
                                 "-d", "topk-neurons:8", "--hookpoint", "mlp_neurons.2", "--no-progress"])
    assert r.exit_code == 2 and "no such file" in r.output and len(r.output.strip().splitlines()) == 1
    corpus = _jsonl(tmp_path / "c.jsonl", PROSE)
    r = CliRunner().invoke(app, ["embed-docs", str(corpus), "-o", str(tmp_path / "x.csv"), "-d", "topk-neurons:8",
                                 "--hookpoint", "mlp_neurons.2", "--no-progress"])
    assert r.exit_code == 2 and ".parquet" in r.output and not (tmp_path / "x.csv").exists()


# ------------------------------------------------------------------------------------------- stored diff

def test_a_stored_diff_finds_code_latents_and_keeps_examples_from_both_sides(small_cache, tmp_path):
    from autointerp.store import open_store
    from autointerp.store.analyses import analyses, analysis

    store = open_store()
    d = store.register_cache(small_cache, name="mlp2")
    a = _jsonl(tmp_path / "a.jsonl", [PROSE[i % 5] + ("\n" + CODE[i % 3] if i % 2 == 0 else "") for i in range(30)])
    b = _jsonl(tmp_path / "b.jsonl", [PROSE[i % 5] for i in range(30)])
    res = CliRunner().invoke(app, ["diff", str(a), str(b), "-d", "mlp2", "--top", "8", "--max-tokens", "48",
                                   "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["id"] is not None and r["summary"]["docs_a"] == 30 and r["summary"]["docs_b"] == 30
    top = r["rows"][0]
    # the top latent fires on (nearly) half of A (the code half) and (nearly) none of B
    assert top["diff"] > 0.3 and top["significant"] and top["q"] < 0.05
    assert top["examples_a"] and all("def" in e["text"] or "class" in e["text"] for e in top["examples_a"])
    ex = top["examples_a"][0]
    assert ex["acts"][ex["peak"]] == pytest.approx(ex["max"], rel=1e-3)  # the highlight peaks where it should
    stored = analysis(store, r["id"])
    assert stored["kind"] == "diff" and stored["result"]["rows"][0]["latent"] == top["latent"]
    assert [x["id"] for x in analyses(store, d["id"], "diff")] == [r["id"]]


# ------------------------------------------------------------------------------------------- separability

def test_histograms_and_js_distance_equal_scipy():
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(3)
    n, docs = 20, 60
    values, y = [], rng.integers(0, 2, docs)
    for i in range(docs):
        lat = np.sort(rng.choice(n, rng.integers(0, 6), replace=False))
        values.append((lat, rng.random(len(lat)).astype(np.float32) + y[i] * (lat < 5)))
    hist, top = histograms(values, y, n)
    assert (hist.sum(axis=2) == np.bincount(y)[:, None]).all()  # every document counted once per latent
    js = js_distance(hist[1].astype(float), hist[0].astype(float))
    for j in range(n):
        assert js[j] == pytest.approx(jensenshannon(hist[1, j], hist[0, j], base=2), abs=1e-9)
    assert js[:5].mean() > js[5:].mean()  # the planted latents separate the labels


def test_stored_separability_equals_jensenshannon_on_the_stored_histograms(small_cache, tmp_path):
    from scipy.spatial.distance import jensenshannon

    from autointerp.store import open_store
    from autointerp.store.analyses import latent_stats

    store = open_store()
    store.register_cache(small_cache, name="mlp2")
    rows = [{"text": t, "label": "code"} for t in CODE * 4] + [{"text": t, "label": "prose"} for t in PROSE * 3]
    path = tmp_path / "lab.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(app, ["separability", str(path), "-d", "mlp2", "--concept", "code", "--no-progress",
                                   "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    stats = latent_stats(store, store.dictionary("mlp2")["id"], stat="separability")
    assert len(stats) == r["summary"]["latents_fired"] > 0
    for s in stats:
        assert s["value"] == pytest.approx(jensenshannon(s["details"]["concept"], s["details"]["other"], base=2),
                                           abs=1e-9)
        assert sum(s["details"]["concept"]) == 12 and sum(s["details"]["other"]) == 15
    best = max(stats, key=lambda s: s["value"])
    assert r["rows"][0]["latent"] == best["latent"] and best["value"] > 0.5
    # a rerun with the same settings replaces its statistics, never duplicates them
    CliRunner().invoke(app, ["separability", str(path), "-d", "mlp2", "--concept", "code", "--no-progress"])
    assert len(latent_stats(store, store.dictionary("mlp2")["id"], stat="separability")) == len(stats)
    _separability_sorts_and_filters(store, stats)


def _separability_sorts_and_filters(store, stats):
    """The statistic is a sort key and a filter of the latent list: the store query, the API and the page."""
    from api_support import ApiServer, http
    from autointerp.api import Settings
    from autointerp.errors import ConfigError
    from autointerp.store.queries import LatentFilter, list_latents

    pk = store.dictionary("mlp2")["id"]
    by_value = sorted(stats, key=lambda s: (-s["value"], -s["latent"]))  # ties: index in the same direction
    rows, nxt = list_latents(store, pk, f=LatentFilter(stat="separability"), sort="stat", order="desc", limit=5)
    assert [(r["index"], r["stat"]) for r in rows] == [(s["latent"], s["value"]) for s in by_value[:5]]
    rows2, _ = list_latents(store, pk, f=LatentFilter(stat="separability"), sort="stat", order="desc", limit=5,
                            cursor=nxt)
    assert [r["index"] for r in rows2] == [s["latent"] for s in by_value[5:10]]
    cut = by_value[len(by_value) // 3]["value"]
    got, cur = [], None
    while True:  # every page of the filtered list
        rows, cur = list_latents(store, pk, f=LatentFilter(stat="separability", min_stat=cut), limit=100, cursor=cur)
        got += [r["index"] for r in rows]
        if cur is None:
            break
    assert got == sorted(s["latent"] for s in stats if s["value"] >= cut)
    with pytest.raises(ConfigError, match="need stat"):
        list_latents(store, pk, sort="stat")
    with ApiServer(Settings(database_url=store.url)) as srv:
        s, _, page = http("GET", srv.url + "/api/v1/dictionaries/mlp2/latents?stat=separability&sort=stat"
                                           "&order=desc&limit=3")
        assert s == 200 and [r["index"] for r in page["items"]] == [x["latent"] for x in by_value[:3]]
        s, _, html = http("GET", srv.url + f"/d/{pk}?sort=stat&order=desc")
        assert s == 200 and html.count(b'class="num stat"') == min(50, 1536)
        best = by_value[0]
        s, _, html = http("GET", srv.url + f"/d/{pk}/{best['latent']}")
        assert s == 200 and b'data-stat="separability"' in html and f"{best['value']:.3f}".encode() in html


def test_separability_bad_input(tmp_path):
    path = tmp_path / "lab.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": 3}\n')
    r = CliRunner().invoke(app, ["separability", str(path), "-d", "topk-neurons:8", "--hookpoint", "mlp_neurons.2"])
    assert r.exit_code == 2 and "lab.jsonl:2" in r.output
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": "z"}\n')
    r = CliRunner().invoke(app, ["separability", str(path), "-d", "topk-neurons:8", "--hookpoint", "mlp_neurons.2",
                                 "--no-progress"])
    assert r.exit_code == 2 and "--concept" in r.output
    path.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "b\xff", "label": "y"}\n')  # a bad byte: one line
    r = CliRunner().invoke(app, ["separability", str(path), "-d", "topk-neurons:8", "--hookpoint", "mlp_neurons.2"])
    assert r.exit_code == 2 and "lab.jsonl:2: not valid UTF-8" in r.output


def test_run_functions_store_nothing_without_a_store(reader):
    r = run_diff(reader, Side("p", texts=PROSE), Side("c", texts=CODE), top=3, progress=False, max_tokens=32)
    assert r["id"] is None and len(r["rows"]) == 3
    s = run_separability(reader, PROSE + CODE, ["p"] * 5 + ["c"] * 3, "c", progress=False, max_tokens=32)
    assert s["id"] is None and 0 <= s["summary"]["mean"] <= 1


# ------------------------------------------------------------------------------------------- random-token rate

def test_random_token_rate_equals_a_direct_count_and_filters_search(small_cache, reader):
    """LangFIR's statistic = the share of random-token positions where the latent fires, counted here directly
    one sequence at a time; stored for every latent, it filters search (CLI and library)."""
    import torch

    from autointerp.corpus_latents import random_token_rate
    from autointerp.jobs.spec import digest
    from autointerp.search import SearchFilters, keyword_search
    from autointerp.store import open_store
    from autointerp.store.analyses import latent_stats

    rates, total = random_token_rate(reader, n_seqs=6, length=20, seed=5, batch_size=4, progress=False)
    tok = reader.subject.tokenizer
    special = set(tok.all_special_ids)
    vocab = np.array([i for i in range(len(tok)) if i not in special], np.int64)
    ids = np.random.default_rng(5).choice(vocab, size=(6, 20))
    fires, n = torch.zeros(reader.n_latents), 0
    for row in ids:
        x = reader.subject.capture(torch.tensor([[tok.bos_token_id, *row.tolist()]]), ["mlp_neurons.2"])
        x = x["mlp_neurons.2"][0, 1:].float()
        norms = x.norm(dim=-1)
        x = x[norms <= 5.0 * norms.median()]
        codes = reader.dictionary.encode(x)
        fires += (torch.as_tensor(codes.to_dense() if hasattr(codes, "to_dense") else codes) > 0).sum(0)
        n += len(x)
    assert total == n and np.allclose(rates, (fires / n).numpy(), atol=1e-9)
    assert 0 < (rates > 0).sum() < reader.n_latents

    store = open_store()
    d = store.register_cache(small_cache, name="mlp2")
    res = CliRunner().invoke(app, ["random-rate", "-d", "mlp2", "--sequences", "8", "--length", "24",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    stored = {s["latent"]: s["value"] for s in latent_stats(store, d["id"], stat="random_rate")}
    assert len(stored) == d["n_latents"]
    firing = [j for j, v in stored.items() if v > 0][:10]
    silent = [j for j, v in stored.items() if v == 0][:10]
    with store.tx(write=True) as conn:
        for j in firing + silent:
            store.insert_explanation(conn, {
                "dictionary_pk": d["id"], "latent": j, "explain_key": digest({"t": 1}), "explainer": "default",
                "model": "m", "prompt_version": "v", "seed": 0, "text": f"fires on commas {j}", "skipped": None,
                "parsed": True, "examples_used": [], "usage": {}, "cost_usd": 0.0})
    every = {h.latent for h in keyword_search(store, "commas", 100)}
    kept = {h.latent for h in keyword_search(store, "commas", 100, SearchFilters(max_random_rate=0.0))}
    assert every == set(firing + silent) and kept == set(silent)
    res = CliRunner().invoke(app, ["search", "commas", "--keyword", "--max-random-rate", "0", "--json"])
    assert res.exit_code == 0 and {h["latent"] for h in json.loads(res.output)} == set(silent)


def test_diff_bad_input_is_one_line_exit_2_and_stores_nothing(small_cache, tmp_path):
    from autointerp.store import open_store
    from autointerp.store.analyses import analyses

    store = open_store()
    store.register_cache(small_cache, name="mlp2")
    good = _jsonl(tmp_path / "a.jsonl", PROSE)
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    for args in ([str(good), str(tmp_path / "missing.jsonl")], [str(good), str(bad)]):
        r = CliRunner().invoke(app, ["diff", *args, "-d", "mlp2", "--no-progress"])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "b.jsonl:2" in r.output and analyses(store) == []
    r = CliRunner().invoke(app, ["diff", str(good), str(good), "-d", "no-such-dictionary", "--no-progress"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
