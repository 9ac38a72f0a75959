"""Cache format 2 (sparse, 8-bit kept windows) against the exact path, and format-1 caches still read."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from test_extract import DICT, HOOK, SMALL, _brute_force, assert_within_quantisation

from autointerp.cache import ARRAYS_V1, LatentCache
from autointerp.collector import Collector, CollectorConfig
from autointerp.corpus import CorpusSpec
from autointerp.errors import ConfigError
from autointerp.extract import extract
from autointerp.records import Examples
from autointerp.sampling import SamplingConfig, sample_latent

SAMPLING = SamplingConfig(n_explain=4, n_test=10, n_negatives=6, n_explain_negatives=2, min_explain=2, min_test=3,
                          min_negatives=2)


@pytest.fixture(scope="module")
def made(subject, tmp_path_factory):
    """A format-2 cache, and every window's exact codes computed without the collector."""
    from autointerp.dictionaries import load_dictionary

    out = tmp_path_factory.mktemp("fmt") / "c"
    (cache,) = extract(subject, DICT, HOOK, "builtin", out, **SMALL)
    d = load_dictionary(DICT, d_in=subject.width(HOOK))
    windows, codes = _brute_force(subject, d, CorpusSpec(source="builtin", ctx_len=32, n_tokens=2048, seed=0))
    return cache, windows, codes.numpy()


def _exact(rec_ex: Examples, windows: np.ndarray, codes: np.ndarray, lat: int) -> Examples:
    """The same windows with the exact activations (window ids are the run's window order here: find by tokens)."""
    where = {w.tobytes(): i for i, w in enumerate(windows)}
    idx = [where[t.tobytes()] for t in rec_ex.tokens]
    return dataclasses.replace(rec_ex, acts=np.maximum(codes[idx, :, lat], 0).astype(np.float32))


def test_every_kept_window_reads_back_within_the_quantisation_step(made):
    cache, windows, codes = made
    assert cache.manifest["format_version"] == 2
    n_windows = 0
    for lat in range(cache.n_latents):
        rec = cache.record(lat)
        for ex in (rec.top, rec.sample):
            exact = _exact(ex, windows, codes, lat)
            for got, want in zip(ex.acts, exact.acts):
                assert_within_quantisation(got, want)
                n_windows += 1
    assert n_windows > 1000


def test_sampling_draws_the_same_sets_as_from_exact_activations(made):
    """Window maxima are exact, so the explainer set, the test set and its deciles are those of the exact path."""
    cache, windows, codes = made
    compared = 0
    for lat in cache.alive_latents():
        rec = cache.record(int(lat))
        exact = dataclasses.replace(rec, top=_exact(rec.top, windows, codes, int(lat)),
                                    sample=_exact(rec.sample, windows, codes, int(lat)))
        for explain_from in ("top", "mixed"):
            cfg = dataclasses.replace(SAMPLING, explain_from=explain_from)
            a, b = sample_latent(rec, cfg, seed=1), sample_latent(exact, cfg, seed=1)
            assert type(a) is type(b)
            if hasattr(a, "test"):
                np.testing.assert_array_equal(a.explain.window_ids, b.explain.window_ids)
                np.testing.assert_array_equal(a.test.window_ids, b.test.window_ids)
                np.testing.assert_array_equal(a.test_quantile, b.test_quantile)
                np.testing.assert_array_equal(a.negatives.window_ids, b.negatives.window_ids)
                compared += 1
    assert compared > 50


def _write_v1(cache: LatentCache, out) -> None:
    """The format-1 layout (dense float16 per-token activations, [n, K] rows padded with -1) of a cache's content."""
    out.mkdir()
    for f in ("windows.npy", "stats.npz", "pool_rows.npy", "pool_indptr.npy", "pool_latents.npy", "pool_max.npy"):
        shutil.copy(cache.path / f, out / f)
    np.save(out / "hist.npy", np.asarray(cache.array("hist"), np.int64))
    cfg = cache.manifest["collector"]
    for buf, k in (("top", cfg["top_k"]), ("sample", cfg["n_sample"])):
        rows = np.full((cache.n_latents, k), -1, np.int32)
        acts = np.zeros((cache.n_latents, k, cache.ctx_len), np.float16)
        for lat in range(cache.n_latents):
            r, a = cache.kept(buf, lat)
            rows[lat, :len(r)], acts[lat, :len(r)] = r, a
        np.save(out / f"{buf}_rows.npy", rows)
        np.save(out / f"{buf}_acts.npy", acts)
    (out / "manifest.json").write_text(json.dumps({**cache.manifest, "format_version": 1}))


