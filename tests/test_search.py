"""Search across dictionaries on SQLite and PostgreSQL: explanations embedded once, semantic and keyword queries,
filters, hostile queries."""

from __future__ import annotations

import pytest

from autointerp.errors import ConfigError
from autointerp.jobs import run, submit
from autointerp.search import SearchFilters, embed_explanations, keyword_search, semantic_search
from autointerp.store import open_store


@pytest.fixture
def explained(store_url, small_cache):
    store = open_store()
    latents = [int(i) for i in small_cache.alive_latents()[:40]]
    job = submit(store, {"dictionary": str(small_cache.path), "latents": latents, "explainer": "token_frequency",
                         "scorers": [], "hard_negatives": False})
    run(store, job, progress=False)
    return store


def test_explanations_are_embedded_once_and_found_by_meaning_and_by_word(explained):
    store = explained
    n = embed_explanations(store)
    texts = [e for e in store.explanations() if e["text"]]
    assert n == len(texts) > 10 and embed_explanations(store) == 0  # once
    target = texts[7]
    hits = semantic_search(store, target["text"], k=5)
    assert hits[0].explanation_id == target["id"] and hits[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert all(a.similarity >= b.similarity for a, b in zip(hits, hits[1:]))
    import re

    # a content word (PostgreSQL's English configuration drops stop words like "the")
    word, target_kw = next((w, e) for e in texts for w in re.findall(r"[A-Za-z]{6,}", e["text"].replace("fires on", "")))
    kw = keyword_search(store, word, k=50)
    assert target_kw["id"] in {h.explanation_id for h in kw}
    # filters: an explainer nobody used, a frequency range that excludes everything
    assert semantic_search(store, target["text"], filters=SearchFilters(explainer="cot")) == []
    assert keyword_search(store, word, filters=SearchFilters(min_frequency=2.0)) == []
    assert semantic_search(store, target["text"], filters=SearchFilters(dictionary=str(target["dictionary_pk"])))


def test_unfiltered_keyword_search_ranks_as_the_filtered_one(explained):
    """On SQLite an unfiltered search ranks inside the full-text index alone; it must give the same hits in the same
    order (ties by id) as the general query, here forced by a filter every explanation passes."""
    store = explained
    every = SearchFilters(explainer="token_frequency")
    for word in ("fires", "the", "on", "and"):
        for k in (1, 5, 200):
            plain = [(h.explanation_id, h.text, h.latent) for h in keyword_search(store, word, k=k)]
            assert plain == [(h.explanation_id, h.text, h.latent)
                             for h in keyword_search(store, word, k=k, filters=every)]
    assert len(keyword_search(store, "fires", k=200)) == len([e for e in store.explanations() if e["text"]]) > 10


def test_hostile_and_bad_queries(explained):
    store = explained
    for q in ['"; DROP TABLE explanation; --', "fires OR 1=1", "NEAR(a b)", "*", "'", "%_%", "a\x00b"]:
        keyword_search(store, q)  # searched for as words, never run
    assert len(store.explanations()) >= 10
    with pytest.raises(ConfigError, match="the query is empty"):
        semantic_search(store, "   ")
    with pytest.raises(ConfigError, match="at most 500"):
        keyword_search(store, "x" * 600)
    with pytest.raises(ConfigError, match="unknown dictionary 'nope'"):
        keyword_search(store, "the", filters=SearchFilters(dictionary="nope"))


def test_a_missing_stale_or_corrupt_index_is_rebuilt_from_the_table(tmp_path, monkeypatch, small_cache, caplog):
    monkeypatch.setenv("AUTOINTERP_DATABASE_URL", f"sqlite:///{tmp_path / 'idx.db'}")
    from autointerp import search as S

    store = open_store()
    latents = [int(i) for i in small_cache.alive_latents()[:30]]
    run(store, submit(store, {"dictionary": str(small_cache.path), "latents": latents,
                              "explainer": "token_frequency", "scorers": [], "hard_negatives": False}), progress=False)
    embed_explanations(store)
    q = [e for e in store.explanations() if e["text"]][3]
    first = [h.explanation_id for h in semantic_search(store, q["text"], k=5)]
    path = S.index_path(store, S._embedder(None))
    assert path.is_file() and first[0] == q["id"]
    for damage, word in ((lambda: path.write_bytes(b"garbage"), "corrupt"), (path.unlink, "missing")):
        damage()
        S._INDEXES.clear()  # a new process
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert [h.explanation_id for h in semantic_search(store, q["text"], k=5)] == first
        assert f"was {word}: rebuilt" in caplog.text
    # new explanations make the saved index stale: rebuilt, and they are found
    more = [int(i) for i in small_cache.alive_latents()[30:40]]
    run(store, submit(store, {"dictionary": str(small_cache.path), "latents": more,
                              "explainer": "token_frequency", "scorers": [], "hard_negatives": False}), progress=False)
    embed_explanations(store)
    S._INDEXES.clear()
    new = [e for e in store.explanations() if e["text"] and e["latent"] in more][0]
    with caplog.at_level("WARNING"):
        assert semantic_search(store, new["text"], k=3)[0].explanation_id == new["id"]
    assert "was stale: rebuilt" in caplog.text
