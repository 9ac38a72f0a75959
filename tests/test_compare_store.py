"""Comparing two dictionaries of the store by each method, on two dictionaries extracted in one pass."""

from __future__ import annotations

import pytest

from autointerp.compare import compare
from autointerp.errors import ConfigError
from autointerp.extract import extract
from autointerp.jobs import run, submit
from autointerp.store import open_store


@pytest.fixture(scope="module")
def pair(subject, tmp_path_factory):
    """Top-8 and top-16 sparsified MLP neurons of one layer, one forward pass (same pool windows)."""
    out = tmp_path_factory.mktemp("pair")
    return extract(subject, ["topk-neurons:8", "topk-neurons:16"], "mlp_neurons.2", "builtin", out, n_tokens=4096,
                   ctx_len=32, batch_size=16, top_k=10, n_sample=10, pool_size=64, progress=False)


def test_three_methods_on_related_dictionaries(pair, store_url):
    store = open_store()
    a, b = (store.register_cache(c) for c in pair)
    with pytest.raises(ConfigError, match="has no explanations"):
        compare(store, a["name"], b["name"], "embedding")
    for d in (a, b):
        run(store, submit(store, {"dictionary": d["cache_path"], "latents": "0-299", "explainer": "token_frequency",
                                  "scorers": [], "hard_negatives": False}), progress=False)
    # decoders: both are the identity over the same neurons, so every latent is shared with itself
    r = compare(store, a["name"], b["name"], "decoder")
    assert r["summary"]["shared_fraction"] == pytest.approx(1.0) and r["method"] == "decoder"
    assert all(x == y for x, y, _ in r["result"]["decoder"]["pairs"][:50])
    # activations over the shared pool: a neuron's top-8 and top-16 codes co-vary
    act = compare(store, a["name"], b["name"], "activation")
    pairs = act["result"]["pairs"]
    assert act["summary"]["matched_fraction_a"] > 0.3
    same = sum(x == y for x, y, s in pairs if s > 0.7)
    assert same >= 0.8 * sum(s > 0.7 for _, _, s in pairs)  # 64 windows: rare neurons tie
    # beside the matching, the codes as wholes: linear CKA over the same pool windows, high for top-8 vs top-16
    from autointerp.compare import _pool_codes
    from autointerp.similarity import linear_cka

    (_, ca), (_, cb) = _pool_codes(store, a), _pool_codes(store, b)
    assert act["summary"]["cka"] == pytest.approx(linear_cka(ca, cb)) and act["summary"]["cka"] > 0.5
    # explanations: token-frequency texts of the same neuron are alike
    emb = compare(store, a["name"], b["name"], "embedding")
    assert emb["summary"]["explained_a"] > 10 and emb["result"]["pairs"]
    hi = [(x, y) for x, y, s in emb["result"]["pairs"] if s > 0.95]
    assert hi and sum(x == y for x, y in hi) >= 0.5 * len(hi)
    # stored, and read back by id
    from sqlalchemy import func, select

    from autointerp.store.tables import Comparison

    with store.tx() as conn:
        assert conn.execute(select(func.count()).select_from(Comparison.__table__)).scalar_one() == 3
    with pytest.raises(ConfigError, match="method 'nope'"):
        compare(store, a["name"], b["name"], "nope")
    with pytest.raises(ConfigError, match="unknown dictionary 'zzz'"):
        compare(store, "zzz", b["name"])
