"""Dictionary comparison: the sparse assignment is one-to-one and optimal (against dense Hungarian), Paulo &
Belrose's shared fraction on constructed dictionaries, activation matching, JSON results, bad input."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

import autointerp.compare as compare_mod
from autointerp.compare import (DEFAULT_K, Matching, _candidates, _cosine_block, assign, compare_activations,
                                compare_directions, compare_explanations, nearest)
from autointerp.errors import ConfigError
from autointerp.vector_index import VectorIndex, unit_rows

rng = np.random.default_rng(0)


def full_graph(s: np.ndarray):
    rows, cols = np.nonzero(np.ones_like(s, bool))
    return rows, cols, s[rows, cols].astype(np.float32)


@pytest.mark.parametrize("shape", [(30, 30), (20, 35), (35, 20)])
def test_assignment_on_the_complete_graph_equals_dense_hungarian(shape):
    s = rng.uniform(0.01, 1, shape)  # all positive: the best matching then pairs every latent it can
    a, b, sims = assign(*full_graph(s), *shape)
    r, c = linear_sum_assignment(s, maximize=True)
    assert len(a) == min(shape) and len(set(a)) == len(a) and len(set(b)) == len(b)  # one-to-one
    assert sims.sum() == pytest.approx(s[r, c].sum(), abs=1e-4)
    assert np.allclose(sims, s[a, b], atol=1e-6)


def test_assignment_leaves_latents_unmatched_rather_than_break_a_strong_pair():
    # A0 and A1 both only know B0; A2 knows B1 and B2: at most 2 pairs; the best pair for B0 is A1.
    # A3 knows only B3 at a negative similarity: better unmatched
    rows, cols = np.array([0, 1, 2, 2, 3]), np.array([0, 0, 1, 2, 3])
    sims = np.array([0.5, 0.9, 0.3, 0.8, -0.2], np.float32)
    a, b, s = assign(rows, cols, sims, 4, 4)
    assert a.tolist() == [1, 2] and b.tolist() == [0, 2] and np.allclose(s, [0.9, 0.8])


@pytest.mark.parametrize("shape", [(60, 60), (40, 75), (90, 30)])
def test_sparse_assignment_equals_dense_hungarian_with_missing_edges_worth_zero(shape):
    """Random sparse graphs with negative edges: a missing or negative edge is worth the same as no partner, so
    the optimum is dense Hungarian on max(s, 0) with zeros where no edge is."""
    for seed in range(5):
        r = np.random.default_rng(seed)
        s = r.uniform(-0.3, 1, shape) * (r.random(shape) < 0.15)
        rows, cols = np.nonzero(s)
        a, b, sims = assign(rows, cols, s[rows, cols].astype(np.float32), *shape)
        dense = np.maximum(s, 0)
        ra, cb = linear_sum_assignment(dense, maximize=True)
        assert len(set(a)) == len(a) and len(set(b)) == len(b) and (s[a, b] > 0).all()
        assert sims.sum() == pytest.approx(dense[ra, cb].sum(), abs=1e-4)


def test_candidates_are_each_sides_exact_top_k(monkeypatch):
    monkeypatch.setattr(compare_mod, "BLOCK", 64)  # several blocks: the running column top-k is merged
    a, b = unit_rows(rng.standard_normal((300, 24))), unit_rows(rng.standard_normal((250, 24)))
    rows, cols, vals = _candidates(_cosine_block(a.astype(np.float32), b.astype(np.float32)), 300, 250, 5)
    s = a @ b.T
    want = {(i, j) for i in range(300) for j in np.argsort(-s[i])[:5]}
    want |= {(i, j) for j in range(250) for i in np.argsort(-s[:, j])[:5]}
    assert set(zip(rows.tolist(), cols.tolist())) == want
    assert np.allclose(vals, s[rows, cols], atol=1e-5)


def test_sparse_candidates_find_the_planted_matching():
    n, d = 600, 64
    a = rng.standard_normal((n, d))
    perm = rng.permutation(n)
    m = compare_explanations(a, a[perm] + 0.2 * rng.standard_normal((n, d)))
    assert len(m.a_index) == n and (perm[m.b_index] == m.a_index).all()
    assert m.summary["matched_fraction_a"] == 1 and len(m.novel_a) == len(m.novel_b) == 0


def test_the_projection_screen_finds_the_exact_matching(monkeypatch):
    """Above SCREEN_MIN_CELLS the candidates come from a 256-d random projection and are re-scored exactly: on
    dictionaries with strong (cosine ~0.9), moderate (~0.5) and weak (~0.3) planted pairs among random ones, the
    screened matching has every strong and moderate pair of the exact one, nearly every weak one, and exact
    similarities (the exact path is forced by raising the threshold)."""
    n, d = 1200, 768
    monkeypatch.setattr(compare_mod, "SCREEN_MIN_CELLS", n * n)
    a = unit_rows(rng.standard_normal((n, d))).astype(np.float32)
    b = unit_rows(rng.standard_normal((n, d))).astype(np.float32)
    for lo, hi, cos in ((0, 300, 0.9), (300, 600, 0.5), (600, 800, 0.3)):  # b_i = cos a_i + sqrt(1-cos^2) noise
        b[lo:hi] = unit_rows(cos * a[lo:hi] + np.sqrt(1 - cos**2) * b[lo:hi])
    perm = rng.permutation(n)
    screened = compare_mod.cosine_matching(a, b[perm], "decoder")
    monkeypatch.setattr(compare_mod, "SCREEN_MIN_CELLS", n * n + 1)
    exact = compare_mod.cosine_matching(a, b[perm], "decoder")
    inv = np.argsort(perm)
    planted = lambda lo, hi: {(i, int(inv[i])) for i in range(lo, hi)}  # noqa: E731
    got, want = [set(zip(m.a_index.tolist(), m.b_index.tolist())) for m in (screened, exact)]
    assert planted(0, 800) <= want  # the exact matching finds every planted pair, down to cosine 0.3
    assert planted(0, 600) <= got and len(planted(600, 800) - got) <= 4  # a 0.3 pair may be estimated < 0.12
    assert len(got ^ want) <= 8
    assert np.allclose(screened.similarity, np.einsum("ij,ij->i", a[screened.a_index], b[perm][screened.b_index]),
                       atol=1e-5)  # exact re-scores
    assert screened.summary["matched_fraction_a"] == exact.summary["matched_fraction_a"] == 0.25  # at >= 0.7


def test_explanations_below_the_explanation_floor_stay_unmatched():
    """Pairs of explanations at cosine 0.3 (unrelated MiniLM sentences reach that) are not matched by default; the
    floor is a parameter."""
    a = np.eye(4, 8)
    b = unit_rows(0.3 * a + np.sqrt(1 - 0.09) * np.eye(8)[4:])  # b_i . a_i = 0.3, orthogonal otherwise
    assert len(compare_explanations(a, b).a_index) == 0
    m = compare_explanations(a, b, min_similarity=0.2)
    assert m.a_index.tolist() == m.b_index.tolist() == [0, 1, 2, 3] and np.allclose(m.similarity, 0.3)


def test_shared_fraction_on_constructed_dictionaries():
    """Half of B's latents are (noisy, shuffled) copies of A's in both encoder and decoder, a quarter copy only the
    decoder, the rest are random: shared = the half that agrees on both."""
    n, d = 400, 96
    dec_a, enc_a = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    dec_b, enc_b = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    both, dec_only = np.arange(200), np.arange(200, 300)
    perm = rng.permutation(n)  # A latent i sits at B row inv[i]
    inv = np.argsort(perm)
    noise = lambda: 0.2 * rng.standard_normal((n, d))  # noqa: E731 (cosine ~0.98 with the original)
    dec_b[:300], enc_b[:200] = (dec_a + noise())[:300], (enc_a + noise())[:200]
    res = compare_directions(dec_a, dec_b[perm], enc_a, enc_b[perm])
    assert res.shared_fraction == pytest.approx(0.5)
    assert set(res.shared_a) == set(both) and res.same_partner_fraction == 1.0
    dec_partner = dict(zip(res.decoder.a_index, res.decoder.b_index))
    assert all(dec_partner[i] == inv[i] for i in np.concatenate([both, dec_only]))
    assert res.decoder.summary["matched_fraction_a"] == pytest.approx(0.75)
    json.dumps(res.as_dict())


def test_random_dictionaries_share_nothing():
    res = compare_directions(rng.standard_normal((300, 128)), rng.standard_normal((300, 128)),
                             rng.standard_normal((300, 128)), rng.standard_normal((300, 128)))
    assert res.shared_fraction == 0 and res.decoder.summary["mean_similarity"] < 0.4


@pytest.mark.parametrize("metric", ["pearson", "jaccard"])
def test_activation_matching_recovers_a_relabelled_dictionary(metric):
    codes = sp.random(4000, 150, density=0.03, random_state=3, format="csc")
    perm = rng.permutation(150)
    m = compare_activations(codes, codes[:, perm], metric=metric)
    assert (perm[m.b_index] == m.a_index).all() and np.allclose(m.similarity, 1, atol=1e-6)


def test_pearson_is_the_correlation_of_the_columns():
    x = sp.random(500, 20, density=0.3, random_state=4, format="csc")
    y = sp.random(500, 25, density=0.3, random_state=5, format="csc")
    m = compare_activations(x, y, k=25, min_similarity=-1)
    dense = np.corrcoef(x.toarray().T, y.toarray().T)[:20, 20:]
    assert np.allclose(m.similarity, dense[m.a_index, m.b_index], atol=1e-6)
    r, c = linear_sum_assignment(np.maximum(dense, 0), maximize=True)  # a negative pair is worth less than none
    assert m.similarity.sum() == pytest.approx(np.maximum(dense, 0)[r, c].sum(), abs=1e-5)


def test_matching_round_trips_through_json():
    m = compare_explanations(rng.standard_normal((50, 16)), rng.standard_normal((60, 16)), threshold=0.3,
                             min_similarity=0)
    back = Matching.from_dict(json.loads(json.dumps(m.as_dict())))
    assert np.allclose(back.pairs(), m.pairs()) and back.summary == m.summary
    assert (back.novel_b == m.novel_b).all() and sum(m.histogram.counts) == len(m.a_index)


def test_nearest_in_a_matrix_and_in_an_index():
    x = unit_rows(rng.standard_normal((200, 32)))
    got = nearest(x[7], x, 3)
    assert got.ids[0] == 7 and got.similarities[0] == pytest.approx(1)
    ids = np.arange(200) + 1000
    assert nearest(x[7], x, 3, ids=ids).ids[0] == 1007
    assert nearest(x[7], VectorIndex.build(ids, x), 3).ids[0] == 1007


def test_bad_input():
    with pytest.raises(ConfigError, match="d_in 64.*32"):
        compare_directions(np.ones((5, 64)), np.ones((5, 32)))
    with pytest.raises(ConfigError, match="non-empty"):
        compare_explanations(np.zeros((0, 384)), np.ones((5, 384)))
    with pytest.raises(ConfigError, match="both"):
        compare_directions(np.ones((5, 8)), np.ones((5, 8)), encoder_a=np.ones((5, 8)))
    with pytest.raises(ConfigError, match="decoders' shapes"):
        compare_directions(np.ones((5, 8)), np.ones((5, 8)), np.ones((4, 8)), np.ones((5, 8)))
    with pytest.raises(ConfigError, match="same tokens"):
        compare_activations(sp.random(10, 4, format="csc"), sp.random(11, 4, format="csc"))
    with pytest.raises(ConfigError, match="metric"):
        compare_activations(sp.random(10, 4, format="csc"), sp.random(10, 4, format="csc"), metric="cos")
    with pytest.raises(ConfigError, match="nan"):
        compare_explanations(np.full((3, 4), np.nan), np.ones((3, 4)))
    with pytest.raises(ConfigError, match="width"):
        nearest(np.ones(5), np.ones((3, 4)))
    assert DEFAULT_K >= 8
