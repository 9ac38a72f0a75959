"""The embedded vector index: recall against exact search, filters, incremental adds, and the manifest that lets a
caller detect a missing, stale or corrupt index and rebuild it from the table."""

import json

import numpy as np
import pytest

from autointerp.errors import ConfigError
from autointerp.vector_index import (HnswParams, IdFingerprint, IndexUnusable, VectorIndex, exact_topk, open_index,
                                     unit_rows)


def clustered(n: int, d: int = 48, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 centres, like sentence embeddings (many near neighbours)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, d))
    return unit_rows(centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, d)))


def recall_at_10(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got, exact)]))


@pytest.fixture(scope="module")
def data():
    x = clustered(6000)
    ids = np.arange(len(x), dtype=np.int64) * 5 + 3  # ids are not row numbers
    return ids, x


@pytest.fixture(scope="module")
def graph(data):
    ids, x = data
    return VectorIndex.build(ids, x, embedder="m", exact_max=1000)


def test_small_index_is_exact_and_large_one_is_hnsw(data, graph):
    ids, x = data
    assert VectorIndex.build(ids[:500], x[:500], exact_max=1000).kind == "exact"
    assert graph.kind == "hnsw" and len(graph) == len(ids)


def test_recall_at_10_against_exact(data, graph):
    ids, x = data
    q = unit_rows(x[:200] + 0.3 * np.random.default_rng(1).standard_normal(x[:200].shape))
    pos, _ = exact_topk(q, x, 10)
    got = graph.search(q, 10)
    assert got.ids.shape == (200, 10)
    assert recall_at_10(got.ids, ids[pos]) >= 0.95
    assert np.all(np.diff(got.similarities, axis=1) <= 1e-6)  # best first


def test_exact_kind_matches_brute_force(data):
    ids, x = data
    small = VectorIndex.build(ids[:800], x[:800])
    pos, sims = exact_topk(x[:5], x[:800], 4)
    got = small.search(x[:5], 4)
    assert np.array_equal(got.ids, ids[pos]) and np.allclose(got.similarities, sims, atol=1e-5)


def test_single_query_and_padding(data):
    ids, x = data
    small = VectorIndex.build(ids[:3], x[:3])
    one = small.search(x[0], 5)
    assert one.ids.shape == (5,) and one.ids[0] == ids[0]
    assert list(one.ids[3:]) == [-1, -1] and np.isnan(one.similarities[3:]).all()


@pytest.mark.parametrize("share", [0.02, 0.5])
def test_allowed_filter_returns_only_allowed_and_keeps_recall(data, graph, share):
    ids, x = data
    rng = np.random.default_rng(2)
    allowed = np.sort(rng.choice(ids, int(share * len(ids)), replace=False))
    q = x[rng.integers(0, len(x), 50)]
    got = graph.search(q, 10, allowed=allowed)
    assert np.isin(got.ids, allowed).all()
    rows = np.flatnonzero(np.isin(ids, allowed))
    pos, _ = exact_topk(q, x[rows], 10)
    assert recall_at_10(got.ids, ids[rows][pos]) >= 0.95


def test_incremental_add_crosses_to_graph(data):
    ids, x = data
    index = VectorIndex.build(ids[:900], x[:900], exact_max=1000)
    index.add(ids[900:1500], x[900:1500])
    assert index.kind == "hnsw" and len(index) == 1500
    assert index.search(x[1200], 1).ids[0] == ids[1200]
    with pytest.raises(ConfigError, match="duplicate"):
        index.add(ids[:1], x[:1])


def test_an_empty_index_grows_by_adds(data):
    ids, x = data
    index = VectorIndex(x.shape[1])
    assert index.search(x[0], 2).ids.tolist() == [-1, -1]
    index.add(ids[:10], x[:10])
    assert index.search(x[4], 1).ids[0] == ids[4]


def test_bad_input(data):
    ids, x = data
    with pytest.raises(ConfigError, match="shape"):
        VectorIndex.build(ids[:10], x[:10, :5]).search(x[0], 3)
    with pytest.raises(ConfigError, match="ids for"):
        VectorIndex.build(ids[:10], x[:9])
    with pytest.raises(ConfigError, match="nan"):
        VectorIndex.build(ids[:2], np.full((2, 4), np.nan))


def test_fingerprint_sees_a_swap_that_keeps_count_max_and_sum():
    a, b = IdFingerprint.of(np.array([1, 4, 9])), IdFingerprint.of(np.array([2, 3, 9]))
    assert (a.count, a.max_id, a.id_sum) == (b.count, b.max_id, b.id_sum) and a != b
    assert IdFingerprint.of(np.array([9, 1, 4])) == a


@pytest.mark.parametrize("exact_max", [10_000, 1000])  # the exact kind's file and the graph's
def test_save_load_roundtrip(tmp_path, data, exact_max):
    ids, x = data
    index = VectorIndex.build(ids, x, embedder="m", exact_max=exact_max)
    index.save(tmp_path / "ix")
    back = VectorIndex.load(tmp_path / "ix", expect=IdFingerprint.of(ids), embedder="m")
    assert back.kind == index.kind and len(back) == len(ids)
    assert recall_at_10(back.search(x[:50], 10).ids, index.search(x[:50], 10).ids) >= 0.95


def test_missing_stale_corrupt_are_detected_and_rebuilt(tmp_path, data):
    ids, x = data
    path = tmp_path / "ix"
    calls = []

    def vectors():
        calls.append(1)
        return x[:len(table)]

    table = ids[:1500]
    index, why = open_index(path, table, vectors, embedder="m", exact_max=1000)
    assert why == "missing" and len(index) == 1500 and len(calls) == 1
    index, why = open_index(path, table, vectors, embedder="m", exact_max=1000)
    assert why is None and len(calls) == 1  # good index: the table's vectors are not read

    table = ids[:1600]  # rows added to the table
    index, why = open_index(path, table, vectors, embedder="m", exact_max=1000)
    assert why == "stale" and len(index) == 1600
    with pytest.raises(IndexUnusable, match="embedder"):
        VectorIndex.load(path, embedder="other")

    data_bytes = bytearray(path.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    path.write_bytes(bytes(data_bytes))
    index, why = open_index(path, table, vectors, embedder="m", exact_max=1000)
    assert why == "corrupt" and len(index) == 1600

    path.with_name("ix.json").write_text("{not json")
    assert open_index(path, table, vectors, embedder="m", exact_max=1000)[1] == "corrupt"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    manifest = json.loads(path.with_name("ix.json").read_text())
    assert manifest["file_bytes"] > 100
    assert open_index(path, table, vectors, embedder="m", exact_max=1000)[1] == "corrupt"


def test_an_index_saved_with_a_narrow_search_is_searched_at_the_default_width(tmp_path, data):
    """expansion_search is a search-time setting: an index saved before the default was raised (64 gave recall@10
    0.66 at 1M) must not keep its old width; a wider saved one keeps its own."""
    ids, x = data
    VectorIndex.build(ids, x, exact_max=1000, params=HnswParams(expansion_search=16)).save(tmp_path / "narrow")
    back = VectorIndex.load(tmp_path / "narrow")
    assert back._graph.expansion_search == back.params.expansion_search == HnswParams().expansion_search >= 256
    wide = HnswParams().expansion_search * 2
    VectorIndex.build(ids, x, exact_max=1000, params=HnswParams(expansion_search=wide)).save(tmp_path / "wide")
    assert VectorIndex.load(tmp_path / "wide")._graph.expansion_search == wide
