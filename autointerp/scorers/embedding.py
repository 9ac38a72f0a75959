"""Embedding scorer (no LLM): how well cosine similarity to the explanation separates activating from
non-activating example texts, as ROC AUC, with the local sentence embedder.

Window embeddings are cached by (embedder, window text): the negatives come from one shared pool and windows
recur across latents, so across a batch of latents most windows are embedded once. (Keyed by text rather than
window id so records from different caches can never collide.)
`score_many` embeds every window of a batch of latents in one encoder pass.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..embedder import embed, embedder_name
from ..formatting import plain_text
from ..metrics import roc_auc
from ..records import Examples, LatentRecord
from ..sampling import NegativePool, SamplingConfig, Skipped
from .base import ScoreResult
from .base import explanation_parts
from .simulation import select_test_examples

NAME = "embedding"


@dataclass
class EmbeddingConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # test set: 50 activating + 50 negatives
    # a NegativePool gives hard negatives and supplies the window embeddings (it must use the same embedder)
    pool: NegativePool | None = field(default=None, compare=False)
    embedder: str | None = None  # None: AUTOINTERP_EMBEDDER or the built-in MiniLM
    query_prefix: str = ""  # some embedders want e.g. "query: " before the explanation


Config = EmbeddingConfig


class WindowEmbeddings:
    """LRU cache of window embeddings keyed by (embedder, text)."""

    def __init__(self, max_items: int = 200_000):
        self.max_items = max_items
        self._d: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, texts: list[str], embedder: str | None) -> np.ndarray:
        with self._lock:
            return self._get(texts, embedder)

    def _get(self, texts: list[str], embedder: str | None) -> np.ndarray:
        name = embedder_name(embedder)
        keys = [(name, t) for t in texts]
        # one encoder pass for every new window, deduplicated
        uniq = list(dict.fromkeys(k for k in keys if k not in self._d))
        if uniq:
            for k, v in zip(uniq, embed([t for _, t in uniq], embedder)):
                self._d[k] = v
        out = np.stack([self._d[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)
        for k in keys:
            self._d.move_to_end(k)
        while len(self._d) > self.max_items:
            self._d.popitem(last=False)
        return out


_CACHE = WindowEmbeddings()


def _texts(record: LatentRecord, ex: Examples) -> list[str]:
    return [plain_text(record.token_strings(t)) for t in ex.tokens]


def _pool_vectors(pool: NegativePool, record: LatentRecord, ex: Examples) -> np.ndarray:
    row = {int(w): k for k, w in enumerate(ex.window_ids)}
    return pool.matrix(ex.window_ids, lambda ids: _texts(record, ex.take([row[int(i)] for i in ids])))


def _result(record, ex, q_vec, w_vecs, labels, cfg, seed) -> ScoreResult:
    res = ScoreResult(NAME, record.latent, {}, model=embedder_name(cfg.embedder), seed=seed)
    y = (labels >= 0).astype(int)
    if len(y) == 0 or y.min() == y.max():
        res.skipped = "need both activating and non-activating examples"
        return res
    sims = w_vecs @ q_vec
    res.metrics = {
        "auc": roc_auc(y, sims),
        "mean_sim_activating": float(sims[y == 1].mean()),
        "mean_sim_negative": float(sims[y == 0].mean()),
        "n_activating": float(y.sum()),
        "n_negative": float((1 - y).sum()),
    }
    res.details = {"window_ids": ex.window_ids.tolist(), "similarities": np.round(sims, 4).tolist(),
                   "quantiles": labels.tolist()}
    return res


async def score(
    record: LatentRecord,
    explanation,
    client=None,
    *,
    config: EmbeddingConfig | None = None,
    seed: int = 0,
) -> ScoreResult:
    if isinstance(explanation, Skipped):
        return ScoreResult(NAME, record.latent, {}, seed=seed, skipped=explanation.reason)
    if getattr(record, "members_only", False):
        return await asyncio.to_thread(score_members, record, explanation, config or EmbeddingConfig(), seed)
    # the encoder is CPU/GPU bound: keep the event loop free for the LLM-bound scorers running beside it
    return (await asyncio.to_thread(score_many, [record], [explanation], config=config, seed=seed))[0]


def score_many(
    records: list[LatentRecord],
    explanations: list,
    *,
    config: EmbeddingConfig | None = None,
    seed: int = 0,
    cache: WindowEmbeddings | None = None,
) -> list[ScoreResult]:
    """Score many (record, explanation) pairs with one encoder pass over all their windows and explanations.
    Explanations are str or Explanation objects (whose example windows stay out of the test set)."""
    cfg = config or EmbeddingConfig()
    cache = cache or _CACHE
    parts = [explanation_parts(e) for e in explanations]
    explanations = [t for t, _ in parts]
    sets = [select_test_examples(r, cfg.sampling, seed, cfg.pool, used) for r, (_, used) in zip(records, parts)]
    # the pool's window vectors serve only when they come from this scorer's embedder (else: another vector space)
    pool = cfg.pool if cfg.pool is not None and embedder_name(cfg.pool.embedder) == embedder_name(cfg.embedder) \
        else None
    texts, spans = [], []
    for r, picked in zip(records, sets):
        n = 0 if isinstance(picked, Skipped) else len(picked[0])
        spans.append((len(texts), len(texts) + n))
        if n and pool is None:
            texts += _texts(r, picked[0])
    W = cache.get(texts, cfg.embedder) if pool is None else None
    Q = embed([cfg.query_prefix + e for e in explanations], cfg.embedder)
    out = []
    for i, (r, picked, (a, b)) in enumerate(zip(records, sets, spans)):
        if isinstance(picked, Skipped):
            out.append(ScoreResult(NAME, r.latent, {}, model=embedder_name(cfg.embedder), seed=seed,
                                   skipped=picked.reason))
            continue
        ex, labels = picked
        if pool is not None:
            vecs = _pool_vectors(pool, r, ex)
        else:
            vecs = W[a:b]
        out.append(_result(r, ex, Q[i], vecs, labels, cfg, seed))
    return out


def score_members(record, explanation, cfg: EmbeddingConfig, seed: int) -> ScoreResult:
    """A meta-latent (autointerp.meta.MetaRecord): how well similarity to its explanation separates the held-out
    explanations of base latents it fires on (never shown to the explainer) from those of base latents it does not
    fire on, as ROC AUC."""
    text, _ = explanation_parts(explanation)
    pos, neg = [m["explanation"] for m in record.test], [m["explanation"] for m in record.negatives]
    res = ScoreResult(NAME, record.latent, {}, model=embedder_name(cfg.embedder), seed=seed)
    if not pos or not neg:
        res.skipped = "need explained base latents it fires on (held out) and ones it does not"
        return res
    sims = _CACHE.get(pos + neg, cfg.embedder) @ embed([cfg.query_prefix + text], cfg.embedder)[0]
    y = np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
    res.metrics = {"auc": roc_auc(y, sims), "mean_sim_activating": float(sims[:len(pos)].mean()),
                   "mean_sim_negative": float(sims[len(pos):].mean()), "n_activating": float(len(pos)),
                   "n_negative": float(len(neg))}
    res.details = {"units": [m["unit"] for m in record.test + record.negatives],
                   "similarities": np.round(sims, 4).tolist(), "labels": y.tolist()}
    return res
