"""Examples in the store: a worker on a machine that has never seen the extraction's cache folder explains, scores,
serves the latent page and exports from the store's rows alone."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from llm_server_fixture import start_llm_server

from autointerp.cache import LatentCache
from autointerp.jobs import run, submit
from autointerp.sampling import SamplingConfig
from autointerp.store import open_store
from autointerp.store.examples import StoredCache, open_examples, pack_latent, unpack_latent

SMALL_SAMPLING = SamplingConfig(n_explain=5, n_test=10, n_negatives=10, n_explain_negatives=0, min_explain=3,
                                min_test=4, min_negatives=4)
FAST_LLM = {"api_key_env": None, "response_cache": False, "max_retries": 1, "backoff_base_s": 0.01}


def _copy(cache: LatentCache, tmp_path) -> LatentCache:
    dst = tmp_path / "cache"
    shutil.copytree(cache.path, dst)
    return LatentCache(dst)


def _same_examples(a, b) -> None:
    assert np.array_equal(a.window_ids, b.window_ids)
    assert np.array_equal(a.tokens, b.tokens) and a.tokens.dtype == b.tokens.dtype == np.int32
    assert np.array_equal(a.acts, b.acts)


def test_stored_examples_read_back_exactly_as_the_folder(small_cache, tmp_path, store_url):
    folder = _copy(small_cache, tmp_path)
    store = open_store()
    row = store.register_cache(folder)
    assert row["examples_in_store"] and row["manifest"]["n_tokens"] == folder.n_tokens
    stored = StoredCache(store, row)
    alive = folder.alive_latents()
    assert np.array_equal(stored.alive_latents(), alive)
    dead = int(np.setdiff1d(np.arange(folder.n_latents), alive)[0]) if len(alive) < folder.n_latents else None
    for latent in [int(i) for i in alive[:: max(1, len(alive) // 40)]] + ([dead] if dead is not None else []):
        a, b = folder.record(latent), stored.record(latent)
        for part in ("top", "sample", "negatives"):
            _same_examples(getattr(a, part), getattr(b, part))
        assert (a.stats.n_active, a.stats.max_act, a.stats.n_tokens) == \
            (b.stats.n_active, pytest.approx(b.stats.max_act), b.stats.n_tokens)
        assert np.array_equal(a.stats.hist_counts, b.stats.hist_counts)
        assert np.allclose(a.stats.hist_edges, b.stats.hist_edges)
    p1, p2 = folder.pool(), stored.pool()
    assert all(np.array_equal(np.asarray(p1[k]), p2[k]) for k in p1)
    # the folder is preferred while it is there; the store once it is gone
    assert isinstance(open_examples(row, store), LatentCache)
    shutil.rmtree(folder.path)
    assert isinstance(open_examples(row, store), StoredCache)


def test_pack_round_trip_keeps_long_windows_positions():
    rng = np.random.default_rng(0)
    parts = {b: (rng.integers(0, 99, 7).astype(np.int32), rng.random(7).astype(np.float32),
                 np.full(7, 3, np.uint16), rng.integers(0, 400, 21).astype(np.uint16),
                 rng.integers(1, 256, 21).astype(np.uint8)) for b in ("top", "sample")}
    back = unpack_latent(pack_latent(parts, ctx_len=512), ctx_len=512)
    for b in parts:
        for x, y in zip(parts[b], back[b]):
            assert np.array_equal(x, y)


def test_a_worker_without_the_cache_folder_explains_scores_serves_and_exports(small_cache, tmp_path, monkeypatch):
    """The extraction folder deleted after a first job: a second job (another scorer), run from another working
    directory, completes from the store; the latent page and the delphi export still show the examples."""
    from autointerp.api import runtime
    from autointerp.exports import export_delphi

    folder = _copy(small_cache, tmp_path)
    store = open_store()
    latents = [int(i) for i in folder.alive_latents()[:3]]
    spec = {"dictionary": str(folder.path), "latents": latents, "scorers": ["detection"],
            "sampling": dataclasses.asdict(SMALL_SAMPLING), "hard_negatives": True, "llm": FAST_LLM}
    with start_llm_server(judge="judges:rule_judge", models=["judge"]) as srv:
        spec["explainer_model"] = f"openai:judge@{srv.base_url}"
        first = run(store, submit(store, spec), progress=False)
        assert first.status == "done"
        name = store.dictionary(str(folder.path))["name"]
        shutil.rmtree(folder.path)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        from autointerp.jobs.context import _CONTEXTS

        _CONTEXTS.clear()  # a fresh worker process: nothing loaded from the folder before
        second = run(store, submit(store, {**spec, "dictionary": name, "scorers": ["fuzzing"]}), progress=False)
        assert second.status == "done" and second.latents_failed == 0
        assert second.latents_done + second.latents_skipped == len(latents)
    d = store.dictionary(name)
    with store.tx() as conn:
        from sqlalchemy import select

        from autointerp.store.tables import Score

        scorers = set(conn.execute(select(Score.__table__.c.scorer)).scalars())
    assert scorers == {"detection", "fuzzing"}
    ex = runtime.latent_examples(d, latents[0], store=store)
    assert ex is not None and ex["top"] and ex["top"][0]["tokens"] and max(ex["top"][0]["acts"]) > 0
    out = export_delphi(store, name, tmp_path / "delphi")
    records = [r for f in (out / "scores").rglob("*.txt") for r in __import__("json").loads(f.read_text())]
    assert records and all(r["str_tokens"] for r in records if "str_tokens" in r)
    assert any(r.get("str_tokens") for r in records)
