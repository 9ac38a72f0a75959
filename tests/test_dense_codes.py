"""Dictionaries with no fixed number of nonzeros (relu, jumprelu, gated...) reach the collector a latent chunk at a
time: never a dense [B, T, n_latents] tensor past the chunk budget, and exactly what the dense codes collect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autointerp.dictionaries.base as base
from autointerp.collector import Collector, CollectorConfig, LatentChunks, SparseCodes
from autointerp.dictionaries import LinearDictionary
from autointerp.extract import encode_for_collector

N, D, T, B = 600, 24, 8, 6
CHUNK = B * T * 4 * 128  # a budget of 128 latents per chunk for a batch: 5 chunks, the last one short


def _sae(activation: str, seed: int = 0) -> LinearDictionary:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, N, generator=g) / D**0.5
    kw = dict(b_enc=torch.randn(N, generator=g) * 0.5 - 0.3)
    if activation == "jumprelu":
        kw["threshold"] = torch.rand(N, generator=g) * 0.8
    if activation == "gated":
        kw = dict(b_enc=None, b_gate=torch.randn(N, generator=g) - 0.5, b_mag=torch.randn(N, generator=g) * 0.3,
                  r_mag=torch.randn(N, generator=g) * 0.3)
    return LinearDictionary(format="saelens", source="t", id="t", hookpoint=None, transcoder=False, W_enc=w.T,
                            W_dec=torch.randn(N, D, generator=g), b_dec=torch.randn(D, generator=g) * 0.2,
                            activation=activation, k=10 if activation == "groupmax" else None, subtract_b_dec=True,
                            **kw)


def _assert_same(a: Collector, b: Collector) -> None:
    for name in ("n_active", "act_sum", "act_max", "hist", "pool_keys", "pool_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.pool_codes.keys() == b.pool_codes.keys()
    for wid, (lat, mx) in a.pool_codes.items():
        assert torch.equal(lat, b.pool_codes[wid][0]) and torch.equal(mx, b.pool_codes[wid][1])
    for buf in ("top", "sample"):
        for got, want in zip(getattr(a, buf).export(), getattr(b, buf).export()):
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x, y)
        sa, sb = getattr(a, buf).state(), getattr(b, buf).state()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("activation,dtype", [("jumprelu", torch.float32), ("relu", torch.float32),
                                              ("gated", torch.float32), ("groupmax", torch.float32),
                                              ("tanh_relu", torch.float32), ("jumprelu", torch.bfloat16)])
def test_latent_chunks_collect_exactly_what_the_dense_codes_do(monkeypatch, activation, dtype):
    """Top-K and sample windows with their activations, statistics and the pool: identical, ignored positions
    included, whether the codes come as one dense tensor or as latent chunks."""
    monkeypatch.setattr(base, "ENCODE_CHUNK_BYTES", CHUNK)
    sae = _sae(activation).to(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    cfg = CollectorConfig(top_k=4, n_sample=3, pool_size=5)
    dense, chunked = Collector(N, T, cfg, "cpu"), Collector(N, T, cfg, "cpu")
    for s in range(0, 60, B):
        x = torch.randn(B, T, D, generator=g)
        ignore = torch.rand(B, T, generator=g) < 0.2
        codes = encode_for_collector(sae, x, ignore)
        assert isinstance(codes, LatentChunks)
        want = sae.encode(x).masked_fill(ignore[..., None], 0)
        dense.update(want, torch.arange(s, s + B))
        chunked.update(codes, torch.arange(s, s + B))
    assert int(dense.n_active.sum()) > 0
    assert (dense.top.ids >= 0).float().mean() > 0.5  # most top-K buffers full: the merges evicted windows
    _assert_same(dense, chunked)


@pytest.mark.parametrize("activation,width", [("jumprelu", 128), ("relu", 128), ("gated", 128), ("groupmax", 120)])
def test_chunks_stay_under_the_budget_and_hold_exactly_the_nonzero_codes(monkeypatch, activation, width):
    """Every matmul makes at most `width` latents' pre-activations (groupmax: whole groups of 60); the chunks come
    in latent order, each sorted by (token, latent), and together they are the dense codes' nonzeros."""
    monkeypatch.setattr(base, "ENCODE_CHUNK_BYTES", CHUNK)
    sae, x = _sae(activation), torch.randn(B, T, D)
    widths = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(base.F, "linear", lambda *a: widths.append(a[1].shape[0]) or linear(*a))
    dense, spans = torch.zeros(B * T, N), []
    for tok, lat, val in sae.nonzero_chunks(x):
        key = tok * N + lat
        assert torch.equal(key, key.sort().values)
        spans.append((int(lat.min()), int(lat.max())))
        dense[tok, lat] = val
    assert max(widths) == width and len(widths) == len(spans) == -(-N // width)
    assert all(hi < lo for (_, hi), (lo, _) in zip(spans, spans[1:])) and all(hi - lo < width for lo, hi in spans)
    monkeypatch.setattr(base.F, "linear", linear)
    assert torch.equal(dense.view(B, T, N), sae.encode(x))


def test_under_the_budget_the_codes_stay_one_tensor_and_top_k_stays_sparse(monkeypatch):
    """Under the budget the codes stay one dense tensor (as before); a top-k rule never comes as latent chunks."""
    x, ignore = torch.randn(B, T, D), torch.zeros(B, T, dtype=torch.bool)
    assert isinstance(encode_for_collector(_sae("jumprelu"), x, ignore), torch.Tensor)
    monkeypatch.setattr(base, "ENCODE_CHUNK_BYTES", CHUNK)
    w = torch.randn(N, D)
    topk = LinearDictionary(format="sparsify", source="t", id="t", hookpoint=None, transcoder=False, W_enc=w,
                            b_enc=torch.zeros(N), W_dec=w, b_dec=torch.zeros(D), activation="relu_topk", k=8)
    assert isinstance(encode_for_collector(topk, x, ignore), SparseCodes)


def test_a_dictionary_firing_past_the_planned_bound_is_warned_about_once(monkeypatch, caplog):
    monkeypatch.setattr(base, "ENCODE_CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(base, "DENSE_NNZ_PER_TOKEN", 2)  # the relu SAE fires at ~hundreds per token
    sae = _sae("relu")
    coll = Collector(N, T, CollectorConfig(top_k=2, n_sample=2, pool_size=0), "cpu")
    for s in (0, B):
        coll.update(encode_for_collector(sae, torch.randn(B, T, D), torch.zeros(B, T, dtype=torch.bool)),
                    torch.arange(s, s + B))
    warned = [r for r in caplog.records if "latents per token" in r.getMessage()]
    assert len(warned) == 1 and "over the 2 the memory plan assumed" in warned[0].getMessage()
