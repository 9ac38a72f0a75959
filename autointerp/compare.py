"""Compare two dictionaries (SAEs, transcoders): pure functions over arrays, results as typed, JSON-ready records.

Three methods, one matching core. Each builds a sparse candidate graph — every latent's k most similar latents on
the other side, both directions, found blockwise so nothing of size n_a x n_b is ever held — and solves the
one-to-one assignment that maximises total similarity on that graph (scipy's sparse LAPJV with one dummy partner per
A latent, so a latent may stay unmatched). Pairs below `min_similarity` are left out first: they would never count
as matched, and unrelated latents' near-equal background similarities are what makes the assignment slow.
Dense Hungarian on 32k x 32k would be 4 GB and cubic.

- `compare_explanations`: cosine of explanation embeddings (any two dictionaries, any models or hookpoints).
- `compare_directions`: cosine of decoder and of encoder directions (same d_in), the analysis of Paulo & Belrose
  (2025), "Sparse Autoencoders Trained on the Same Data Learn Different Features": one matching on decoder cosine and
  one on encoder cosine; a latent is shared when both its matches exceed 0.7.
- `compare_activations`: Pearson correlation (or Jaccard overlap of firing sets) of the codes over the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from .errors import ConfigError
from .vector_index import Neighbours, VectorIndex, exact_topk, ids_at, unit_rows

DEFAULT_K = 16  # candidates per latent and direction; the optimum on the full graph rarely needs a worse partner
SHARED_THRESHOLD = 0.7  # Paulo & Belrose's cut for a shared latent
BLOCK = 2048  # rows of A per similarity block: BLOCK x n_b floats at a time
HIST_BINS = 40
MIN_SIMILARITY = 0.2  # candidate pairs at or below this are not considered (random 768-d directions: ~0.04 +- 0.04)
# MiniLM explanations: unrelated sentences reach 0.35 at the 99th percentile (bench/search.py's real texts, mean
# 0.09), so pairs below 0.4 say nothing, and they were ~1M candidate edges that made the assignment slow
EXPLANATION_MIN_SIMILARITY = 0.4
# The candidate screen: above SCREEN_MIN_CELLS similarities and for vectors at least twice SCREEN_DIM wide (decoder
# and encoder rows; not 384-d explanation embeddings), candidates are found on random projections to SCREEN_DIM
# dimensions (cosine estimates, error sd ~ 1/sqrt(SCREEN_DIM)), SCREEN_WIDEN x more of them per latent, then every
# candidate pair is re-scored exactly: the dense products cost SCREEN_DIM / d of the exact ones.
SCREEN_DIM = 256
SCREEN_WIDEN = 2
SCREEN_MIN_CELLS = 4096 * 4096


@dataclass
class Histogram:
    edges: list[float]
    counts: list[int]

    @classmethod
    def of(cls, values: np.ndarray, lo: float, hi: float, bins: int = HIST_BINS) -> Histogram:
        counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
        return cls([round(float(e), 6) for e in edges], [int(c) for c in counts])


@dataclass
class Matching:
    """A one-to-one matching of A's latents to B's. Pairs are (a_index, b_index, similarity), sorted by a_index;
    "novel" latents have no partner with similarity >= threshold."""

    method: str
    n_a: int
    n_b: int
    threshold: float
    a_index: np.ndarray
    b_index: np.ndarray
    similarity: np.ndarray
    histogram: Histogram
    novel_a: np.ndarray = field(init=False)
    novel_b: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        good = self.similarity >= self.threshold
        self.novel_a = np.setdiff1d(np.arange(self.n_a), self.a_index[good])
        self.novel_b = np.setdiff1d(np.arange(self.n_b), self.b_index[good])

    @property
    def summary(self) -> dict[str, float]:
        """Share of each side matched at >= threshold, and the mean similarity of A's best partners (an unmatched
        latent counts 0), the number to compare runs by."""
        return {"matched_fraction_a": 1 - len(self.novel_a) / self.n_a,
                "matched_fraction_b": 1 - len(self.novel_b) / self.n_b,
                "mean_similarity": float(self.similarity.sum() / self.n_a),
                "n_pairs": int(len(self.a_index))}

    def pairs(self) -> list[tuple[int, int, float]]:
        return [(int(a), int(b), float(s)) for a, b, s in zip(self.a_index, self.b_index, self.similarity)]

    def partner_similarity(self) -> np.ndarray:
        """[n_a]: the similarity of each A latent's partner, 0 when it has none."""
        out = np.zeros(self.n_a, np.float32)
        out[self.a_index] = self.similarity
        return out

    def as_dict(self) -> dict:
        return {"method": self.method, "n_a": self.n_a, "n_b": self.n_b, "threshold": self.threshold,
                "summary": self.summary, "histogram": {"edges": self.histogram.edges, "counts": self.histogram.counts},
                "pairs": self.pairs(), "novel_a": self.novel_a.tolist(), "novel_b": self.novel_b.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Matching:
        pairs = np.asarray(d["pairs"], np.float64).reshape(-1, 3)
        return cls(d["method"], int(d["n_a"]), int(d["n_b"]), float(d["threshold"]), pairs[:, 0].astype(np.int64),
                   pairs[:, 1].astype(np.int64), pairs[:, 2].astype(np.float32), Histogram(**d["histogram"]))


@dataclass
class DirectionComparison:
    """Decoder and encoder matchings and Paulo & Belrose's shared latents of A (both matches > threshold)."""

    decoder: Matching
    encoder: Matching | None
    threshold: float
    shared_a: np.ndarray  # A latents shared by that definition (decoder only when no encoders are given)
    same_partner_fraction: float  # of the shared, how many have the same partner in both matchings

    @property
    def shared_fraction(self) -> float:
        return len(self.shared_a) / self.decoder.n_a

    def as_dict(self) -> dict:
        return {"method": "directions", "threshold": self.threshold, "shared_fraction": self.shared_fraction,
                "same_partner_fraction": self.same_partner_fraction, "shared_a": self.shared_a.tolist(),
                "decoder": self.decoder.as_dict(), "encoder": None if self.encoder is None else self.encoder.as_dict()}


# --- candidates: top-k both ways, blockwise -------------------------------------------------------------------------

BlockFn = Callable[[int, int], np.ndarray]  # rows lo:hi of the similarity matrix, dense [hi - lo, n_b]


def _candidates(block: BlockFn, n_a: int, n_b: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, block similarities) of the union of each A row's top-k and each B column's top-k, sorted by
    (row, col), without duplicates."""
    import torch

    ka, kb = min(k, n_b), min(k, n_a)
    rows, cols, vals = [], [], []
    col_val = torch.full((n_b, kb), -torch.inf)  # each column's best kb so far
    col_idx = torch.zeros((n_b, kb), dtype=torch.int64)
    for lo in range(0, n_a, BLOCK):
        hi = min(lo + BLOCK, n_a)
        s = torch.as_tensor(block(lo, hi)).float()
        v, top = torch.topk(s, ka, dim=1)
        rows.append(np.repeat(np.arange(lo, hi), ka))
        cols.append(top.reshape(-1).numpy())
        vals.append(v.reshape(-1).numpy())
        col_val, col_idx = _merge_column_topk(s, lo, col_val, col_idx)
    have = torch.isfinite(col_val)
    rows.append(col_idx[have].numpy())
    cols.append(torch.nonzero(have)[:, 0].numpy())
    vals.append(col_val[have].numpy())
    key, first = np.unique(np.concatenate(rows).astype(np.int64) * n_b + np.concatenate(cols), return_index=True)
    return key // n_b, key % n_b, np.concatenate(vals)[first].astype(np.float32)


def _merge_column_topk(s, lo: int, col_val, col_idx):
    """Block rows lo.. of s [h, n_b] merged into each column's running top-kb (col_val, col_idx [n_b, kb]); returns
    the new pair. After the first block only entries above a column's current kb-th best can enter, and those are
    few (about kb * h / rows seen per column): filtering them and merging a small padded [n_b, kb + m] is several
    times faster than torch.topk along dim 0 (strided) or a transposed copy of every block."""
    import torch

    n_b, kb = col_val.shape
    if lo == 0:  # the first block: its own top-k per column
        v, r = torch.topk(s, min(kb, len(s)), dim=0)
        v, r = v.T, r.T
        if v.shape[1] < kb:
            v = torch.cat([v, torch.full((n_b, kb - v.shape[1]), -torch.inf)], 1)
            r = torch.cat([r, torch.zeros((n_b, kb - r.shape[1]), dtype=torch.int64)], 1)
        return v.contiguous(), r.contiguous()
    r, c = torch.nonzero(s > col_val.min(dim=1).values, as_tuple=True)
    if not len(r):
        return col_val, col_idx
    v = s[r, c]
    order = torch.argsort(c)  # group by column; order within a column does not matter
    r, c, v = r[order] + lo, c[order], v[order]
    counts = torch.bincount(c, minlength=n_b)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(c)) - starts[c]
    m = int(counts.max())
    new_v = torch.full((n_b, m), -torch.inf)
    new_i = torch.zeros((n_b, m), dtype=torch.int64)
    new_v[c, rank], new_i[c, rank] = v, r
    col_val, pick = torch.topk(torch.cat([col_val, new_v], 1), kb, dim=1)
    return col_val, torch.gather(torch.cat([col_idx, new_i], 1), 1, pick)


def _cosine_block(a: np.ndarray, b: np.ndarray) -> BlockFn:
    """Blocks of a @ b.T in float32, written into one reused buffer (a fresh 2048 x 32k result per block costs page
    faults) against a pre-transposed b: ~70 GFLOP per CPU-second here vs ~55 for torch's matmul. Not bfloat16:
    without AVX512-BF16/AMX (this project's AVX2-only AMD EPYC) bf16 matmul is ~4x slower than float32
    (docs/benchmarks.md). The block is only valid until the next call."""
    bt = np.ascontiguousarray(b.T)
    buf = np.empty((min(BLOCK, len(a)), len(b)), np.float32)

    def block(lo: int, hi: int) -> np.ndarray:
        return np.matmul(a[lo:hi], bt, out=buf[:hi - lo])
    return block


# --- assignment -----------------------------------------------------------------------------------------------------

def assign(rows: np.ndarray, cols: np.ndarray, sims: np.ndarray, n_a: int, n_b: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one-to-one matching on the candidate edges (rows[i], cols[i], sims[i]; no edge twice) of largest total
    similarity; a latent may stay unmatched (worth 0), so a pair of similarity <= 0 is never taken. On a complete
    graph of positive similarities, exactly the dense Hungarian answer (scipy's linear_sum_assignment).

    Not forcing every latent into a pair matters on a sparse graph: a full matching there can be forced to break a
    strong pair to place latents whose few candidates are taken. As a full matching for scipy's LAPJVsp on the
    rectangular graph A x (B + one dummy per A latent): A_i–B_j costs C - s_ij, A_i–dummy(A_i) costs C (unmatched);
    every A latent is matched (to a B or its dummy), a B latent may stay free. Every such matching costs
    n_a * C - (its total similarity), so it is the optimum; C (keeping weights > 0, as scipy needs) changes no
    choice. (The square form with dummies on both sides and dummy–dummy edges is the same optimum, 8-11x slower.)"""
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    c = 2.0 + float(np.abs(sims).max())
    ia = np.arange(n_a)
    cost = np.concatenate([c - sims.astype(np.float64), np.full(n_a, c)])
    graph = sp.csr_matrix((cost, (np.concatenate([rows, ia]), np.concatenate([cols, n_b + ia]))),
                          shape=(n_a, n_b + n_a))
    li, ri = min_weight_full_bipartite_matching(graph)
    real = ri < n_b
    a, b = li[real].astype(np.int64), ri[real].astype(np.int64)
    order = np.argsort(a)
    a, b = a[order], b[order]
    key = rows.astype(np.int64) * n_b + cols
    by_key = np.argsort(key)
    return a, b, sims[by_key[np.searchsorted(key, a * n_b + b, sorter=by_key)]].astype(np.float32)


def _matching(method: str, rows, cols, sims, n_a: int, n_b: int, threshold: float, lo: float,
              min_similarity: float) -> Matching:
    keep = sims > min_similarity  # near-background pairs: never "matched", and they only slow the solver down
    a, b, s = assign(rows[keep], cols[keep], sims[keep], n_a, n_b)
    return Matching(method, n_a, n_b, threshold, a, b, s, Histogram.of(s, lo, 1.0))


# --- the three methods ----------------------------------------------------------------------------------------------

def _matrix(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or 0 in x.shape:
        raise ConfigError(f"compare: {what} must be a non-empty [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError(f"compare: {what} contains nan or inf")
    return x


def cosine_matching(a: np.ndarray, b: np.ndarray, method: str = "cosine", k: int = DEFAULT_K,
                    threshold: float = SHARED_THRESHOLD, min_similarity: float = MIN_SIMILARITY) -> Matching:
    """One-to-one matching of the rows of a [n_a, d] and b [n_b, d] by cosine similarity."""
    a, b = unit_rows(_matrix(a, f"{method} A")), unit_rows(_matrix(b, f"{method} B"))
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"compare {method}: A has width {a.shape[1]}, B has {b.shape[1]} (they must be equal)")
    if len(a) * len(b) >= SCREEN_MIN_CELLS and a.shape[1] >= 2 * SCREEN_DIM:
        rows, cols, sims = _screened_candidates(a, b, k)
    else:
        rows, cols, sims = _candidates(_cosine_block(a, b), len(a), len(b), k)  # float32 blocks: exact
    return _matching(method, rows, cols, sims, len(a), len(b), threshold, -1.0, min_similarity)


def _screened_candidates(a: np.ndarray, b: np.ndarray, k: int, dim: int = SCREEN_DIM, widen: int = SCREEN_WIDEN
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_candidates` of unit rows a, b with the top-(widen * k) both ways found on a seeded random projection to `dim`
    dimensions, then re-scored exactly (the similarities returned are the exact cosines). A pair of cosine s is
    estimated with an error of sd ~ (1 - s^2) / sqrt(dim): strong pairs are never missed; weak ones (s ~ 0.3,
    against 32k near-zero neighbours) stay in the widened top-k with high probability (docs/benchmarks.md)."""
    proj = np.random.default_rng(0).standard_normal((a.shape[1], dim), dtype=np.float32)
    rows, cols, _ = _candidates(_cosine_block(unit_rows(a @ proj), unit_rows(b @ proj)), len(a), len(b), widen * k)
    return rows, cols, _row_dots(a, b, rows, cols)


def _row_dots(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """a[rows[i]] . b[cols[i]] for every i, in chunks (the gathered rows of all pairs would not fit)."""
    out = np.empty(len(rows), np.float32)
    for lo in range(0, len(rows), chunk):
        hi = min(lo + chunk, len(rows))
        out[lo:hi] = np.einsum("ij,ij->i", a[rows[lo:hi]], b[cols[lo:hi]])
    return out


def compare_explanations(emb_a: np.ndarray, emb_b: np.ndarray, k: int = DEFAULT_K, threshold: float = SHARED_THRESHOLD,
                         min_similarity: float = EXPLANATION_MIN_SIMILARITY) -> Matching:
    """Match explanations by the cosine of their embeddings (rows: the explained latents, in the caller's order;
    map pair indices back to latent indices with the caller's row -> latent table)."""
    return cosine_matching(emb_a, emb_b, "explanation", k, threshold, min_similarity)


def compare_directions(decoder_a: np.ndarray, decoder_b: np.ndarray, encoder_a: np.ndarray | None = None,
                       encoder_b: np.ndarray | None = None, k: int = DEFAULT_K,
                       threshold: float = SHARED_THRESHOLD, min_similarity: float = MIN_SIMILARITY
                       ) -> DirectionComparison:
    """Paulo & Belrose's comparison: decoders [n, d_in] (and encoders [n, d_in], one row per latent, i.e. W_enc
    transposed for SAELens / Gemma Scope) matched separately; A's latent is shared when both of its partners
    have cosine > threshold (decoder only when no encoders are given)."""
    da, db = _matrix(decoder_a, "decoder A"), _matrix(decoder_b, "decoder B")
    if da.shape[1] != db.shape[1]:
        raise ConfigError(f"compare directions: decoder A has d_in {da.shape[1]}, decoder B has {db.shape[1]}; "
                          "direction comparison needs the same d_in (use compare_explanations)")
    if (encoder_a is None) != (encoder_b is None):
        raise ConfigError("compare directions: give the encoders of both dictionaries or of neither")
    dec = cosine_matching(da, db, "decoder", k, threshold, min_similarity)
    if encoder_a is None:
        return DirectionComparison(dec, None, threshold, dec.a_index[dec.similarity > threshold], 1.0)
    ea, eb = _matrix(encoder_a, "encoder A"), _matrix(encoder_b, "encoder B")
    if ea.shape != da.shape or eb.shape != db.shape:
        raise ConfigError(f"compare directions: encoders {ea.shape} / {eb.shape} must have the decoders' shapes "
                          f"{da.shape} / {db.shape} (one row per latent)")
    enc = cosine_matching(ea, eb, "encoder", k, threshold, min_similarity)
    shared = np.flatnonzero((dec.partner_similarity() > threshold) & (enc.partner_similarity() > threshold))
    partner_dec, partner_enc = np.full(dec.n_a, -1), np.full(dec.n_a, -2)
    partner_dec[dec.a_index], partner_enc[enc.a_index] = dec.b_index, enc.b_index
    same = float((partner_dec[shared] == partner_enc[shared]).mean()) if len(shared) else 0.0
    return DirectionComparison(dec, enc, threshold, shared, same)


def canonical_split(decoder_small: np.ndarray, decoder_large: np.ndarray, threshold: float = SHARED_THRESHOLD,
                    cells: int = 1 << 26) -> dict:
    """Leask et al.'s split ("Sparse autoencoders do not find canonical units of analysis") of the wider
    dictionary's latents: a *reconstruction* latent's decoder has cosine >= threshold with some latent of the
    narrower one (it re-learns, or splits, what the narrower one has); a *novel* latent has none (it adds
    something). Many-to-one, unlike the matching: feature splitting gives several reconstruction latents one partner.
    Blockwise: never more than `cells` similarities at once."""
    small, large = unit_rows(_matrix(decoder_small, "decoder")), unit_rows(_matrix(decoder_large, "decoder"))
    if small.shape[1] != large.shape[1]:
        raise ConfigError(f"compare: decoders have d_in {small.shape[1]} and {large.shape[1]}; the split needs one width")
    best, arg = np.empty(len(large), np.float32), np.empty(len(large), np.int64)
    step = max(1, cells // max(1, len(small)))
    for lo in range(0, len(large), step):
        sims = large[lo:lo + step] @ small.T
        arg[lo:lo + step] = sims.argmax(1)
        best[lo:lo + step] = sims[np.arange(len(sims)), arg[lo:lo + step]]
    recon = best >= threshold
    return {"threshold": threshold, "n_reconstruction": int(recon.sum()), "n_novel": int((~recon).sum()),
            "novel_fraction": float((~recon).mean()) if len(large) else 0.0,
            "reconstruction": np.flatnonzero(recon).tolist(), "novel": np.flatnonzero(~recon).tolist(),
            "partner": arg.tolist(), "max_cosine": Histogram.of(best, -1.0, 1.0).__dict__}


def _codes(x, what: str) -> sp.csc_matrix:
    x = sp.csc_matrix(x, dtype=np.float64)
    if 0 in x.shape:
        raise ConfigError(f"compare activations: codes {what} are empty (shape {x.shape})")
    return x


def compare_activations(codes_a, codes_b, metric: str = "pearson", k: int = DEFAULT_K,
                        threshold: float = SHARED_THRESHOLD, min_similarity: float = MIN_SIMILARITY) -> Matching:
    """Match latents by how their codes co-vary over the same tokens: codes [n_tokens, n_latents] (scipy sparse or
    dense; the same tokens in the same order on both sides). metric "pearson" (correlation of activations, zeros
    included) or "jaccard" (|both fire| / |either fires|)."""
    xa, xb = _codes(codes_a, "A"), _codes(codes_b, "B")
    if xa.shape[0] != xb.shape[0]:
        raise ConfigError(f"compare activations: A has codes for {xa.shape[0]} tokens, B for {xb.shape[0]} "
                          "(they must cover the same tokens)")
    if metric == "jaccard":
        xa, xb = (xa != 0).astype(np.float64), (xb != 0).astype(np.float64)
        block = _jaccard_block(xa, xb)
    elif metric == "pearson":
        block = _pearson_block(xa, xb)
    else:
        raise ConfigError(f"compare activations: metric {metric!r}, expected pearson or jaccard")
    n_a, n_b = xa.shape[1], xb.shape[1]
    rows, cols, sims = _candidates(block, n_a, n_b, k)
    lo = 0.0 if metric == "jaccard" else -1.0
    return _matching(f"activation-{metric}", rows, cols, sims, n_a, n_b, threshold, lo, min_similarity)


def _pearson_block(xa: sp.csc_matrix, xb: sp.csc_matrix) -> BlockFn:
    t = xa.shape[0]
    mu_a, mu_b = np.asarray(xa.mean(0)).ravel(), np.asarray(xb.mean(0)).ravel()
    sd_a = np.sqrt(np.maximum(np.asarray(xa.multiply(xa).mean(0)).ravel() - mu_a ** 2, 0))
    sd_b = np.sqrt(np.maximum(np.asarray(xb.multiply(xb).mean(0)).ravel() - mu_b ** 2, 0))
    inv_a, inv_b = _inverse(sd_a), _inverse(sd_b)

    def block(lo: int, hi: int) -> np.ndarray:  # a dead latent (sd 0) correlates 0 with everything
        cov = (xa[:, lo:hi].T @ xb).toarray() / t - np.outer(mu_a[lo:hi], mu_b)
        return cov * inv_a[lo:hi, None] * inv_b[None, :]
    return block


def _inverse(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, 1 / np.where(x > 0, x, 1), 0.0)


def _jaccard_block(fa: sp.csc_matrix, fb: sp.csc_matrix) -> BlockFn:
    count_a, count_b = np.asarray(fa.sum(0)).ravel(), np.asarray(fb.sum(0)).ravel()

    def block(lo: int, hi: int) -> np.ndarray:
        both = (fa[:, lo:hi].T @ fb).toarray()
        either = count_a[lo:hi, None] + count_b[None, :] - both
        return np.where(either > 0, both / np.where(either > 0, either, 1), 0.0)
    return block


# --- nearest latents of one latent elsewhere ------------------------------------------------------------------------

def nearest(vector: np.ndarray, among: np.ndarray | VectorIndex, k: int = 10,
            ids: np.ndarray | None = None) -> Neighbours:
    """The k rows of `among` nearest to `vector` by cosine: a [n, d] matrix (a decoder, embeddings; compared
    exactly; ids are row numbers unless `ids` names them) or a VectorIndex (its ids)."""
    if isinstance(among, VectorIndex):
        return among.search(vector, k)
    matrix = unit_rows(_matrix(among, "nearest: matrix"))
    width = np.shape(vector)[-1] if np.ndim(vector) else 0
    if width != matrix.shape[1]:
        raise ConfigError(f"nearest: vector of width {width}, matrix rows of width {matrix.shape[1]}")
    pos, sims = exact_topk(unit_rows(np.atleast_2d(vector)), matrix, k)
    out = ids_at(pos, np.arange(len(matrix)) if ids is None else np.asarray(ids, np.int64))
    return Neighbours(out[0], sims[0]) if np.ndim(vector) == 1 else Neighbours(out, sims)


# --- two dictionaries of the store: the function the CLI, the API and the demo call --------------------------------

METHODS = ("embedding", "decoder", "activation", "itda-jaccard")
_BASELINE_EXPLAINERS = ("random",)


def _explanation_vectors(store, d: dict, embedder: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(latents, unit vectors): one explanation per latent — the newest of a non-random explainer — embedded."""
    from sqlalchemy import select

    from .search import _embedder, embed_explanations
    from .store.store import T_EMB, T_EXPL

    name = _embedder(embedder)
    embed_explanations(store, embedder, str(d["id"]))
    with store.tx() as conn:
        rows = conn.execute(select(T_EXPL.c.latent, T_EMB.c.vector).join(T_EMB, T_EMB.c.explanation_id == T_EXPL.c.id)
                            .where(T_EXPL.c.dictionary_pk == d["id"], T_EMB.c.embedder == name,
                                   T_EXPL.c.explainer.not_in(_BASELINE_EXPLAINERS))
                            .order_by(T_EXPL.c.latent, T_EXPL.c.id)).all()
    by_latent = {int(latent): vec for latent, vec in rows}  # the last (newest) explanation of each latent wins
    if not by_latent:
        raise ConfigError(f"compare by embedding: dictionary {d['name']} has no explanations (run a job on it "
                          "first, or compare with method decoder)")
    latents = np.fromiter(by_latent, np.int64, len(by_latent))
    return latents, np.stack([np.frombuffer(by_latent[i], np.float32) for i in latents])


def _examples_of(store, d: dict):
    from .store.examples import open_examples

    ex = open_examples(d, store)
    if ex is None:
        raise ConfigError(f"dictionary {d['name']}: no extraction here (no cache folder, no examples in the store)")
    return ex


def _dictionary_of(store, d: dict):
    from .dictionaries import load_cached_dictionary

    return load_cached_dictionary(_examples_of(store, d).manifest["dictionary"])


def _pool_codes(store, d: dict) -> tuple[np.ndarray, sp.csr_matrix]:
    """Window-level codes over the cache's shared random pool: [pool windows, n_latents], each latent's max
    activation in each window (the cache keeps which latents fire in every pool window)."""
    c = _examples_of(store, d)
    p = c.pool()
    indptr, lat = np.asarray(p["indptr"]), np.asarray(p["latents"])
    vals = np.asarray(p["max"], np.float64)
    tokens = c.windows(np.sort(np.asarray(p["rows"])))
    return tokens, sp.csr_matrix((vals, lat, indptr), shape=(len(indptr) - 1, c.n_latents))


def _remap(m: Matching, la: np.ndarray, lb: np.ndarray) -> dict:
    """A matching over rows as a result over latent indices."""
    out = m.as_dict()
    out["pairs"] = [(int(la[a]), int(lb[b]), s) for a, b, s in out["pairs"]]
    out["novel_a"], out["novel_b"] = la[m.novel_a].tolist(), lb[m.novel_b].tolist()
    return out


def _whole_dictionary(xa, xb, dec_a: np.ndarray, dec_b: np.ndarray, threshold: float, result: dict) -> dict:
    """What a decoder comparison adds beside the matching: the canonical-units split of the wider dictionary's
    latents when the widths differ (into `result["canonical"]`), ITDA Jaccard when both are ITDA."""
    out: dict = {}
    if len(dec_a) != len(dec_b):
        wide_a = len(dec_a) > len(dec_b)
        split = canonical_split(dec_b if wide_a else dec_a, dec_a if wide_a else dec_b, threshold)
        result["canonical"] = {"wider": "a" if wide_a else "b", **split}
        out.update(wider="a" if wide_a else "b", novel_fraction=split["novel_fraction"],
                   reconstruction_latents=split["n_reconstruction"], novel_latents=split["n_novel"])
    ba, bb = (getattr(x, "base", x) for x in (xa, xb))
    if hasattr(ba, "atom_indices") and hasattr(bb, "atom_indices"):
        from .similarity import itda_jaccard

        out["itda_jaccard"] = itda_jaccard(ba, bb)
    return out


def _directions(xa, xb, name_a: str, name_b: str, k: int, threshold: float) -> tuple[dict, dict]:
    """(result, summary) of the decoder (+ encoder) comparison of two loaded dictionaries (their units), with the
    whole-dictionary numbers beside it."""
    dec_a, dec_b = (x.decoder_directions().float().cpu().numpy() for x in (xa, xb))
    if dec_a.shape[1] != dec_b.shape[1]:
        raise ConfigError(f"compare decoder: {name_a} has d_in {dec_a.shape[1]}, {name_b} has {dec_b.shape[1]}; "
                          "direction comparison needs the same width (use method embedding)")
    enc = [getattr(x, "encoder_weight", None) for x in (xa, xb)]
    enc_a, enc_b = (e().float().cpu().numpy() for e in enc) if all(enc) else (None, None)
    r = compare_directions(dec_a, dec_b, enc_a, enc_b, k, threshold)
    result = r.as_dict()
    summary = {"shared_fraction": r.shared_fraction, "same_partner_fraction": r.same_partner_fraction,
               "decoder": r.decoder.summary, "encoder": None if r.encoder is None else r.encoder.summary,
               **_whole_dictionary(xa, xb, dec_a, dec_b, threshold, result)}
    return result, summary


def compare_checkpoints(a: str, b: str, method: str = "decoder", *, k: int = DEFAULT_K,
                        threshold: float = SHARED_THRESHOLD) -> dict:
    """The comparisons that need only weights (decoder / encoder cosine, ITDA Jaccard) straight from two checkpoints
    (paths or hub ids, any format `load_dictionary` reads), with no extraction first; nothing is stored."""
    from .dictionaries import as_units, load_dictionary

    if method == "itda-jaccard":
        from .similarity import itda_overlap

        r = itda_overlap(a, b)
        return {"method": method, "a": a, "b": b, "summary": {"jaccard": r["jaccard"], "shared_atoms": r["shared"]},
                "result": r}
    if method not in ("decoder", "encoder"):
        raise ConfigError(f"compare: method {method!r} needs extractions; checkpoints compare by decoder, encoder or "
                          "itda-jaccard")
    result, summary = _directions(*(as_units(load_dictionary(x)) for x in (a, b)), a, b, k, threshold)
    return {"method": "decoder", "a": a, "b": b, "params": {"k": k, "threshold": threshold}, "summary": summary,
            "result": result}


def compare(store, a: str | int, b: str | int, method: str = "embedding", *, k: int = DEFAULT_K,
            threshold: float = SHARED_THRESHOLD, embedder: str | None = None) -> dict:
    """Compare two dictionaries of the store and store the result; returns the stored row.

    embedding: one-to-one matching of their explanations' embeddings (any two dictionaries, across models and
    hookpoints). decoder: Paulo & Belrose's decoder and encoder cosine matching (same d_in; "shared" = both > 0.7).
    activation: correlation of the latents' window-level activations over the two caches' shared random pool
    (the same corpus windows on both sides: two dictionaries extracted in one pass, or with the same corpus and seed).
    """
    from .store.tables import Comparison

    if method not in METHODS + ("encoder",):
        raise ConfigError(f"compare: method {method!r}, expected one of {', '.join(METHODS)}")
    da, db = store.dictionary(a), store.dictionary(b)
    params = {"k": k, "threshold": threshold}
    if method == "embedding":
        la, ea = _explanation_vectors(store, da, embedder)
        lb, eb = _explanation_vectors(store, db, embedder)
        m = compare_explanations(ea, eb, k, threshold)
        result, summary = _remap(m, la, lb), {**m.summary, "explained_a": len(la), "explained_b": len(lb)}
        params["embedder"] = embedder or "default"
    elif method in ("decoder", "encoder"):
        result, summary = _directions(_dictionary_of(store, da), _dictionary_of(store, db), da["name"], db["name"],
                                      k, threshold)
        method = "decoder"
    elif method == "itda-jaccard":
        from .similarity import itda_overlap

        xa, xb = (getattr(x, "base", x) for x in (_dictionary_of(store, da), _dictionary_of(store, db)))
        if not (hasattr(xa, "atom_indices") and hasattr(xb, "atom_indices")):
            raise ConfigError(f"compare itda-jaccard: {da['name']} ({da['format']}) and {db['name']} ({db['format']}) "
                              "must both be ITDA dictionaries")
        result = itda_overlap(xa, xb)
        summary = {"jaccard": result["jaccard"], "shared_atoms": result["shared"]}
    else:
        ta, ca = _pool_codes(store, da)
        tb, cb = _pool_codes(store, db)
        if ta.shape != tb.shape or not np.array_equal(ta, tb):
            raise ConfigError(f"compare activation: {da['name']} and {db['name']} were not extracted over the same "
                              "pool windows (extract both in one pass, or with the same corpus, seed and n_tokens)")
        m = compare_activations(ca, cb, "pearson", k, threshold)
        from .similarity import linear_cka

        # beside the latent-to-latent matching, one number for the two codes as wholes
        result, summary = m.as_dict(), {**m.summary, "pool_windows": int(ca.shape[0]), "cka": linear_cka(ca, cb)}
    from .store.tables import utcnow

    row = {"dictionary_a": da["id"], "dictionary_b": db["id"], "method": method, "params": params,
           "summary": summary, "result": result, "created": utcnow()}
    with store.tx(write=True) as conn:
        cid = conn.execute(Comparison.__table__.insert().values(**row)).inserted_primary_key[0]
    # each side's quality pass (autointerp.quality), shown beside the comparison; the dictionaries' rows keep it
    return {"id": int(cid), **row, "quality": {"a": da.get("quality"), "b": db.get("quality")}}


def format_comparison(r: dict, show: int) -> list[str]:
    """The lines `autointerp compare` prints: the summary, the similarity histogram, the best pairs, the novel
    latents and (stored comparisons) both sides' quality."""
    out: list[str] = []
    if r["method"] == "itda-jaccard":
        out.append(f"  jaccard {r['summary']['jaccard']:.4f} ({r['result']['shared']} shared atoms of "
                   f"{r['result']['union']})")
        return out
    res = r["result"]["decoder"] if r["method"] == "decoder" else r["result"]
    for k, v in r["summary"].items():
        out.append(f"  {k:<22} {json.dumps(v) if isinstance(v, dict) else (f'{v:.3f}' if isinstance(v, float) else v)}")
    h = res["histogram"]
    peak = max(h["counts"]) or 1
    out.append("  similarity of matched pairs:")
    for lo, hi, n in zip(h["edges"], h["edges"][1:], h["counts"]):
        if n:
            out.append(f"  {lo:6.2f}..{hi:5.2f} {n:>7} {'#' * max(1, round(40 * n / peak))}")
    for x, y, sim in sorted(res["pairs"], key=lambda p: -p[2])[:show]:
        out.append(f"  A {x:>7} ~ B {y:>7}  {sim:.3f}")
    out.append(f"  novel: {len(res['novel_a'])} of A, {len(res['novel_b'])} of B (no partner >= {res['threshold']})")
    from .quality import format_value, quality_rows

    q = r.get("quality") or {}
    rows = quality_rows(q.get("a"), q.get("b"))
    if rows:  # what each dictionary is worth, side by side (from their extractions' quality passes)
        out.append(f"  {'quality':<34} {'A':>12} {'B':>12}")
        for label, (va, vb) in rows:
            out.append(f"  {label:<34} {format_value(va):>12} {format_value(vb):>12}")
    return out
