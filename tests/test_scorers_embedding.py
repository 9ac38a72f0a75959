"""Embedding scorer with the real local MiniLM: AUC high for a matching explanation, ~0.5 for an unrelated one."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from judges_sim import word_record

from autointerp.embedder import DEFAULT_EMBEDDER
from autointerp.sampling import SamplingConfig
from autointerp.scorers import embedding as emb

ANIMALS = ["dog", "cat", "horse", "rabbit", "goat", "parrot"]
THINGS = ["car", "lamp", "chair", "bottle", "bicycle", "umbrella"]
FRAMES = [
    "After lunch my brother sat next to the {} and read the newspaper.",
    "We found a {} in the garden when we came home late yesterday.",
    "The teacher pointed at the {} and asked the children a question.",
    "She took a photo of the old {} before the rain started.",
    "Nobody noticed the {} standing quietly by the front door.",
    "In the morning the {} was still there, next to the kitchen window.",
    "He painted a picture of a {} for his grandmother's birthday.",
]


def _sentences(nouns):
    return [f.format(n) for f, n in itertools.product(FRAMES, nouns)]


@pytest.fixture(scope="module")
def record():
    return word_record(_sentences(ANIMALS), _sentences(THINGS), ANIMALS, latent=7)


CFG = emb.EmbeddingConfig(sampling=SamplingConfig(n_explain=5, n_test=30, n_negatives=30))


def test_auc_matching_vs_unrelated(record):
    good = asyncio.run(emb.score(record, "animals, such as pets and farm animals", None, config=CFG))
    bad = asyncio.run(emb.score(record, "tax law and accounting rules", None, config=CFG))
    assert good.skipped is None and good.metrics["n_activating"] == 30 and good.metrics["n_negative"] == 30
    assert good.metrics["auc"] > 0.9
    assert 0.3 < bad.metrics["auc"] < 0.7
    assert good.metrics["mean_sim_activating"] > good.metrics["mean_sim_negative"]


@pytest.fixture
def embed_calls(monkeypatch):
    """The sizes of the embedding scorer's embed() calls, in order."""
    calls = []
    real = emb.embed

    def counting(texts, name=None):
        calls.append(len(texts))
        return real(texts, name)

    monkeypatch.setattr(emb, "embed", counting)
    return calls


def test_score_many_embeds_each_window_once(record, embed_calls):
    calls = embed_calls
    cache = emb.WindowEmbeddings()
    expl = ["animals", "furniture and objects", "the weather"]
    res = emb.score_many([record] * 3, expl, config=CFG, cache=cache)
    # one pass for the 60 distinct windows, one for the 3 explanations
    assert calls == [60, 3]
    again = emb.score_many([record], ["animals"], config=CFG, cache=cache)
    assert calls[2:] == [1]  # windows come from the cache
    assert again[0].metrics["auc"] == pytest.approx(res[0].metrics["auc"])
    assert res[0].metrics["auc"] > res[1].metrics["auc"]


def test_explanation_examples_stay_out_of_the_test_set(record):
    from autointerp.explainers import Explanation
    from autointerp.sampling import Skipped

    first = asyncio.run(emb.score(record, "animals", None, config=CFG))
    used = tuple(w for w, q in zip(first.details["window_ids"], first.details["quantiles"]) if q >= 0)[:10]
    res = asyncio.run(emb.score(record, Explanation(7, "animals", "default", "", "", 0, examples_used=used), None,
                                config=CFG))
    assert res.skipped is None and not set(used) & set(res.details["window_ids"])
    assert asyncio.run(emb.score(record, Skipped("no explanation", 7), None, config=CFG)).skipped == "no explanation"


def test_skips_without_enough_examples(record):
    tiny = word_record(_sentences(ANIMALS)[:3], _sentences(THINGS)[:3], ANIMALS)
    res = asyncio.run(emb.score(tiny, "animals", None, config=CFG))
    assert res.skipped and not res.metrics
    assert np.isfinite(asyncio.run(emb.score(record, "animals", None, config=CFG)).metrics["auc"])


def test_a_pool_from_another_embedder_is_not_mixed_into_the_scores(record, embed_calls):
    """The job's negative pool may have been embedded with another model than the scorer's: its vectors are then
    not used for scoring (another vector space, maybe another width), only the scorer's own embedder's."""
    from dataclasses import replace

    from autointerp.sampling import NegativePool

    def other_model(texts):  # 8-d unit vectors: not MiniLM's 384-d space
        v = np.random.default_rng(len(texts)).normal(size=(len(texts), 8)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    pool = NegativePool.from_examples(record.negatives, record.decode, other_model, embedder="other/model-8d")
    got = asyncio.run(emb.score(record, "animals, such as pets and farm animals", None,
                                config=replace(CFG, pool=pool)))
    assert got.skipped is None and got.model == DEFAULT_EMBEDDER and got.metrics["auc"] > 0.9
    # a pool in the scorer's own space does supply the window vectors: the scorer embeds only the explanation
    same = NegativePool.from_examples(record.negatives, record.decode)
    embed_calls.clear()
    res = asyncio.run(emb.score(record, "animals, such as pets and farm animals", None,
                                config=replace(CFG, pool=same)))
    assert embed_calls == [1] and res.metrics["auc"] > 0.9


def test_pool_from_matrix_with_a_repeated_id_keeps_rows_aligned():
    from autointerp.sampling import NegativePool

    m = np.eye(4, dtype=np.float32)
    pool = NegativePool.from_matrix([1, 1, 2, 3], m, embed_fn=lambda t: None)
    assert len(pool) == 3
    np.testing.assert_array_equal(pool.matrix([1, 2, 3]), m[[0, 2, 3]])
