"""Sharded extraction equals the one-process extraction exactly, on a dictionary whose firing sets are known: raw
neurons at the embedding output (resid_pre.0), where a latent's activation depends on the token id only."""

from __future__ import annotations

import numpy as np
import pytest

from autointerp.cache import ARRAYS
from autointerp.corpus import CorpusSpec, iter_windows
from autointerp.errors import ConfigError
from autointerp.extract import extract, extract_shard, publish_shards
from autointerp.shards import default_shards, shard_bounds

RUN = dict(n_tokens=4096, ctx_len=32, batch_size=8, top_k=6, n_sample=5, pool_size=24, seed=3)
DICT, HOOK = "topk-neurons:12", "resid_pre.0"


def _shards(subject, n_shards: int, out):
    bounds = shard_bounds(RUN["n_tokens"] // RUN["ctx_len"], RUN["batch_size"], n_shards)
    states = [extract_shard(subject, DICT, HOOK, "builtin", windows=b, **RUN) for b in reversed(bounds)]
    return publish_shards(states, out), bounds


def test_shard_bounds_are_whole_batches_and_cover_every_window():
    assert shard_bounds(100, 8, 3) == [(0, 32), (32, 72), (72, 100)]  # 13 batches: 4, 5, 4
    assert shard_bounds(10, 8, 7) == [(0, 8), (8, 10)]  # never an empty shard
    for n, b, s in ((128, 8, 7), (1, 1, 1), (999, 32, 5)):
        bounds = shard_bounds(n, b, s)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a1 == b0 and b0 % b == 0 for (_, a1), (b0, _) in zip(bounds, bounds[1:]))
    assert default_shards(2_500_000) == 3 and default_shards(10) == 1
    with pytest.raises(ConfigError, match="shards"):
        shard_bounds(10, 8, 0)


def test_1_3_and_7_shards_equal_one_process_exactly(subject, tmp_path):
    (one,) = extract(subject, DICT, HOOK, "builtin", tmp_path / "one", progress=False, **RUN)
    # the firing sets, from the embedding matrix: latent j fires on token t iff j is among t's top-12 dims (> 0)
    import torch

    emb = subject.model.get_input_embeddings().weight.detach().float()
    vals, idx = torch.topk(emb, 12, dim=-1)
    fires = torch.zeros_like(emb, dtype=torch.bool).scatter_(1, idx, vals > 0).numpy()  # [vocab, n]
    windows = np.concatenate(list(iter_windows(CorpusSpec("builtin", RUN["ctx_len"], RUN["n_tokens"], RUN["seed"]),
                                               subject.tokenizer, 64)))
    special = np.isin(windows, list(subject.tokenizer.all_special_ids))
    counted = fires[windows[~special]].sum(0)
    assert np.array_equal(one.stats["n_active"], counted)  # the oracle holds for the one-process run
    for n_shards in (1, 3, 7):
        merged, bounds = _shards(subject, n_shards, tmp_path / f"s{n_shards}")
        assert len(bounds) == n_shards
        for name in ARRAYS:
            a, b = np.asarray(one.array(name)), np.asarray(merged.array(name))
            assert a.dtype == b.dtype and np.array_equal(a, b), (n_shards, name)
        for k in ("n_active", "act_max", "act_sum"):
            assert np.array_equal(one.stats[k], merged.stats[k]), (n_shards, k)
        assert merged.n_tokens == one.n_tokens and merged.manifest["n_windows"] == one.manifest["n_windows"]
        # no kept window outside the latent's true firing set, and its max is the true max there
        for latent in one.alive_latents()[::7]:
            for buf in ("top", "sample"):
                rows, acts = merged.kept(buf, int(latent))
                toks = merged.windows(rows)
                assert all(fires[t[a > 0], latent].all() and (a > 0).any() for t, a in zip(toks, acts))


def test_shards_of_different_runs_are_refused(subject):
    a = extract_shard(subject, DICT, HOOK, "builtin", windows=(0, 64), **RUN)
    b = extract_shard(subject, DICT, HOOK, "builtin", windows=(64, 128), **{**RUN, "seed": 4})
    with pytest.raises(ConfigError, match="different extractions"):
        publish_shards([a, b], "/nonexistent/never-written")
    with pytest.raises(ConfigError, match="batch boundary"):
        extract_shard(subject, DICT, HOOK, "builtin", windows=(3, 64), **RUN)