def test_format_1_cache_still_reads(made, tmp_path):
    cache, _, _ = made
    _write_v1(cache, tmp_path / "v1")
    old = LatentCache(tmp_path / "v1")
    assert old.format_version == 1 and {f"{a}.npy" for a in ARRAYS_V1} <= {p.name for p in old.path.iterdir()}
    for lat in range(cache.n_latents):
        a, b = cache.record(lat), old.record(lat)
        for x, y in ((a.top, b.top), (a.sample, b.sample), (a.negatives, b.negatives)):
            np.testing.assert_array_equal(x.window_ids, y.window_ids)
            np.testing.assert_array_equal(x.tokens, y.tokens)
            np.testing.assert_allclose(x.acts, y.acts, rtol=1e-3)  # float16 in format 1
        assert a.stats.n_active == b.stats.n_active
        np.testing.assert_array_equal(a.stats.hist_counts, b.stats.hist_counts)


def test_format_1_values_are_read_exactly(tmp_path, made):
    """A hand-made format-1 cache: rows padded with -1 are dropped, float16 values come back as they were."""
    cache, _, _ = made
    _write_v1(cache, tmp_path / "v1")
    acts = np.load(tmp_path / "v1" / "top_acts.npy")
    rows = np.load(tmp_path / "v1" / "top_rows.npy")
    lat = int(np.argmax((rows >= 0).sum(1)))
    acts[lat, 0, :3] = [1.5, 0.0, 1000.0]
    rows[lat, -1] = -1
    np.save(tmp_path / "v1" / "top_acts.npy", acts)
    np.save(tmp_path / "v1" / "top_rows.npy", rows)
    rec = LatentCache(tmp_path / "v1").record(lat)
    assert len(rec.top) == int((rows[lat] >= 0).sum())
    np.testing.assert_array_equal(rec.top.acts, acts[lat, rows[lat] >= 0].astype(np.float32))


def test_unknown_format_version_is_one_line(made, tmp_path):
    cache, _, _ = made
    shutil.copytree(cache.path, tmp_path / "v9")
    m = json.loads((tmp_path / "v9" / "manifest.json").read_text())
    (tmp_path / "v9" / "manifest.json").write_text(json.dumps({**m, "format_version": 9}))
    with pytest.raises(ConfigError, match=r"manifest.json: format_version 9 \(this autointerp reads 1, 2\)"):
        LatentCache(tmp_path / "v9")


def test_quantisation_keeps_tiny_values_nonzero_and_the_max_exact():
    """Values 1e-4 of the window's max still read as firing; the max is exact; the rest within max / 510."""
    T, n = 16, 3
    codes = torch.zeros(4, T, n)
    codes[0, :, 0] = torch.linspace(0, 7.3, T)
    codes[1, 3, 0], codes[1, 9, 0] = 1e-4, 1.0
    codes[2, :, 1] = torch.rand(T) * 100
    codes[3, 5, 2] = 3.0
    coll = Collector(n, T, CollectorConfig(top_k=4, n_sample=4, pool_size=0), "cpu")
    coll.update(codes, torch.arange(4))
    for per_latent, ids, wmax, nnz, pos, q in coll.top.export():
        slot = np.repeat(np.arange(len(ids)), nnz)
        acts = np.zeros((len(ids), T), np.float32)
        acts[slot, pos] = wmax[slot] * (q / np.float32(255))
        lat = np.repeat(np.arange(n), per_latent)
        for s in range(len(ids)):
            assert_within_quantisation(acts[s], codes[ids[s], :, lat[s]].numpy())
    assert (q >= 1).all()
